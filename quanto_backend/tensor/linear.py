"""Quantized linear algebra: the one function that picks the ``quanto_backend`` op for a linear layer, and the
``F.linear`` / ``torch.matmul`` / ``F.conv2d`` handlers of the QTensor family."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .. import ops
from .activations import AffineQActivation, QActivation
from .qtensor import QTensor, register_qtensor_function
from .weights import GroupedQWeight, PerAxisAffineQWeight, PerAxisQWeight

__all__ = ["needs_grad", "qlinear"]


def qlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_shift: torch.Tensor | None = None,
    bits: int = 8,
) -> torch.Tensor:
    """``F.linear`` with a quantized weight given by its plain storage tensors.

    Args:
        x: float input, or a :class:`QActivation` (int8 x int8 and float8 x float8 then run quantized end to end).
        weight: int8/float8 ``[out, in]``, uint8 ``[out, in]`` (``quint8``, with ``weight_shift`` and ``bits=8``),
            or packed 2/4-bit codes when ``weight_shift`` is given.
        weight_scale: ``[out, 1]`` per-axis, or ``[out, n_groups]`` group-wise.
        bias: float bias or ``None``.
        weight_shift: the zero-point of ``quint8`` (``[out, 1]``) or the group-wise shift of the 2/4-bit formats.
        bits: code width of a packed weight.
    """
    per_axis_shift = weight_shift is not None and bits == 8  # quint8: per-axis affine, not packed
    if isinstance(x, QActivation):
        same_family = x.qdata.dtype.is_floating_point == weight.dtype.is_floating_point
        if (weight_shift is None or per_axis_shift) and same_family and not x.requires_grad:
            zero_point = x.zero_point if isinstance(x, AffineQActivation) else None
            if zero_point is None and weight_shift is None:
                return ops.linear_a8w8(x.qdata, x.scale, weight, weight_scale, bias, x.dtype)
            if weight_shift is None and x.qdata.dtype == torch.int8 and zero_point.ndim == 0 and x.scale.ndim == 0:
                # int8 codes with a zero-point: x W^T = scale (q W^T) - scale zero_point (W 1), so the int8 x int8
                # op runs on the codes as they are and the zero-point's term joins the bias.
                bias = _zero_point_bias(x.scale, zero_point, weight, weight_scale, bias, x.dtype)
                return ops.linear_a8w8(x.qdata, x.scale, weight, weight_scale, bias, x.dtype)
            return ops.linear_a8w8_asymmetric(
                x.qdata, x.scale, zero_point, weight, weight_scale, weight_shift, bias, x.dtype
            )
        x = x.dequantize()
    if weight_shift is None:
        return ops.linear_w8(x, weight, weight_scale, bias)
    if per_axis_shift:
        return ops.linear_w8_asymmetric(x, weight, weight_scale, weight_shift, bias)
    return ops.linear_affine(x, weight, weight_scale, weight_shift, bits, bias)


def _zero_point_bias(
    x_scale: torch.Tensor,
    zero_point: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``bias - x_scale * zero_point * (W 1)`` for an int8 ``weight`` ``[out, in]`` with ``weight_scale`` ``[out, 1]``:
    the term an activation's zero-point adds to a linear layer (its row sums are exact in int32)."""
    row_sums = ops.weight_row_sums(weight) * weight_scale.float().reshape(-1)
    correction = (x_scale.float() * zero_point.float()) * row_sums
    return (-correction if bias is None else bias.float() - correction).to(dtype)


def _dequantized(tree):
    return tree_map(lambda a: a.dequantize() if isinstance(a, QTensor) else a, tree)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must see through a call on these tensors (the quantized ops have no derivative)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _WeightHolder:
    """Carries a QTensor into an autograd.Function as a plain object (so it is not dispatched as a tensor)."""

    def __init__(self, weight: QTensor):
        self.weight = weight


class _FrozenQWeightLinear(torch.autograd.Function):
    """``F.linear`` with a frozen quantized weight and an input (or bias) that needs gradients, as in QLoRA.

    The forward runs the quantized op; the backward dequantizes the weight again for ``grad_output @ W``. So what
    autograd keeps for backward is the quantized storage, not a float copy of every layer's weight (dequantizing
    under autograd would hold as many float weights as the float model has, until backward).
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, bias: torch.Tensor | None, holder: _WeightHolder) -> torch.Tensor:
        ctx.holder = holder
        ctx.bias_shape = None if bias is None else bias.shape
        return _linear(input, holder.weight, bias)  # grad mode is off inside forward: the quantized op runs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad @ ctx.holder.weight.dequantize().to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).reshape(ctx.bias_shape)
        return grad_input, grad_bias, None


@register_qtensor_function(F.linear)
def _linear(input, weight, bias=None):
    frozen_2d = isinstance(weight, (PerAxisQWeight, PerAxisAffineQWeight, GroupedQWeight)) and weight.ndim == 2
    if frozen_2d and not weight.requires_grad and needs_grad(input, bias) and not isinstance(input, QTensor):
        if not (isinstance(weight, PerAxisQWeight) and weight.axis != 0):
            return _FrozenQWeightLinear.apply(input, bias, _WeightHolder(weight))
    if not needs_grad(input, weight, bias):
        if isinstance(weight, PerAxisQWeight) and weight.axis == 0 and weight.ndim == 2:
            return qlinear(input, weight.qdata, weight.scale, bias)
        if isinstance(weight, PerAxisAffineQWeight) and weight.ndim == 2:
            return qlinear(input, weight.qdata, weight.scale, bias, weight.shift, 8)
        if isinstance(weight, GroupedQWeight) and weight.ndim == 2:
            return qlinear(input, weight.qdata, weight.scale, bias, weight.shift, weight.qtype.bits)
    return F.linear(*_dequantized((input, weight, bias)))


@register_qtensor_function(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
def _matmul(input, other):
    # x @ w.t() with w quantized per output channel is a linear layer.
    if isinstance(other, PerAxisQWeight) and other.axis == 1 and other.ndim == 2 and input.ndim >= 1:
        return _linear(input, other.t())
    return torch.matmul(*_dequantized((input, other)))


@register_qtensor_function(F.conv2d)
def _conv2d(input, weight, bias=None, *args, **kwargs):
    return F.conv2d(*_dequantized((input, weight, bias)), *args, **kwargs)
