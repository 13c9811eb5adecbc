"""The ``quanto_backend::*`` custom ops: the one seam between Python and compute.

Each op is defined with :func:`torch.library.custom_op`. Its default implementation (every device) is the
plain-torch math of :mod:`.reference`; the CPU kernels are registered over it by :mod:`.cpu` and the CUDA
kernels by :mod:`.cuda`; the fake (meta) implementation lets ``torch.compile`` trace the op as
one opaque node.
"""

from __future__ import annotations

import torch

from . import reference

_NS = "quanto_backend"


def _out_features_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[0])


@torch.library.custom_op(f"{_NS}::pack", mutates_args=())
def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide codes along the last dimension into uint8."""
    return reference.pack(values, bits)


@pack.register_fake
def _(values, bits):
    return values.new_empty((*values.shape[:-1], values.shape[-1] * bits // 8), dtype=torch.uint8)


@torch.library.custom_op(f"{_NS}::unpack", mutates_args=())
def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 bytes into ``8 // bits`` codes each."""
    return reference.unpack(packed, bits)


@unpack.register_fake
def _(packed, bits):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 8 // bits), dtype=torch.uint8)


@torch.library.custom_op(f"{_NS}::quantize_symmetric", mutates_args=())
def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` rounded (int8) or cast (float8); ``scale`` broadcasts against ``x``."""
    return reference.quantize_symmetric(x, scale, dtype)


@quantize_symmetric.register_fake
def _(x, scale, dtype):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op(f"{_NS}::dequantize_symmetric", mutates_args=())
def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in the scale's dtype."""
    return reference.dequantize_symmetric(q, scale)


@dequantize_symmetric.register_fake
def _(q, scale):
    return torch.empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=scale.dtype, device=q.device)


@torch.library.custom_op(f"{_NS}::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization with one float32 scale per row (last dimension reduced)."""
    return reference.quantize_per_token(x, dtype)


@quantize_per_token.register_fake
def _(x, dtype):
    return torch.empty_like(x, dtype=dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::quantize_affine", mutates_args=())
def quantize_affine(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Group-wise affine quantization of ``w`` ``[out, n_groups * group_size]``, packed into uint8."""
    return reference.quantize_affine(w, scale, shift, bits)


@quantize_affine.register_fake
def _(w, scale, shift, bits):
    return w.new_empty((*w.shape[:-1], w.shape[-1] * bits // 8), dtype=torch.uint8)


@torch.library.custom_op(f"{_NS}::dequantize_affine", mutates_args=())
def dequantize_affine(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack and dequantize a group-wise affine weight to ``[out, n_groups * group_size]``."""
    return reference.dequantize_affine(packed, scale, shift, bits)


@dequantize_affine.register_fake
def _(packed, scale, shift, bits):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 8 // bits), dtype=scale.dtype)


@torch.library.custom_op(f"{_NS}::linear_w8", mutates_args=())
def linear_w8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only 8-bit linear: int8 or float8 ``weight`` ``[out, in]`` with per-row ``weight_scale`` ``[out, 1]``."""
    return reference.linear_w8(x, weight, weight_scale, bias)


@linear_w8.register_fake
def _(x, weight, weight_scale, bias):
    return x.new_empty(_out_features_shape(x, weight))


@torch.library.custom_op(f"{_NS}::linear_affine", mutates_args=())
def linear_affine(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_shift: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Weight-only 2/4-bit linear: packed group-wise affine ``weight``; ``x``'s last dim may be shorter than the
    padded input dimension of the weight (the padding is ignored)."""
    return reference.linear_affine(x, weight, weight_scale, weight_shift, bits, bias)


@linear_affine.register_fake
def _(x, weight, weight_scale, weight_shift, bits, bias):
    return x.new_empty(_out_features_shape(x, weight))


@torch.library.custom_op(f"{_NS}::linear_a8w8", mutates_args=())
def linear_a8w8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Quantized activations x quantized weights (int8 x int8 or float8 x float8).

    ``x_scale`` is 0-dim (per tensor) or ``[..., 1]`` (per token); ``weight_scale`` is ``[out, 1]``.
    """
    return reference.linear_a8w8(x_q, x_scale, weight, weight_scale, bias, out_dtype)


@linear_a8w8.register_fake
def _(x_q, x_scale, weight, weight_scale, bias, out_dtype):
    return x_q.new_empty(_out_features_shape(x_q, weight), dtype=out_dtype)


@torch.library.custom_op(f"{_NS}::quantize_asymmetric", mutates_args=())
def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zero_point, 0, 255)``; ``scale`` and ``zero_point`` broadcast."""
    return reference.quantize_asymmetric(x, scale, zero_point)


@quantize_asymmetric.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op(f"{_NS}::dequantize_asymmetric", mutates_args=())
def dequantize_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the scale's dtype."""
    return reference.dequantize_asymmetric(q, scale, zero_point)


@dequantize_asymmetric.register_fake
def _(q, scale, zero_point):
    shape = torch.broadcast_shapes(q.shape, scale.shape, zero_point.shape)
    return torch.empty(shape, dtype=scale.dtype, device=q.device)


@torch.library.custom_op(f"{_NS}::linear_w8_asymmetric", mutates_args=())
def linear_w8_asymmetric(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Weight-only linear with a per-axis uint8 weight ``[out, in]``, ``weight_scale``/``weight_zero_point``
    ``[out, 1]``."""
    return reference.linear_w8_asymmetric(x, weight, weight_scale, weight_zero_point, bias)


@linear_w8_asymmetric.register_fake
def _(x, weight, weight_scale, weight_zero_point, bias):
    return x.new_empty(_out_features_shape(x, weight))


@torch.library.custom_op(f"{_NS}::linear_a8w8_asymmetric", mutates_args=())
def linear_a8w8_asymmetric(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor | None,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Integer activations (uint8 with ``x_zero_point``, or int8) x integer weights (per-axis uint8 with
    ``weight_zero_point`` ``[out, 1]``, or int8): ``((x_q - zx) @ (w - zw).T) * x_scale * weight_scale.T + bias``.

    ``x_scale``/``x_zero_point`` are 0-dim (per tensor) or ``[..., 1]`` (per token); a ``None`` zero-point is 0.
    """
    return reference.linear_a8w8_asymmetric(
        x_q, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, out_dtype
    )


@linear_a8w8_asymmetric.register_fake
def _(x_q, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, out_dtype):
    return x_q.new_empty(_out_features_shape(x_q, weight), dtype=out_dtype)
