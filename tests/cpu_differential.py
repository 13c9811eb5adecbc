"""Frozen quantized Linears on the CPU fast paths against the same modules on the reference ops, case by case.

Run as ``python tests/cpu_differential.py GROUP`` by ``tests/test_cpu_differential.py``, one process per group, so
that a crash (a SIGSEGV inside a private PyTorch kernel) fails the test and names the case: the process prints
``START <case>`` before each case and ``FAIL <case>: <why>`` or ``OK <case>`` after it, then one ``SUMMARY`` line
with the number of cases and of calls into each PyTorch kernel and into the float8 conversion (so that the fast
paths are known to have run).

A case is a layer shape (in_features K, out_features N), a batch of M rows, an activation dtype, and a storage
layout: the weight's storage offset (a view 1/2/4/8 bytes into a larger buffer, as ``safetensors`` gives), the
input's offset, or a non-contiguous input. The sliced ``_int_mm`` path for int8 weights is taken by layers of any size
here (it is kept for large ones). The reference is the same module with every CPU kernel contract emptied
(:data:`quanto_backend.ops.cpu.INT8PACK`, ``INT4PACK`` and ``INT_MM`` hold on no CPU), so both run the public API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import sys

import torch
from torch import nn

from quanto_backend import Calibration, QActivation, freeze, quantize
from quanto_backend.ops import cpu

# Each group: quantize() arguments; the weight formats and activation modes the issue lists.
GROUPS: dict[str, dict] = {
    "int8": dict(weights="int8"),
    "uint8": dict(weights="uint8"),
    "float8": dict(weights="float8"),
    "int4": dict(weights="int4", group_size=32),
    "int2": dict(weights="int2", group_size=64),
    "w8a8-static": dict(weights="int8", activations="int8"),
    "w8a8-uint8": dict(weights="int8", activations="uint8"),
    "w8a8-float8": dict(weights="float8", activations="float8"),
    "w8a8-dynamic": dict(weights="int8", activations="int8", activation_scales="dynamic"),
}
IN_FEATURES = (8, 16, 24, 40, 64, 72, 96, 136, 264, 1000, 1024, 4104)
OUT_FEATURES = (1, 7, 16, 33, 48, 64)
ROWS = (1, 2, 3, 4, 5, 8, 16, 17, 32, 33)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("plain", "weight+1", "weight+2", "weight+4", "weight+8", "input+2", "input+4", "input+8", "strided")
# Both paths see the same quantized weights and codes; they differ by the kernels' bfloat16 rounding of activations
# and outputs (2**-8 relative at worst each) and the order of additions. An element's error is bounded against the
# sum of the magnitudes of its products, so that one wrong element (or a NaN) fails, whatever the cancellation.
TOLERANCE = 2e-2
KERNELS = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm")


@dataclasses.dataclass(frozen=True)
class Case:
    group: str
    k: int
    n: int
    dtype: str
    layout: str

    def __str__(self) -> str:
        return f"{self.group} K={self.k} N={self.n} {self.dtype} {self.layout}"


def cases(group: str) -> list[Case]:
    """Every K with every dtype; N cycles through odd and even values; the layouts cycle across the cases."""
    out = []
    for i, (k, dtype) in enumerate(itertools.product(IN_FEATURES, DTYPES)):
        n = OUT_FEATURES[i % len(OUT_FEATURES)]
        out.append(Case(group, k, n, str(dtype).removeprefix("torch."), LAYOUTS[i % len(LAYOUTS)]))
        if k in (64, 1024):  # every layout at an aligned, kernel-friendly shape
            out += [Case(group, k, 16, "bfloat16", layout) for layout in LAYOUTS]
    return out


def _offset_view(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A copy of ``t`` that starts ``offset_bytes`` into a larger buffer (contiguous, misaligned)."""
    flat = t.detach().reshape(-1).view(torch.uint8)
    buffer = torch.empty(flat.numel() + offset_bytes, dtype=torch.uint8)
    buffer[offset_bytes:].copy_(flat)
    return buffer[offset_bytes:].view(t.dtype).view(t.shape)


CONTRACTS = ("INT8PACK", "INT4PACK", "INT_MM")


@contextlib.contextmanager
def reference_only():
    """Every CPU kernel contract holds on no CPU (no op reaches a private PyTorch kernel), and float8 weights take
    the reference's conversion (torch's own) instead of the one through float16 bits."""
    saved = {name: getattr(cpu, name) for name in (*CONTRACTS, "FLOAT8_VIA_HALF_FACTOR")}
    for name in CONTRACTS:
        setattr(cpu, name, dataclasses.replace(saved[name], kinds=frozenset()))
    cpu.FLOAT8_VIA_HALF_FACTOR = {}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(cpu, name, value)


def _model(case: Case) -> nn.Sequential:
    dtype = getattr(torch, case.dtype)
    model = nn.Sequential(nn.Linear(case.k, case.n)).to(dtype)
    config = dict(GROUPS[case.group])
    quantize(model, **config)
    if config.get("activations") and config.get("activation_scales") != "dynamic":
        with torch.no_grad(), Calibration():
            model(torch.randn(64, case.k, dtype=dtype))
    freeze(model)
    if case.layout.startswith("weight+"):  # storage the user put there: must be checked, not trusted
        layer = model[0]
        layer._parameters["weight"] = nn.Parameter(_offset_view(layer.weight, int(case.layout[7:])), False)
    return model


def _input(case: Case, rows: int) -> torch.Tensor:
    x = torch.randn(rows, case.k).to(getattr(torch, case.dtype))
    if case.layout.startswith("input+"):
        return _offset_view(x, int(case.layout[6:]))
    if case.layout == "strided":
        return torch.randn(case.k, rows).to(x.dtype).t()  # a transposed view
    return x


def _float(y: torch.Tensor) -> torch.Tensor:
    return (y.dequantize() if isinstance(y, QActivation) else y).double()


def check(case: Case) -> str | None:
    """``None`` if the fast path agrees with the reference at every row count, else what went wrong."""
    torch.manual_seed(hash(str(case)) % 2**31)
    model = _model(case)
    layer = model[0]
    weight = layer.qweight.dequantize().double()
    for rows in ROWS:
        x = _input(case, rows)
        with torch.no_grad():
            fast = _float(model(x))
            with reference_only():
                ref = _float(model(x))
        if fast.shape != ref.shape:
            return f"M={rows}: shape {tuple(fast.shape)}, expected {tuple(ref.shape)}"
        if not torch.isfinite(fast).all():
            return f"M={rows}: non-finite output"
        magnitude = x.double().abs() @ weight.abs().t() + layer.bias.double().abs()
        scale = layer._buffers.get("output_scale") if layer.quantizes_output else None
        slack = TOLERANCE * magnitude + (0 if scale is None else 1.01 * scale.double())  # one output code
        worst = ((fast - ref).abs() - slack).max().item()
        if worst > 0:
            return f"M={rows}: error above the bound by {worst:.3g} (max |out| {ref.abs().max().item():.3g})"
    return None


def main(group: str) -> None:
    torch.set_num_threads(1)
    # The sliced _int_mm path is kept for layers of a million weights and more; these small layers take it too.
    cpu._SLICED_BOUNDS = {cap: dataclasses.replace(b, min_weights=0) for cap, b in cpu._SLICED_BOUNDS.items()}
    calls = dict.fromkeys((*KERNELS, "float8_into"), 0)
    for owner, name in [(torch, name) for name in KERNELS] + [(cpu, "float8_into")]:
        kernel = getattr(owner, name)

        def counting(*args, _name=name, _kernel=kernel, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        setattr(owner, name, counting)
    failed = 0
    all_cases = cases(group)
    for case in all_cases:
        print(f"START {case}", flush=True)
        error = check(case)
        failed += error is not None
        print(f"FAIL {case}: {error}" if error else f"OK {case}", flush=True)
    # What this process (its environment may select other code paths than the parent's) trusts.
    holds = {name: getattr(cpu, name).holds() for name in CONTRACTS}
    summary = {"cases": len(all_cases), "failed": failed, "calls": calls, "holds": holds}
    summary["a8w8_kernel_rows"] = cpu.a8w8_kernel_max_rows(4096, 4096)
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
