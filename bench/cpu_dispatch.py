"""Where the CPU kernels stop paying: for each layer shape, activation dtype and number of rows, the time of the
packed-kernel path and of the other paths of ``linear_w8`` (int8: the sliced ``torch._int_mm`` path where its
contract holds, and the dequantizing path) and ``linear_affine`` (int4, group 128: the dequantizing path), and of
``_weight_int8pack_mm`` against the exact path for int8 x int8 (``linear_a8w8``: ``torch._int_mm`` where its
contract holds, else float32 matmuls of the codes, with ``torch._int_mm`` timed alone as ``int_mm_ms``).

The row bounds in ``quanto_backend/ops/cpu.py`` (``_ROW_BOUNDS``, ``_SLICED_BOUNDS`` and ``A8W8_INT8PACK_MAX_ROWS``,
one entry per CPU kind, ``cpu_kind()``) are fitted to the crossovers this measures; the JSON keeps, per shape,
weight and dtype, the measured crossover (the largest row count up to which every kernel run was faster than the
path taken beyond the bound) next to the bound in use, and the CPU kind it ran on.

    python bench/cpu_dispatch.py                 # bench/results/cpu_dispatch-<kind>.json and .png
    python bench/cpu_dispatch.py --quick --output-dir /tmp/out
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from plot import machine_info, save_report  # bench/plot.py, next to this script

from quanto_backend import ops
from quanto_backend.ops import cpu
from quanto_backend.tensor import quantize_weight

RESULTS = Path(__file__).parent / "results"
SHAPES = ((384, 384), (384, 1536), (1536, 384), (1024, 1024), (2048, 2048), (4096, 4096), (4096, 14336))
ROWS = (1, 4, 8, 16, 32, 64, 128, 256, 512)  # 4 and 16: each side of the sliced path's kernel_rows and bf16 bound
MAX_WORK = 4096 * 14336 * 256  # skips the slowest (shape, rows) pairs: rows * in * out above this


def _median_ms(fn: Callable[[], object], budget_s: float = 0.3) -> float:
    fn()
    start = time.perf_counter()
    fn()
    calls = max(3, min(50, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def _without_int_mm():
    """``linear_w8`` beyond the kernel's rows takes the dequantizing path instead of the sliced ``_int_mm`` one."""
    contract = cpu.INT_MM
    cpu.INT_MM = cpu.KernelContract(frozenset(), 1, 1, 1)
    try:
        yield
    finally:
        cpu.INT_MM = contract


@contextlib.contextmanager
def _sliced_everywhere():
    """``linear_w8`` beyond the kernel's rows takes the sliced ``_int_mm`` path at every layer size and row count."""
    bounds = dict(cpu._SLICED_BOUNDS)
    cpu._SLICED_BOUNDS[cpu.cpu_kind()] = cpu.SlicedBound(min_weights=0, kernel_rows=0, bfloat16_max_rows=sys.maxsize)
    try:
        yield
    finally:
        cpu._SLICED_BOUNDS.clear()
        cpu._SLICED_BOUNDS.update(bounds)


@contextlib.contextmanager
def _kernel_rows(bound: int):
    """Every call with up to ``bound`` rows takes the packed kernel, the others the dequantizing path (int8 x int8:
    ``_weight_int8pack_mm`` up to ``bound`` rows, ``torch._int_mm`` beyond)."""
    rule, a8w8 = cpu.kernel_max_rows, dict(cpu.A8W8_INT8PACK_MAX_ROWS)
    cpu.kernel_max_rows = lambda *_: bound
    cpu.A8W8_INT8PACK_MAX_ROWS[cpu.cpu_kind()] = bound
    try:
        yield
    finally:
        cpu.kernel_max_rows = rule
        cpu.A8W8_INT8PACK_MAX_ROWS.clear()
        cpu.A8W8_INT8PACK_MAX_ROWS.update(a8w8)


def _call(name: str, q, x: torch.Tensor):
    if name == "int8":
        return lambda: ops.linear_w8(x, q.qdata, q.scale, None)
    if name == "int4":
        return lambda: ops.linear_affine(x, q.qdata, q.scale, q.shift, 4, None)
    x_q, x_scale = ops.quantize_per_token(x, torch.int8)  # W8A8: the activations quantized once, outside the timing
    return lambda: ops.linear_a8w8(x_q, x_scale, q.qdata, q.scale, None, torch.float32)


def run(shapes, rows_list, threads: int, dtypes) -> dict:
    torch.set_num_threads(threads)
    results = []
    for in_features, out_features in shapes:
        w = torch.randn(out_features, in_features) * 0.02
        weights = {
            "int8": (quantize_weight(w, "int8"), 8),
            "int4": (quantize_weight(w, "int4", group_size=128, optimizer="minmax"), 4),
            "w8a8": (quantize_weight(w, "int8"), 8),
        }
        for (name, (q, bits)), dtype in itertools.product(weights.items(), dtypes):
            if name == "w8a8" and dtype != torch.float32:
                continue  # int8 x int8: the activation dtype only changes the cast of the output
            timings = []
            for rows in rows_list:
                if rows * in_features * out_features > MAX_WORK:
                    continue
                fn = _call(name, q, torch.randn(rows, in_features).to(dtype))
                with torch.no_grad(), _kernel_rows(sys.maxsize):
                    kernel = _median_ms(fn)
                with torch.no_grad(), _kernel_rows(0):
                    other = _median_ms(fn)  # the path the dispatch takes beyond the kernel's rows
                    timing = {"rows": rows, "kernel_ms": kernel, "other_ms": other, "dequantized_ms": other}
                    if name == "w8a8" and not cpu.INT_MM.holds():  # what torch._int_mm would cost here
                        x_q = ops.quantize_per_token(torch.randn(rows, in_features), torch.int8)[0]
                        timing["int_mm_ms"] = _median_ms(lambda: torch._int_mm(x_q, q.qdata.t()))  # noqa: B023
                    if name == "int8" and cpu.INT_MM.holds():
                        with _without_int_mm():
                            timing["dequantized_ms"] = _median_ms(fn)
                        with _sliced_everywhere():
                            timing["sliced_ms"] = _median_ms(fn)
                timings.append(timing)
                dequantized = timing["dequantized_ms"]
                print(
                    f"{in_features:>5}x{out_features:<6} {name} {str(dtype)[6:]:<8} rows={rows:<4} "
                    f"kernel {kernel:9.3f} ms  other path {other:9.3f} ms  dequantized {dequantized:9.3f} ms"
                )
            crossover = 0  # the kernel was faster at every measured row count up to this one
            for t in timings:
                if t["kernel_ms"] >= t["other_ms"]:
                    break
                crossover = t["rows"]
            bound = (
                min(cpu.a8w8_kernel_max_rows(out_features, in_features), max(rows_list))
                if name == "w8a8"
                else cpu.kernel_max_rows(out_features, in_features, bits, dtype)
            )
            results.append(
                {
                    "in_features": in_features,
                    "out_features": out_features,
                    "weights": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "timings": timings,
                    "measured_crossover_rows": crossover,
                    "kernel_max_rows": bound,
                }
            )
    return {"benchmark": "cpu_dispatch", "threads": threads, "machine": machine_info(), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two small shapes, three row counts")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shapes, rows = (((384, 384), (384, 1536)), (1, 32, 256)) if args.quick else (SHAPES, ROWS)
    report = run(shapes, rows, args.threads, [getattr(torch, d) for d in args.dtypes])
    name = f"cpu_dispatch-{report['machine']['cpu_kind'].lower()}.json"
    save_report(report, args.output_dir / name, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
