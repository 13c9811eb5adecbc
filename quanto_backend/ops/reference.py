"""Plain-torch reference math of every ``quanto_backend::*`` op: the truth each kernel is tested against.

Conventions, written down here once:

* Symmetric (8-bit) quantization: ``q = clamp(round(x / scale), -128, 127)`` for int8 and
  ``q = clamp(x / scale, -max, max)`` cast to float8; ``x ~= q * scale``. ``scale`` broadcasts against ``x``:
  ``[out, 1]`` per output channel for weights, 0-dim per tensor or ``[..., 1]`` per token for activations.
  Scales map the largest magnitude to 127 (``absmax / 127``), so -128 holds only values beyond a static scale's
  calibrated range, which it rounds to more closely than -127 would (optimum-quanto and torch.ao clamp alike).
* Affine (2/4-bit) quantization, group-wise along the input dimension:
  ``q = clamp(round(w / scale + shift), 0, 2**bits - 1)`` and ``w ~= (q - shift) * scale``. ``scale`` and
  ``shift`` are ``[out, n_groups]`` in the weight's float dtype; ``shift`` is the zero-point in the quantized
  domain (a float, so it needs no rounding). The input dimension is padded to ``n_groups * group_size``.
* Asymmetric (8-bit, uint8 codes with an integer zero-point): ``q = clamp(round(x / scale) + zero_point, 0, 255)``
  and ``x ~= (q - zero_point) * scale``. Activations carry a float32 scale and an int32 zero-point (0-dim per
  tensor); the per-axis uint8 weight (``quint8``) carries ``[out, 1]`` scale and zero-point (integer-valued, in
  the weight's float dtype, like the group-wise ``shift``).
* Packing, along the last dimension: a byte holds ``8 // bits`` consecutive values, the first in the lowest bits.
  For 4-bit, byte ``j`` holds values ``2j`` (bits 0-3) and ``2j + 1`` (bits 4-7); for 2-bit, byte ``j`` holds
  values ``4j .. 4j + 3`` at bits ``0-1, 2-3, 4-5, 6-7``.
* All arithmetic is done in float32 (float64 for exact int8 accumulation) and cast to the output dtype last,
  so a kernel that computes in float32 matches bit for bit where the order of additions does not matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127.0
INT8_MIN = -128.0


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide codes (uint8, last dim a multiple of ``8 // bits``) into bytes."""
    per_byte = 8 // bits
    grouped = values.to(torch.uint8).unflatten(-1, (values.shape[-1] // per_byte, per_byte))
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.uint8, device=values.device)
    for i in range(per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes, ``8 // bits`` per input byte."""
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)


def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scaled = x.float() / scale.float()  # a fresh tensor, rounded and clamped in place (a weight-sized temporary less)
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        return scaled.clamp_(info.min, info.max).to(dtype)
    if dtype == torch.int8:
        return scaled.round_().clamp_(INT8_MIN, INT8_MAX).to(torch.int8)
    raise ValueError(f"quantize_symmetric: unsupported dtype {dtype}; accepted: int8 and the float8 dtypes")


def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale.float()).to(scale.dtype)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization with one float32 scale per row (``[..., 1]``); all-zero rows get scale 1."""
    qmax = torch.finfo(dtype).max if dtype.is_floating_point else INT8_MAX
    absmax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return quantize_symmetric(x, scale, dtype), scale


def quantize_affine(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Group-wise affine quantization and packing of ``w`` ``[out, n_groups * group_size]``."""
    groups = w.float().unflatten(-1, (scale.shape[-1], -1))
    # In place on one buffer (quantize-on-load runs this on every weight): the same codes as the plain formula.
    codes = torch.div(groups, scale.float().unsqueeze(-1)).add_(shift.float().unsqueeze(-1)).round_()
    codes = codes.clamp_(0, 2**bits - 1).flatten(-2)
    # Packing by exact float arithmetic (integers below 256) is several times faster than shifting uint8 views,
    # and gives the bytes of :func:`pack`.
    per_byte = 8 // bits
    fields = codes.unflatten(-1, (codes.shape[-1] // per_byte, per_byte))
    packed = fields[..., per_byte - 1].clone()
    for i in range(per_byte - 2, -1, -1):
        packed.mul_(2**bits).add_(fields[..., i])
    return packed.to(torch.uint8)


def dequantize_affine(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack and dequantize to ``[out, n_groups * group_size]`` in the scale's dtype."""
    codes = unpack(packed, bits).unflatten(-1, (scale.shape[-1], -1))
    # In place: each fresh weight-sized buffer costs its page faults, more than the arithmetic (same results).
    w = codes.float().sub_(shift.float().unsqueeze(-1)).mul_(scale.float().unsqueeze(-1))
    return w.flatten(-2).to(scale.dtype)


def linear_w8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
    w = weight.to(torch.float32, copy=True).mul_(weight_scale.float()).to(x.dtype)  # in place: see dequantize_affine
    return F.linear(x, w, bias)


def linear_affine(x, weight, weight_scale, weight_shift, bits: int, bias):
    w = dequantize_affine(weight, weight_scale, weight_shift, bits)[:, : x.shape[-1]]
    return F.linear(x, w.to(x.dtype), bias)


def weight_row_sums(weight: torch.Tensor) -> torch.Tensor:
    """``weight.sum(1)`` of int8 codes ``[out, in]`` as float32 ``[out]``, summed exactly in int32."""
    return weight.sum(dim=1, dtype=torch.int32).float()


def linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype: torch.dtype):
    # float64 holds int8 x int8 sums exactly for any realistic in_features; float8 products fit float32.
    acc_dtype = torch.float32 if weight.dtype.is_floating_point else torch.float64
    acc = torch.matmul(x_q.to(acc_dtype), weight.to(acc_dtype).t()).float()
    out = acc * x_scale.float() * weight_scale.float().t()
    out = out.to(out_dtype)
    return out if bias is None else out + bias.to(out_dtype)


UINT8_MAX = 255.0


def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zero_point, 0, 255)``; ``scale``/``zero_point`` broadcast."""
    codes = (x.float() / scale.float()).round() + zero_point.float()
    return codes.clamp(0.0, UINT8_MAX).to(torch.uint8)


def dequantize_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the scale's dtype."""
    return ((q.float() - zero_point.float()) * scale.float()).to(scale.dtype)


def linear_w8_asymmetric(x, weight, weight_scale, weight_zero_point, bias):
    w = dequantize_asymmetric(weight, weight_scale, weight_zero_point).to(x.dtype)
    return F.linear(x, w, bias)


def linear_a8w8_asymmetric(x_q, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, out_dtype):
    """Integer activations x integer weights, either or both with zero-points.

    Exact: ``(x_q - zx) @ (w - zw).T`` expands to ``x_q @ w.T - zx * sum(w) - zw * sum(x_q) + K * zx * zw``, an
    integer matmul plus rank-one corrections (what a kernel computes); float64 holds every term exactly.
    """
    x = x_q.double() if x_zero_point is None else x_q.double() - x_zero_point.double()
    w = weight.double() if weight_zero_point is None else weight.double() - weight_zero_point.double()
    acc = torch.matmul(x, w.t()).float()
    out = (acc * x_scale.float() * weight_scale.float().t()).to(out_dtype)
    return out if bias is None else out + bias.to(out_dtype)
