"""QConv2d: the quantized ``torch.nn.Conv2d``."""

from __future__ import annotations

import torch
from torch import nn

from ..tensor import QActivation
from .qmodule import QModuleMixin, register_qmodule

__all__ = ["QConv2d"]


@register_qmodule(nn.Conv2d)
class QConv2d(QModuleMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized weights: 8-bit per output channel, 2/4-bit grouped over the flattened
    ``in_channels / groups * kh * kw`` inputs of each output channel."""

    @classmethod
    def qcreate(cls, module: nn.Conv2d, device=None, **qconfig) -> QConv2d:
        qmodule = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            dtype=module.weight.dtype,
            **qconfig,
        )
        return qmodule

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_channels, self.in_channels // self.groups, *self.kernel_size))

    def qforward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, QActivation):
            input = input.dequantize()
        if self._trains():
            weight = self._train_weight()
        elif self.weight_qtype is None:
            weight = self.weight
        else:
            # No quantized convolution kernel: the (small) conv weight is dequantized for the call.
            weight = self.qweight.dequantize()
        return self._conv_forward(input, weight, self.bias)
