"""How many bytes of weights the CPU dequantizing path should convert at a time: for each layer shape, activation
dtype and number of rows, the time of ``linear_w8``'s dequantizing path (int8 weights, no packed kernel, no sliced
``torch._int_mm``) at several block sizes, next to ``F.linear`` on the float weight.

``_BLOCK_BYTES`` in ``quanto_backend/ops/cpu.py`` (one entry per CPU kind, ``cpu_kind()``) is fitted to this: the
JSON keeps every timing, and per block size the geometric mean of its time over the best block size's.

    python bench/cpu_blocks.py                  # bench/results/cpu_blocks-<kind>.json
    python bench/cpu_blocks.py --quick --output-dir /tmp/out
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from plot import machine_info  # bench/plot.py, next to this script

from quanto_backend import ops
from quanto_backend.ops import cpu
from quanto_backend.tensor import quantize_weight

RESULTS = Path(__file__).parent / "results"
SHAPES = ((384, 384), (384, 1536), (1536, 384), (1024, 1024), (2048, 2048), (1024, 4096), (4096, 4096))
ROWS = (16, 64, 256, 1024)
BLOCKS = (1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 40)  # the last: the whole weight at once
MAX_WORK = 4096 * 4096 * 1024


def _label(block_bytes: int) -> str:
    return "whole" if block_bytes >= 1 << 40 else f"{block_bytes >> 10}K"


@contextlib.contextmanager
def _dequantizing_path(block_bytes: int):
    """``linear_w8`` takes the dequantizing path, ``block_bytes`` at a time."""
    saved = cpu.kernel_max_rows, cpu.INT_MM, dict(cpu._BLOCK_BYTES)
    cpu.kernel_max_rows = lambda *_: 0
    cpu.INT_MM = cpu.KernelContract(frozenset(), 1, 1, 1)
    cpu._BLOCK_BYTES[cpu.cpu_kind()] = block_bytes
    try:
        yield
    finally:
        cpu.kernel_max_rows, cpu.INT_MM = saved[:2]
        cpu._BLOCK_BYTES.clear()
        cpu._BLOCK_BYTES.update(saved[2])


def _interleaved_ms(fns: dict, rounds: int, budget_s: float) -> dict:
    """Median over ``rounds`` of each function's mean time in ms; the functions take turns, so that a change of
    load or clock hits them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - start < budget_s:
                fn()
                calls += 1
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _timings(x: torch.Tensor, q, w_float: torch.Tensor, blocks, rounds: int) -> dict[str, float]:
    def blocked(block_bytes: int):
        def call():
            with _dequantizing_path(block_bytes):
                return ops.linear_w8(x, q.qdata, q.scale, None)

        return call

    fns = {"float": lambda: F.linear(x, w_float), **{str(b): blocked(b) for b in blocks}}
    with torch.no_grad():
        return _interleaved_ms(fns, rounds, budget_s=0.03)


def run(shapes, rows_list, blocks, dtypes, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    results = []
    for (in_features, out_features), dtype in itertools.product(shapes, dtypes):
        q = quantize_weight(torch.randn(out_features, in_features) * 0.02, "int8")
        w_float = (q.qdata.float() * q.scale.float()).to(dtype)
        for rows in rows_list:
            if rows * in_features * out_features > MAX_WORK:
                continue
            ms = _timings(torch.randn(rows, in_features).to(dtype), q, w_float, blocks, rounds)
            block_ms = {str(b): ms[str(b)] for b in blocks}
            best = min(block_ms.values())
            ratios = "  ".join(f"{_label(b)} {ms[str(b)] / best:.2f}" for b in blocks)
            name = str(dtype).removeprefix("torch.")
            print(f"{in_features:>5}x{out_features:<5} {name:<8} rows={rows:<5} float {ms['float']:8.3f} ms  {ratios}")
            results.append({"in_features": in_features, "out_features": out_features, "rows": rows, "dtype": name,
                            "float_ms": ms["float"], "block_ms": block_ms})  # fmt: skip
    over_best = {}
    for b in blocks:
        logs = [math.log(r["block_ms"][str(b)] / min(r["block_ms"].values())) for r in results]
        over_best[str(b)] = math.exp(statistics.mean(logs))
    means = "  ".join(f"{_label(b)} {over_best[str(b)]:.3f}" for b in blocks)
    print(f"geometric mean over the best block size: {means}")
    return {"benchmark": "cpu_blocks", "threads": threads, "machine": machine_info(),
            "block_bytes_in_use": cpu._BLOCK_BYTES.get(cpu.cpu_kind(), cpu.DEFAULT_BLOCK_BYTES),
            "geomean_over_best": over_best, "results": results}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two small shapes, two row counts, one round")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    if args.quick:
        report = run(((384, 384), (384, 1536)), (16, 64), (1 << 18, 1 << 40), dtypes, args.threads, 1)
    else:
        report = run(SHAPES, ROWS, BLOCKS, dtypes, args.threads, args.rounds)
    report["command"] = "python bench/cpu_blocks.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = args.output_dir / f"cpu_blocks-{report['machine']['cpu_kind'].lower()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
