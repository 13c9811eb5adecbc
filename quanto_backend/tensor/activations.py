"""Quantized activations: symmetric int8/float8 with a per-tensor (0-dim) or per-token (``[..., 1]``) scale."""

from __future__ import annotations

import torch

from .. import ops
from ..qtypes import QType, as_qtype, qfloat8_e4m3fn, qfloat8_e5m2, qint8
from .qtensor import QTensor

__all__ = ["ACTIVATION_QTYPES", "QActivation", "quantize_activation"]

ACTIVATION_QTYPES = (qint8, qfloat8_e4m3fn, qfloat8_e5m2)


class QActivation(QTensor):
    """An activation quantized symmetrically: ``x ~= qdata * scale`` with float32 ``scale``."""

    _inner_names = ("qdata", "scale")
    _meta_names = ("qtype",)

    @staticmethod
    def __new__(cls, qdata, scale, qtype, shape, dtype, requires_grad=False):
        return QTensor.__new__(cls, shape=shape, dtype=dtype, device=qdata.device, requires_grad=requires_grad)

    def __init__(self, qdata, scale, qtype: QType, shape, dtype, requires_grad=False):
        self.qdata, self.scale, self.qtype = qdata, scale, qtype

    def _dequantize(self) -> torch.Tensor:
        return (self.qdata.float() * self.scale).to(self.dtype)


class _QuantizeActivation(torch.autograd.Function):
    """Quantization with a straight-through gradient, so training sees quantized activations."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor | None, qtype: QType) -> QActivation:
        if scale is None:
            qdata, scale = ops.quantize_per_token(x, qtype.dtype)
        else:
            qdata = ops.quantize_symmetric(x, scale, qtype.dtype)
        return QActivation(qdata, scale.float(), qtype, x.shape, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def quantize_activation(x: torch.Tensor, qtype: QType | str = qint8, scale: torch.Tensor | None = None) -> QActivation:
    """Quantize an activation.

    Args:
        x: the float activation.
        qtype: ``qint8``, ``qfloat8_e4m3fn`` or ``qfloat8_e5m2``.
        scale: a static scale (0-dim, or broadcastable per token); ``None`` computes one scale per token
            (the last dimension reduced) on the fly.
    """
    qtype = as_qtype(qtype, ACTIVATION_QTYPES, "activations")
    if isinstance(x, QActivation):
        x = x.dequantize()
    return _QuantizeActivation.apply(x, scale, qtype)
