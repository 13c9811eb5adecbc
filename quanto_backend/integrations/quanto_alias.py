"""Loading for ``quant_method: "quanto"`` (optimum-quanto's method name in transformers and diffusers) when
optimum-quanto is not installed: registered under that name by :func:`~quanto_backend.integrations.register`.

* The configs, whether a ``config.json`` entry or the libraries' own ``QuantoConfig`` objects (transformers:
  ``weights``/``activations``/``modules_to_not_convert``, diffusers: ``weights_dtype``/``modules_to_not_convert``),
  become this library's :class:`~quanto_backend.QuantoConfig`; a model saved afterwards says ``quanto_backend``.
* A float checkpoint is quantized on load, as optimum-quanto's quantizers do.
* A diffusers checkpoint saved with diffusers' quanto backend (``weight._data``, ``weight._scale``...) is converted
  shard by shard through the checkpoint readers of :func:`quanto_backend.quantize.register_checkpoint_reader`
  (optimum-quanto's is registered by ``quanto_backend.compat``). transformers never serialized its quanto models
  (its quantizer is not serializable), so it has no such checkpoints.
"""

from __future__ import annotations

import importlib.util
from enum import Enum
from typing import Any

import torch

from ..nn import QModuleMixin
from ..quantize import read_checkpoint
from .config import QuantoConfig
from .diffusers_quantizer import QuantoDiffusersQuantizer
from .transformers_quantizer import QuantoHfQuantizer

__all__ = [
    "QUANTO_METHOD",
    "QuantoAliasConfig",
    "QuantoAliasDiffusersQuantizer",
    "QuantoAliasHfQuantizer",
    "optimum_quanto_installed",
]

QUANTO_METHOD = "quanto"


class QuantoMethod(str, Enum):
    """``quant_method`` of the alias configs: the libraries pick the quantizer registered under it (diffusers reads
    ``.value``). Their ``to_dict`` writes ``quanto_backend``: what a model saved after loading holds."""

    QUANTO = QUANTO_METHOD

    def __str__(self) -> str:
        return self.value


# optimum-quanto's key suffixes for one weight, and this library's names for them.
_RENAMES = (
    (".weight._data._data", ".weight"),
    (".weight._data", ".weight"),
    (".weight._scale", ".weight_scale"),
    (".weight._shift", ".weight_shift"),
)


def optimum_quanto_installed() -> bool:
    """Whether ``optimum.quanto`` can be imported (then the libraries' own quanto backends are left in place)."""
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except (ImportError, ValueError):
        return False


class QuantoAliasConfig(QuantoConfig):
    """:class:`~quanto_backend.QuantoConfig` read from a ``quant_method: "quanto"`` config."""

    def __init__(self, *args: Any, quant_method: Any = None, **kwargs: Any) -> None:
        method = str(getattr(quant_method, "value", quant_method))
        if quant_method is not None and method not in (QUANTO_METHOD, "quanto_backend"):
            raise ValueError(f"QuantoAliasConfig reads quant_method 'quanto', got {quant_method!r}")
        super().__init__(*args, **kwargs)
        self.quant_method = QuantoMethod.QUANTO

    @classmethod
    def from_config(cls, config: Any) -> QuantoConfig:
        """This library's config for ``config``: itself if it is one, else the libraries' quanto config (object or
        dict) translated field by field."""
        if isinstance(config, QuantoConfig):
            return config
        fields = dict(config) if isinstance(config, dict) else config.to_dict()
        return cls(**{k: v for k, v in fields.items() if v is not None or k == "quant_method"})


def _checkpoint_shapes(files: list[str]) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in files:
        if str(file).endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                shapes.update({key: f.get_slice(key).get_shape() for key in f.keys()})
    return shapes


def _weight_keys(module: QModuleMixin, prefix: str) -> tuple[str, ...]:
    """The tensors optimum-quanto saves for ``module``'s quantized weight."""
    if module.weight_qtype.is_packed:
        return (prefix + "weight._data._data", prefix + "weight._scale", prefix + "weight._shift")
    return (prefix + "weight._data", prefix + "weight._scale")


def _quanto_qmap(model: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, dict[str, str]]:
    """optimum-quanto's map for the quantized modules of ``model`` whose weight tensors ``state_dict`` holds."""
    qmap = {}
    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin) and module.weight_qtype is not None:
            if all(key in state_dict for key in _weight_keys(module, f"{name}." if name else "")):
                activations = module.activation_qtype
                qmap[name] = {
                    "weights": module.weight_qtype.name,
                    "activations": "none" if activations is None else activations.name,
                }
    return qmap


class QuantoAliasDiffusersQuantizer(QuantoDiffusersQuantizer):
    """diffusers quantizer for ``quant_method: "quanto"``: quantize-on-load, or diffusers' quanto checkpoints."""

    def __init__(self, quantization_config: Any, **kwargs: Any):
        super().__init__(QuantoAliasConfig.from_config(quantization_config), **kwargs)
        self._model: torch.nn.Module | None = None
        self._pending: dict[str, torch.Tensor] = {}  # weight tensors of modules split across shards

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        # The key names diffusers checks for missing and unexpected tensors: this library's.
        self._checkpoint_files = list(checkpoint_files or [])
        renamed = []
        for key in loaded_keys:
            for old, new in _RENAMES:
                if key.endswith(old):
                    key = key[: -len(old)] + new
                    break
            if self.quantization_config.activations is None and key.endswith((".input_scale", ".output_scale")):
                continue  # optimum-quanto saves both scales on every module, used or not
            renamed.append(key)
        return renamed

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        if not self.pre_quantized:
            return super()._process_model_before_weight_loading(model, device_map, keep_in_fp32_modules, **kwargs)
        from . import loading

        config = self.quantization_config
        skip = list(config.modules_to_not_convert or []) + list(keep_in_fp32_modules or [])
        # The checkpoint says which modules diffusers' quanto backend quantized (its Linears, not its convs): those
        # that hold a float weight stay float.
        shapes = _checkpoint_shapes(self._checkpoint_files)
        for name, module in model.named_modules():
            if name and isinstance(getattr(module, "weight", None), torch.Tensor) and f"{name}.weight" in shapes:
                skip.append(name)
        self.modules_to_not_convert = sorted(set(skip))
        # Recorded, so that the model saved again (in this library's format) rebuilds the same skeleton.
        config.modules_to_not_convert = self.modules_to_not_convert
        loading.replace_with_qmodules(model, config, self.modules_to_not_convert, frozen=False)
        for name, module in model.named_modules():
            if isinstance(module, QModuleMixin) and module.weight_qtype is not None:
                # optimum-quanto picks each 2/4-bit module's group size (128, 96 or 64 inputs, or a whole row):
                # the checkpoint's scale count says which, and the storage is built for it.
                scale_shape = shapes.get(f"{name}.weight._scale")
                if module.weight_qtype.is_packed and scale_shape is not None:
                    n_scales = int(torch.Size(scale_shape).numel())
                    out, n_inputs = module.weight_shape[0], module.weight_shape[1:].numel()
                    if n_scales % out == 0 and n_inputs % (n_scales // out or 1) == 0:
                        module.group_size = n_inputs // max(n_scales // out, 1)
                with torch.device("meta"):
                    module.freeze()
        model.config.quantization_config = config
        self._model = model  # each shard is converted against it (maybe_update_state_dict)
        return model

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if not self.pre_quantized or self._model is None:
            return state_dict
        # A module's tensors may sit in two shards: those of a module not complete yet wait for the next shard.
        state_dict = {**self._pending, **state_dict}
        qmap = _quanto_qmap(self._model, state_dict)
        complete = {k for name in qmap for k in _weight_keys(self._model.get_submodule(name), f"{name}.")}
        self._pending = {k: v for k, v in state_dict.items() if ".weight._" in k and k not in complete}
        state_dict = {k: v for k, v in state_dict.items() if k not in self._pending}
        if self.quantization_config.activations is None:  # optimum-quanto saves both scales, used or not
            state_dict = {k: v for k, v in state_dict.items() if not k.endswith((".input_scale", ".output_scale"))}
        converted, _ = read_checkpoint(self._model, state_dict, qmap)
        return dict(converted)


class QuantoAliasHfQuantizer(QuantoHfQuantizer):
    """transformers quantizer for ``quant_method: "quanto"`` (e.g. ``transformers.QuantoConfig(weights="int8")``):
    quantize-on-load with this library."""

    def __init__(self, quantization_config: Any, **kwargs: Any):
        super().__init__(QuantoAliasConfig.from_config(quantization_config), **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized:
            raise ValueError(
                "This checkpoint's config says quant_method 'quanto' (optimum-quanto), whose transformers integration "
                "never saved quantized weights: without optimum-quanto installed, quanto_backend loads it only if it "
                "was saved by optimum-quanto's QuantizedModelForCausalLM (use quanto_backend.QuantizedModelForCausalL"
                "M.from_pretrained), or quantizes a float checkpoint: from_pretrained(path, quantization_config="
                "quanto_backend.QuantoConfig(...))."
            )
        super().validate_environment(*args, **kwargs)
