"""QuantizedModel: the wrapper shared by the transformers and diffusers model helpers (optimum-quanto's API).

The helper wraps a quantized and frozen model, forwards attribute access and calls to it, and saves a folder
holding the model's config, the quantization map (``quanto_qmap.json``) and the quantized state
(``quanto_model.safetensors``, written with safetensors' ``save_file``). ``from_pretrained`` rebuilds the model
as a ``meta`` skeleton from its config and fills it with :func:`~quanto_backend.requantize`: no float weight is
ever materialized.

The weights file is deliberately not named like the libraries' own (``model.safetensors``): a plain
``from_pretrained`` of this folder fails visibly instead of loading quantized values into float modules.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..qtypes import QType
from ..quantize import freeze, quantization_map, quantize, requantize

__all__ = ["QMAP_NAME", "WEIGHTS_NAME", "QuantizedModel"]

QMAP_NAME = "quanto_qmap.json"
WEIGHTS_NAME = "quanto_model.safetensors"
# safetensors metadata key of the tied tensors: {name left out of the file: name of the tensor it shares}.
_TIED_KEY = "quanto_backend.tied"


def _split_shared(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor (safetensors refuses aliases); return the others as ``{alias: kept}``."""
    kept: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.dtype)
        if tensor.device.type != "meta" and key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, write_config) -> None:
    """Write ``model``'s config (via ``write_config(dir)``), quantization map and quantized state.

    Everything is written to a temporary folder next to ``save_directory`` first and moved into place only once
    complete, so a failed save leaves a previous save untouched.
    """
    qmap = quantization_map(model)
    if not qmap:
        raise ValueError("The model has no quantized module: quantize (and freeze) it before saving")
    unfrozen = [name for name, m in model.named_modules() if getattr(m, "weight_qtype", None) and not m.frozen]
    if unfrozen:
        raise ValueError(f"Freeze the model before saving: module {unfrozen[0]!r} still holds a float weight")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".quanto_tmp_", dir=save_directory))
    try:
        write_config(tmp)
        with open(tmp / QMAP_NAME, "w", encoding="utf-8") as f:
            json.dump(qmap, f, indent=2, sort_keys=True)
        tensors, aliases = _split_shared(model.state_dict())
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", _TIED_KEY: json.dumps(aliases)})
        for file in tmp.iterdir():
            os.replace(file, save_directory / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The weights files of folders written by optimum-quanto's model helpers (the libraries' own save_pretrained),
# single or sharded (``<name>.index.json`` maps each tensor to its shard).
_LIBRARY_WEIGHTS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def _weights_files(directory: Path) -> list[Path]:
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    for name in _LIBRARY_WEIGHTS_NAMES:
        if (directory / name).is_file():
            return [directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [directory / shard for shard in shards]
    names = ", ".join((WEIGHTS_NAME, *_LIBRARY_WEIGHTS_NAMES))
    raise FileNotFoundError(f"{directory} has no quantized weights file (looked for {names}, single or sharded)")


def load_quantized(model: nn.Module, directory: str | os.PathLike, device: torch.device | str | None) -> nn.Module:
    """Fill the ``meta`` skeleton ``model`` from a folder written by :func:`save_quantized`, or by
    optimum-quanto's model helpers (``quanto_qmap.json`` next to the library's own safetensors files)."""
    directory = Path(directory)
    if not (directory / QMAP_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {QMAP_NAME}: it was not saved by a quantized model helper")
    with open(directory / QMAP_NAME, encoding="utf-8") as f:
        qmap = json.load(f)
    state_dict = {}
    aliases: dict[str, str] = {}
    for file in _weights_files(directory):
        with safe_open(file, framework="pt", device="cpu") as f:
            aliases.update(json.loads((f.metadata() or {}).get(_TIED_KEY, "{}")))
            for key in f.keys():
                state_dict[key] = f.get_tensor(key)
    # transformers' save_pretrained leaves tied weights out (e.g. lm_head.weight tied to the input embedding).
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target not in state_dict and source in state_dict and target.rpartition(".")[0] not in qmap:
            aliases[target] = source
    for alias, kept in aliases.items():
        state_dict[alias] = state_dict[kept]
    requantize(model, state_dict, qmap, device=device)
    for alias, kept in aliases.items():  # load_state_dict(assign=True) wraps each name in its own Parameter
        module_name, _, tensor_name = alias.rpartition(".")
        kept_module, _, kept_name = kept.rpartition(".")
        setattr(model.get_submodule(module_name), tensor_name, getattr(model.get_submodule(kept_module), kept_name))
    return model.eval()


class QuantizedModel:
    """Wraps a quantized, frozen model; attribute access and calls go to the wrapped model.

    Subclasses set how to build a skeleton from a saved config and how to write that config.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module) or not quantization_map(model):
            raise ValueError(f"{type(self).__name__} wraps a quantized model; got {type(model).__name__} with none")
        self._wrapped = model

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: everything the helper does not define comes from the model.
        if name == "_wrapped":
            raise AttributeError(name)
        return getattr(self._wrapped, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped.forward(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> QuantizedModel:
        """Move the wrapped model (all its quantized storage too); returns the helper."""
        self._wrapped.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._wrapped!r})"

    @classmethod
    def quantize(
        cls,
        model: nn.Module,
        weights: QType | str | None = None,
        activations: QType | str | None = None,
        optimizer=None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        group_size: int | None = None,
    ) -> QuantizedModel:
        """Quantize ``model`` in place (see :func:`~quanto_backend.quantize`), freeze it and wrap it.

        With ``activations``, calibrate before freezing instead: ``quantize`` then ``Calibration`` then
        ``freeze``, then wrap the model with ``cls(model)``.
        """
        quantize(
            model,
            weights=weights,
            activations=activations,
            optimizer=optimizer,
            include=include,
            exclude=exclude,
            group_size=group_size,
        )
        freeze(model)
        return cls(model)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save config, quantization map and quantized tensors (safetensors) into ``save_directory``."""
        save_quantized(self._wrapped, save_directory, self._write_config)

    def _write_config(self, directory: Path) -> None:
        raise NotImplementedError
