"""What the transformers and diffusers quantizers share: building the quantized skeleton, the per-parameter
quantization step of quantize-on-load, the checks of a ``device_map``, and dequantization.

Kept free of either library's classes so that both quantizers call the very same code.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from ..nn import QModuleMixin, quantize_module
from ..nn.qmodule import OUTPUT_QUANTIZED, initial_buffer
from .config import FORMAT_VERSION, QuantoConfig

__all__ = [
    "add_input_zero_points",
    "align_storage",
    "QUANT_BUFFERS",
    "release_checkpoint_pages",
    "trim_heap",
    "check_calibrated",
    "create_quantized_param",
    "dequantize_model",
    "is_skipped",
    "finish_format_upgrade",
    "prepare_format_upgrade",
    "replace_with_qmodules",
    "reset_requires_grad",
    "validate_device_map",
]

# The buffers a quantized module adds to its float module (activation quantization, SmoothQuant factors). None
# is in a float checkpoint; a pre-quantized one holds those its modules had when saved.
QUANT_BUFFERS = (
    "input_scale",
    "output_scale",
    "input_zero_point",
    "output_zero_point",
    "input_smooth",
    OUTPUT_QUANTIZED,
)


def _materialize_quant_buffers(
    module: nn.Module, device: torch.device, names: Iterable[str] = QUANT_BUFFERS
) -> list[str]:
    """Give a module's quantization buffers their initial values on ``device``: scales and smoothing factors 1,
    zero-points 0, outputs quantized (what calibration starts from)."""
    done = []
    for name in names:
        buffer = module._buffers.get(name)
        if buffer is not None:
            module._buffers[name] = initial_buffer(name, buffer, device, module)
            done.append(name)
    return done


def is_skipped(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` is left float by ``patterns``: a pattern equal to a run of whole dotted components
    of the name skips it (``"mlp"`` skips ``"model.layers.0.mlp.down_proj"``, ``"layers.1"`` skips
    ``"model.layers.1.mlp"`` but not ``"model.layers.11.mlp"``), and so does an fnmatch pattern matching it."""
    dotted = f".{name}."
    for pattern in patterns:
        if f".{pattern}." in dotted:
            return True
        if any(c in pattern for c in "*?[") and fnmatch(name, pattern):
            return True
    return False


def replace_with_qmodules(model: nn.Module, config: QuantoConfig, skip: Iterable[str], frozen: bool) -> list[str]:
    """Replace, in place, the supported submodules of a ``meta`` skeleton by quantized modules.

    Args:
        model: the skeleton built by ``from_pretrained`` (on ``meta``).
        config: the quantization config.
        skip: module names / patterns to leave float.
        frozen: build the quantized storage now (empty, right shapes and dtypes): what a pre-quantized checkpoint
            loads into, and what ``device_map="auto"`` sizes exactly. Otherwise the modules keep a float ``weight``
            slot that :func:`create_quantized_param` fills.

    Returns:
        The names of the replaced modules.
    """
    skip = list(skip)
    qconfig: dict[str, Any] = dict(
        weights=config.weights_qtype, activations=config.activations_qtype, group_size=config.group_size
    )
    if config.activation_scales != "static":
        qconfig["activation_scales"] = config.activation_scales
    if config.optimizer is not None:
        qconfig["optimizer"] = config.optimizer
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or is_skipped(name, skip) or isinstance(module, QModuleMixin):
            continue
        qmodule = quantize_module(module, **qconfig)
        if qmodule is None:
            continue
        if frozen:
            qmodule.freeze()
            # transformers re-initializes the weights it did not load (e.g. those offloaded to disk) with float
            # initializers, which cannot run on quantized storage: the storage is only ever loaded.
            for tensor in (*qmodule._parameters.values(), *qmodule._buffers.values()):
                if tensor is not None and (not tensor.is_floating_point() or tensor.dtype.itemsize == 1):
                    tensor._is_hf_initialized = True
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, qmodule)
        replaced.append(name)
    return replaced


def param_needs_quantization(model: nn.Module, param_name: str) -> bool:
    """Whether the checkpoint tensor ``param_name`` goes through :func:`create_quantized_param` when quantizing on
    load: the ``weight`` of every quantized module (a normalization's float weight too, so that its activation
    scales get created with it)."""
    module_name, _, tensor_name = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, QModuleMixin) and tensor_name == "weight"


_MADV_DONTNEED = 4  # linux/mman.h
_MAPPINGS: list[tuple[int, int]] = []  # the last ranges read by _checkpoint_mappings


def _checkpoint_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's private file mappings of ``*.safetensors`` files (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].endswith(".safetensors") and fields[1].endswith("p"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def release_checkpoint_pages(tensor: torch.Tensor) -> bool:
    """Drop from this process's resident memory the pages of a float checkpoint tensor once it is quantized.

    The loaders hand over tensors that are views of the memory-mapped safetensors file: every page a
    quantization reads stays resident (and counts in the process's RSS) until the whole file is unmapped at the
    end of the load, so a quantize-on-load would peak near the float checkpoint's size. ``MADV_DONTNEED`` on a
    private, unmodified file mapping only forgets the pages: a later read faults them in again from the file,
    unchanged. Only the pages lying entirely inside the tensor are released (a neighbour's bytes are never
    touched), and only when the tensor lies inside such a mapping.

    Returns:
        Whether pages were released.
    """
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux") or tensor.numel() == 0:
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not tensor.is_contiguous():
        return False
    inside = lambda ranges: any(a <= start and end <= b for a, b in ranges)  # noqa: E731
    if not inside(_MAPPINGS):  # the maps file is long: read again only for an address not seen mapped yet
        _MAPPINGS[:] = _checkpoint_mappings()
        if not inside(_MAPPINGS):
            return False
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(first, last - first, _MADV_DONTNEED) == 0


# Free heap memory a quantize-on-load leaves in place for the next weights' temporaries (a 64 MiB float32 layer
# quantizes with about 3 temporaries of 16 MiB): a fraction of one float layer of a real model.
HEAP_SLACK_BYTES = 64 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _free_heap_bytes(libc) -> int | None:
    """The free bytes held by glibc's heap (``mallinfo2().fordblks``, glibc 2.33+), or ``None``."""
    try:
        mallinfo2 = libc.mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2().fordblks


def trim_heap(keep_bytes: int = 0) -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``; elsewhere nothing), once it holds
    more than ``keep_bytes``.

    Quantizing a weight allocates and frees a few temporaries of its size. glibc raises its mmap threshold to the
    largest block freed so far, so later temporaries come from the heap, and freed heap memory stays resident: over
    a load these add up to several float layers of RSS that no tensor uses. Trimming after every weight costs time
    twice (the trim itself, and the page faults of the next weight's temporaries, 15% of an int4 load): up to
    ``keep_bytes`` stay, for the next weight to reuse.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        free = _free_heap_bytes(libc) if keep_bytes else None
        if free is None or free > keep_bytes:
            libc.malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (musl has no malloc_trim)
        pass


@torch.no_grad()
def create_quantized_param(
    model: nn.Module, param_value: torch.Tensor, param_name: str, target_device: torch.device | str | int | None
) -> dict[str, torch.Tensor]:
    """The per-parameter step of quantize-on-load, shared by the transformers and diffusers quantizers.

    The float checkpoint tensor ``param_value`` (the ``weight`` of a quantized module) is moved to
    ``target_device`` and quantized there into the module's storage; the module's static activation scales are
    created there as well, as placeholders (1, flagged :attr:`~quanto_backend.QModuleMixin.awaits_calibration`: the
    module quantizes its input per token until :class:`~quanto_backend.Calibration` sets them). Only this one float
    weight is alive beyond the quantized model.

    Returns:
        ``{full name: tensor}`` of every tensor this set on the module.
    """
    module_name, _, tensor_name = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, QModuleMixin) or tensor_name != "weight":
        raise ValueError(f"{param_name!r} is not the weight of a quantized module; nothing to quantize")
    if target_device is not None and str(target_device) not in ("disk", "meta"):
        param_value = param_value.to(target_device)
    prefix = f"{module_name}." if module_name else ""
    if module.weight_qtype is not None:
        module.set_quantized_weight(param_value)
        names = ["weight", "weight_scale", "weight_shift"]
        release_checkpoint_pages(param_value)  # read once, quantized: no need to keep it resident
        # The quantization's temporaries are freed: so is their memory, beyond what the next weights' may reuse.
        trim_heap(keep_bytes=max(HEAP_SLACK_BYTES, 2 * param_value.nbytes))
    else:  # a normalization of an activation-quantized model: its weight stays float
        module.weight = nn.Parameter(param_value, requires_grad=param_value.is_floating_point())
        names = ["weight"]
    names += _materialize_quant_buffers(module, param_value.device)
    module.mark_awaiting_calibration()  # scales of 1 are placeholders: per-token scales until Calibration runs
    module._quanto_loaded = True
    return {prefix + n: getattr(module, n) for n in names if getattr(module, n, None) is not None}


def init_unloaded_activation_scales(model: nn.Module) -> None:
    """Set to 1 the activation scales of quantized modules that :func:`create_quantized_param` never saw (e.g. a
    LayerNorm without weight): they were never in the float checkpoint."""
    for module in model.modules():
        if isinstance(module, QModuleMixin) and not getattr(module, "_quanto_loaded", False):
            device = next((t.device for t in module.parameters() if t.device.type != "meta"), torch.device("cpu"))
            _materialize_quant_buffers(module, device)
            module.mark_awaiting_calibration()
        if hasattr(module, "_quanto_loaded"):
            del module._quanto_loaded


def check_calibrated(model: nn.Module) -> None:
    """Refuse to save placeholder activation scales: written to disk they would reload as real scales of 1.

    Raises:
        ValueError: naming the first module whose static activation scales were never calibrated.
    """
    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin) and module.awaits_calibration:
            raise ValueError(
                f"Module {name!r} has static activation scales that were never calibrated (they are placeholders "
                "until quanto_backend.Calibration runs; meanwhile inputs are quantized per token). Calibrate before "
                "save_pretrained: `with torch.no_grad(), Calibration(): model(samples)`, or load with "
                "QuantoConfig(..., activation_scales='dynamic'), which saves no scales."
            )


def _checkpoint_key(name: str, keys: set[str], prefix: str) -> str | None:
    """The key under which ``name`` (a full tensor name of the model) is in ``keys``: checkpoints are saved with or
    without the model's ``base_model_prefix``."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name.removeprefix(prefix + ".")]
    return next((k for k in candidates if k in keys), None)


def prepare_format_upgrade(
    model: nn.Module, checkpoint_keys: Iterable[str], prefix: str = "", format_version: int = 1
) -> list[str]:
    """Before a pre-quantized checkpoint loads: let the modules that it saved in format 1 load.

    Format 1 had no ``output_quantized`` buffer: an output left float by ``Calibration(streamline=True)`` had no
    ``output_scale``, and a QLayerNorm no ``input_scale``. The skeleton rebuilt from the config has them all. For
    each module the checkpoint holds no ``output_quantized`` of, the tensors it lacks are made non-persistent (the
    loaders then neither expect them nor report them missing) and are given their values by
    :func:`finish_format_upgrade` once loading is done: ``output_quantized`` is whether ``output_scale`` was saved.

    Args:
        model: the frozen skeleton.
        checkpoint_keys: the tensor names of the checkpoint.
        prefix: the model's ``base_model_prefix`` (checkpoints may be saved with or without it).
        format_version: the checkpoint's ``quantization_config`` format version: modules without
            ``output_quantized`` are read as format 1 only where it says 1.

    Returns:
        The names of the modules read as format 1.

    Raises:
        ValueError: a checkpoint of format 2 or later lacks an ``output_quantized``, naming it.
    """
    keys = set(checkpoint_keys)
    upgraded = []
    for name, module in model.named_modules():
        if not isinstance(module, QModuleMixin) or OUTPUT_QUANTIZED not in module._buffers:
            continue
        full = f"{name}." if name else ""
        if _checkpoint_key(full + OUTPUT_QUANTIZED, keys, prefix) is not None:
            continue
        if format_version >= 2:
            raise ValueError(
                f"Pre-quantized checkpoint lacks tensor {full + OUTPUT_QUANTIZED!r} that its quantization_config "
                f"(format_version {format_version}, activations={module.activation_qtype}) requires: the checkpoint "
                "is incomplete or was not saved by quanto_backend's save_pretrained."
            )
        missing = [n for n in QUANT_BUFFERS if n in module._buffers and _checkpoint_key(full + n, keys, prefix) is None]
        module._pending_format_upgrade = {
            "names": missing,
            "output_quantized": _checkpoint_key(full + "output_scale", keys, prefix) is not None,
        }
        module._non_persistent_buffers_set.update(missing)
        upgraded.append(name)
    return upgraded


def finish_format_upgrade(model: nn.Module, config: QuantoConfig | None = None) -> None:
    """After loading: give the tensors that :func:`prepare_format_upgrade` set aside their values, on the device of
    the module's loaded tensors, and make them persistent again (a later save writes the current format, and
    ``config`` says so); every module takes whether it quantizes its output from its loaded ``output_quantized``."""
    for module in model.modules():
        if not isinstance(module, QModuleMixin):
            continue
        pending = module.__dict__.pop("_pending_format_upgrade", None)
        if pending is None:
            module.read_output_quantized()
            continue
        loaded = (t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
        device = next((t.device for t in loaded if t.device.type != "meta"), torch.device("cpu"))
        _materialize_quant_buffers(module, device, pending["names"])
        module._set_output_quantized(pending["output_quantized"])
        module._non_persistent_buffers_set.difference_update(pending["names"])
    if config is not None:
        config.format_version = FORMAT_VERSION


def add_input_zero_points(model: nn.Module, checkpoint_keys: Iterable[str], prefix: str = "") -> list[str]:
    """Give the ``qint8`` modules of a pre-quantized skeleton the ``input_zero_point`` that the checkpoint holds.

    :class:`~quanto_backend.Calibration` gives a static int8 input a zero-point where it is mostly one-sided; the
    skeleton rebuilt from the config has symmetric inputs, so the checkpoint decides (as for output scales).

    Returns:
        The names of the added buffers.
    """
    keys = set(checkpoint_keys)
    added = []
    for name, module in model.named_modules():
        if not isinstance(module, QModuleMixin) or "input_scale" not in module._buffers:
            continue
        if "input_zero_point" in module._buffers:
            continue
        full = f"{name}.input_zero_point"
        if _checkpoint_key(full, keys, prefix) is not None:
            module.set_input_zero_point(torch.zeros((), dtype=torch.int32, device=module.input_scale.device))
            added.append(full)
    return added


def align_storage(model: nn.Module) -> None:
    """Give every frozen quantized module storage that meets the CPU kernels' contracts (see
    :meth:`~quanto_backend.QModuleMixin.align_storage`): the loaders assign the checkpoint's own tensors."""
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            module.align_storage()


def reset_requires_grad(model: nn.Module) -> None:
    """Quantized storage and scales are never trained: loaders re-wrap float scales with ``requires_grad=True``."""
    for module in model.modules():
        if isinstance(module, QModuleMixin) and module.frozen:
            for name in ("weight", "weight_scale", "weight_shift"):
                param = module._parameters.get(name)
                if param is not None:
                    param.requires_grad_(False)


def validate_device_map(device_map: Any, pre_quantized: bool) -> None:
    """Refuse, before anything is loaded, the device maps that cannot work.

    Quantizing on load with disk offload cannot work: the offloaded float weights would never be quantized
    (transformers would silently give zeros, diffusers fails late).
    """
    if not isinstance(device_map, dict) or pre_quantized:
        return
    if "disk" in {str(d) for d in device_map.values()}:
        disk = sorted(k for k, d in device_map.items() if str(d) == "disk")
        raise ValueError(
            f"quanto_backend cannot quantize on load with disk offload (device_map sends {disk[:3]} to 'disk'). "
            "Either give more memory (max_memory) or fewer modules to disk, or quantize first and save: "
            "model = from_pretrained(path, quantization_config=QuantoConfig(...)); model.save_pretrained(qdir); "
            "then from_pretrained(qdir, device_map=...) offloads the quantized checkpoint to disk."
        )


def _float_class(module: QModuleMixin) -> type[nn.Module]:
    for cls in type(module).__mro__[1:]:
        if issubclass(cls, nn.Module) and not issubclass(cls, QModuleMixin):
            return cls
    raise TypeError(f"{type(module).__name__} has no float torch module base class")


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Turn, in place, every quantized module of ``model`` back into its float torch module, with the
    dequantized weight (in ``dtype``, default: the scale's dtype). Activation quantization is dropped."""
    for module in list(model.modules()):
        if not isinstance(module, QModuleMixin):
            continue
        weight = module.qweight.dequantize() if module.weight_qtype is not None else module.weight
        if weight is not None:
            weight = weight.detach().to(dtype or weight.dtype)
        for tensor_name in ("weight", "weight_scale", "weight_shift"):
            module._parameters.pop(tensor_name, None)
        smooth = module._buffers.get("input_smooth")
        if smooth is not None and weight is not None:  # the input was divided by it: fold it into the weight
            weight = weight / smooth.to(weight.dtype).reshape(1, -1, *([1] * (weight.ndim - 2)))
        for buffer in QUANT_BUFFERS:
            module._buffers.pop(buffer, None)
        module.weight = None if weight is None else nn.Parameter(weight)
        for attr in (
            "weight_qtype",
            "activation_qtype",
            "activation_scales",
            "optimizer",
            "group_size",
            "_calibrating",
            "_output_quantized",
        ):
            module.__dict__.pop(attr, None)
        if module.bias is not None and dtype is not None:
            module.bias = nn.Parameter(module.bias.detach().to(dtype))
        # The quantized class adds no state of its own beyond what was just removed, so the float class fits.
        module.__class__ = _float_class(module)
    return model


def checkpoint_keys(checkpoint_files: Iterable[str] | None) -> set[str]:
    """The tensor names of safetensors checkpoint files (headers only; nothing is loaded)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for file in checkpoint_files or ():
        if str(file).endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                keys.update(f.keys())
    return keys


_SAFETENSORS_DTYPES = {
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def check_prequantized_checkpoint(model: nn.Module, checkpoint_files: Iterable[str] | None, prefix: str = "") -> None:
    """Check, from the safetensors headers alone, that a pre-quantized checkpoint holds every quantized tensor the
    skeleton expects, with the right shape and storage dtype.

    The libraries only warn about missing keys (and fill them with uninitialized memory), so a mismatch between a
    checkpoint's ``quantization_config`` and its tensors must be caught here, before loading.

    Raises:
        ValueError: naming the first missing or mismatched tensor.
    """
    from safetensors import safe_open

    headers: dict[str, tuple[list[int], str]] = {}
    for file in checkpoint_files or ():
        if str(file).endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    headers[key] = (list(s.get_shape()), s.get_dtype())
    if not headers:
        return  # not a safetensors checkpoint: nothing to read cheaply, the loader reports what it finds
    known: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, QModuleMixin):
            continue
        storage = ("weight", "weight_scale", "weight_shift") if module.frozen else ()  # a norm's weight is float
        tensors = {n: module._parameters[n] for n in storage if n in module._parameters}
        tensors.update(
            {
                n: module._buffers[n]
                for n in QUANT_BUFFERS
                if n in module._buffers and n not in module._non_persistent_buffers_set  # format 1: not saved
            }
        )
        for tensor_name, expected in tensors.items():
            full = f"{name}.{tensor_name}"
            candidates = [full, f"{prefix}.{full}", full.removeprefix(prefix + ".")] if prefix else [full]
            known.update(candidates)
            key = next((k for k in candidates if k in headers), None)
            if key is None:
                raise ValueError(
                    f"Pre-quantized checkpoint lacks tensor {full!r} that its quantization_config requires "
                    f"(weights={module.weight_qtype}, activations={module.activation_qtype}); the checkpoint is "
                    "incomplete or was not saved by quanto_backend's save_pretrained."
                )
            shape, dtype = headers[key]
            if tuple(shape) != tuple(expected.shape):
                raise ValueError(
                    f"Checkpoint tensor {key!r} has shape {tuple(shape)}, but its quantization_config "
                    f"(weights={module.weight_qtype}, group_size={module.group_size}) needs {tuple(expected.shape)}."
                )
            want = _SAFETENSORS_DTYPES.get(expected.dtype)
            if tensor_name == "weight" and want is not None and dtype != want:
                raise ValueError(
                    f"Checkpoint tensor {key!r} has dtype {dtype}, but {module.weight_qtype} weights are stored as "
                    f"{want}: the checkpoint does not match its quantization_config."
                )
    quant_suffixes = tuple("." + n for n in ("weight_scale", "weight_shift", *QUANT_BUFFERS))
    for key in sorted(headers):
        if key.endswith(quant_suffixes) and key not in known:
            raise ValueError(
                f"Checkpoint tensor {key!r} is quantization state that the model rebuilt from the checkpoint's "
                "quantization_config does not have (a module left float by modules_to_not_convert, or a quantization "
                "option QuantoConfig cannot express): the checkpoint does not match its quantization_config."
            )
