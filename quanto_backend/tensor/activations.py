"""Quantized activations: symmetric int8/float8 with a per-tensor (0-dim) or per-token (``[..., 1]``) scale, and
asymmetric 8-bit codes with a static scale and zero-point: uint8 (``quint8``), or int8 (``qint8`` with a zero-point,
which calibration gives the inputs it finds mostly one-sided, such as GELU outputs)."""

from __future__ import annotations

import torch

from .. import ops
from ..qtypes import QType, as_qtype, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2, qint8, qtypes, quint8
from .qtensor import QTensor

__all__ = ["ACTIVATION_QTYPES", "AffineQActivation", "QActivation", "quantize_activation"]

ACTIVATION_QTYPES = (qint8, quint8, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2)


class QActivation(QTensor):
    """An activation quantized symmetrically: ``x ~= qdata * scale`` with float32 ``scale``."""

    _inner_names = ("qdata", "scale")
    # The qtype travels by name: torch.compile can carry a string through a graph, not a QType object.
    _meta_names = ("qtype_name",)

    @property
    def qtype(self) -> QType:
        return qtypes[self.qtype_name]

    def _dequantize(self) -> torch.Tensor:
        return (self.qdata.float() * self.scale).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # ReLU of symmetric int8 codes is exact on the codes: the output stays quantized with the same scale, so the
        # next quantized layer takes it as is (as optimum-quanto does, whose checkpoints are calibrated for that).
        if (
            func.overloadpacket is torch.ops.aten.relu
            and type(args[0]) is QActivation
            and args[0].qdata.dtype == torch.int8
        ):
            x = args[0]
            return QActivation(torch.relu(x.qdata), x.scale, x.qtype_name, x.shape, x.dtype)
        return super().__torch_dispatch__(func, types, args, kwargs)


class AffineQActivation(QActivation):
    """An activation quantized asymmetrically: ``x ~= (qdata - zero_point) * scale`` with uint8 (``quint8``) or
    int8 (``qint8``) ``qdata``, float32 ``scale`` and int32 ``zero_point`` (0-dim, or broadcastable per token)."""

    _inner_names = ("qdata", "scale", "zero_point")

    def _dequantize(self) -> torch.Tensor:
        return ((self.qdata.float() - self.zero_point) * self.scale).to(self.dtype)


def _quantize(
    x: torch.Tensor, scale: torch.Tensor | None, qtype: QType, zero_point: torch.Tensor | None
) -> QActivation:
    if zero_point is not None:
        if qtype is qint8:
            # int8 codes clamp(round(x / scale) + zero_point, -128, 127) are the uint8 codes of zero_point + 128,
            # shifted down by 128: flipping the top bit of each byte does that shift.
            codes = ops.quantize_asymmetric(x, scale, zero_point + 128)
            qdata = (codes ^ 128).view(torch.int8)
        else:
            qdata = ops.quantize_asymmetric(x, scale, zero_point)
        return AffineQActivation(qdata, scale.float(), zero_point, qtype.name, x.shape, x.dtype)
    if scale is None:
        qdata, scale = ops.quantize_per_token(x, qtype.dtype)
    else:
        qdata = ops.quantize_symmetric(x, scale, qtype.dtype)
    return QActivation(qdata, scale.float(), qtype.name, x.shape, x.dtype)


class _QuantizeActivation(torch.autograd.Function):
    """Quantization with a straight-through gradient, so training sees quantized activations."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, scale: torch.Tensor | None, qtype: QType, zero_point: torch.Tensor | None = None
    ) -> QActivation:
        return _quantize(x, scale, qtype, zero_point)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


def quantize_activation(
    x: torch.Tensor,
    qtype: QType | str = qint8,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> QActivation:
    """Quantize an activation.

    Args:
        x: the float activation.
        qtype: ``qint8``, ``qfloat8_e4m3fn`` or ``qfloat8_e5m2`` (symmetric), or ``quint8`` (asymmetric).
        scale: a static scale (0-dim, or broadcastable per token); ``None`` computes one scale per token
            (the last dimension reduced) on the fly (symmetric qtypes only).
        zero_point: the int32 zero-point of ``quint8`` (required with it), or of an asymmetric ``qint8`` (codes
            ``clamp(round(x / scale) + zero_point, -128, 127)``; needs a static scale); refused with float8.
    """
    qtype = as_qtype(qtype, ACTIVATION_QTYPES, "activations")
    # Identity, not dataclass equality: qtypes are registry singletons, and dynamo folds `is` to a constant.
    if qtype is quint8 and (scale is None or zero_point is None):
        raise ValueError("quint8 activations need a static scale and zero_point (from an observer or Calibration)")
    if qtype is not quint8 and zero_point is not None and (qtype is not qint8 or scale is None):
        raise ValueError(
            f"{qtype} activations take no zero_point here; quint8 takes one, and qint8 with a static scale"
        )
    if isinstance(x, QActivation):
        x = x.dequantize()
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuantizeActivation.apply(x, scale, qtype, zero_point)
    return _quantize(x, scale, qtype, zero_point)  # inference: without autograd.Function's cost (about 50 us)
