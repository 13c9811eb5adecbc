"""Benchmark of the quantized linear kernels against ``torch.nn.functional.linear`` on the same device, same run.

For every weight qtype (int8, int4, int2, float8) and activation mode (weight-only, W8A8 int8, float8 x float8)
at Llama-3-8B shapes (in x out: 4096x4096, 4096x14336, 14336x4096, 4096x128256) and M in {1, 16, 128, 2048}, it
times the quantized op and a bf16 ``F.linear`` (CUDA events around a CUDA graph of several calls, after warmup;
median of repeats), and reports the speedup and the achieved bandwidth (bytes read and written / time) as a
fraction of the device's peak memory bandwidth. It also measures the bandwidth of quantizing a weight on the GPU.

Without a GPU (or with ``--device cpu``) it runs a small CPU variant against float32 and bfloat16 ``F.linear``;
``--quick`` shrinks either run to a few shapes. Results go to ``bench/results/kernel_speed-<device>.json``, and its
chart next to it.

    python bench/kernel_speed.py                 # GPU: full grid
    python bench/kernel_speed.py --quick --device cpu --output /tmp/k.json
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from plot import machine_info, save_report  # bench/plot.py, next to this script

from quanto_backend import ops

LLAMA3_8B_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256))
M_VALUES = (1, 16, 32, 128, 2048)  # 32 and 128: one row of output tiles, split along K
QUICK_GPU_SHAPES = ((4096, 4096),)
QUICK_M_VALUES = (1, 16, 128)
CPU_SHAPES = ((1024, 1024), (1024, 4096))
QUICK_CPU_SHAPES = ((256, 512),)
CPU_M_VALUES = (1, 16, 128)
QUICK_CPU_M_VALUES = (1, 16)
GROUP_SIZE = 128
# (weight qtype, activation mode): the combinations quanto_backend supports.
CASES = (
    ("int8", "weight-only"),
    ("int4", "weight-only"),
    ("int2", "weight-only"),
    ("float8", "weight-only"),
    ("int8", "w8a8-int8"),
    ("float8", "fp8xfp8"),
)

LinearFn = Callable[[torch.Tensor], torch.Tensor]


def _affine(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = w.float().unflatten(-1, (-1, GROUP_SIZE))
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-6)
    shift = -lo / scale
    scale, shift = scale.to(w.dtype), shift.to(w.dtype)
    return ops.quantize_affine(w, scale, shift, bits), scale, shift


def build_case(qtype: str, mode: str, w: torch.Tensor) -> tuple[LinearFn, Callable[[], object], int]:
    """The quantized linear ``x -> y`` of a float weight ``w [out, in]`` (quantized on its device), the call that
    quantizes ``w`` (timed for the quantize bandwidth), and the bytes the quantized weight occupies."""
    act_dtype = w.dtype
    if qtype in ("int4", "int2"):
        bits = 4 if qtype == "int4" else 2
        packed, scale, shift = _affine(w, bits)
        nbytes = packed.numel() + 2 * scale.numel() * scale.element_size()
        return (
            (lambda x: ops.linear_affine(x, packed, scale, shift, bits, None)),
            (lambda: ops.quantize_affine(w, scale, shift, bits)),
            nbytes,
        )
    wdtype = torch.int8 if qtype == "int8" else torch.float8_e4m3fn
    w_q, w_scale = ops.quantize_per_token(w, wdtype)
    nbytes = w_q.numel() + w_scale.numel() * 4

    def quantize() -> object:
        return ops.quantize_per_token(w, wdtype)

    if mode == "weight-only":
        w_scale = w_scale.to(act_dtype)
        return (lambda x: ops.linear_w8(x, w_q, w_scale, None)), quantize, nbytes

    def quantized_activations(x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = ops.quantize_per_token(x, wdtype)
        return ops.linear_a8w8(x_q, x_scale, w_q, w_scale, None, act_dtype)

    return quantized_activations, quantize, nbytes


def _time_cuda(fn: Callable[[], object], repeats: int, calls_per_graph: int = 10) -> tuple[float, str]:
    """Median milliseconds per call. Calls are replayed from a CUDA graph so that Python's launch overhead does not
    hide the kernel time; if capture fails, eager calls are timed instead."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                fn()
        run, per_run, how = graph.replay, calls_per_graph, "cuda-graph"
    except RuntimeError:
        run, per_run, how = fn, 1, "eager"
    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_run)
    return statistics.median(times), how


def _time_cpu(fn: Callable[[], object], repeats: int) -> tuple[float, str]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), "wall-clock"


def peak_bandwidth_gbps(device: torch.device, override: float | None) -> float | None:
    """The device's peak memory bandwidth in GB/s: ``--peak-gbps``, else memory clock x bus width x 2 (DDR)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return None


def device_label(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def run(device: torch.device, quick: bool, repeats: int, peak_gbps: float | None) -> dict:
    """Runs the benchmark grid on ``device`` and returns the JSON-ready results."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        import quanto_backend.ops.cuda  # noqa: F401  (registers the kernels if ops/__init__ does not)

        shapes, m_values = (QUICK_GPU_SHAPES, QUICK_M_VALUES) if quick else (LLAMA3_8B_SHAPES, M_VALUES)
        baselines = (torch.bfloat16,)
        timer = _time_cuda
    else:
        shapes, m_values = (QUICK_CPU_SHAPES, QUICK_CPU_M_VALUES) if quick else (CPU_SHAPES, CPU_M_VALUES)
        baselines = (torch.float32, torch.bfloat16)
        timer = _time_cpu
    fp8_ok = not on_gpu or torch.cuda.get_device_capability(device) >= (8, 9)
    generator = torch.Generator(device=device).manual_seed(0)
    results, quantize_results = [], []
    for k, n in shapes:
        w = torch.randn(n, k, device=device, generator=generator, dtype=torch.bfloat16)
        for qtype, mode in CASES:
            if mode == "fp8xfp8" and not fp8_ok:
                continue
            fn, quantize, weight_bytes = build_case(qtype, mode, w)
            if mode == "weight-only":
                quantize_ms, _ = timer(quantize, repeats)
                quantize_results.append(
                    {
                        "qtype": qtype,
                        "in_features": k,
                        "out_features": n,
                        "time_ms": quantize_ms,
                        "gbps": (w.numel() * w.element_size() + weight_bytes) / quantize_ms / 1e6,
                    }
                )
            for m in m_values:
                x = torch.randn(m, k, device=device, generator=generator, dtype=torch.bfloat16)
                ms, how = timer(lambda fn=fn, x=x: fn(x), repeats)
                moved = m * k * 2 + weight_bytes + m * n * 2
                row = {
                    "qtype": qtype,
                    "mode": mode,
                    "in_features": k,
                    "out_features": n,
                    "m": m,
                    "time_ms": ms,
                    "timing": how,
                    "bytes": moved,
                    "gbps": moved / ms / 1e6,
                }
                if peak_gbps:
                    row["peak_fraction"] = row["gbps"] / peak_gbps
                speedups = []
                for dtype in baselines:
                    wb, xb = w.to(dtype), x.to(dtype)
                    base_ms, _ = timer(lambda wb=wb, xb=xb: F.linear(xb, wb), repeats)
                    name = str(dtype).removeprefix("torch.")
                    row[f"{name}_linear_ms"] = base_ms
                    row[f"speedup_vs_{name}"] = base_ms / ms
                    speedups.append(f"x{base_ms / ms:.2f} vs {name}")
                results.append(row)
                peak = f"  {row['peak_fraction']:.0%} of peak" if "peak_fraction" in row else ""
                print(f"{qtype:>6} {mode:<11} {k:>6}x{n:<6} M={m:<5} {ms * 1e3:9.1f} us  {', '.join(speedups)}{peak}")
        del w
    return {
        "benchmark": "kernel_speed",
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "peak_gbps": peak_gbps,
        "quick": quick,
        "group_size": GROUP_SIZE,
        "linear": results,
        "quantize": quantize_results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median kept)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth, if torch lacks it")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    report = run(device, args.quick, args.repeats, peak_bandwidth_gbps(device, args.peak_gbps))
    output = args.output or Path(__file__).parent / "results" / f"kernel_speed-{device_label(device)}.json"
    save_report(report, output, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
