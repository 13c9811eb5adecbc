"""Probe where PyTorch's private CPU kernels are correct on this machine, each case in a crash-contained process.

For ``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu`` and ``torch._int_mm`` (activations first,
and weight first: ``int_mm_weight_first``) it runs a grid of shapes (K, N, M), activation dtypes and storage offsets
(misaligned weight or activation storage, as safetensors gives), and classifies each case:

* ``ok``: within bfloat16 rounding of the float64 product (``_int_mm``: exactly equal);
* ``wrong``: a silently wrong result (NaN, Inf or a large error);
* ``error``: the op raised (it checks that input itself);
* ``crash``: the process died (SIGSEGV).

The contracts in ``quanto_backend/ops/cpu.py`` were read off this table; the JSON records the CPU kind.

    python bench/cpu_contracts.py                       # bench/results/cpu_contracts-<kind>.json
    python bench/cpu_contracts.py --quick --output-dir /tmp/out
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from plot import machine_info  # bench/plot.py, next to this script

from quanto_backend.ops import cpu

RESULTS = Path(__file__).parent / "results"
OK_RTOL = 2e-2  # bfloat16 activations and outputs: about 2**-8 relative at worst per element


def _storage(n: int, dtype: torch.dtype, offset_bytes: int, make) -> torch.Tensor:
    """``n`` elements of ``dtype`` starting ``offset_bytes`` into a fresh 64-byte-aligned allocation."""
    itemsize = dtype.itemsize
    assert offset_bytes % itemsize == 0
    base = make(n + offset_bytes // itemsize)
    return base[offset_bytes // itemsize :]


def _int8(n: int, offset_bytes: int) -> torch.Tensor:
    return _storage(n, torch.int8, offset_bytes, lambda c: torch.randint(-128, 128, (c,), dtype=torch.int8))


def run_case(case: dict) -> str:
    """``ok`` or ``wrong`` for one case (a crash never returns)."""
    torch.manual_seed(0)
    op, m, k, n = case["op"], case["m"], case["k"], case["n"]
    if op in ("int_mm", "int_mm_weight_first"):  # exact int32 sums of int8 x int8: anything but equality is wrong
        x, w = _int8(m * k, case["x_offset"]).view(m, k), _int8(n * k, case["w_offset"]).view(n, k)
        # x @ w.T as quanto_backend computes it: activations first, or the weight first (w @ x.T, transposed back)
        out = torch._int_mm(x, w.t()) if op == "int_mm" else torch._int_mm(w, x.t()).t()
        exact = (x.double() @ w.double().t()).to(torch.int32)
        return "ok" if out.dtype == torch.int32 and torch.equal(out, exact) else "wrong"
    dtype = getattr(torch, case["dtype"])
    x = _storage(m * k, dtype, case["x_offset"], lambda c: torch.randn(c).to(dtype)).view(m, k)
    if op == "int8pack":
        w = _int8(n * k, case["w_offset"]).view(n, k)
        scale = (torch.rand(n) + 0.5).to(dtype)
        out = torch._weight_int8pack_mm(x, w, scale)
        ref = (x.double() @ w.double().t()) * scale.double()
    else:
        group = case["group"]
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
        scales = torch.rand(k // group, n) * 0.1 + 0.01
        zeros = torch.randn(k // group, n) * 0.1
        sz = torch.stack([scales, zeros], -1).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)
        s, z = sz.double()[..., 0].t(), sz.double()[..., 1].t()  # [n, groups]
        w = ((codes.double() - 8).view(n, -1, group) * s[..., None] + z[..., None]).view(n, k)
        ref = x.double() @ w.t()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return "wrong"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    return "ok" if err < OK_RTOL else "wrong"


def run_contained(cases: list[dict]) -> list[str]:
    """Run each case in a forked child of this process (torch is imported once); a child that dies is ``crash``.

    The parent never runs a parallel region before forking, so the children start with a fresh thread pool.
    """
    results = []
    for case in cases:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            try:
                answer = run_case(case)
            except Exception:  # the op refused its inputs (a RuntimeError from its own checks)
                answer = "error"
            os.write(write_end, answer.encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        results.append(answer if os.WIFEXITED(status) and answer else "crash")
    return results


def grid(quick: bool) -> list[dict]:
    ks = (8, 16, 24, 40, 48, 64, 96, 128, 136, 200, 256, 264, 1000, 1024, 4104) if not quick else (40, 64, 264)
    ns = (1, 3, 16, 33) if not quick else (3, 16)
    ms = (1, 2, 4, 5, 17, 33) if not quick else (1, 4)
    dtypes = ("bfloat16", "float32", "float16") if not quick else ("bfloat16", "float32")
    cases = []
    for k, n, m, dtype in itertools.product(ks, ns, ms, dtypes):
        cases.append(dict(op="int8pack", m=m, k=k, n=n, dtype=dtype, x_offset=0, w_offset=0))
    offsets = (1, 2, 4, 8, 16, 32) if not quick else (4, 16)
    for k, m, off in itertools.product((64, 256, 4096) if not quick else (64,), (1, 4, 17), offsets):
        cases.append(dict(op="int8pack", m=m, k=k, n=16, dtype="bfloat16", x_offset=0, w_offset=off))
        if off % 2 == 0:
            cases.append(dict(op="int8pack", m=m, k=k, n=16, dtype="bfloat16", x_offset=off, w_offset=0))
    for op in ("int_mm", "int_mm_weight_first"):
        for k, n, m in itertools.product(ks, ns, ms):
            cases.append(dict(op=op, m=m, k=k, n=n, dtype="int8", x_offset=0, w_offset=0))
        for k, m, off in itertools.product((64, 4096) if not quick else (64,), (1, 17), offsets):
            cases.append(dict(op=op, m=m, k=k, n=16, dtype="int8", x_offset=off, w_offset=0))
            cases.append(dict(op=op, m=m, k=k, n=16, dtype="int8", x_offset=0, w_offset=off))
    for k, n, m, group, dtype in itertools.product(
        (256, 1024) if not quick else (256,),
        (16, 48) if not quick else (16,),
        (1, 4, 17),
        (32, 64, 128, 256) if not quick else (32, 128),
        ("bfloat16", "float32", "float16") if not quick else ("bfloat16",),
    ):
        if k % group == 0:
            cases.append(dict(op="int4pack", m=m, k=k, n=n, dtype=dtype, group=group, x_offset=0))
            cases.append(dict(op="int4pack", m=m, k=k, n=n, dtype=dtype, group=group, x_offset=2))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid (for tests)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    machine = machine_info()
    cases = grid(args.quick)
    rows = [dict(case, result=r) for case, r in zip(cases, run_contained(cases), strict=True)]
    counts = Counter((r["op"], r["result"]) for r in rows)
    report = {
        "benchmark": "cpu_contracts",
        "command": "python bench/cpu_contracts.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "int_mm_is_exact": cpu.int_mm_is_exact(),  # the check INT_MM and INT_MM_WEIGHT_FIRST also require
        "summary": {f"{op} {result}": n for (op, result), n in sorted(counts.items())},
        "cases": rows,
    }
    path = args.output_dir / f"cpu_contracts-{machine['cpu_kind'].lower()}.json"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{machine['cpu_kind']}: {report['summary']} -> {path}")
    for r in rows:
        if r["result"] != "ok":
            print(" ", r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
