"""The transformers 5.x quantizer of quanto-backend (``HfQuantizer``).

Loading a float checkpoint with ``QuantoConfig`` (quantize-on-load):

1. ``_process_model_before_weight_loading`` replaces the supported modules of the ``meta`` skeleton by frozen
   quantized modules: their storage (int8 / float8 / packed uint8 ``weight``, ``weight_scale``...) already has
   its final shapes and dtypes, so ``device_map="auto"`` sizes the model exactly.
2. The loader materializes each float ``weight`` on the device the map gives it and hands it to the op of
   :meth:`QuantoHfQuantizer.get_quantize_ops`, which calls :meth:`QuantoHfQuantizer.create_quantized_param`:
   the weight is quantized there and dropped, so a load peaks near the quantized model plus one float weight.

A pre-quantized checkpoint (``save_pretrained`` of such a model) loads into the same skeleton as plain tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from . import loading
from .config import QuantoConfig

__all__ = ["QuantoHfQuantizer"]


class QuantoQuantizeOp(ConversionOps):
    """The loader's per-parameter op: quantizes each float weight it receives (return style: the loader sets the
    returned tensors and marks their keys as loaded)."""

    def __init__(self, hf_quantizer: QuantoHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(
        self, input_dict: dict[str, Any], model: torch.nn.Module | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            if self.hf_quantizer.param_needs_quantization(model, name):
                out.update(self.hf_quantizer.create_quantized_param(model, value, name, value.device))
            else:
                out[name] = value
        return out


class QuantoHfQuantizer(HfQuantizer):
    """transformers quantizer for :class:`~quanto_backend.QuantoConfig` (``quant_method="quanto_backend"``)."""

    quantization_config: QuantoConfig
    requires_calibration = False

    def __init__(self, quantization_config: QuantoConfig, **kwargs: Any):
        if not isinstance(quantization_config, QuantoConfig):
            raise TypeError(f"QuantoHfQuantizer needs a QuantoConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    # ---- checks before loading -----------------------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Refuse disk offload when quantizing on load (called with the user's map and with the inferred one)."""
        loading.validate_device_map(kwargs.get("device_map"), self.pre_quantized)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The compute dtype is the user's (scales are stored in it)."""
        return dtype

    def update_device_map(self, device_map: dict[str, Any] | None) -> dict[str, Any] | None:
        """No device map means the whole model on CPU, as for an unquantized load."""
        return device_map

    def adjust_max_memory(self, max_memory: dict[str, int | str]) -> dict[str, int | str]:
        """Leave 10% headroom per device: while a layer is quantized its float weight and the quantization
        intermediates live next to the quantized model (the skeleton's sizes are otherwise exact)."""
        return {key: val * 0.90 if isinstance(val, (int, float)) else val for key, val in max_memory.items()}

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        """A float ``weight`` of a quantized module, while quantizing on load."""
        return not self.pre_quantized and loading.param_needs_quantization(model, param_name)

    # ---- skeleton ------------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)
        )
        # A tied weight lives in two modules: quantizing one side would break the tie (see HF_API pitfall 9).
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        skip += [k.removesuffix(".weight") for k in (*tied.keys(), *tied.values())]
        self.modules_to_not_convert = sorted(set(skip))
        loading.replace_with_qmodules(model, config, self.modules_to_not_convert, frozen=True)
        if self.pre_quantized:
            prefix = getattr(model, "base_model_prefix", "")
            keys = loading.checkpoint_keys(checkpoint_files) if config.activations is not None else set()
            if keys:
                loading.prepare_format_upgrade(model, keys, prefix, config.format_version)
                loading.add_input_zero_points(model, keys, prefix)
            loading.check_prequantized_checkpoint(model, checkpoint_files, prefix)
        return model

    # ---- per-parameter quantization ------------------------------------------------------------------------
    def get_quantize_ops(self) -> QuantoQuantizeOp:
        return QuantoQuantizeOp(self)

    def create_quantized_param(
        self,
        model: torch.nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        target_device: torch.device | str | int | None,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Quantize the float checkpoint weight ``param_value`` into the module owning ``param_name``, on
        ``target_device``; returns the tensors it set. (The same logic serves the diffusers quantizer.)"""
        return loading.create_quantized_param(model, param_value, param_name, target_device)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        loading.reset_requires_grad(model)
        loading.align_storage(model)
        if not self.pre_quantized:
            loading.init_unloaded_activation_scales(model)
        loading.finish_format_upgrade(model, self.quantization_config)
        return model

    def get_state_dict_and_metadata(self, model):
        """``model.state_dict()`` as is, once checked to hold no placeholder activation scales (called by
        ``save_pretrained`` before any file is written)."""
        loading.check_calibrated(model)
        return None, {}

    # ---- capabilities --------------------------------------------------------------------------------------
    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        """Quantized tensors are plain named tensors: ``save_pretrained`` writes them to safetensors as is."""
        return True

    @property
    def is_trainable(self) -> bool:
        """Gradients flow through the quantized modules to their inputs and float parameters (adapters,
        biases, norms); the quantized weights themselves are frozen."""
        return True

    @property
    def is_compileable(self) -> bool:
        """The quantized modules call opaque ``torch.library`` ops with fake implementations."""
        return True

    def _dequantize(self, model, dtype: torch.dtype | None = None):
        return loading.dequantize_model(model, dtype)


# Importing the libraries above may have fired the registration hook while this module was incomplete.
from .registration import finish_pending_registration  # noqa: E402

finish_pending_registration(__name__)
