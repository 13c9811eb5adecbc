"""Model helpers for diffusers models: ``QuantizedDiffusersModel`` and ``QuantizedPixArtTransformer2DModel``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.modeling_utils import ModelMixin

from .base import QuantizedModel, load_quantized

__all__ = ["QuantizedDiffusersModel", "QuantizedPixArtTransformer2DModel"]


class QuantizedDiffusersModel(QuantizedModel):
    """Wraps a quantized diffusers model. Subclasses set ``base_class`` (e.g. ``PixArtTransformer2DModel``).

    The helper can replace the model in a pipeline (``pipe.transformer = qtransformer``); move it with
    ``qtransformer.to(device)`` (pipelines only move ``torch.nn.Module`` components).
    """

    base_class = None

    def __init__(self, model: ModelMixin):
        if not isinstance(model, ModelMixin):
            raise ValueError(f"{type(self).__name__} wraps a diffusers ModelMixin, got {type(model).__name__}")
        super().__init__(model)

    def _write_config(self, directory: Path) -> None:
        self._wrapped.save_config(directory)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, device: torch.device | str | None = None
    ) -> QuantizedDiffusersModel:
        """Reload a folder written by :meth:`save_pretrained` (no float weight is materialized)."""
        from accelerate import init_empty_weights

        if cls.base_class is None:
            raise TypeError(
                f"{cls.__name__} has no base_class: use a subclass such as QuantizedPixArtTransformer2DModel"
            )
        config = cls.base_class.load_config(pretrained_model_name_or_path)
        with init_empty_weights(include_buffers=False):
            model = cls.base_class.from_config(config)
        return cls(load_quantized(model, pretrained_model_name_or_path, device))


class QuantizedPixArtTransformer2DModel(QuantizedDiffusersModel):
    """:class:`QuantizedDiffusersModel` for ``PixArtTransformer2DModel``."""

    base_class = PixArtTransformer2DModel
