"""The first-use self-test of each CUDA kernel family: every entry point on a small case, against the reference.

:func:`quanto_backend.ops.cuda.warmup` runs it once per device and family, before the family's first use, so a
kernel that the compiler, the driver or the GPU gets wrong is disabled (with a warning) instead of being silently
wrong. The cases are small (at most a hundred kilobytes, one launch each) but cross the boundaries the kernels
handle: rows that are not a multiple of a tile, both scale layouts, every weight and activation format of the
family, and each loop of the GEMV (the unchecked fast loop, the checked tail).

The elementwise kernels and the int8 x int8 matmul must equal the reference bit for bit; the other matmuls sum in
another order (and the weight-only ones skip the reference's rounding of the dequantized weight), so they are held
to a few output ulps of a float32 truth, which any indexing or layout bug exceeds by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import cuda, reference

__all__ = ["run"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_Q8 = (torch.int8, *_FP8)
_HALF = (torch.float16, torch.bfloat16)
# Max error relative to the largest output: twice the tolerance of the GPU test suite.
_TOLERANCE = {torch.bfloat16: 3.2e-2, torch.float16: 5e-3, torch.float32: 2e-4}
# K: two and a half GEMM k-tiles of 8-bit activations (five of 16-bit ones), five 32-wide groups; one output tile,
# so the GEMM splits along K (cuda_kernels/gemm.cu). _UNSPLIT_K: one or two k-tiles, too few to split.
_K, _UNSPLIT_K, _N = 160, 64, 24  # N: not a multiple of 16


def _qmax(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max if dtype.is_floating_point else 127.0


def _differs(name: str, actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when ``actual`` is bit for bit ``expected``, else what differs."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return f"{name}: {actual.dtype}{list(actual.shape)} instead of {expected.dtype}{list(expected.shape)}"
    if actual.element_size() == 1:
        bad = actual.view(torch.uint8) != expected.view(torch.uint8)
    else:
        a, e = actual.float(), expected.float()
        bad = (a != e) & ~(a.isnan() & e.isnan())
    count = int(bad.sum())
    return None if count == 0 else f"{name}: {count} of {bad.numel()} values differ from the reference"


def _far(name: str, actual: torch.Tensor, truth: torch.Tensor) -> str | None:
    """None when ``actual`` is within a few output ulps of the float32 ``truth``, else by how much it is not."""
    if actual.shape != truth.shape:
        return f"{name}: shape {list(actual.shape)} instead of {list(truth.shape)}"
    a = actual.float()
    if not bool(torch.isfinite(a).all()):
        return f"{name}: non-finite outputs"
    err = float((a - truth).abs().max() / truth.abs().max().clamp_min(1e-6))
    tol = _TOLERANCE[actual.dtype]
    return None if err <= tol else f"{name}: relative error {err:.3g} > {tol}"


def _quantize(device: torch.device) -> str | None:
    gen = torch.Generator(device=device).manual_seed(0)
    checks: list[str | None] = []
    for bits in (2, 4):
        values = torch.randint(0, 2**bits, (3, 64), dtype=torch.uint8, device=device, generator=gen)
        packed = cuda._pack_kernel(values, bits)
        checks.append(_differs(f"pack {bits}-bit", packed, reference.pack(values, bits)))
        checks.append(_differs(f"unpack {bits}-bit", cuda._unpack_kernel(packed, bits), values))
    x32 = torch.randn(5, 72, device=device, generator=gen) * 3
    for x_dtype in (torch.float32, torch.bfloat16):
        x = x32.to(x_dtype)
        for dtype in _Q8:
            per_row = (x32.abs().amax(dim=-1, keepdim=True) / _qmax(dtype)).to(x_dtype)
            per_tensor = (x32.abs().amax() / _qmax(dtype)).float()
            for layout, scale in ((1, per_row), (0, per_tensor)):
                name = f"{x_dtype} -> {dtype}, scale layout {layout}"
                q = cuda._quantize_symmetric_kernel(x, scale, dtype, layout)
                checks.append(_differs(f"quantize_symmetric {name}", q, reference.quantize_symmetric(x, scale, dtype)))
                dq = cuda._dequantize_symmetric_kernel(q, scale, layout)
                checks.append(_differs(f"dequantize_symmetric {name}", dq, reference.dequantize_symmetric(q, scale)))
            q, scale = cuda._quantize_per_token_kernel(x, dtype)
            q_ref, scale_ref = reference.quantize_per_token(x, dtype)
            checks.append(_differs(f"quantize_per_token {x_dtype} -> {dtype}", q, q_ref))
            checks.append(_differs(f"quantize_per_token {x_dtype} -> {dtype} scale", scale, scale_ref))
    w = torch.randn(6, 128, device=device, generator=gen).to(torch.float16)
    for bits in (2, 4):
        scale, shift = _affine_params(w.float(), 32, bits, torch.float16)
        packed = cuda._quantize_affine_kernel(w, scale, shift, bits)
        checks.append(_differs(f"quantize_affine {bits}-bit", packed, reference.quantize_affine(w, scale, shift, bits)))
        dq = cuda._dequantize_affine_kernel(packed, scale, shift, bits)
        ref = reference.dequantize_affine(packed, scale, shift, bits)
        checks.append(_differs(f"dequantize_affine {bits}-bit", dq, ref))
    return next((c for c in checks if c is not None), None)


def _affine_params(w: torch.Tensor, group_size: int, bits: int, dtype: torch.dtype):
    groups = w.unflatten(-1, (-1, group_size))
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-4)
    return scale.to(dtype), (-lo / scale).to(dtype)


def _gemv_k(bits: int) -> int:
    """K of the GEMV cases for ``bits``-bit weights: 17 full warp steps, so that each of the 8 warps runs the
    unchecked loop's two-step iteration (and warp 0 its single step after it), and one lane's 16 weight bytes more,
    which the bounds-checked loop takes; rows stay 16-byte aligned (the unchecked loop's condition)."""
    lane_values = 128 // bits
    return 17 * 4 * lane_values + lane_values


def _matmul(kind: str, device: torch.device) -> str | None:
    """Every matmul entry point of ``kind``. The GEMM: M one tile and a few rows past GEMV_MAX_M, split along K and
    not. The GEMV: its unchecked loop and its checked tail (see :func:`_gemv_k`), for M on both sides of 8 (one half
    of the mma tile's rows or both), and 2-bit weights with two groups in a lane's 16 bytes or one."""
    gen = torch.Generator(device=device).manual_seed(1)
    checks: list[str | None] = []
    if kind == "gemv":
        for m in (3, 11):
            checks += _matmul_cases(kind, m, None, gen, device)
    else:
        for k in (_K, _UNSPLIT_K):
            checks += _matmul_cases(kind, cuda.GEMV_MAX_M + 5, k, gen, device)
    return next((c for c in checks if c is not None), None)


def _matmul_cases(kind: str, m: int, k: int | None, gen: torch.Generator, device: torch.device) -> list[str | None]:
    """The cases of every format at ``m`` rows; ``k``: the GEMM's K (the GEMV's depends on the weight's bits)."""

    def inputs(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        depth = _gemv_k(bits) if k is None else k
        return torch.randn(_N, depth, device=device, generator=gen), torch.randn(m, depth, device=device, generator=gen)

    bias32 = torch.randn(_N, device=device, generator=gen)
    shape = f"M = {m}" if k is None else f"M = {m}, K = {k}"
    checks: list[str | None] = []
    for x_dtype in _HALF:
        bias = bias32.to(x_dtype)
        for w_dtype in _Q8:
            w32, x32 = inputs(8)
            x = x32.to(x_dtype)
            w_q, w_scale = reference.quantize_per_token(w32, w_dtype)
            w_scale = w_scale.to(x_dtype)
            out = cuda._linear_w8_kernel(kind, x, w_q, w_scale, bias)
            truth = x.float() @ (w_q.float() * w_scale.float()).t() + bias.float()
            checks.append(_far(f"linear_w8 {x_dtype} x {w_dtype}, {shape}", out, truth))
        for bits in (2, 4):
            for group_size in (32, 64) if kind == "gemv" and bits == 2 else (32,):
                w32, x32 = inputs(bits)
                x = x32.to(x_dtype)
                scale, shift = _affine_params(w32, group_size, bits, x_dtype)
                packed = reference.quantize_affine(w32, scale, shift, bits)
                out = cuda._linear_affine_kernel(kind, x, packed, scale, shift, bits, bias)
                w_ref = reference.dequantize_affine(packed, scale, shift, bits).to(x_dtype).float()
                name = f"linear_affine {x_dtype} x {bits}-bit, groups of {group_size}, {shape}"
                checks.append(_far(name, out, x.float() @ w_ref.t() + bias.float()))
    pairs = [(torch.int8, torch.int8)]
    if cuda._fp8_tensor_cores(device):
        pairs += [(a, w) for a in _FP8 for w in _FP8]
    for x_dtype, w_dtype in pairs:
        w32, x32 = inputs(8)
        x_q, x_scale = reference.quantize_per_token(x32, x_dtype)
        w_q, w_scale = reference.quantize_per_token(w32, w_dtype)
        out = cuda._linear_a8w8_kernel(kind, x_q, x_scale, 1, w_q, w_scale, bias32, torch.bfloat16)
        name = f"linear_a8w8 {x_dtype} x {w_dtype}, {shape}"
        if x_dtype == torch.int8:
            expected = reference.linear_a8w8(x_q, x_scale, w_q, w_scale, bias32, torch.bfloat16)
            checks.append(_differs(name, out, expected))
        else:
            truth = (x_q.float() @ w_q.float().t()) * x_scale * w_scale.t() + bias32
            checks.append(_far(name, out, truth))
    return checks


_TESTS: dict[str, Callable[[torch.device], str | None]] = {
    "quantize": _quantize,
    "gemv": lambda device: _matmul("gemv", device),
    "gemm": lambda device: _matmul("gemm", device),
}


def run(family: str, device: torch.device) -> str | None:
    """Runs ``family``'s self-test on ``device``: None when every case agrees with the reference, else the first
    disagreement. Needs the family's module loaded; must run outside CUDA-graph capture (it reads results)."""
    return _TESTS[family](device)
