"""optimum-quanto's tensor-level names, each working on this library's QTensor family.

* The tensor classes by their optimum-quanto names: ``isinstance`` answers for this library's classes
  (``WeightQBytesTensor``: an 8-bit per-axis weight, ``ActivationQBytesTensor``: a quantized activation,
  ``WeightQBitsTensor``/``QBitsTensor``: a 2/4-bit group-wise weight, ``QBytesTensor``: either 8-bit kind); the
  concrete ones build this library's tensors from optimum-quanto's constructor arguments, and their ``quantize``
  classmethods quantize. What they return is this library's class (``PerAxisQWeight``, ``QActivation``,
  ``GroupedQWeight``), whose storage is ``qdata``/``scale``/``shift``, not ``_data``/``_scale``/``_shift``.
* ``quantize_weight`` with both signatures, ``absmax_scale`` and ``MaxOptimizer``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .. import ops
from ..qtypes import QType, as_qtype, qint8
from ..tensor import (
    WEIGHT_QTYPES,
    GroupedQWeight,
    MinMaxOptimizer,
    PerAxisQWeight,
    QActivation,
    quantize_activation,
    quantize_weight_with_scale,
)
from ..tensor import quantize_weight as _quantize_weight

__all__ = [
    "ActivationQBytesTensor",
    "MaxOptimizer",
    "QBitsTensor",
    "QBytesTensor",
    "WeightQBitsTensor",
    "WeightQBytesTensor",
    "absmax_scale",
    "quantize_weight",
]


class MaxOptimizer(MinMaxOptimizer):
    """optimum-quanto's name for the min-max affine optimizer (each group's ``[min, max]`` onto the codes).

    Called as ``MaxOptimizer()(base, qtype, axis, group_size)``, it returns optimum-quanto's ``(scale, shift)``
    (``w ~= q * scale - shift``), ready for ``quantize_weight(base, qtype, axis, scale, shift, group_size)``.
    A subclass in optimum-quanto's style may call ``super().optimize(base, qtype, axis)`` for the same.
    """

    def optimize(self, base: torch.Tensor, qtype: QType, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This library's ``optimize(groups, qtype)``; with ``axis`` (0), optimum-quanto's form: ``base`` the
        grouped weight ``[n_groups_total, group_size]``, returning ``(scale, shift)`` ``[n_groups_total, 1]`` in
        ``base``'s dtype, with ``w ~= q * scale - shift``."""
        if axis is None:
            return super().optimize(base, qtype)
        if axis != 0:
            raise ValueError(f"axis must be 0: weights are quantized per output channel, got {axis!r}")
        scale, shift = super().optimize(base.reshape(base.shape[0], 1, -1), qtype)
        shape = (base.shape[0], *([1] * (base.ndim - 1)))
        return scale.to(base.dtype).reshape(shape), (shift * scale).to(base.dtype).reshape(shape)


def absmax_scale(base: torch.Tensor, qtype: QType | str = qint8, axis: int | None = None) -> torch.Tensor:
    """The symmetric scale ``absmax(base) / qmax`` in ``base``'s dtype: per tensor (``axis=None``, 0-dim) or
    keeping ``axis`` (``-1``: the last one), for the 8-bit qtypes (``qint8``, ``qfloat8*``)."""
    qtype = as_qtype(qtype)
    if qtype.bits != 8 or qtype.dtype == torch.uint8:
        raise ValueError(f"absmax_scale is for the symmetric 8-bit qtypes (qint8, qfloat8*), got {qtype}")
    absmax = base.detach().abs()
    if axis is None:
        absmax = absmax.amax()
    else:
        keep = axis % base.ndim
        absmax = absmax.amax(dim=[d for d in range(base.ndim) if d != keep], keepdim=True)
    return (absmax.float() / qtype.qmax).to(base.dtype)


_QUANTO_WEIGHT_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("axis", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("scale", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("shift", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("group_size", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("activation_qtype", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("optimized", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=True),
    ]
)


def quantize_weight(weight: torch.Tensor, qtype: QType | str = qint8, *args: Any, **kwargs: Any):
    """Quantize a float weight ``[out, in, ...]``, with either signature:

    * ``quantize_weight(weight, qtype, group_size=None, optimizer=None)``: this library's; the scales are chosen
      here (see :func:`quanto_backend.tensor.quantize_weight`).
    * ``quantize_weight(t, qtype, axis, scale, shift=None, group_size=None, activation_qtype=None,
      optimized=True)``: optimum-quanto's, with parameters from an optimizer
      (:func:`quanto_backend.tensor.quantize_weight_with_scale`). ``requires_grad`` is kept: gradients pass
      straight through to ``t``. ``activation_qtype`` and ``optimized`` are accepted and have no effect: the
      kernel is chosen at each call from the tensors' dtypes and device.

    The second form is recognized by a ``scale`` (keyword or fourth argument) or an ``axis`` keyword.
    """
    if "scale" in kwargs or "axis" in kwargs or (len(args) >= 2 and isinstance(args[1], torch.Tensor)):
        try:
            bound = _QUANTO_WEIGHT_SIGNATURE.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise TypeError(f"quantize_weight(t, qtype, axis, scale, shift=None, group_size=None, ...): {e}") from e
        return quantize_weight_with_scale(
            weight, qtype, bound["axis"], bound["scale"], bound.get("shift"), bound.get("group_size")
        )
    return _quantize_weight(weight, qtype, *args, **kwargs)


class _QuantoName(type):
    """Metaclass of the optimum-quanto class names: ``isinstance``/``issubclass`` answer for the classes of this
    library that they stand for."""

    _stands_for: tuple[type, ...]

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._stands_for)

    def __subclasscheck__(cls, sub: type) -> bool:
        return isinstance(sub, type) and issubclass(sub, cls._stands_for)


class QBytesTensor(metaclass=_QuantoName):
    """An 8-bit quantized tensor: an 8-bit per-axis weight or a quantized activation (``isinstance`` only; build
    one with :class:`WeightQBytesTensor` or :class:`ActivationQBytesTensor`)."""

    _stands_for = (PerAxisQWeight, QActivation)

    def __new__(cls, *args: Any, **kwargs: Any):
        raise TypeError("QBytesTensor is the base of WeightQBytesTensor and ActivationQBytesTensor: build one of those")


class WeightQBytesTensor(QBytesTensor):
    """An 8-bit (int8 / float8) weight with one scale per output channel: this library's ``PerAxisQWeight``."""

    _stands_for = (PerAxisQWeight,)

    def __new__(cls, qtype, axis, size, stride, data, scale, activation_qtype=None, requires_grad=False):
        """optimum-quanto's constructor: ``data`` the int8/float8 codes ``size``, ``scale`` ``[out, 1, ...]`` (or
        one value with ``axis=None``); ``stride`` and ``activation_qtype`` are not needed and ignored."""
        qtype = as_qtype(qtype, WEIGHT_QTYPES, "weights")
        if axis not in (0, None):
            raise ValueError(f"WeightQBytesTensor axis must be 0 (or None for one scale), got {axis!r}")
        size = torch.Size(size)
        per_axis = (size[0], *([1] * (len(size) - 1)))
        if scale.numel() == 1:
            scale = scale.reshape([1] * len(size)).expand(per_axis).contiguous()
        if tuple(data.shape) != tuple(size) or data.dtype != qtype.dtype or tuple(scale.shape) != per_axis:
            raise ValueError(
                f"WeightQBytesTensor needs {qtype.dtype} data of shape {tuple(size)} and a scale {per_axis}, got "
                f"{data.dtype} {tuple(data.shape)} and {tuple(scale.shape)}"
            )
        return PerAxisQWeight(data, scale, qtype, 0, size, scale.dtype, requires_grad)

    @classmethod
    def quantize(cls, base, qtype, axis, scale, activation_qtype=None, optimized=True) -> PerAxisQWeight:
        """Quantize ``base`` with ``scale`` (straight-through gradient)."""
        return quantize_weight_with_scale(base, qtype, axis, scale)


class ActivationQBytesTensor(QBytesTensor):
    """A quantized activation (int8 / float8, per-tensor scale): this library's ``QActivation``."""

    _stands_for = (QActivation,)

    def __new__(cls, qtype, size, stride, data, scale, requires_grad=False):
        """optimum-quanto's constructor: ``data`` the codes of shape ``size``, ``scale`` one value; the tensor's
        dtype is ``scale``'s."""
        qtype = as_qtype(qtype)
        if tuple(data.shape) != tuple(size) or data.dtype != qtype.dtype or scale.numel() != 1:
            raise ValueError(
                f"ActivationQBytesTensor needs {qtype.dtype} data of shape {tuple(size)} and a single scale, got "
                f"{data.dtype} {tuple(data.shape)} and a scale of {scale.numel()} values"
            )
        return QActivation(data, scale.float().reshape(()), qtype.name, torch.Size(size), scale.dtype, requires_grad)

    @classmethod
    def quantize(cls, base: torch.Tensor, qtype, scale: torch.Tensor) -> QActivation:
        """Quantize ``base`` with the per-tensor ``scale`` (straight-through gradient)."""
        return quantize_activation(base, qtype, scale)


class QBitsTensor(metaclass=_QuantoName):
    """A 2/4-bit group-wise quantized tensor (``isinstance`` only; build one with :class:`WeightQBitsTensor`)."""

    _stands_for = (GroupedQWeight,)

    def __new__(cls, *args: Any, **kwargs: Any):
        raise TypeError("QBitsTensor is the base of WeightQBitsTensor: build one of those")


class WeightQBitsTensor(QBitsTensor):
    """A 2/4-bit weight, affine per group of inputs: this library's ``GroupedQWeight``."""

    _stands_for = (GroupedQWeight,)

    def __new__(cls, qtype, axis, group_size, size, stride, data, scale, shift, requires_grad=False):
        """optimum-quanto's constructor: ``data`` the unpacked uint8 codes, grouped ``[out * n_groups,
        group_size]`` (``size`` itself without groups); ``scale`` and ``shift`` ``[out * n_groups, 1]`` with
        ``w = q * scale - shift`` (float shift) or ``w = (q - shift) * scale`` (integer shift)."""
        qtype = as_qtype(qtype, WEIGHT_QTYPES, "weights")
        if not qtype.is_packed or axis != 0:
            raise ValueError(f"WeightQBitsTensor takes qint4/qint2 along axis 0, got {qtype} along axis {axis!r}")
        size = torch.Size(size)
        n_inputs = size[1:].numel()
        group_size = n_inputs if group_size is None else group_size
        if data.dtype != torch.uint8 or data.numel() != size.numel() or n_inputs % group_size:
            raise ValueError(
                f"WeightQBitsTensor needs the unpacked uint8 codes of a {tuple(size)} weight in groups dividing "
                f"{n_inputs}, got {data.dtype} {tuple(data.shape)} with group_size {group_size}"
            )
        n_groups = n_inputs // group_size
        scale = scale.reshape(size[0], n_groups)
        shift = shift.reshape(size[0], n_groups)
        shift = (shift.float() / scale.float() if shift.is_floating_point() else shift.float()).to(scale.dtype)
        packed = ops.pack(data.reshape(size[0], n_inputs).contiguous(), qtype.bits)
        return GroupedQWeight(packed, scale, shift, qtype, group_size, size, scale.dtype, requires_grad)

    @classmethod
    def quantize(cls, base, qtype, axis, group_size, scale, shift, optimized=True) -> GroupedQWeight:
        """Quantize ``base`` with optimum-quanto's ``scale`` and ``shift`` (straight-through gradient)."""
        return quantize_weight_with_scale(base, qtype, axis, scale, shift, group_size)
