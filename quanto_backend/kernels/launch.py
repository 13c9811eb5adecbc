"""Launches a compiled kernel on PyTorch's current CUDA stream with the tensors' own memory.

The arguments travel in one buffer per launch, laid out as the kernel's parameter list is by the CUDA ABI (each
parameter at the next multiple of its own alignment, no trailing padding), and handed to ``cuLaunchKernel``
through its ``extra`` argument (``CU_LAUNCH_PARAM_BUFFER_POINTER`` / ``CU_LAUNCH_PARAM_BUFFER_SIZE``). A tensor is
passed as its ``data_ptr()`` (no copy), ``None`` as a null pointer, a Python int as a 32-bit ``int``, an
:class:`Int64` as a ``long long`` and a float as a ``float``. The layout of each signature is computed once
(a :class:`struct.Struct` in native alignment, which is the host C ABI, the one CUDA parameters follow on x86-64
and aarch64), and each thread reuses its own buffer for it, so a launch costs one loop over the arguments, one
``pack_into`` and the driver call. Nothing is allocated on the device and nothing waits for the GPU, so launches
can be captured in CUDA graphs.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from collections.abc import Sequence

import torch

from . import driver as _driver
from .loader import device_context, device_index, get_function, in_device_context

__all__ = ["Int64", "ParamLayout", "launch", "pack_args", "param_layout"]


class Int64(int):
    """A Python int passed to a ``long long`` kernel parameter."""


_Arg = torch.Tensor | int | float | None
# struct codes: P void* (8 bytes, 8-aligned), i int (4, 4), q long long (8, 8), f float (4, 4).
_SIZES = {"P": 8, "i": 4, "q": 8, "f": 4}


def _code_and_value(arg: _Arg) -> tuple[str, int | float]:
    if isinstance(arg, torch.Tensor):
        return "P", arg.data_ptr()
    if arg is None:
        return "P", 0
    if isinstance(arg, Int64):
        return "q", int(arg)
    if isinstance(arg, bool | int):
        if not -(2**31) <= arg < 2**31:
            raise ValueError(f"kernel argument {arg} does not fit a 32-bit int")
        return "i", int(arg)
    if isinstance(arg, float):
        return "f", arg
    raise TypeError(f"unsupported kernel argument type {type(arg).__name__}: {arg!r}")


class ParamLayout:
    """The parameter buffer of one kernel signature (a string of struct codes, one per parameter)."""

    def __init__(self, codes: str) -> None:
        self.codes = codes
        self.struct = struct.Struct("@" + codes)
        self.size = self.struct.size
        offsets, offset = [], 0
        for code in codes:
            size = _SIZES[code]
            offset = -(-offset // size) * size  # each basic type is aligned to its size
            offsets.append(offset)
            offset += size
        self.offsets = tuple(offsets)
        if offset != self.size:  # struct's native alignment must be the C ABI's
            raise AssertionError(f"struct layout of {codes!r} is {self.size} bytes, the C ABI's {offset}")

    def buffers(self) -> tuple[ctypes.Array, ctypes.Array]:
        """A new argument buffer and the ``extra`` array of ``cuLaunchKernel`` that describes it."""
        buffer = ctypes.create_string_buffer(max(self.size, 1))
        size = ctypes.c_size_t(self.size)
        extra = (ctypes.c_void_p * 5)(
            _driver.CU_LAUNCH_PARAM_BUFFER_POINTER,
            ctypes.addressof(buffer),
            _driver.CU_LAUNCH_PARAM_BUFFER_SIZE,
            ctypes.addressof(size),
            _driver.CU_LAUNCH_PARAM_END,
        )
        extra._keep = (buffer, size)  # the array points into both: they live as long as it does
        return buffer, extra


_layouts: dict[str, ParamLayout] = {}
_local = threading.local()


def param_layout(codes: str) -> ParamLayout:
    layout = _layouts.get(codes)
    if layout is None:
        layout = _layouts.setdefault(codes, ParamLayout(codes))
    return layout


# The struct code of each plain argument type (subclasses of torch.Tensor are looked up by _code_and_value).
_CODES: dict[type, str] = {torch.Tensor: "P", torch.nn.Parameter: "P", type(None): "P", Int64: "q", int: "i",
                           bool: "i", float: "f"}  # fmt: skip


def pack_args(args: Sequence[_Arg]) -> tuple[ParamLayout, ctypes.Array, ctypes.Array]:
    """Packs ``args`` into this thread's buffer for their signature; returns the layout, the buffer and the
    ``extra`` array to launch with (valid until this thread packs the same signature again)."""
    get = _CODES.get
    codes = "".join([get(type(a)) or _code_and_value(a)[0] for a in args])
    values = [(0 if a is None else a.data_ptr()) if c == "P" else a for c, a in zip(codes, args, strict=True)]
    layout = _layouts.get(codes) or param_layout(codes)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buffers = cache.get(codes)
    if buffers is None:
        buffers = cache[codes] = layout.buffers()
    try:
        layout.struct.pack_into(buffers[0], 0, *values)
    except struct.error:
        for arg in args:
            _code_and_value(arg)  # raises the ValueError naming the argument
        raise
    return layout, buffers[0], buffers[1]


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
    :func:`_code_and_value` for the accepted Python types).
    """
    function = get_function(source, entry_point, device)
    gx, gy, gz = (*grid, 1, 1)[:3]
    bx, by, bz = (*block, 1, 1)[:3]
    if gx == 0 or gy == 0 or gz == 0:
        return
    _, _, extra = pack_args(args)
    index = device_index(device)
    stream = torch.cuda.current_stream(index).cuda_stream
    drv = _driver.driver
    if in_device_context(index):
        drv.launch(function, (gx, gy, gz), (bx, by, bz), shared_mem, stream, extra=ctypes.addressof(extra))
    else:
        # A worker or autograd thread: the function belongs to the device's primary context, made current here.
        with device_context(index):
            drv.launch(function, (gx, gy, gz), (bx, by, bz), shared_mem, stream, extra=ctypes.addressof(extra))
