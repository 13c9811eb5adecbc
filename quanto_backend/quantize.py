"""Model-level workflow: ``quantize``, ``freeze``, ``quantization_map`` and ``requantize``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from .nn import QModuleMixin, qmodule_class, quantize_module
from .qtypes import QType, as_qtype
from .tensor import WEIGHT_QTYPES

__all__ = ["freeze", "quantization_map", "quantize", "read_checkpoint", "register_checkpoint_reader", "requantize"]

# Readers of other libraries' checkpoints: reader(model, state_dict, qmap) returns them converted to this
# library's format, or None when they are not its format (see quanto_backend.compat for optimum-quanto's).
CheckpointReader = Callable[[nn.Module, Mapping[str, torch.Tensor], Mapping[str, Mapping[str, Any]]], Any]
_CHECKPOINT_READERS: list[CheckpointReader] = []


def register_checkpoint_reader(reader: CheckpointReader) -> CheckpointReader:
    """Let :func:`requantize` (and every loader built on it) read another library's checkpoints.

    ``reader(model, state_dict, quantization_map)`` gets the float skeleton and returns ``(state_dict,
    quantization_map)`` in this library's format, or ``None`` when the checkpoint is not its format.
    """
    if reader not in _CHECKPOINT_READERS:
        _CHECKPOINT_READERS.append(reader)
    return reader


def read_checkpoint(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], quantization_map: Mapping[str, Mapping[str, Any]]
) -> tuple[Mapping[str, torch.Tensor], Mapping[str, Mapping[str, Any]]]:
    """``(state_dict, quantization_map)`` in this library's format: converted by the first registered reader
    that recognizes them, unchanged when none does."""
    for reader in _CHECKPOINT_READERS:
        converted = reader(model, state_dict, quantization_map)
        if converted is not None:
            return converted
    return state_dict, quantization_map


def _as_patterns(patterns: str | list[str] | None, what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns):
        return list(patterns)
    raise TypeError(f"{what} must be a pattern string or a list of them, got {patterns!r}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def quantize(
    model: nn.Module,
    weights: QType | str | None = None,
    activations: QType | str | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    optimizer=None,
    group_size: int | None = None,
    activation_scales: str = "static",
) -> nn.Module:
    """Replace, in place, every supported submodule of ``model`` by its quantized version.

    The quantized modules share the float tensors of the modules they replace (nothing is copied) and quantize
    their weights on the fly until :func:`freeze`.

    Args:
        model: any torch model.
        weights: ``qint2``, ``qint4``, ``qint8``, ``qfloat8`` (or their names), or ``None`` for float weights.
        activations: ``qint8``, ``qfloat8`` (or their names), or ``None``.
        include: fnmatch patterns of module names to quantize (default: all).
        exclude: fnmatch patterns of module names to leave float.
        optimizer: ``"absmax"``, ``"minmax"``, ``"hqq"`` or an optimizer instance (default per qtype).
        group_size: inputs per group of the 2/4-bit formats (default 128); must stay ``None`` for 8-bit weights
            (one scale per output channel), or a ``ValueError`` names it.
        activation_scales: ``"static"`` (per-tensor scales set by :class:`~quanto_backend.Calibration` or the
            static workflow) or ``"dynamic"`` (symmetric int8/float8 scales per token, computed on the fly: no
            calibration needed).

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: ``model`` itself is a supported module (a bare ``nn.Linear``, say), which cannot be replaced in
            place: quantize ``quantize_module(model, ...)`` instead, or a container holding it.
    """
    if qmodule_class(model) is not None:
        raise ValueError(
            f"quantize() replaces the submodules of the model in place, and the model itself is a "
            f"{type(model).__name__}: use quantize_module(model, weights=..., ...) for a single module, or pass a "
            "container holding it (e.g. nn.Sequential(model))"
        )
    include, exclude = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    if weights is None and activations is None:
        raise ValueError("quantize needs weights and/or activations, got neither")
    qconfig = dict(weights=weights, activations=activations, optimizer=optimizer, group_size=group_size)
    if activation_scales != "static":  # passed only when set, so quantized classes that predate it still work
        qconfig["activation_scales"] = activation_scales
    for name, module in list(model.named_modules()):
        if not name or (include and not any(fnmatch(name, p) for p in include)):
            continue
        if any(fnmatch(name, p) for p in exclude):
            continue
        qmodule = quantize_module(module, **qconfig)
        if qmodule is not None:
            _set_submodule(model, name, qmodule)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Replace the float weights of every quantized module by their quantized storage (frees the floats)."""
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            module.freeze()
    return model


def quantization_map(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: its quantization config}`` for every quantized module: what :func:`requantize` needs."""
    return {name: m.qconfig() for name, m in model.named_modules() if isinstance(m, QModuleMixin)}


def requantize(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    quantization_map: Mapping[str, Mapping[str, Any]],
    device: torch.device | str | None = None,
) -> nn.Module:
    """Rebuild a quantized model from a float skeleton (ideally on ``meta``), its quantization map and a
    quantized state dict, without ever materializing float weights.

    Checkpoints of other libraries load too, through the readers of :func:`register_checkpoint_reader`:
    optimum-quanto's maps (``"none"`` entries) and key names (``weight._data``, ``weight._scale``...). So do this
    library's format 1 states (no ``output_quantized``; see :meth:`~quanto_backend.QModuleMixin.upgrade_state_dict`).

    Raises:
        KeyError: a module of the map is missing from ``model``, or a tensor is missing from ``state_dict``.
        ValueError: a tensor of ``state_dict`` has the wrong shape or dtype.
    """
    state_dict, quantization_map = read_checkpoint(model, state_dict, quantization_map)
    state_dict = dict(state_dict)  # format 1 states get the tensors they lack (upgrade_state_dict), not the caller's
    for name, qconfig in quantization_map.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise KeyError(f"quantization_map names module {name!r}, which the model does not have") from e
        qconfig = dict(qconfig)
        quantize_output = qconfig.pop("quantize_output", True)
        weights = qconfig.get("weights")
        if weights is not None and not as_qtype(weights, WEIGHT_QTYPES, "weights").is_packed:
            qconfig["group_size"] = None  # maps written before 8-bit weights refused a group size recorded it
        qmodule = quantize_module(module.to("meta"), **qconfig, quantize_output=quantize_output)
        if qmodule is None:
            raise ValueError(f"Module {name!r} ({type(module).__name__}) has no quantized version")
        qmodule.freeze()
        _set_submodule(model, name, qmodule)
        qmodule.upgrade_state_dict(state_dict, f"{name}." if name else "")  # the map says the state is its
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)  # QModuleMixin aligns what it was assigned
    if device is not None:
        model.to(device)
    return model


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise an error naming the first tensor of ``model``'s state that ``state_dict`` lacks or gets wrong."""
    for key, expected in model.state_dict().items():
        if key not in state_dict:
            raise KeyError(f"Tensor {key!r} is missing from the state dict")
        found = state_dict[key]
        if found.shape != expected.shape:
            raise ValueError(f"Tensor {key!r} has shape {tuple(found.shape)}, expected {tuple(expected.shape)}")
        exact = expected.dtype.itemsize == 1  # quantized storage: int8, uint8 codes or float8
        if found.dtype != expected.dtype and (exact or not found.is_floating_point() or found.dtype.itemsize == 1):
            raise ValueError(f"Tensor {key!r} has dtype {found.dtype}, expected {expected.dtype}")
    unexpected = sorted(set(state_dict) - set(model.state_dict()))
    if unexpected:
        raise KeyError(f"Unexpected tensors in the state dict: {', '.join(unexpected[:5])}")
