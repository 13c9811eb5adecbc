"""The CUDA driver-API calls the kernels need (contexts, modules, launches), made through ctypes on libcuda.

They are kept behind one small object, :data:`driver`, for two reasons: every call the loader and the launcher make
is in one place, with its error turned into a message naming the call; and tests replace the object with a fake
that records which context was current for each call (no GPU is needed to test the context handling).

The primary context of a device is the one the CUDA runtime, and so torch, uses. The driver API acts on the
*current* context of the calling thread, which a new thread (a data-loader worker, autograd's device threads) does
not have until the runtime sets one, and ``torch.cuda.device(i)`` only sets one when ``i`` differs from the
thread's current device. :func:`quanto_backend.kernels.loader.device_context` therefore makes the primary context
current explicitly around each call.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["CUDADriver", "DriverError", "driver"]

# cuLaunchKernel's `extra` keys (cuda.h).
CU_LAUNCH_PARAM_END = 0x00
CU_LAUNCH_PARAM_BUFFER_POINTER = 0x01
CU_LAUNCH_PARAM_BUFFER_SIZE = 0x02


class DriverError(RuntimeError):
    """A CUDA driver-API call failed; the message names the call and the driver's error."""


_P = ctypes.c_void_p
_U = ctypes.c_uint
# name: (argument types), all returning CUresult (an int).
_SIGNATURES: dict[str, tuple] = {
    "cuInit": (ctypes.c_uint,),
    "cuDeviceGet": (ctypes.POINTER(ctypes.c_int), ctypes.c_int),
    "cuDevicePrimaryCtxRetain": (ctypes.POINTER(_P), ctypes.c_int),
    "cuCtxGetCurrent": (ctypes.POINTER(_P),),
    "cuCtxPushCurrent_v2": (_P,),
    "cuCtxPopCurrent_v2": (ctypes.POINTER(_P),),
    "cuModuleLoadData": (ctypes.POINTER(_P), ctypes.c_char_p),
    "cuModuleGetFunction": (ctypes.POINTER(_P), _P, ctypes.c_char_p),
    "cuLaunchKernel": (_P, _U, _U, _U, _U, _U, _U, _U, _P, _P, _P),
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
}


class CUDADriver:
    """The driver calls, on ``libcuda.so.1`` (loaded on first use)."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._lock = threading.Lock()
        self._primary: dict[int, int] = {}

    def _load(self) -> ctypes.CDLL:
        if self._lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise DriverError(f"the CUDA driver (libcuda.so.1) could not be loaded ({e})") from e
            for name, argtypes in _SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes = argtypes
                function.restype = ctypes.c_int
            self._lib = lib
        return self._lib

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self._load().cuGetErrorName(status, ctypes.byref(name))
            label = name.value.decode() if name.value else "unknown error"
            raise DriverError(f"{call} failed: {label} ({status})")

    def primary_context(self, index: int) -> int:
        """The primary context of device ``index`` (retained once per process, as torch's runtime uses it)."""
        context = self._primary.get(index)
        if context is None:
            with self._lock:
                lib = self._load()
                self._check(lib.cuInit(0), "cuInit")
                device = ctypes.c_int()
                self._check(lib.cuDeviceGet(ctypes.byref(device), index), f"cuDeviceGet({index})")
                handle = _P()
                self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(handle), device), "cuDevicePrimaryCtxRetain")
                context = self._primary[index] = handle.value or 0
        return context

    def current_context(self) -> int:
        """The calling thread's current context (0 when it has none)."""
        handle = _P()
        self._check(self._load().cuCtxGetCurrent(ctypes.byref(handle)), "cuCtxGetCurrent")
        return handle.value or 0

    def push_context(self, context: int) -> None:
        self._check(self._load().cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")

    def pop_context(self) -> None:
        self._check(self._load().cuCtxPopCurrent_v2(ctypes.byref(_P())), "cuCtxPopCurrent")

    def module_load_data(self, image: bytes) -> int:
        """Loads a cubin or NUL-terminated PTX image into the current context; returns the ``CUmodule``."""
        handle = _P()
        self._check(self._load().cuModuleLoadData(ctypes.byref(handle), image), "cuModuleLoadData")
        return handle.value or 0

    def module_get_function(self, module: int, name: str) -> int:
        handle = _P()
        self._check(
            self._load().cuModuleGetFunction(ctypes.byref(handle), module, name.encode()),
            f"cuModuleGetFunction({name})",
        )
        return handle.value or 0

    def launch(
        self,
        function: int,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        stream: int,
        params: int | None = None,
        extra: int | None = None,
    ) -> None:
        """``cuLaunchKernel``: ``params`` is the address of an array of argument pointers, or ``extra`` that of a
        ``CU_LAUNCH_PARAM_BUFFER_POINTER, ptr, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, CU_LAUNCH_PARAM_END`` array
        describing one buffer holding all the arguments."""
        status = self._load().cuLaunchKernel(function, *grid, *block, shared_mem, stream, params, extra)
        if status != 0:
            self._check(status, "cuLaunchKernel")


driver = CUDADriver()
