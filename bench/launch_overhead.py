"""Host cost of one kernel launch's argument packing, on CPU (no GPU needed).

Times, interleaved in one run, the packing of the GEMV/GEMM argument list (7 pointers and 12 ints) two ways:
``one_buffer``, what :mod:`quanto_backend.kernels.launch` does (one ``struct.pack_into`` into a per-thread buffer
passed through ``cuLaunchKernel``'s ``extra``), and ``per_argument``, the previous method (a ctypes object per
argument and an array of their addresses for ``kernelParams``), kept here only as the baseline. It also times the
whole ``launch()`` call against a stub driver that does nothing, which adds the function lookup and the
context/stream checks (with torch.cuda replaced by stubs: the real ``torch.cuda.current_stream`` adds its own
cost on a GPU machine, not measured here).

    python bench/launch_overhead.py                       # bench/results/launch_overhead-cpu.json
    python bench/launch_overhead.py --quick --output /tmp/launch.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import timeit
import types
from pathlib import Path

import torch
from plot import machine_info  # bench/plot.py, next to this script

import quanto_backend.kernels  # noqa: F401  (loads the launch module)
from quanto_backend.kernels import driver as driver_module
from quanto_backend.kernels import loader

launch_module = sys.modules["quanto_backend.kernels.launch"]
RESULTS = Path(__file__).parent / "results"


def _per_argument(args) -> int:
    """The previous packing: one ctypes scalar per argument and an array of their addresses."""
    values = []
    for a in args:
        if isinstance(a, torch.Tensor):
            values.append(ctypes.c_uint64(a.data_ptr()))
        elif a is None:
            values.append(ctypes.c_uint64(0))
        elif isinstance(a, launch_module.Int64):
            values.append(ctypes.c_int64(int(a)))
        elif isinstance(a, int):
            values.append(ctypes.c_int32(a))
        else:
            values.append(ctypes.c_float(a))
    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    return ctypes.addressof(params)


def _one_buffer(args) -> int:
    return ctypes.addressof(launch_module.pack_args(args)[2])


class _StubDriver:
    def primary_context(self, index):
        return 1

    def current_context(self):
        return 1

    def launch(self, *args, **kwargs):
        pass


def _us(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def run(number: int, repeat: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    t = [torch.empty(16) for _ in range(7)]
    args = (*t[:3], None, t[4], t[5], t[6], 1, 4096, 4096, 4096, 32, 128, 0, 2, 0, 2, 1, 1)
    source, entry = loader.matmul_entry_point("gemv", 2, 3)
    device = torch.device("cuda", 0)
    loader._functions[(source, entry, 0)] = 1234  # the handle a real first use would have cached
    stubs = {
        "current_device": lambda: 0,
        "current_stream": lambda index=None: types.SimpleNamespace(cuda_stream=0),
    }
    saved = {name: getattr(torch.cuda, name) for name in stubs}
    saved_driver = driver_module.driver
    timings = {"per_argument_us": [], "one_buffer_us": [], "launch_with_stub_driver_us": []}
    try:
        for name, fn in stubs.items():
            setattr(torch.cuda, name, fn)
        driver_module.driver = _StubDriver()
        for _ in range(rounds):  # interleaved, so load changes hit all three alike
            timings["per_argument_us"].append(_us(lambda: _per_argument(args), number, repeat))
            timings["one_buffer_us"].append(_us(lambda: _one_buffer(args), number, repeat))
            timings["launch_with_stub_driver_us"].append(
                _us(lambda: launch_module.launch(source, entry, (512,), (256,), args, device), number, repeat)
            )
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        driver_module.driver = saved_driver
        loader._functions.pop((source, entry, 0), None)
    return {
        "benchmark": "launch_overhead",
        "machine": machine_info(),
        "arguments": "GEMV/GEMM list: 7 pointers, 12 ints",
        "note": f"best of {repeat} x {number} calls per round; the machine is shared, so rounds vary",
        "timings": timings,
        "best_us": {k: min(v) for k, v in timings.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS / "launch_overhead-cpu.json")
    args = parser.parse_args(argv)
    number, repeat, rounds = (200, 2, 1) if args.quick else (20000, 5, 3)
    report = run(number, repeat, rounds)
    report["command"] = "python bench/launch_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["best_us"]), f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
