"""Where the CPU kernels stop paying: for each layer shape and number of float32 activation rows, the time of the
packed-kernel path and of the exact reference path of ``linear_w8`` (int8) and ``linear_affine`` (int4, group 128).

``quanto_backend.ops.cpu.kernel_max_rows`` is fitted to the crossovers this measures; the JSON keeps, per shape and
weight, the measured crossover (the largest row count up to which every kernel run was faster) next to the bound
in use.

    python bench/cpu_dispatch.py                 # bench/results/cpu_dispatch.json and .png
    python bench/cpu_dispatch.py --quick --output-dir /tmp/out
"""

from __future__ import annotations

import argparse
import contextlib
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
ROWS = (1, 8, 32, 64, 128, 256, 512)
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
def _kernel_rows(bound: int):
    """Every call with up to ``bound`` rows takes the kernel, the others the reference."""
    rule = cpu.kernel_max_rows
    cpu.kernel_max_rows = lambda *_: bound
    try:
        yield
    finally:
        cpu.kernel_max_rows = rule


def run(shapes, rows_list, threads: int) -> dict:
    torch.set_num_threads(threads)
    results = []
    for in_features, out_features in shapes:
        w = torch.randn(out_features, in_features) * 0.02
        weights = {
            "int8": (quantize_weight(w, "int8"), 8),
            "int4": (quantize_weight(w, "int4", group_size=128, optimizer="minmax"), 4),
        }
        for name, (q, bits) in weights.items():
            timings = []
            for rows in rows_list:
                if rows * in_features * out_features > MAX_WORK:
                    continue
                x = torch.randn(rows, in_features)
                if bits == 8:
                    fn = lambda x=x, q=q: ops.linear_w8(x, q.qdata, q.scale, None)  # noqa: E731
                else:
                    fn = lambda x=x, q=q: ops.linear_affine(x, q.qdata, q.scale, q.shift, 4, None)  # noqa: E731
                with torch.no_grad(), _kernel_rows(sys.maxsize):
                    kernel = _median_ms(fn)
                with torch.no_grad(), _kernel_rows(0):
                    reference = _median_ms(fn)
                timings.append({"rows": rows, "kernel_ms": kernel, "reference_ms": reference})
                print(
                    f"{in_features:>5}x{out_features:<6} {name} rows={rows:<4} kernel {kernel:9.3f} ms  "
                    f"reference {reference:9.3f} ms"
                )
            crossover = 0  # the kernel was faster at every measured row count up to this one
            for t in timings:
                if t["kernel_ms"] >= t["reference_ms"]:
                    break
                crossover = t["rows"]
            results.append(
                {
                    "in_features": in_features,
                    "out_features": out_features,
                    "weights": name,
                    "timings": timings,
                    "measured_crossover_rows": crossover,
                    "kernel_max_rows": cpu.kernel_max_rows(out_features, in_features, bits),
                }
            )
    return {"benchmark": "cpu_dispatch", "threads": threads, "machine": machine_info(), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two small shapes, three row counts")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shapes, rows = (((384, 384), (384, 1536)), (1, 32, 256)) if args.quick else (SHAPES, ROWS)
    report = run(shapes, rows, args.threads)
    save_report(report, args.output_dir / "cpu_dispatch.json", __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
