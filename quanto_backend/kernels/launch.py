"""Launches a compiled kernel on PyTorch's current CUDA stream with the tensors' own memory.

Arguments are packed for ``cuLaunchKernel`` directly: a tensor is passed as its ``data_ptr()`` (no copy), ``None``
as a null pointer, a Python int as a 32-bit ``int`` and an :class:`Int64` as a ``long long``. Nothing is allocated
on the device and nothing waits for the GPU, so launches can be captured in CUDA graphs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from . import driver as _driver
from .loader import device_context, device_index, get_function, in_device_context

__all__ = ["Int64", "launch"]


class Int64(int):
    """A Python int passed to a ``long long`` kernel parameter."""


_Arg = torch.Tensor | int | float | None


def _pack(arg: _Arg) -> ctypes._SimpleCData:
    if isinstance(arg, torch.Tensor):
        return ctypes.c_uint64(arg.data_ptr())
    if arg is None:
        return ctypes.c_uint64(0)
    if isinstance(arg, Int64):
        return ctypes.c_int64(int(arg))
    if isinstance(arg, bool | int):
        if not -(2**31) <= arg < 2**31:
            raise ValueError(f"kernel argument {arg} does not fit a 32-bit int")
        return ctypes.c_int32(int(arg))
    if isinstance(arg, float):
        return ctypes.c_float(arg)
    raise TypeError(f"unsupported kernel argument type {type(arg).__name__}: {arg!r}")


def launch(
    source: str,
    entry_point: str,
    grid: Sequence[int],
    block: Sequence[int],
    args: Sequence[_Arg],
    device: torch.device,
    shared_mem: int = 0,
) -> None:
    """Launches ``entry_point`` of ``cuda_kernels/<source>`` on ``device``'s current torch stream.

    ``grid`` and ``block`` have 1 to 3 dimensions; ``args`` follow the kernel's parameter list exactly (see
    :func:`_pack` for the accepted Python types).
    """
    function = get_function(source, entry_point, device)
    gx, gy, gz = (*grid, 1, 1)[:3]
    bx, by, bz = (*block, 1, 1)[:3]
    if gx == 0 or gy == 0 or gz == 0:
        return
    values = [_pack(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    index = device_index(device)
    stream = torch.cuda.current_stream(index).cuda_stream
    drv = _driver.driver
    if in_device_context(index):
        drv.launch(function, (gx, gy, gz), (bx, by, bz), shared_mem, stream, params=ctypes.addressof(params))
    else:
        # A worker or autograd thread: the function belongs to the device's primary context, made current here.
        with device_context(index):
            drv.launch(function, (gx, gy, gz), (bx, by, bz), shared_mem, stream, params=ctypes.addressof(params))
