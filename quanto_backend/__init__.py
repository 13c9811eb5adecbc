"""quanto-backend: quantization of PyTorch models, with Hugging Face integration and CUDA kernels.

Quick start::

    from quanto_backend import quantize, freeze, qint8
    quantize(model, weights=qint8)
    freeze(model)
"""

from .calibrate import Calibration
from .integrations import register_when_imported as _register_with_hf
from .nn import QConv2d, QLayerNorm, QLinear, QModuleMixin, register_qmodule
from .observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer
from .qtypes import QType, qfloat8, qfloat8_e4m3fn, qfloat8_e5m2, qint2, qint4, qint8, qtypes, quint8
from .quantize import freeze, quantization_map, quantize, requantize
from .smooth import smooth_quant
from .static import convert_static, insert_observers
from .tensor import (
    AbsmaxOptimizer,
    AffineOptimizer,
    AffineQActivation,
    GroupedQWeight,
    HqqOptimizer,
    MinMaxOptimizer,
    MseOptimizer,
    PerAxisAffineQWeight,
    PerAxisQWeight,
    QActivation,
    QTensor,
    choose_qparams,
    quantize_activation,
    quantize_weight,
)

# Registration with transformers and diffusers: neither library discovers plugins, so a checkpoint saved with
# quant_method "quanto_backend" only loads after `import quanto_backend`. It is done as soon as either library's
# quantizers are imported (now, if they already are), so that this import stays light.
_register_with_hf()

__version__ = "0.1.0"

_MODEL_HELPERS = (
    "QuantizedDiffusersModel",
    "QuantizedModelForCausalLM",
    "QuantizedPixArtTransformer2DModel",
    "QuantizedTransformersModel",
)


def __getattr__(name: str):
    # QuantoConfig and the model helpers import transformers/diffusers classes: loaded on first use only.
    if name == "QuantoConfig":
        from .integrations.config import QuantoConfig

        return QuantoConfig
    if name in _MODEL_HELPERS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'quanto_backend' has no attribute {name!r}")


__all__ = [
    "AbsmaxOptimizer",
    "AffineOptimizer",
    "AffineQActivation",
    "Calibration",
    "GroupedQWeight",
    "HistogramObserver",
    "HqqOptimizer",
    "MinMaxObserver",
    "MinMaxOptimizer",
    "MovingAverageMinMaxObserver",
    "MseOptimizer",
    "Observer",
    "PerAxisAffineQWeight",
    "PerAxisQWeight",
    "QActivation",
    "QConv2d",
    "QLayerNorm",
    "QLinear",
    "QModuleMixin",
    "QTensor",
    "QType",
    "QuantizedDiffusersModel",
    "QuantizedModelForCausalLM",
    "QuantizedPixArtTransformer2DModel",
    "QuantizedTransformersModel",
    "QuantoConfig",
    "choose_qparams",
    "convert_static",
    "freeze",
    "insert_observers",
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
    "smooth_quant",
]
