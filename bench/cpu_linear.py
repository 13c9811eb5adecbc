"""CPU speed of a frozen QLinear against ``F.linear`` in float32, bfloat16 and float16, at the shape of a Llama-3-8B
MLP up-projection (4096 -> 14336), at M=1 (decode) and M=32, with 2 threads; each layer is also compared with the
float layer of its own activation dtype (``speedup_vs_same_dtype``).

Every configuration is timed in the same run on the same weight and input, in interleaved rounds (one call of each
configuration per round, so a burst of load from another process hits all of them alike); the JSON keeps the
median and the quartiles of each. Optional columns for optimum-quanto and torchao appear when they import.

    python bench/cpu_linear.py                          # bench/results/cpu_linear-<kind>.json, .png
    python bench/cpu_linear.py --quick --output-dir /tmp/out
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from plot import machine_info, save_report  # bench/plot.py, next to this script
from torch import nn

from quanto_backend import freeze, quantize
from quanto_backend.ops.cpu import cpu_kind

RESULTS = Path(__file__).parent / "results"

Forward = Callable[[], torch.Tensor]


def _qlinear(linear: nn.Linear, dtype: torch.dtype, **config) -> nn.Module:
    model = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(linear.weight)
    quantize(model, **config)
    freeze(model)
    return model


def _optional_configs(linear: nn.Linear, x: torch.Tensor) -> dict[str, Forward]:
    """optimum-quanto and torchao on the same weight, when installed (each skipped if it does not import)."""
    configs: dict[str, Forward] = {}
    try:
        import optimum.quanto as oq

        for name, qtype in (("int8", oq.qint8), ("int4", oq.qint4)):
            model = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=False)).bfloat16()
            with torch.no_grad():
                model[0].weight.copy_(linear.weight)
            oq.quantize(model, weights=qtype)
            oq.freeze(model)
            configs[f"optimum-quanto {name} (bf16 act)"] = lambda m=model: m(x.bfloat16())
    except ImportError:
        pass
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # torchao 0.18 has no CPU int4 weight-only layout any more; its int8 weight-only runs eagerly here.
        model = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=False)).bfloat16()
        with torch.no_grad():
            model[0].weight.copy_(linear.weight)
        quantize_(model, Int8WeightOnlyConfig())
        configs["torchao int8 (bf16 act)"] = lambda m=model: m(x.bfloat16())
    except ImportError:
        pass
    return configs


def build_configs(in_features: int, out_features: int, m: int, optional: bool) -> dict[str, Forward]:
    """Every configuration as a zero-argument forward on the same weight and input."""
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    w32, w16, wh = linear.weight.detach(), linear.weight.detach().bfloat16(), linear.weight.detach().half()
    x = torch.randn(m, in_features)
    x16, xh = x.bfloat16(), x.half()
    # int4 uses the min-max optimizer only to keep the benchmark short: the kernel's speed does not depend on it.
    int4 = {"weights": "int4", "group_size": 128, "optimizer": "minmax"}
    w8a8 = {"weights": "int8", "activations": "int8", "activation_scales": "dynamic"}
    models = {
        "int8 QLinear (fp32 act)": (_qlinear(linear, torch.float32, weights="int8"), x),
        "int8 QLinear (bf16 act)": (_qlinear(linear, torch.bfloat16, weights="int8"), x16),
        "int4 QLinear (fp32 act)": (_qlinear(linear, torch.float32, **int4), x),
        "int4 QLinear (bf16 act)": (_qlinear(linear, torch.bfloat16, **int4), x16),
        "int8 QLinear (fp16 act)": (_qlinear(linear, torch.float16, weights="int8"), xh),
        "int4 QLinear (fp16 act)": (_qlinear(linear, torch.float16, **int4), xh),
        "W8A8 QLinear (fp32 act, dynamic)": (_qlinear(linear, torch.float32, **w8a8), x),
    }
    configs: dict[str, Forward] = {
        "float32 F.linear": lambda: F.linear(x, w32),
        "bfloat16 F.linear": lambda: F.linear(x16, w16),
        "float16 F.linear": lambda: F.linear(xh, wh),
    }
    configs.update({name: (lambda m=model, inp=inp: m(inp)) for name, (model, inp) in models.items()})
    if optional:
        configs.update(_optional_configs(linear, x))
    return configs


@torch.no_grad()
def time_interleaved(configs: dict[str, Forward], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each configuration, one call of each per round, in a new random order each round.

    Each call reads its own weight, which does not fit in the last-level cache, so every call streams it from
    memory as a model's decode does. The order is shuffled because a call is measurably slower right after a
    large float32 matmul; a fixed order would always charge that to the same configuration.
    """
    for fn in configs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in configs}
    order = list(configs)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            configs[name]()
            times[name].append(time.perf_counter() - start)
    return times


# The activation dtypes of the configurations' names ("int8 QLinear (bf16 act)"), and the float layers of each.
_ACT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _float_of(config: str) -> str:
    """The float dtype a configuration is compared with: its activations' ("int8 QLinear (bf16 act)": bfloat16)."""
    if config.endswith("F.linear"):
        return config.removesuffix(" F.linear")
    return next((full for short, full in _ACT_DTYPES.items() if f"({short} act" in config), "bfloat16")


def run(in_features: int, out_features: int, ms: list[int], rounds: int, threads: int, optional: bool) -> dict:
    torch.set_num_threads(threads)
    machine = machine_info()
    rows = []
    for m in ms:
        configs = build_configs(in_features, out_features, m, optional)
        times = time_interleaved(configs, rounds)
        floats = {dtype: statistics.median(times[f"{dtype} F.linear"]) for dtype in _ACT_DTYPES.values()}
        base32, base16 = floats["float32"], floats["bfloat16"]
        for name, ts in times.items():
            q1, med, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
            med = statistics.median(ts)
            rows.append(
                {
                    "config": name,
                    "m": m,
                    "median_ms": med * 1e3,
                    "q1_ms": q1 * 1e3,
                    "q3_ms": q3 * 1e3,
                    "min_ms": min(ts) * 1e3,
                    "speedup_vs_float32": base32 / med,
                    "speedup_vs_bfloat16": base16 / med,
                    # against the float layer of its activation dtype (what the targets compare)
                    "speedup_vs_same_dtype": floats[_float_of(name)] / med,
                }
            )
            print(
                f"M={m:<4} {name:<36} {med * 1e3:9.2f} ms  x{base32 / med:5.2f} vs fp32  x{base16 / med:5.2f} vs bf16"
            )
    machine["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "benchmark": "cpu_linear",
        "in_features": in_features,
        "out_features": out_features,
        "threads": threads,
        "rounds": rounds,
        "machine": machine,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=14336)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 32], help="rows of activations")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds (median and quartiles kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-optional", action="store_true", help="skip optimum-quanto and torchao")
    parser.add_argument("--quick", action="store_true", help="a 256 -> 512 layer, M=1 and 4, 3 rounds")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.in_features, args.out_features, args.m, args.rounds = 256, 512, [1, 4], 3
    report = run(args.in_features, args.out_features, args.m, args.rounds, args.threads, not args.no_optional)
    name = f"cpu_linear-{cpu_kind().lower()}.json"
    save_report(report, args.output_dir / name, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
