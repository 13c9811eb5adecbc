"""Calibration of static activation scales (and zero-points), by a running absmax or by any observer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .nn import QModuleMixin
from .observers import MovingAverageMinMaxObserver, Observer
from .qtypes import qint8, quint8
from .tensor import QActivation

__all__ = ["Calibration"]


def _absmax(x: torch.Tensor) -> torch.Tensor:
    x = x.dequantize() if isinstance(x, QActivation) else x
    return x.detach().abs().amax().float()


def _extrema(x: torch.Tensor) -> torch.Tensor:
    """``[min(x, 0), max(x, 0)]``, float32: the range an int8 grid with a zero-point must cover (0 exactly)."""
    x = (x.dequantize() if isinstance(x, QActivation) else x).detach().float()
    return torch.stack([x.amin().clamp(max=0), x.amax().clamp(min=0)])


# A static int8 input gets a zero-point when its range is this lopsided: the smaller side at most half the
# larger, so that the 256 codes spread over max - min step at least 25% finer than symmetric codes over +-absmax.
# GELU outputs (min about -0.17) are the common case: symmetric codes leave half the grid unused there, and that
# alone was most of the error of static W8A8 on BERT-like models (MiniLM: 0.984 mean cosine, 0.991 with it).
ONE_SIDED_RATIO = 0.5


class Calibration(TorchFunctionMode):
    """Context manager recording the activation ranges of quantized modules while samples pass through them.

    Each quantized module's ``input_scale`` and ``output_scale`` become a running average (``momentum``) of
    ``absmax / qmax`` over the samples::

        with torch.no_grad(), Calibration():
            for batch in samples:
                model(batch)

    Args:
        momentum: weight of the previous scale in the running average (the first sample sets it).
        streamline: stop quantizing the output of a module whose output is consumed by anything other than a
            quantized module (:meth:`~quanto_backend.QModuleMixin.disable_output_quantization`: its
            ``output_scale`` stays, its ``output_quantized`` buffer turns false and is saved with the model): the
            next float operation would only dequantize it.
        observer: an :class:`~quanto_backend.Observer` class (or any callable taking ``qtype=`` and returning an
            observer, e.g. ``functools.partial(HistogramObserver, percentile=99.9)``): one is created per module
            input and output, and the scales (and ``quint8`` zero-points) become its ``calculate_qparams()``.
            Default: the running absmax above for symmetric activations, and a
            :class:`~quanto_backend.MovingAverageMinMaxObserver` with ``momentum`` for ``quint8``.
        debug: print each quantized module's activation scales after every call it calibrates.
        input_zero_points: with the default estimate, give the ``qint8`` input of a module a zero-point (int8
            codes over ``[min, max]`` instead of ``[-absmax, absmax]``) when its running range is mostly one-sided
            (the smaller side at most half the larger, e.g. after a GELU); ``False`` keeps every int8 input
            symmetric (what optimum-quanto's checkpoints can hold).
    """

    def __init__(
        self,
        momentum: float = 0.9,
        streamline: bool = True,
        observer=None,
        debug: bool = False,
        input_zero_points: bool = True,
    ):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if observer is not None and not callable(observer):
            raise TypeError(f"observer must be an Observer class or a callable returning one, got {observer!r}")
        self.momentum = momentum
        self.streamline = streamline
        self.observer = observer
        self.debug = debug
        self.input_zero_points = input_zero_points
        self._extrema: dict[tuple[int, str], torch.Tensor] = {}  # running [min, max] of int8 inputs
        self._observers: dict[tuple[int, str], Observer] = {}
        self._handles: list = []
        self._scales: dict[tuple[int, str], torch.Tensor] = {}  # running symmetric scales
        self._producers = WeakIdKeyDictionary()  # quantized output tensor -> the module that produced it
        self._depth = 0  # > 0 while a quantized module's forward runs

    def __enter__(self):
        # Global hooks see every quantized module that runs, whichever model it belongs to.
        self._handles = [
            register_module_forward_pre_hook(self._before),
            register_module_forward_hook(self._after),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._observers.clear()
        self._producers = WeakIdKeyDictionary()
        return super().__exit__(*exc)

    def _observe(self, module: nn.Module, side: str, x: torch.Tensor) -> None:
        """Feed ``x`` to the observer of ``module``'s ``side`` ("input"/"output") and copy its parameters."""
        key = (id(module), side)
        observer = self._observers.get(key)
        if observer is None:
            qtype = module.activation_qtype
            if self.observer is None:
                observer = MovingAverageMinMaxObserver(qtype=qtype, momentum=self.momentum)
            else:
                observer = self.observer(qtype=qtype)
            if not isinstance(observer, Observer) or observer.qtype != qtype:
                raise TypeError(f"Calibration's observer must build an Observer for {qtype}, got {observer!r}")
            self._observers[key] = observer.to(x.device)
        observer(x)
        scale, zero_point = observer.calculate_qparams()
        if scale.ndim != 0:
            raise ValueError(f"{type(observer).__name__} gives per-axis parameters; activation scales are per tensor")
        getattr(module, f"{side}_scale").copy_(scale)
        zero_point_buffer = module._buffers.get(f"{side}_zero_point")
        if zero_point_buffer is not None:
            zero_point_buffer.copy_(zero_point)

    def _update(self, module: nn.Module, name: str, x: torch.Tensor) -> None:
        module.mark_awaiting_calibration(False)  # its static scales are measured from now on
        if self.observer is not None or module.activation_qtype == quint8:
            self._observe(module, name.removesuffix("_scale"), x)
            return
        scale = (_absmax(x) / module.activation_qtype.qmax).clamp_min(torch.finfo(torch.float32).tiny)
        buffer = getattr(module, name)
        key = (id(module), name)
        scale = scale.to(buffer.device)
        previous = self._scales.get(key)  # not the buffer: a zero-point's scale may have replaced it
        if previous is not None:
            scale = self.momentum * previous + (1 - self.momentum) * scale
        self._scales[key] = scale
        buffer.copy_(scale)
        if (
            name == "input_scale"
            and module.activation_qtype == qint8
            and self.input_zero_points
            and type(module).quantizes_input  # a normalization keeps its input_scale unused
        ):
            self._update_zero_point(module, key, x)

    def _update_zero_point(self, module: nn.Module, key: tuple[int, str], x: torch.Tensor) -> None:
        """Give ``module``'s int8 input a zero-point (and the scale of its ``[min, max]``) while the running range
        is mostly one-sided; otherwise keep the symmetric absmax scale just set."""
        extrema = _extrema(x).to(module.input_scale.device)
        previous = self._extrema.get(key)
        if previous is not None:
            extrema = self.momentum * previous + (1 - self.momentum) * extrema
        self._extrema[key] = extrema
        low, high = -extrema[0], extrema[1]
        if torch.minimum(low, high) > ONE_SIDED_RATIO * torch.maximum(low, high):
            module.set_input_zero_point(None)
            return
        scale = ((high + low) / 255).clamp_min(torch.finfo(torch.float32).tiny)
        module.input_scale.copy_(scale)
        # The code of 0.0 is exact: -128 maps the minimum to the lowest code.
        module.set_input_zero_point((-128 + low / scale).round().clamp(-128, 127))

    def _before(self, module, args):
        if not isinstance(module, QModuleMixin):
            return
        self._depth += 1
        module._calibrating = True  # its forward leaves the output float: _after quantizes it, scale updated
        # A module with dynamic activation scales has no input_scale: nothing to calibrate.
        if module.activation_qtype is not None and "input_scale" in module._buffers and args:
            self._update(module, "input_scale", module.smooth_input(args[0]))

    def _after(self, module, args, output):
        if not isinstance(module, QModuleMixin):
            return None
        self._depth -= 1
        module._calibrating = False
        if not module.quantizes_output or not isinstance(output, torch.Tensor):
            self._trace(module)
            return None
        self._update(module, "output_scale", output)
        self._trace(module)
        output = module.quantize_output(output)
        self._producers[output] = module
        return output

    def _trace(self, module: nn.Module) -> None:
        if self.debug:
            scales = {n: float(module._buffers[n]) for n in ("input_scale", "output_scale") if n in module._buffers}
            print(f"Calibration: {type(module).__name__} {module.activation_qtype} activations, scales {scales}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.streamline and self._depth == 0 and getattr(func, "__name__", "") != "__get__":
            for arg in (*args, *kwargs.values()):
                producer = self._producers.get(arg) if isinstance(arg, QActivation) else None
                if producer is not None and producer.quantizes_output:
                    producer.disable_output_quantization()  # a float op consumes this output: keep it float
        return func(*args, **kwargs)
