"""Hugging Face integration: :class:`QuantoConfig` and the transformers / diffusers quantizers."""

from .config import FORMAT_VERSION, QUANT_METHOD, QuantoConfig
from .registration import register

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "QuantoConfig", "register"]
