"""Static quantization with observers: insert observers, run calibration samples, convert.

::

    insert_observers(model, observer=MinMaxObserver, activations=quint8)   # the model stays float
    with torch.no_grad():
        for batch in samples:
            model(batch)
    convert_static(model, weights=quint8)   # quantized modules with fixed activation scales and zero-points
    freeze(model)

Observers see the float activations of the unmodified model (unlike :class:`~quanto_backend.Calibration`, which
calibrates a model whose upstream layers are already quantized). The converted modules are ordinary quantized
modules: their ``input_scale``/``input_zero_point`` (and ``output_*``) buffers serialize with the rest of the
state and are rebuilt by :func:`~quanto_backend.requantize`.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatch

from torch import nn

from .nn import QModuleMixin, qmodule_class, quantize_module
from .observers import MinMaxObserver, Observer
from .qtypes import QType, as_qtype, quint8
from .quantize import _as_patterns, _set_submodule
from .tensor import ACTIVATION_QTYPES

__all__ = ["convert_static", "insert_observers"]

_HANDLES = "_observer_handles"  # the hook handles of an observed module, removed by convert_static


def _observe_input(module: nn.Module, args) -> None:
    if args:
        module.input_observer(args[0])


def _observe_output(module: nn.Module, args, output) -> None:
    module.output_observer(output)


def insert_observers(
    model: nn.Module,
    observer: Callable[..., Observer] = MinMaxObserver,
    activations: QType | str = quint8,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    types: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    outputs: bool = False,
) -> nn.Module:
    """Attach observers to the chosen float modules of ``model`` (in place), ready for calibration samples.

    Each chosen module gets an ``input_observer`` child (and an ``output_observer`` when ``outputs`` is set, or
    when the module quantizes only its output, like a LayerNorm), fed by forward hooks.

    Args:
        model: a float model.
        observer: an :class:`~quanto_backend.Observer` class, or a callable taking ``qtype=`` and returning one
            (e.g. ``functools.partial(HistogramObserver, percentile=99.9)``).
        activations: the activation format: ``quint8`` (asymmetric, with zero-points; the default), ``qint8``
            or a float8.
        include: fnmatch patterns of module names to observe (default: all).
        exclude: fnmatch patterns of module names to leave alone.
        types: module classes to observe (default: every class with a quantized version).
        outputs: also observe (and later quantize) the outputs of modules that quantize their input.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: no module was chosen, or a chosen type has no quantized version.
    """
    include, exclude = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    qtype = as_qtype(activations, ACTIVATION_QTYPES, "activations")
    if types is not None:
        types = types if isinstance(types, tuple) else (types,)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"types must be torch module classes, got {types!r}")
    if not callable(observer):
        raise TypeError(f"observer must be an Observer class or a callable returning one, got {observer!r}")
    chosen = 0
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, (Observer, QModuleMixin)) or hasattr(module, _HANDLES):
            continue
        if types is not None and not isinstance(module, types):
            continue
        if (include and not any(fnmatch(name, p) for p in include)) or any(fnmatch(name, p) for p in exclude):
            continue
        qcls = qmodule_class(module)
        if qcls is None:
            if types is None:
                continue
            raise ValueError(f"Module {name!r} ({type(module).__name__}) has no quantized version to convert to")
        handles = []
        if qcls.quantizes_input:
            module.input_observer = _build(observer, qtype)
            handles.append(module.register_forward_pre_hook(_observe_input))
        if outputs or not qcls.quantizes_input:
            module.output_observer = _build(observer, qtype)
            handles.append(module.register_forward_hook(_observe_output))
        setattr(module, _HANDLES, handles)
        chosen += 1
    if chosen == 0:
        raise ValueError(f"insert_observers chose no module (include={include}, exclude={exclude}, types={types})")
    return model


def _build(observer: Callable[..., Observer], qtype: QType) -> Observer:
    built = observer(qtype=qtype)
    if not isinstance(built, Observer) or built.qtype != qtype:
        raise TypeError(f"observer must build an Observer for {qtype}, got {built!r}")
    return built


def convert_static(
    model: nn.Module,
    weights: QType | str | None = None,
    optimizer=None,
    group_size: int | None = None,
) -> nn.Module:
    """Replace every module observed by :func:`insert_observers` by its quantized version, with the activation
    scales and zero-points its observers computed (in place; the observers and hooks are removed).

    Args:
        model: a model prepared by :func:`insert_observers` and run on calibration samples.
        weights: the weight format (``qint8``, ``quint8`` for asymmetric per-axis uint8, ``qint4``, ...), or
            ``None`` for float weights. Weights are quantized on the fly until :func:`~quanto_backend.freeze`.
        optimizer, group_size: as for :func:`~quanto_backend.quantize`.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: ``model`` has no observed module.
        RuntimeError: an observer saw no data (its module never ran during calibration).
    """
    observed = [(name, m) for name, m in model.named_modules() if hasattr(m, _HANDLES)]
    if not observed:
        raise ValueError("convert_static found no observed module: call insert_observers and calibrate first")
    for name, module in observed:
        observers = {
            side: getattr(module, f"{side}_observer")
            for side in ("input", "output")
            if isinstance(getattr(module, f"{side}_observer", None), Observer)
        }
        for side, obs in observers.items():
            if not obs.observed:
                raise RuntimeError(f"The {side} observer of {name!r} saw no data: its module never ran")
        qtype = next(iter(observers.values())).qtype
        for handle in getattr(module, _HANDLES):
            handle.remove()
        delattr(module, _HANDLES)
        for side in observers:
            delattr(module, f"{side}_observer")
        qmodule = quantize_module(
            module,
            weights=weights,
            activations=qtype,
            optimizer=optimizer,
            group_size=group_size,
            quantize_output="output" in observers,
        )
        for side, obs in observers.items():
            scale, zero_point = obs.calculate_qparams()
            if scale.ndim != 0:
                raise ValueError(f"The {side} observer of {name!r} is per axis; activation scales are per tensor")
            getattr(qmodule, f"{side}_scale").copy_(scale)
            if f"{side}_zero_point" in qmodule._buffers:
                getattr(qmodule, f"{side}_zero_point").copy_(zero_point)
        _set_submodule(model, name, qmodule)
    return model
