"""Model helpers for transformers models: ``QuantizedTransformersModel`` and ``QuantizedModelForCausalLM``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .base import QuantizedModel, load_quantized

__all__ = ["QuantizedModelForCausalLM", "QuantizedTransformersModel"]


class QuantizedTransformersModel(QuantizedModel):
    """Wraps a quantized transformers model. Subclasses set ``auto_class`` (e.g. ``AutoModelForCausalLM``).

    Example::

        qmodel = QuantizedModelForCausalLM.quantize(model, weights=qint4, exclude="lm_head")
        qmodel.save_pretrained("qdir")
        qmodel = QuantizedModelForCausalLM.from_pretrained("qdir")
    """

    auto_class = None

    def __init__(self, model: PreTrainedModel):
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"{type(self).__name__} wraps a transformers PreTrainedModel, got {type(model).__name__}")
        super().__init__(model)

    def _write_config(self, directory: Path) -> None:
        self._wrapped.config.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, device: torch.device | str | None = None
    ) -> QuantizedTransformersModel:
        """Reload a folder written by :meth:`save_pretrained` (no float weight is materialized)."""
        from accelerate import init_empty_weights

        if cls.auto_class is None:
            raise TypeError(f"{cls.__name__} has no auto_class: use a subclass such as QuantizedModelForCausalLM")
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        # Parameters on meta; buffers (e.g. rotary frequencies, not saved) are built for real.
        with init_empty_weights(include_buffers=False):
            model = cls.auto_class.from_config(config)
        return cls(load_quantized(model, pretrained_model_name_or_path, device))


class QuantizedModelForCausalLM(QuantizedTransformersModel):
    """:class:`QuantizedTransformersModel` for ``AutoModelForCausalLM`` models."""

    auto_class = AutoModelForCausalLM
