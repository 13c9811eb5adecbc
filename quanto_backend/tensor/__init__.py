"""The math of quantization and the QTensor family."""

from .activations import ACTIVATION_QTYPES, AffineQActivation, QActivation, quantize_activation
from .linear import qlinear
from .optimizers import (
    AbsmaxOptimizer,
    AffineOptimizer,
    HqqOptimizer,
    MinMaxOptimizer,
    MseOptimizer,
    SymmetricOptimizer,
    as_optimizer,
    choose_qparams,
)
from .qtensor import QTensor, register_qtensor_function
from .weights import (
    DEFAULT_GROUP_SIZE,
    WEIGHT_QTYPES,
    GroupedQWeight,
    PerAxisAffineQWeight,
    PerAxisQWeight,
    group_layout,
    quantize_weight,
    quantize_weight_with_scale,
)

__all__ = [
    "ACTIVATION_QTYPES",
    "DEFAULT_GROUP_SIZE",
    "WEIGHT_QTYPES",
    "AbsmaxOptimizer",
    "AffineOptimizer",
    "AffineQActivation",
    "GroupedQWeight",
    "HqqOptimizer",
    "MinMaxOptimizer",
    "MseOptimizer",
    "SymmetricOptimizer",
    "PerAxisAffineQWeight",
    "PerAxisQWeight",
    "QActivation",
    "QTensor",
    "as_optimizer",
    "choose_qparams",
    "group_layout",
    "qlinear",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_with_scale",
    "register_qtensor_function",
]
