"""quanto-backend: quantization of PyTorch models, with Hugging Face integration and CUDA kernels.

Quick start::

    from quanto_backend import quantize, freeze, qint8
    quantize(model, weights=qint8)
    freeze(model)
"""

from .calibrate import Calibration
from .nn import QConv2d, QLayerNorm, QLinear, QModuleMixin, register_qmodule
from .qtypes import QType, qfloat8, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, qtypes, quint8
from .quantize import freeze, quantization_map, quantize, requantize
from .tensor import (
    AbsmaxOptimizer,
    AffineOptimizer,
    GroupedQWeight,
    HqqOptimizer,
    MinMaxOptimizer,
    PerAxisQWeight,
    QActivation,
    QTensor,
    quantize_activation,
    quantize_weight,
)

__version__ = "0.1.0"

__all__ = [
    "AbsmaxOptimizer",
    "AffineOptimizer",
    "Calibration",
    "GroupedQWeight",
    "HqqOptimizer",
    "MinMaxOptimizer",
    "PerAxisQWeight",
    "QActivation",
    "QConv2d",
    "QLayerNorm",
    "QLinear",
    "QModuleMixin",
    "QTensor",
    "QType",
    "freeze",
    "qfloat8",
    "qfloat8_e4m3fn",
    "qfloat8_e5m2",
    "qint2",
    "qint4",
    "qint8",
    "qtypes",
    "quantization_map",
    "quantize",
    "quantize_activation",
    "quantize_weight",
    "quint8",
    "register_qmodule",
    "requantize",
]
