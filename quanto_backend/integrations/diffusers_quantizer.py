"""The diffusers quantizer of quanto-backend (``DiffusersQuantizer``, diffusers 0.42 per-parameter API).

Quantize-on-load: the skeleton's supported modules become quantized modules that keep a float ``weight`` slot
(diffusers checks each checkpoint tensor's shape against the skeleton before the quantizer sees it, and packed
2/4-bit storage has another shape); ``create_quantized_param`` quantizes each float weight on the device it
lands on. ``device_map="auto"`` sizes those weights at the quantized element size (``adjust_target_dtype``)
and everything else at the compute dtype (``get_special_dtypes_update``).

Pre-quantized checkpoints load into a frozen skeleton (exact storage shapes and dtypes).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer

from . import loading
from .config import QuantoConfig

__all__ = ["QuantoDiffusersQuantizer"]


def _target_dtypes() -> dict[str, Any]:
    from accelerate.utils import CustomDtype

    return {
        "int8": torch.int8,
        "float8_e4m3fn": CustomDtype.FP8,
        "float8_e4m3fnuz": CustomDtype.FP8,
        "float8_e5m2": CustomDtype.FP8,
        "int4": CustomDtype.INT4,
        "int2": CustomDtype.INT2,
        "uint8": torch.uint8,
    }


class QuantoDiffusersQuantizer(DiffusersQuantizer):
    """diffusers quantizer for :class:`~quanto_backend.QuantoConfig` (``quant_method="quanto_backend"``)."""

    quantization_config: QuantoConfig
    use_keep_in_fp32_modules = True
    requires_calibration = False
    required_packages = ["accelerate"]

    def __init__(self, quantization_config: QuantoConfig, **kwargs: Any):
        if not isinstance(quantization_config, QuantoConfig):
            raise TypeError(f"QuantoDiffusersQuantizer needs a QuantoConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_files: list[str] = []

    # ---- checks before loading -----------------------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Refuse disk offload when quantizing on load (called before and after the device map is inferred)."""
        loading.validate_device_map(kwargs.get("device_map"), self.pre_quantized)

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        # With no dtype diffusers casts each checkpoint tensor to the skeleton's dtype: it must be a float one.
        return torch.float32 if torch_dtype is None else torch_dtype

    def update_device_map(self, device_map: dict[str, Any] | None) -> dict[str, Any] | None:
        return device_map

    def adjust_target_dtype(self, torch_dtype: torch.dtype) -> Any:
        """The dtype at which ``device_map="auto"`` sizes the weights that will be quantized."""
        if self.pre_quantized:
            return torch_dtype  # the frozen skeleton already has the storage dtypes
        return _target_dtypes()[self.quantization_config.weights]

    def get_special_dtypes_update(self, model, torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
        """Every parameter that is not a weight quantized on load keeps the compute dtype in the size estimate."""
        if self.pre_quantized:
            return {}
        return {
            name: torch_dtype
            for name, _ in model.named_parameters()
            if not (loading.param_needs_quantization(model, name) and self._weight_quantized(model, name))
        }

    @staticmethod
    def _weight_quantized(model, name: str) -> bool:
        return getattr(model.get_submodule(name.rpartition(".")[0]), "weight_qtype", None) is not None

    def adjust_max_memory(self, max_memory: dict[str, int | str]) -> dict[str, int | str]:
        """10% headroom: a float weight and the quantization intermediates live next to the quantized model."""
        return {key: val * 0.90 if isinstance(val, (int, float)) else val for key, val in max_memory.items()}

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self._checkpoint_files = list(checkpoint_files or [])  # read by the skeleton checks below
        return loaded_keys

    # ---- skeleton ------------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        skip = list(config.modules_to_not_convert or []) + list(keep_in_fp32_modules or [])
        self.modules_to_not_convert = sorted(set(skip))
        loading.replace_with_qmodules(model, config, self.modules_to_not_convert, frozen=self.pre_quantized)
        if self.pre_quantized:
            if config.activations is not None:
                keys = loading.checkpoint_keys(self._checkpoint_files)
                loading.prepare_format_upgrade(model, keys, format_version=config.format_version)
                loading.add_input_zero_points(model, keys)
            loading.check_prequantized_checkpoint(model, self._checkpoint_files)
        model.config.quantization_config = config
        return model

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        """Activation scales are created by :meth:`create_quantized_param` when quantizing on load: they are not
        missing from a float checkpoint."""
        if self.pre_quantized:
            return missing_keys
        return [k for k in missing_keys if not k.endswith(loading.QUANT_BUFFERS)]

    # ---- per-parameter step ------------------------------------------------------------------------------------
    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs: Any) -> bool:
        """The float weights of quantized modules (on-the-fly), or quantized storage (pre-quantized)."""
        if not loading.param_needs_quantization(model, param_name.rpartition(".")[0] + ".weight"):
            return False
        tensor_name = param_name.rpartition(".")[2]
        if self.pre_quantized:
            return tensor_name in ("weight", "weight_scale", "weight_shift")
        return tensor_name == "weight"

    def check_quantized_param_shape(self, param_name: str, current_param, loaded_param) -> bool:
        """Called by diffusers on a shape mismatch of a pre-quantized tensor: always an error, naming it."""
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise ValueError(
                f"Checkpoint tensor {param_name!r} has shape {tuple(loaded_param.shape)}, but its "
                f"quantization_config ({self.quantization_config.to_dict()}) needs {tuple(current_param.shape)}."
            )
        return True

    def create_quantized_param(
        self,
        model,
        param_value: torch.Tensor,
        param_name: str,
        target_device: torch.device | str | int | None,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Quantize-on-load: quantize the float weight into its module on ``target_device`` (shared logic with
        the transformers quantizer). Pre-quantized: put the stored tensor in place, never trainable."""
        if not self.pre_quantized:
            return loading.create_quantized_param(model, param_value, param_name, target_device)
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        value = param_value.to(target_device) if target_device is not None else param_value
        module._parameters[tensor_name] = torch.nn.Parameter(value, requires_grad=False)
        return {param_name: module._parameters[tensor_name]}

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        loading.reset_requires_grad(model)
        loading.align_storage(model)
        if not self.pre_quantized:
            loading.init_unloaded_activation_scales(model)
        loading.finish_format_upgrade(model, self.quantization_config)
        # diffusers' save hooks get no model: keep a weak reference to check it before anything is written.
        self._model = weakref.ref(model)
        return model

    # ---- capabilities ------------------------------------------------------------------------------------------
    @property
    def is_serializable(self) -> bool:
        """True; raises if the loaded model still holds placeholder activation scales (``save_pretrained`` asks
        this before writing any file)."""
        model = self._model() if getattr(self, "_model", None) is not None else None
        if model is not None:
            loading.check_calibrated(model)
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model):
        loading.dequantize_model(model)
        model.config.quantization_config = None
        return model


# Importing the libraries above may have fired the registration hook while this module was incomplete.
from .registration import finish_pending_registration  # noqa: E402

finish_pending_registration(__name__)
