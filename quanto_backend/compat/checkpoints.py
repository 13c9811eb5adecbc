"""Reading checkpoints written by optimum-quanto (0.2.x) into this library's flat format.

optimum-quanto flattens each frozen weight, a tensor subclass, into its inner tensors:

* 8-bit (``qint8``, ``qfloat8_*``): ``weight._data`` (int8 / float8 ``[out, in, ...]``) and ``weight._scale``
  (``[out, 1, ...]``, or 0-dim when quantized per tensor); ``w = _data * _scale``.
* 2/4-bit (``qint4``, ``qint2``): ``weight._data._data``, the uint8 codes of the grouped weight (``[out *
  n_groups, group_size]``, or ``[out, in, ...]`` without groups) packed ``8 // bits`` to a byte along the FIRST
  dimension (byte row ``r`` holds code rows ``r, r + R, r + 2R...`` at bits ``0, bits, 2 * bits...``, with ``R`` the
  packed row count); ``weight._scale`` and ``weight._shift`` ``[out * n_groups, 1]``, with ``w = q * _scale -
  _shift`` for a float shift and ``w = (q - _shift) * _scale`` for integer zero-points.
* ``input_scale`` and ``output_scale`` on every quantized module, whether it quantizes activations or not.

Its quantization map is ``{module: {"weights": name or "none", "activations": name or "none"}}``. A reloaded
optimum-quanto module quantizes its output whenever it has activations, so the converted map says so too.

:func:`read_quanto_checkpoint` is registered with :func:`quanto_backend.quantize.register_checkpoint_reader`,
so :func:`~quanto_backend.requantize`, the model helpers' ``from_pretrained`` and the transformers / diffusers
loaders all read these checkpoints; nothing of optimum-quanto is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import ops
from ..nn.qmodule import OUTPUT_QUANTIZED
from ..qtypes import qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2, qint2, qint4, qint8
from ..tensor import group_layout

__all__ = ["QUANTO_ACTIVATIONS", "QUANTO_WEIGHTS", "is_quanto_checkpoint", "read_quanto_checkpoint"]

# The optimum-quanto qtype names this library reads, and what they become.
QUANTO_WEIGHTS = {q.name: q for q in (qint2, qint4, qint8, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2)}
QUANTO_ACTIVATIONS = {q.name: q for q in (qint8, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2)}
_QUANTO_SUFFIXES = (".weight._data", ".weight._scale", ".weight._shift", ".weight._data._data")


def is_quanto_checkpoint(state_dict: Mapping[str, Any], qmap: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether ``state_dict`` / ``qmap`` are optimum-quanto's: flattened weight keys, or a map whose entries are
    exactly ``{"weights", "activations"}`` and say ``"none"`` somewhere (this library writes ``None``)."""
    if any(key.endswith(_QUANTO_SUFFIXES) for key in state_dict):
        return True
    entries = [dict(c) for c in qmap.values()]
    return (
        bool(entries)
        and all(set(c) == {"weights", "activations"} for c in entries)
        and any(v == "none" for c in entries for v in c.values())
    )


def _qtype(value: Any, accepted: dict, module: str, what: str):
    if value in (None, "none"):
        return None
    if value not in accepted:
        raise ValueError(
            f"optimum-quanto checkpoint: module {module!r} has {what} {value!r}, which quanto_backend cannot read; "
            f"it reads {what} {', '.join(sorted(accepted))} or 'none'"
        )
    return accepted[value]


def _inputs_per_output(module: nn.Module) -> int:
    weight_shape = getattr(module, "weight_shape", None)
    if weight_shape is None:
        weight_shape = module.weight.shape
    return int(torch.Size(weight_shape)[1:].numel())


def _take(state: dict[str, torch.Tensor], key: str, reason: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"optimum-quanto checkpoint lacks tensor {key!r} ({reason})")
    return state.pop(key)


def _unpack_quanto(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """optimum-quanto's packing, undone: ``rows`` rows of codes from bytes packed along the first dimension."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    planes = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.cat(planes)[:rows]


def _convert_8bit(state, prefix, qtype, out: int, shape: torch.Size) -> None:
    data = _take(state, prefix + "weight._data", f"the {qtype.name} weight codes")
    scale = _take(state, prefix + "weight._scale", f"the {qtype.name} weight scale")
    if data.dtype != qtype.dtype:
        raise ValueError(
            f"optimum-quanto tensor {prefix + 'weight._data'!r} has dtype {data.dtype}, but {qtype.name} weights are "
            f"stored as {qtype.dtype}: the checkpoint does not match its quantization map"
        )
    if tuple(data.shape) != tuple(shape):
        raise ValueError(
            f"optimum-quanto tensor {prefix + 'weight._data'!r} has shape {tuple(data.shape)}, the module's weight is "
            f"{tuple(shape)}: a layout quanto_backend cannot read (weights quantized along the last axis?)"
        )
    per_axis = (out, *([1] * (len(shape) - 1)))
    if scale.numel() == 1:  # quantized per tensor (a single output channel)
        scale = scale.reshape([1] * len(shape)).expand(per_axis).contiguous()
    if tuple(scale.shape) != per_axis:
        raise ValueError(
            f"optimum-quanto tensor {prefix + 'weight._scale'!r} has shape {tuple(scale.shape)}; quanto_backend reads "
            f"weights quantized along axis 0 (scale {per_axis}), not along the last axis"
        )
    # A copy: tensors read from a file may sit at any offset of its buffer, and CPU int8 kernels want aligned
    # storage (a fresh allocation is).
    state[prefix + "weight"] = data.clone(memory_format=torch.contiguous_format)
    state[prefix + "weight_scale"] = scale.contiguous()


def _convert_packed(state, prefix, qtype, out: int, n_inputs: int) -> int:
    """Convert a 2/4-bit weight in place; returns its group size."""
    key = prefix + "weight._data._data"
    unknown = sorted(k for k in state if k.startswith(prefix + "weight._data") and k != key)
    if unknown:
        raise ValueError(
            f"optimum-quanto tensor {unknown[0]!r}: a {qtype.name} weight layout quanto_backend cannot read (it reads "
            f"the standard packing, {key!r})"
        )
    packed = _take(state, key, f"the packed {qtype.name} weight codes")
    scale = _take(state, prefix + "weight._scale", f"the {qtype.name} weight scale")
    shift = _take(state, prefix + "weight._shift", f"the {qtype.name} weight shift")
    if packed.dtype != torch.uint8:
        raise ValueError(f"optimum-quanto tensor {key!r} has dtype {packed.dtype}; packed {qtype.name} codes are uint8")
    n_groups, rest = divmod(scale.numel(), out)
    if rest or n_groups == 0 or n_inputs % n_groups:
        raise ValueError(
            f"optimum-quanto tensor {prefix + 'weight._scale'!r} has {scale.numel()} values, which is no whole number "
            f"of groups for {out} outputs of {n_inputs} inputs"
        )
    group_size = n_inputs // n_groups
    try:
        valid = group_layout(n_inputs, group_size) == (group_size, n_inputs)
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"optimum-quanto tensor {key!r} has groups of {group_size} inputs; quanto_backend reads groups that are a "
            f"multiple of 8 and divide the {n_inputs} inputs of an output channel"
        )
    # The codes are [out * n_groups, group_size] (per-axis: the weight's own shape [out, in, ...]), packed along
    # the first dimension.
    rows = out * n_groups
    if packed.ndim < 2 or packed.shape[0] != -(-rows // (8 // qtype.bits)) or packed[0].numel() != group_size:
        raise ValueError(
            f"optimum-quanto tensor {key!r} has shape {tuple(packed.shape)}, which does not hold {out} x {n_inputs} "
            f"{qtype.name} codes in groups of {group_size}"
        )
    codes = _unpack_quanto(packed, qtype.bits, rows).reshape(out, n_inputs)
    if shift.numel() != scale.numel():
        raise ValueError(f"optimum-quanto tensor {prefix + 'weight._shift'!r} is not shaped like its scale")
    scale = scale.reshape(out, n_groups)
    shift = shift.reshape(out, n_groups)
    # optimum-quanto's float shift is in the weight's units (w = q * scale - shift); this library's is in codes.
    shift = shift.float() / scale.float() if shift.is_floating_point() else shift.float()
    state[prefix + "weight"] = ops.pack(codes.contiguous(), qtype.bits)
    state[prefix + "weight_scale"] = scale.contiguous()
    state[prefix + "weight_shift"] = shift.to(scale.dtype)
    return group_size


def read_quanto_checkpoint(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], qmap: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]] | None:
    """Convert an optimum-quanto state dict and quantization map for ``model`` (a float skeleton, e.g. on
    ``meta``) into this library's; ``None`` when they are not optimum-quanto's.

    Raises:
        ValueError: a qtype or tensor layout this library cannot read, naming the module or tensor and why.
        KeyError: a tensor the map requires is missing, naming it.
    """
    if not is_quanto_checkpoint(state_dict, qmap):
        return None
    state = dict(state_dict)
    converted: dict[str, dict[str, Any]] = {}
    for name, entry in qmap.items():
        entry = dict(entry)
        weights = _qtype(entry.get("weights"), QUANTO_WEIGHTS, name, "weights")
        activations = _qtype(entry.get("activations"), QUANTO_ACTIVATIONS, name, "activations")
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise KeyError(f"quantization map names module {name!r}, which the model does not have") from e
        prefix = f"{name}." if name else ""
        group_size = None
        if weights is not None:
            weight = getattr(module, "weight", None)
            if weight is None:
                raise ValueError(f"optimum-quanto checkpoint quantizes the weight of {name!r}, which has none")
            out = weight.shape[0]
            if weights.is_packed:
                group_size = _convert_packed(state, prefix, weights, out, _inputs_per_output(module))
            else:
                _convert_8bit(state, prefix, weights, out, weight.shape)
        # optimum-quanto saves both scales on every module; this library keeps them where activations are quantized
        # (a normalization's unused input scale too, as optimum-quanto).
        for side in ("input", "output"):
            key = f"{prefix}{side}_scale"
            if activations is None:
                state.pop(key, None)
            elif key not in state:
                raise KeyError(f"optimum-quanto checkpoint lacks tensor {key!r} ({activations.name} activations)")
            else:
                state[key] = state[key].float()
        if activations is not None:
            state[f"{prefix}{OUTPUT_QUANTIZED}"] = torch.tensor(True)  # reloaded, optimum-quanto quantizes every output
        converted[name] = {
            "weights": None if weights is None else weights.name,
            "activations": None if activations is None else activations.name,
            "group_size": group_size,
            "quantize_output": True,
        }
    leftovers = sorted(k for k in state if k.endswith(_QUANTO_SUFFIXES) or ".weight._" in k)
    if leftovers:
        raise ValueError(
            f"optimum-quanto tensor {leftovers[0]!r} belongs to no module of the quantization map (or is a layout "
            "quanto_backend cannot read)"
        )
    return state, converted
