"""The ``quanto_backend::*`` custom ops: the one seam between Python and compute.

Each op is defined in the ``quanto_backend`` :class:`torch.library.Library` from the signature of its plain-torch
reference (:mod:`.reference`), which is its implementation on every device without a kernel of its own; the CPU
kernels are registered over it by :mod:`.cpu` and the CUDA kernels by :mod:`.cuda`; the fake (meta) implementation
lets ``torch.compile`` trace the op as one opaque node.

The ops are defined with ``Library.define`` rather than :func:`torch.library.custom_op`: the latter wraps every
call in a Python autograd layer (about 20 us a call, more than a small layer's matmul) for a derivative these ops
do not have. Callers route anything that needs gradients around them (see ``tensor.linear.needs_grad``); a
backward through an op itself gets PyTorch's warning that no autograd kernel is registered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import reference

_NS = "quanto_backend"
_LIB = torch.library.Library(_NS, "DEF")


def _define(reference_fn: Callable) -> torch._ops.OpOverload:
    """Define ``quanto_backend::<name>`` with the schema of ``reference_fn``'s annotations and ``reference_fn`` as
    its implementation on every device; returns the op."""
    name = reference_fn.__name__
    _LIB.define(name + torch.library.infer_schema(reference_fn, mutates_args=()))
    op = getattr(getattr(torch.ops, _NS), name).default
    torch.library.register_kernel(op, None, reference_fn, lib=_LIB)  # None: CompositeExplicitAutograd
    return op


def _out_features_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], weight.shape[0])


@_define
def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide codes along the last dimension into uint8."""
    return reference.pack(values, bits)


@torch.library.register_fake(pack)
def _(values, bits):
    return values.new_empty((*values.shape[:-1], values.shape[-1] * bits // 8), dtype=torch.uint8)


@_define
def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack uint8 bytes into ``8 // bits`` codes each."""
    return reference.unpack(packed, bits)


@torch.library.register_fake(unpack)
def _(packed, bits):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 8 // bits), dtype=torch.uint8)


@_define
def quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` rounded (int8) or cast (float8); ``scale`` broadcasts against ``x``."""
    return reference.quantize_symmetric(x, scale, dtype)


@torch.library.register_fake(quantize_symmetric)
def _(x, scale, dtype):
    return torch.empty_like(x, dtype=dtype)


@_define
def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in the scale's dtype."""
    return reference.dequantize_symmetric(q, scale)


@torch.library.register_fake(dequantize_symmetric)
def _(q, scale):
    return torch.empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=scale.dtype, device=q.device)


@_define
def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization with one float32 scale per row (last dimension reduced)."""
    return reference.quantize_per_token(x, dtype)


@torch.library.register_fake(quantize_per_token)
def _(x, dtype):
    return torch.empty_like(x, dtype=dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@_define
def quantize_affine(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Group-wise affine quantization of ``w`` ``[out, n_groups * group_size]``, packed into uint8."""
    return reference.quantize_affine(w, scale, shift, bits)


@torch.library.register_fake(quantize_affine)
def _(w, scale, shift, bits):
    return w.new_empty((*w.shape[:-1], w.shape[-1] * bits // 8), dtype=torch.uint8)


@_define
def dequantize_affine(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack and dequantize a group-wise affine weight to ``[out, n_groups * group_size]``."""
    return reference.dequantize_affine(packed, scale, shift, bits)


@torch.library.register_fake(dequantize_affine)
def _(packed, scale, shift, bits):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 8 // bits), dtype=scale.dtype)


@_define
def linear_w8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only 8-bit linear: int8 or float8 ``weight`` ``[out, in]`` with per-row ``weight_scale`` ``[out, 1]``."""
    return reference.linear_w8(x, weight, weight_scale, bias)


@torch.library.register_fake(linear_w8)
def _(x, weight, weight_scale, bias):
    return x.new_empty(_out_features_shape(x, weight))


@_define
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


@torch.library.register_fake(linear_affine)
def _(x, weight, weight_scale, weight_shift, bits, bias):
    return x.new_empty(_out_features_shape(x, weight))


@_define
def weight_row_sums(weight: torch.Tensor) -> torch.Tensor:
    """The sums of an int8 weight's rows (``[out, in]`` -> float32 ``[out]``): the term an int8 input's zero-point
    adds to a linear layer. The CPU kernel caches them per weight storage."""
    return reference.weight_row_sums(weight)


@torch.library.register_fake(weight_row_sums)
def _(weight):
    return weight.new_empty(weight.shape[:1], dtype=torch.float32)


@_define
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


@torch.library.register_fake(linear_a8w8)
def _(x_q, x_scale, weight, weight_scale, bias, out_dtype):
    return x_q.new_empty(_out_features_shape(x_q, weight), dtype=out_dtype)


@_define
def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zero_point, 0, 255)``; ``scale`` and ``zero_point`` broadcast."""
    return reference.quantize_asymmetric(x, scale, zero_point)


@torch.library.register_fake(quantize_asymmetric)
def _(x, scale, zero_point):
    return torch.empty_like(x, dtype=torch.uint8)


@_define
def dequantize_asymmetric(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - zero_point) * scale`` in the scale's dtype."""
    return reference.dequantize_asymmetric(q, scale, zero_point)


@torch.library.register_fake(dequantize_asymmetric)
def _(q, scale, zero_point):
    shape = torch.broadcast_shapes(q.shape, scale.shape, zero_point.shape)
    return torch.empty(shape, dtype=scale.dtype, device=q.device)


@_define
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


@torch.library.register_fake(linear_w8_asymmetric)
def _(x, weight, weight_scale, weight_zero_point, bias):
    return x.new_empty(_out_features_shape(x, weight))


@_define
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


@torch.library.register_fake(linear_a8w8_asymmetric)
def _(x_q, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, out_dtype):
    return x_q.new_empty(_out_features_shape(x_q, weight), dtype=out_dtype)
