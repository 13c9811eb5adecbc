"""QTensor: the base of the quantized tensor family (torch.Tensor wrapper subclasses).

A QTensor looks like the float tensor it stands for (same shape, float dtype) and holds quantized storage
inside. Functions with a quantized implementation (``F.linear``, ``torch.matmul``, ``F.conv2d``) are routed to
it by ``__torch_function__``; ``detach``, ``clone``, ``.to(...)`` keep the subclass; any other op sees the
dequantized value, so it is correct, if not fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..qtypes import QType

__all__ = ["QTensor", "register_qtensor_function"]

_FUNCTION_HANDLERS: dict[Callable, Callable] = {}


def register_qtensor_function(*funcs: Callable):
    """Route the torch functions ``funcs``, when any argument is a QTensor, to the decorated handler."""

    def decorator(handler: Callable) -> Callable:
        for func in funcs:
            _FUNCTION_HANDLERS[func] = handler
        return handler

    return decorator


class _Dequantize(torch.autograd.Function):
    """Differentiable dequantization: the gradient passes straight through to the QTensor."""

    @staticmethod
    def forward(ctx, qtensor: QTensor) -> torch.Tensor:
        return qtensor._dequantize()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class QTensor(torch.Tensor):
    """Base class: subclasses name their inner tensors in ``_inner_names`` and their plain attributes in
    ``_meta_names``, and implement ``_dequantize``.

    A subclass is built as ``Cls(*inner tensors, *meta attributes, shape, dtype, requires_grad=False)``, in the
    order of those names (or by keyword); the first inner tensor gives the device.
    """

    _inner_names: tuple[str, ...] = ()
    _meta_names: tuple[str, ...] = ()
    qtype: QType

    @classmethod
    def _bind(cls, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        names = (*cls._inner_names, *cls._meta_names, "shape", "dtype", "requires_grad")
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__} takes at most {len(names)} arguments ({', '.join(names)})")
        return {"requires_grad": False, **dict(zip(names, args, strict=False)), **kwargs}

    @staticmethod
    def __new__(cls, *args, **kwargs):
        bound = cls._bind(args, kwargs)
        device = bound[cls._inner_names[0]].device
        return torch.Tensor._make_wrapper_subclass(
            cls, bound["shape"], dtype=bound["dtype"], device=device, requires_grad=bound["requires_grad"]
        )

    def __init__(self, *args, **kwargs):
        bound = self._bind(args, kwargs)
        for name in (*self._inner_names, *self._meta_names):
            setattr(self, name, bound[name])

    def _dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float tensor this QTensor stands for; gradients flow straight through."""
        return _Dequantize.apply(self)

    # The pieces from which an equal QTensor can be rebuilt: used by detach/clone/to and by torch.compile.
    def __tensor_flatten__(self):
        return list(self._inner_names), {name: getattr(self, name) for name in self._meta_names} | {
            "shape": self.shape,
            "dtype": self.dtype,
        }

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, torch.Tensor], meta: dict[str, Any], outer_size, outer_stride):
        meta = dict(meta)
        shape, dtype = meta.pop("shape"), meta.pop("dtype")
        return cls(**inner, **meta, shape=shape, dtype=dtype)

    def _map_inner(self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None) -> QTensor:
        inner, meta = self.__tensor_flatten__()
        tensors = {name: fn(getattr(self, name)) for name in inner}
        if dtype is not None:
            meta["dtype"] = dtype
        return type(self).__tensor_unflatten__(tensors, meta, None, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._dequantize()}, qtype={self.qtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _FUNCTION_HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        if op in (torch.ops.aten.detach, torch.ops.aten.clone, torch.ops.aten.alias):
            return args[0]._map_inner(lambda t: op(t))
        if op is torch.ops.aten._to_copy:
            return _to_copy(args[0], **kwargs)
        if op in (torch.ops.aten.t, torch.ops.aten.transpose) and hasattr(args[0], "_transposed"):
            return args[0]._transposed()
        # Anything else computes on the dequantized values: correct for every op, fast for none.
        args, kwargs = tree_map(lambda a: a._dequantize() if isinstance(a, QTensor) else a, (args, kwargs))
        return func(*args, **kwargs)


def _to_copy(qtensor: QTensor, dtype: torch.dtype | None = None, device=None, **_) -> QTensor:
    """``.to(device)`` moves every inner tensor; ``.to(float dtype)`` changes the dequantized dtype (the float
    scales follow), never the quantized storage."""
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"A {type(qtensor).__name__} can only be cast to a floating point dtype, not {dtype}")

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.dtype == qtensor.dtype:
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    return qtensor._map_inner(move, dtype=dtype)
