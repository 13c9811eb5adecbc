"""QLinear: the quantized ``torch.nn.Linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tensor import QActivation, qlinear
from ..tensor.linear import needs_grad
from .qmodule import QModuleMixin, register_qmodule

__all__ = ["QLinear"]


@register_qmodule(nn.Linear)
class QLinear(QModuleMixin, nn.Linear):
    """``nn.Linear`` with quantized weights (int2/int4/int8/float8) and optionally quantized activations."""

    @classmethod
    def qcreate(cls, module: nn.Linear, device=None, **qconfig) -> QLinear:
        qmodule = cls(
            module.in_features, module.out_features, module.bias is not None, dtype=module.weight.dtype, **qconfig
        )
        return qmodule

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def qforward(self, input: torch.Tensor) -> torch.Tensor:
        if self._trains():
            if isinstance(input, QActivation):
                input = input.dequantize()
            return F.linear(input, self._train_weight(), self.bias)
        if self.weight_qtype is None:
            return F.linear(input.dequantize() if isinstance(input, QActivation) else input, self.weight, self.bias)
        if not self.frozen or needs_grad(input, self.bias):
            # The QTensor handler of F.linear dequantizes when gradients flow (to the input or the bias), which
            # the quantized op has no autograd formula for: frozen models can be fine-tuned around their weights.
            return F.linear(input, self.qweight, self.bias)
        shift = self._parameters.get("weight_shift")
        return qlinear(input, self.weight, self.weight_scale, self.bias, shift, self.weight_qtype.bits)
