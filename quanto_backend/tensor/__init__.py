"""The math of quantization and the QTensor family."""

from .activations import ACTIVATION_QTYPES, QActivation, quantize_activation
from .linear import qlinear
from .optimizers import AbsmaxOptimizer, AffineOptimizer, HqqOptimizer, MinMaxOptimizer, as_optimizer
from .qtensor import QTensor, register_qtensor_function
from .weights import (
    DEFAULT_GROUP_SIZE,
    WEIGHT_QTYPES,
    GroupedQWeight,
    PerAxisQWeight,
    group_layout,
    quantize_weight,
)

__all__ = [
    "ACTIVATION_QTYPES",
    "DEFAULT_GROUP_SIZE",
    "WEIGHT_QTYPES",
    "AbsmaxOptimizer",
    "AffineOptimizer",
    "GroupedQWeight",
    "HqqOptimizer",
    "MinMaxOptimizer",
    "PerAxisQWeight",
    "QActivation",
    "QTensor",
    "as_optimizer",
    "group_layout",
    "qlinear",
    "quantize_activation",
    "quantize_weight",
    "register_qtensor_function",
]
