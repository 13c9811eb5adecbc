"""Hugging Face integration: :class:`QuantoConfig` and the transformers / diffusers quantizers.

Its names load on first use: :class:`QuantoConfig` subclasses both libraries' config classes, and importing
them costs seconds that ``import quanto_backend`` should not pay.
"""

from .registration import register, register_when_imported

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "QuantoConfig", "register", "register_when_imported"]

_CONFIG_NAMES = ("FORMAT_VERSION", "QUANT_METHOD", "QuantoConfig")


def __getattr__(name: str):
    if name in _CONFIG_NAMES:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'quanto_backend.integrations' has no attribute {name!r}")
