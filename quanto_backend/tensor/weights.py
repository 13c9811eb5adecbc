"""Quantized weights: 8-bit per-axis (int8, float8) and 2/4-bit group-wise affine, and ``quantize_weight``."""

from __future__ import annotations

import torch

from .. import ops
from ..qtypes import QType, as_qtype, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2, qint2, qint4, qint8, quint8
from .optimizers import (
    AbsmaxOptimizer,
    AffineOptimizer,
    MinMaxOptimizer,
    as_optimizer,
    choose_qparams,
    default_affine_optimizer,
)
from .qtensor import QTensor

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "GroupedQWeight",
    "PerAxisAffineQWeight",
    "PerAxisQWeight",
    "WEIGHT_QTYPES",
    "group_layout",
    "quantize_weight",
    "quantize_weight_with_scale",
]

WEIGHT_QTYPES = (qint2, qint4, qint8, quint8, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2)
DEFAULT_GROUP_SIZE = 128
# Kernels read whole bytes of packed codes and vectorise along the input dimension: groups are multiples of 8.
GROUP_SIZE_MULTIPLE = 8


class PerAxisQWeight(QTensor):
    """An 8-bit (int8 or float8) weight with one symmetric scale per output channel.

    ``qdata`` has the weight's shape; ``scale`` is ``[out, 1, ...]`` (axis 0) or, once transposed, ``[1, out]``.
    """

    _inner_names = ("qdata", "scale")
    _meta_names = ("qtype", "axis")

    def _dequantize(self) -> torch.Tensor:
        return ops.dequantize_symmetric(self.qdata, self.scale).to(self.dtype)

    def _transposed(self) -> PerAxisQWeight:
        if self.ndim != 2:
            raise ValueError(f"Only a 2-D quantized weight can be transposed, got shape {tuple(self.shape)}")
        return PerAxisQWeight(self.qdata.t(), self.scale.t(), self.qtype, 1 - self.axis, self.shape[::-1], self.dtype)


class PerAxisAffineQWeight(QTensor):
    """An 8-bit asymmetric weight (``quint8``): uint8 codes with one scale and one integer zero-point per output
    channel, ``w ~= (q - shift) * scale``.

    ``qdata`` is uint8 ``[out, in]``; ``scale`` and ``shift`` are ``[out, 1]`` in the weight's float dtype (the
    shift holds integers in [0, 255], exact in bfloat16/float16), so integer kernels stay exact.
    """

    _inner_names = ("qdata", "scale", "shift")
    _meta_names = ("qtype",)

    def _dequantize(self) -> torch.Tensor:
        w = ops.dequantize_asymmetric(self.qdata.reshape(self.shape[0], -1), self.scale, self.shift)
        return w.reshape(self.shape).to(self.dtype)


class GroupedQWeight(QTensor):
    """A 2/4-bit weight, affine per group of ``group_size`` consecutive inputs: ``w ~= (q - shift) * scale``.

    ``qdata`` is the packed uint8 codes ``[out, padded_in * bits / 8]`` (the input dimension padded to whole
    groups); ``scale`` and ``shift`` are ``[out, n_groups]`` in the weight's float dtype. A conv weight is
    grouped over its flattened ``in * kh * kw`` inputs.
    """

    _inner_names = ("qdata", "scale", "shift")
    _meta_names = ("qtype", "group_size")

    def _dequantize(self) -> torch.Tensor:
        w = ops.dequantize_affine(self.qdata, self.scale, self.shift, self.qtype.bits)
        return w[:, : self.shape[1:].numel()].reshape(self.shape).to(self.dtype)


def _rounded_inputs(in_features: int) -> int:
    """``in_features`` rounded up to a multiple of :data:`GROUP_SIZE_MULTIPLE`: the widest group it needs."""
    return -(-in_features // GROUP_SIZE_MULTIPLE) * GROUP_SIZE_MULTIPLE


def group_layout(in_features: int, group_size: int | None) -> tuple[int, int]:
    """The effective group size and the padded input dimension for ``in_features`` inputs.

    The group never exceeds the (rounded-up) input dimension; when ``in_features`` is not a multiple of the
    group size, the last group is padded, so every group has the requested size and none is silently wrong.
    """
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if not isinstance(group_size, int) or group_size <= 0 or group_size % GROUP_SIZE_MULTIPLE:
        raise ValueError(f"group_size must be a positive multiple of {GROUP_SIZE_MULTIPLE}, got {group_size!r}")
    group_size = min(group_size, _rounded_inputs(in_features))
    return group_size, -(-in_features // group_size) * group_size


def quantize_weight(
    weight: torch.Tensor,
    qtype: QType | str = qint8,
    group_size: int | None = None,
    optimizer: AbsmaxOptimizer | AffineOptimizer | str | None = None,
) -> PerAxisQWeight | PerAxisAffineQWeight | GroupedQWeight:
    """Quantize a float weight ``[out, in, ...]``.

    Args:
        weight: the float weight; output channels on axis 0.
        qtype: ``qint8``/``qfloat8*`` give per-output-channel symmetric scales; ``qint4``/``qint2`` give
            group-wise affine scale and shift along the inputs; ``quint8`` gives per-output-channel uint8 codes
            with a scale and an integer zero-point (``shift``) from each channel's min and max.
        group_size: inputs per group for 2/4-bit (default 128); ignored for 8-bit.
        optimizer: ``"absmax"`` (8-bit default), ``"mse"``, ``"minmax"`` or ``"hqq"`` (2/4-bit; default ``"mse"``
            at 4 bits, ``"hqq"`` at 2 bits), or an optimizer instance; ``quint8`` takes only ``"minmax"`` (its
            default).
    """
    qtype = as_qtype(qtype, WEIGHT_QTYPES, "weights")
    optimizer = as_optimizer(optimizer)
    if not weight.is_floating_point():
        raise TypeError(f"quantize_weight needs a floating point weight, got {weight.dtype}")
    if weight.ndim < 2:
        raise ValueError(f"quantize_weight needs a weight of at least 2 dims [out, in, ...], got {tuple(weight.shape)}")
    if weight.device.type != "meta" and not _all_finite(weight):
        raise ValueError("Cannot quantize a weight holding NaN or Inf values")
    if qtype.is_packed:
        return _quantize_grouped(weight, qtype, group_size, optimizer or default_affine_optimizer(qtype))
    if qtype == quint8:
        return _quantize_per_axis_affine(weight, qtype, optimizer)
    if isinstance(optimizer, AffineOptimizer):
        raise ValueError(f"{qtype} weights take a symmetric optimizer ('absmax'), not {type(optimizer).__name__}")
    scale = (optimizer or AbsmaxOptimizer())(weight, qtype, axis=0).to(weight.dtype)
    data = ops.quantize_symmetric(weight, scale, qtype.dtype)
    return PerAxisQWeight(data, scale, qtype, 0, weight.shape, weight.dtype)


def _all_finite(weight: torch.Tensor) -> bool:
    # aminmax propagates NaN and Inf, in one vectorized pass: 10x faster than isfinite().all() on CPU, which
    # writes a bool tensor of the weight's size first (a load quantizes every weight of the model once).
    if weight.numel() == 0 or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return bool(torch.isfinite(weight).all())
    low, high = weight.aminmax()
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _padded_inputs(flat: torch.Tensor, padded_in: int) -> torch.Tensor:
    """``flat`` ``[out, in]`` widened to ``padded_in`` inputs by repeating its last one, which keeps each padded
    group's min and max, hence its scale and shift, unchanged."""
    if padded_in == flat.shape[1]:
        return flat
    return torch.cat([flat, flat[:, -1:].expand(-1, padded_in - flat.shape[1])], dim=1)


def _quantize_grouped(weight: torch.Tensor, qtype: QType, group_size: int | None, optimizer) -> GroupedQWeight:
    if not isinstance(optimizer, AffineOptimizer):
        name = type(optimizer).__name__
        raise ValueError(f"{qtype} weights take an affine optimizer ('minmax' or 'hqq'), not {name}")
    flat = weight.reshape(weight.shape[0], -1)
    group_size, padded_in = group_layout(flat.shape[1], group_size)
    flat = _padded_inputs(flat, padded_in)
    if weight.device.type == "meta":
        scale, shift = (flat.new_empty(flat.shape[0], padded_in // group_size, dtype=torch.float32),) * 2
    else:
        scale, shift = optimizer(flat.unflatten(1, (-1, group_size)), qtype)
    scale, shift = scale.to(weight.dtype), shift.to(weight.dtype)
    data = ops.quantize_affine(flat, scale, shift, qtype.bits)
    return GroupedQWeight(data, scale, shift, qtype, group_size, weight.shape, weight.dtype)


def _quantize_per_axis_affine(weight: torch.Tensor, qtype: QType, optimizer) -> PerAxisAffineQWeight:
    if optimizer is not None and type(optimizer) is not MinMaxOptimizer:
        raise ValueError(f"{qtype} weights take the 'minmax' optimizer, not {type(optimizer).__name__}")
    flat = weight.reshape(weight.shape[0], -1)
    scale, zero_point = choose_qparams(flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True), qtype, False)
    # The codes are computed with the scale as stored (in the weight's dtype), so dequantization matches them.
    scale, shift = scale.to(weight.dtype), zero_point.to(weight.dtype)
    data = ops.quantize_asymmetric(flat, scale, shift)
    return PerAxisAffineQWeight(data, scale, shift, qtype, weight.shape, weight.dtype)


class _StraightThrough(torch.autograd.Function):
    """Quantization with given parameters; the gradient passes straight through to the float weight."""

    @staticmethod
    def forward(ctx, weight, qtype, scale, shift, group_size):
        return _quantize_with_scale(weight, qtype, scale, shift, group_size)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


def quantize_weight_with_scale(
    weight: torch.Tensor,
    qtype: QType | str,
    axis: int | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    group_size: int | None = None,
) -> PerAxisQWeight | GroupedQWeight:
    """Quantize ``weight`` with parameters chosen elsewhere, in optimum-quanto's convention.

    The result keeps ``weight.requires_grad``: the gradient of anything computed from it flows straight through
    to ``weight`` (quantization-aware training).

    Args:
        weight: the float weight ``[out, in, ...]``.
        qtype: ``qint8``/``qfloat8*`` (``scale`` only) or ``qint4``/``qint2`` (``scale`` and ``shift``).
        axis: 0 (one scale per output channel), or ``None`` with a single scale for the whole 8-bit weight.
            The last axis (-1) is not supported: weights are always quantized along their output channels.
        scale: ``[out, 1, ...]`` (8-bit), or ``[out * n_groups, 1]`` with ``group_size`` (``[out, 1, ...]`` without).
        shift: 2/4-bit only: a float shift with ``w ~= q * scale - shift``, or uint8/int zero-points with
            ``w ~= (q - shift) * scale``; shaped like ``scale``.
        group_size: inputs per group of the 2/4-bit formats (``None``: one group per output channel).
    """
    qtype = as_qtype(qtype, WEIGHT_QTYPES, "weights")
    if axis not in (0, None):
        raise ValueError(
            f"axis must be 0 (or None for a per-tensor 8-bit scale), got {axis!r}: quanto_backend quantizes weights "
            "along axis 0 only; quantize the transposed weight instead"
        )
    if not weight.is_floating_point() or weight.ndim < 2:
        raise ValueError(
            f"quantize_weight needs a floating point weight [out, in, ...], got {weight.dtype} {tuple(weight.shape)}"
        )
    if qtype is quint8:
        raise ValueError("quint8 weights choose their own scale and zero-point: use quantize_weight(w, quint8)")
    if qtype.is_packed:
        if shift is None:
            raise ValueError(f"{qtype} weights need a shift as well as a scale")
    elif shift is not None or group_size is not None:
        raise ValueError(f"{qtype} weights take a scale only: shift and group_size are for qint4/qint2")
    if torch.is_grad_enabled() and weight.requires_grad:
        # The parameters get no gradient, so their history (an optimizer's, from the weight itself) is cut here:
        # torch 2.11 has no derivative for aminmax (2.13 has), and backward would fail on it.
        shift = None if shift is None else shift.detach()
        return _StraightThrough.apply(weight, qtype, scale.detach(), shift, group_size)
    return _quantize_with_scale(weight, qtype, scale, shift, group_size)


def _quantize_with_scale(weight, qtype, scale, shift, group_size):
    out = weight.shape[0]
    per_axis_shape = (out, *([1] * (weight.ndim - 1)))
    if not qtype.is_packed:
        if scale.numel() == 1:
            scale = scale.reshape([1] * weight.ndim).expand(per_axis_shape)
        if tuple(scale.shape) != per_axis_shape:
            raise ValueError(
                f"scale of shape {tuple(scale.shape)} given for a weight {tuple(weight.shape)} "
                f"quantized along axis 0: expected {per_axis_shape}"
            )
        scale = scale.detach().to(weight.dtype).contiguous()
        data = ops.quantize_symmetric(weight.detach(), scale, qtype.dtype)
        return PerAxisQWeight(data, scale, qtype, 0, weight.shape, weight.dtype)
    flat = weight.detach().reshape(out, -1)
    if group_size is None:  # one group per output channel, padded as group_layout pads
        flat = _padded_inputs(flat, _rounded_inputs(flat.shape[1]))
    size = flat.shape[1] if group_size is None else group_size
    if group_layout(flat.shape[1], size) != (size, flat.shape[1]):
        raise ValueError(
            f"group_size {size} does not fit {flat.shape[1]} inputs: groups must be a multiple of "
            f"{GROUP_SIZE_MULTIPLE} that divides the inputs of an output channel"
        )
    n_groups = flat.shape[1] // size
    for name, t in (("scale", scale), ("shift", shift)):
        if t.numel() != out * n_groups:
            raise ValueError(f"{name} has {t.numel()} values; {out} outputs x {n_groups} groups need {out * n_groups}")
    scale = scale.detach().reshape(out, n_groups).float()
    shift = shift.detach().reshape(out, n_groups)
    # optimum-quanto's float shift is in the weight's units (w ~= q * scale - shift); this library's is in codes.
    shift = shift.float() / scale if shift.is_floating_point() else shift.float()
    scale, shift = scale.to(weight.dtype), shift.to(weight.dtype)
    data = ops.quantize_affine(flat, scale, shift, qtype.bits)
    return GroupedQWeight(data, scale, shift, qtype, size, weight.shape, weight.dtype)
