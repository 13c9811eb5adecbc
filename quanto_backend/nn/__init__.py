"""Quantized modules and their registry."""

from .qconv2d import QConv2d
from .qlayernorm import QLayerNorm
from .qlinear import QLinear
from .qmodule import QModuleMixin, qmodule_class, quantize_module, register_qmodule

__all__ = ["QConv2d", "QLayerNorm", "QLinear", "QModuleMixin", "qmodule_class", "quantize_module", "register_qmodule"]
