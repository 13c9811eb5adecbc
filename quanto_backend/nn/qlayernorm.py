"""QLayerNorm: ``torch.nn.LayerNorm`` whose output is quantized (its affine parameters stay float)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tensor import QActivation
from .qmodule import QModuleMixin, register_qmodule

__all__ = ["QLayerNorm"]


@register_qmodule(nn.LayerNorm)
class QLayerNorm(QModuleMixin, nn.LayerNorm):
    """A LayerNorm feeding quantized activations to the next layer. It has no quantized weights, so it is only
    created when activations are quantized."""

    quantizes_input = False

    @classmethod
    def from_module(cls, module: nn.LayerNorm, **qconfig):
        # Dynamic activations are quantized per token by the consuming layer: a normalization has nothing to do.
        if qconfig.get("activations") is None or qconfig.get("activation_scales", "static") == "dynamic":
            return None
        return super().from_module(module, **{**qconfig, "weights": None})

    @classmethod
    def qcreate(cls, module: nn.LayerNorm, device=None, **qconfig) -> QLayerNorm:
        qmodule = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            dtype=None if module.weight is None else module.weight.dtype,
            **qconfig,
        )
        return qmodule

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size(self.normalized_shape)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        # The input of a normalization is never quantized: only its output feeds quantized layers.
        return x.dequantize() if isinstance(x, QActivation) else x

    def qforward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
