"""Calibration of static activation scales."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .nn import QModuleMixin
from .tensor import QActivation

__all__ = ["Calibration"]


def _absmax(x: torch.Tensor) -> torch.Tensor:
    x = x.dequantize() if isinstance(x, QActivation) else x
    return x.detach().abs().amax().float()


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
            quantized module (its ``output_scale`` is removed): the next float operation would only dequantize it.
    """

    def __init__(self, momentum: float = 0.9, streamline: bool = True):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.streamline = streamline
        self._handles: list = []
        self._seen: set[tuple[int, str]] = set()
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
        self._producers = WeakIdKeyDictionary()
        return super().__exit__(*exc)

    def _update(self, module: nn.Module, name: str, x: torch.Tensor) -> None:
        scale = (_absmax(x) / module.activation_qtype.qmax).clamp_min(torch.finfo(torch.float32).tiny)
        buffer = getattr(module, name)
        key = (id(module), name)
        if key in self._seen:
            scale = self.momentum * buffer + (1 - self.momentum) * scale.to(buffer.device)
        self._seen.add(key)
        buffer.copy_(scale)

    def _before(self, module, args):
        if not isinstance(module, QModuleMixin):
            return
        self._depth += 1
        module._calibrating = True  # its forward leaves the output float: _after quantizes it, scale updated
        if module.activation_qtype is not None and module.quantizes_input and args:
            self._update(module, "input_scale", args[0])

    def _after(self, module, args, output):
        if not isinstance(module, QModuleMixin):
            return None
        self._depth -= 1
        module._calibrating = False
        if not module.quantizes_output or not isinstance(output, torch.Tensor):
            return None
        self._update(module, "output_scale", output)
        output = module.quantize_output(output)
        self._producers[output] = module
        return output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.streamline and self._depth == 0 and getattr(func, "__name__", "") != "__get__":
            for arg in (*args, *kwargs.values()):
                producer = self._producers.get(arg) if isinstance(arg, QActivation) else None
                if producer is not None and producer.quantizes_output:
                    del producer.output_scale  # a float op consumes this output: keep it float
        return func(*args, **kwargs)
