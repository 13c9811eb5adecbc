"""quanto-backend: quantization of PyTorch models, with Hugging Face integration and CUDA kernels.

Quick start::

    from quanto_backend import quantize, freeze, qint8
    quantize(model, weights=qint8)
    freeze(model)
"""

from .calibrate import Calibration

# optimum-quanto's names and signatures (quantize_weight takes both its signature and this library's), and the
# reader of its checkpoints: the compat layer, on top of everything else.
from .compat import (
    ActivationQBytesTensor,
    MaxOptimizer,
    QBitsTensor,
    QBytesTensor,
    WeightQBitsTensor,
    WeightQBytesTensor,
    absmax_scale,
    quantize_weight,
)
from .integrations import register_when_imported as _register_with_hf
from .nn import QConv2d, QLayerNorm, QLinear, QModuleMixin, quantize_module, register_qmodule
from .observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer
from .qtypes import (
    QType,
    qfloat8,
    qfloat8_e4m3fn,
    qfloat8_e4m3fnuz,
    qfloat8_e5m2,
    qint2,
    qint4,
    qint8,
    qtypes,
    quint8,
)
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
    SymmetricOptimizer,
    choose_qparams,
    quantize_activation,
)

# Registration with transformers and diffusers: neither library discovers plugins, so a checkpoint saved with
# quant_method "quanto_backend" only loads after `import quanto_backend` (which integrations/autoload, run by
# `import torch`, does for the user). It is done as soon as either library's quantizers are imported (now, if they
# already are), so that this import stays light.
_register_with_hf()

__version__ = "0.1.0"

# These import transformers/diffusers classes (seconds): loaded on first use only, by the module that holds them.
_LAZY = {
    "QuantoConfig": "integrations.config",
    "QuantizedCache": "kv_cache",
    "QuantizedDiffusersModel": "models",
    "QuantizedModelForCausalLM": "models",
    "QuantizedPixArtTransformer2DModel": "models",
    "QuantizedTransformersModel": "models",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'quanto_backend' has no attribute {name!r}")


__all__ = [
    "AbsmaxOptimizer",
    "ActivationQBytesTensor",
    "MaxOptimizer",
    "QBitsTensor",
    "QBytesTensor",
    "WeightQBitsTensor",
    "WeightQBytesTensor",
    "absmax_scale",
    "qfloat8_e4m3fnuz",
    "quantize_module",
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
    "QuantizedCache",
    "QuantizedDiffusersModel",
    "QuantizedModelForCausalLM",
    "QuantizedPixArtTransformer2DModel",
    "QuantizedTransformersModel",
    "QuantoConfig",
    "SymmetricOptimizer",
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
