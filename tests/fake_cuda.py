"""A fake CUDA runtime and driver, for testing the host side of the kernels on a machine with no GPU.

It models what matters for contexts: each thread has a runtime device (0 until set) and a driver context stack
(empty until something makes a context current). ``torch.cuda.device(i)`` changes the device, and makes ``i``'s
primary context current, only when ``i`` differs from the thread's device (as c10's device guard does), so a new
thread entering device 0 gets no context. Every module load, function lookup and launch is recorded with the
context and device current at the time, and fails like the real driver ("invalid context") without a context or
with a handle of another device's context.
"""

from __future__ import annotations

import contextlib
import threading
import types
from dataclasses import dataclass

import torch

from quanto_backend.kernels import driver as driver_module
from quanto_backend.kernels import loader

H100_SMS = 132  # SMs of the GPU the fakes stand for (GEMMs of fewer output tiles split along K)


def primary(index: int) -> int:
    return 0xC000 + index


@dataclass
class Call:
    what: str
    context: int
    device: int
    thread: int


class FakeCUDA:
    """Stands in for the parts of ``torch.cuda`` the kernels use, and for :data:`driver.driver`."""

    def __init__(self, devices: int = 2, capability: tuple[int, int] = (9, 0)) -> None:
        self.devices = devices
        self.capability = capability
        self.capturing = False
        self.calls: list[Call] = []
        self._local = threading.local()
        self._owner: dict[int, int] = {}  # module/function handle -> context it was created in
        self._next = 0x100
        self._lock = threading.Lock()
        self.images: list[bytes] = []
        self.launches: list[tuple] = []

    # --- per-thread state ------------------------------------------------------------------------------------
    def _stack(self) -> list[int]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current_device(self) -> int:
        return getattr(self._local, "device", 0)

    def _set_device(self, index: int) -> None:  # cudaSetDevice: the device's primary context becomes current
        self._local.device = index
        stack = self._stack()
        if stack:
            stack[-1] = primary(index)
        else:
            stack.append(primary(index))

    def init_main_thread(self) -> None:
        """The main thread as torch leaves it after creating a CUDA tensor: device 0, its primary context."""
        self._set_device(0)

    # --- torch.cuda -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def device(self, index: int):
        previous = self.current_device()
        if index != previous:
            self._set_device(index)
        try:
            yield
        finally:
            if index != previous:
                self._set_device(previous)

    def current_stream(self, index: int | None = None):
        return types.SimpleNamespace(cuda_stream=0x5000 + (self.current_device() if index is None else index))

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return self.capability

    def get_device_properties(self, device=None):
        return types.SimpleNamespace(multi_processor_count=H100_SMS, major=self.capability[0], minor=self.capability[1])

    def is_current_stream_capturing(self) -> bool:
        return self.capturing

    # --- driver ---------------------------------------------------------------------------------------------
    def primary_context(self, index: int) -> int:
        if not 0 <= index < self.devices:
            raise driver_module.DriverError(f"cuDeviceGet({index}) failed: CUDA_ERROR_INVALID_DEVICE (101)")
        return primary(index)

    def current_context(self) -> int:
        stack = self._stack()
        return stack[-1] if stack else 0

    def push_context(self, context: int) -> None:
        self._stack().append(context)

    def pop_context(self) -> None:
        self._stack().pop()

    def _record(self, what: str, handle: int | None = None) -> int:
        context = self.current_context()
        self.calls.append(Call(what, context, self.current_device(), threading.get_ident()))
        if context == 0:
            raise driver_module.DriverError(f"{what} failed: CUDA_ERROR_INVALID_CONTEXT (201)")
        if handle is not None and self._owner[handle] != context:
            raise driver_module.DriverError(f"{what} failed: CUDA_ERROR_INVALID_HANDLE (400)")
        return context

    def _new_handle(self, context: int) -> int:
        with self._lock:
            self._next += 1
            self._owner[self._next] = context
            return self._next

    def module_load_data(self, image: bytes) -> int:
        context = self._record("module_load_data")
        self.images.append(image)
        return self._new_handle(context)

    def module_get_function(self, module: int, name: str) -> int:
        context = self._record(f"module_get_function {name}", module)
        return self._new_handle(context)

    def launch(self, function, grid, block, shared_mem, stream, params=None, extra=None) -> None:
        self._record("launch", function)
        self.launches.append((function, grid, block, shared_mem, stream, params, extra))


def install(monkeypatch, fake: FakeCUDA) -> FakeCUDA:
    """Puts ``fake`` in place of torch.cuda's device functions and of the driver; fake modules for every source
    (no compilation); empty loader caches."""
    names = ("device", "current_device", "current_stream", "get_device_capability", "get_device_properties",
             "is_current_stream_capturing")  # fmt: skip
    for name in names:
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(driver_module, "driver", fake)
    monkeypatch.setattr(loader, "_functions", {})
    monkeypatch.setattr(loader, "_loaded", {})
    monkeypatch.setattr(loader, "_failed", {})

    def fake_compiled(name: str, arch: int) -> loader.CompiledModule:
        return loader.CompiledModule(f"{name}-sm{arch}".encode(), True, {e: e for e in loader.ENTRY_POINTS[name]})

    monkeypatch.setattr(loader, "load_compiled", fake_compiled)
    fake.init_main_thread()
    return fake


# --- a CPU emulator of the kernels' launches, in terms of the reference -----------------------------------------


def _entry_formats(entry_point: str) -> tuple[int, int]:
    act, weight = entry_point[entry_point.index("<") + 1 : -1].split(",")
    return int(act), int(weight)


def gemm_launches(entry_point: str, m: int, k: int, n: int) -> list[str]:
    """The launches of ops/cuda.py's GEMM ``entry_point`` (``qb_gemm<A, W>``) for an ``m x k`` by ``n x k`` matmul on
    an H100: the GEMM, and its reduction where it splits along K."""
    from quanto_backend.ops import cuda

    act_bytes = 1 if _entry_formats(entry_point)[0] in (3, 5, 6) else 2
    splits, _ = cuda.split_k(-(-n // 128) * -(-m // 128), -(-k * act_bytes // 64), H100_SMS)
    return [entry_point] if splits == 1 else [entry_point, entry_point.replace("qb_gemm<", "qb_gemm_reduce<")]


def emulate_launch(source: str, entry_point: str, grid, args: tuple, device) -> None:
    """Does what the kernel ``entry_point`` would, given the argument tuple ops/cuda.py passes to ``_launch``: the
    reference's result is written into the kernel's output tensor. For host tests of ops/cuda.py on CPU."""
    from quanto_backend.ops import reference

    def scale_of(x, scale, layout):
        return scale.reshape(*x.shape[:-1], 1) if layout == 1 else scale.reshape(())

    if entry_point == "qb_pack":
        values, out, _, bits = args
        out.copy_(reference.pack(values, bits))
    elif entry_point == "qb_unpack":
        packed, out, _, bits = args
        out.copy_(reference.unpack(packed, bits))
    elif entry_point == "qb_quantize_symmetric":
        x, _, scale, _, layout, out, _, _, _ = args
        out.copy_(reference.quantize_symmetric(x, scale_of(x, scale, layout), out.dtype))
    elif entry_point == "qb_dequantize_symmetric":
        q, _, scale, _, layout, out, _, _ = args
        out.copy_(reference.dequantize_symmetric(q, scale_of(q, scale, layout)))
    elif entry_point == "qb_quantize_per_token":
        x, _, out, _, scale, _ = args
        q, s = reference.quantize_per_token(x, out.dtype)
        out.copy_(q)
        scale.copy_(s)
    elif entry_point == "qb_quantize_affine":
        w, _, scale, _, shift, _, out, *_, bits = args
        out.copy_(reference.quantize_affine(w, scale, shift, bits))
    elif entry_point == "qb_dequantize_affine":
        packed, scale, _, shift, _, out, *_, bits = args
        out.copy_(reference.dequantize_affine(packed, scale, shift, bits))
    elif entry_point.startswith("qb_gemm_reduce<"):
        partial, splits, _, _, x_scale, x_scale_stride, w_scale, _, bias, _, out, _ = args
        act, weight_format = _entry_formats(entry_point)
        acc = partial[:splits].sum(0).float()
        if act in (1, 2):  # weight-only: the row scale of 8-bit weights, once; 2/4-bit tiles were dequantized
            scaled = acc if weight_format in (loader.U4_CODE, loader.U2_CODE) else acc * w_scale.float().reshape(1, -1)
            out.copy_(scaled + (0 if bias is None else bias.float()))
        else:
            xs = x_scale.float().reshape(-1, 1) if x_scale_stride == 1 else x_scale.float().reshape(())
            result = (acc * xs * w_scale.float().reshape(1, -1)).to(out.dtype)
            out.copy_(result if bias is None else result + bias.to(out.dtype))
    elif entry_point.startswith("qb_gemm<") and args[19] is not None:  # one split of a split-K GEMM: raw sums
        x, w, w_scale, w_shift, *_ = args
        k, partial, per_split = args[9], args[19], args[20]
        act, weight_format = _entry_formats(entry_point)
        if weight_format in (loader.U4_CODE, loader.U2_CODE):
            bits = 4 if weight_format == loader.U4_CODE else 2
            w = reference.dequantize_affine(w, w_scale, w_shift, bits)[:, :k].to(x.dtype)
        step = per_split * 64 // x.element_size()  # k-tiles of 64 bytes of activations
        for z in range(partial.shape[0]):
            ks = slice(z * step, (z + 1) * step)
            partial[z] = (x.float()[:, ks] @ w.float()[:, ks].t()).to(partial.dtype)
    elif entry_point.startswith(("qb_gemv<", "qb_gemm<")):
        x, w, w_scale, w_shift, x_scale, bias, out, m, n, k, _, n_groups, group_size, x_scale_stride = args[:14]
        act, weight_format = _entry_formats(entry_point)
        if weight_format in (loader.U4_CODE, loader.U2_CODE):
            bits = 4 if weight_format == loader.U4_CODE else 2
            result = reference.linear_affine(x, w, w_scale, w_shift, bits, bias)
        elif act in (1, 2):  # 16-bit activations: weight-only
            result = reference.linear_w8(x, w, w_scale.reshape(-1, 1), bias)
        else:
            xs = x_scale.reshape(-1, 1) if x_scale_stride == 1 else x_scale.reshape(())
            result = reference.linear_a8w8(x, xs, w, w_scale.reshape(-1, 1), bias, out.dtype)
        out.copy_(result)
    else:
        raise AssertionError(f"no emulation of {entry_point}")
