"""Model helpers (optimum-quanto's API): quantize, save_pretrained and from_pretrained of whole models."""

from .base import QuantizedModel
from .diffusers_models import QuantizedDiffusersModel, QuantizedPixArtTransformer2DModel
from .transformers_models import QuantizedModelForCausalLM, QuantizedTransformersModel

__all__ = [
    "QuantizedDiffusersModel",
    "QuantizedModel",
    "QuantizedModelForCausalLM",
    "QuantizedPixArtTransformer2DModel",
    "QuantizedTransformersModel",
]
