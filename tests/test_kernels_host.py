"""The host side of the CUDA kernels (contexts, module loading, launches), against a fake runtime and driver
(tests/fake_cuda.py): no GPU is needed, and what the real driver would reject the fake rejects too."""

from __future__ import annotations

import threading

import pytest
import torch
from fake_cuda import FakeCUDA, install, primary

from quanto_backend import kernels
from quanto_backend.kernels import loader


@pytest.fixture
def fake(monkeypatch) -> FakeCUDA:
    return install(monkeypatch, FakeCUDA(devices=2))


def _launch_pack(index: int) -> None:
    values = torch.zeros(64, dtype=torch.uint8)
    packed = torch.zeros(32, dtype=torch.uint8)
    kernels.launch("quantize.cu", "qb_pack", (1,), (256,), (values, packed, kernels.Int64(32), 4),
                   torch.device("cuda", index))  # fmt: skip


def _in_thread(fn, *args) -> int:
    errors: list[BaseException] = []
    ident: list[int] = []

    def run():
        ident.append(threading.get_ident())
        try:
            fn(*args)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return ident[0]


@pytest.mark.parametrize("index", [0, 1])
def test_worker_thread_loads_and_launches_in_the_primary_context(fake, index):
    """A thread that never touched CUDA (a data-loader worker, autograd's device thread) has no current context,
    and entering torch.cuda.device(0) there sets none: every driver call must still run in the device's
    primary context, with torch's current device set to it."""
    thread = _in_thread(_launch_pack, index)
    calls = [c for c in fake.calls if c.thread == thread]
    assert {c.what.split()[0] for c in calls} == {"module_load_data", "module_get_function", "launch"}
    assert calls[-1].what == "launch"
    for call in calls:
        assert call.context == primary(index), call
        assert call.device == index, call
    assert fake.launches[-1][4] == 0x5000 + index  # on that device's current torch stream


def test_thread_context_stack_is_restored(fake):
    def launch_and_report():
        _launch_pack(1)
        # Back on the thread's own device (whose primary context the runtime made current on the way back), and
        # nothing of ours left on its context stack.
        assert fake.current_device() == 0 and fake.current_context() == primary(0)
        assert len(fake._stack()) == 1

    _in_thread(launch_and_report)
    # The main thread, already on device 0 in its primary context, launches there directly.
    _launch_pack(0)
    assert fake.calls[-1].context == primary(0) and fake.current_context() == primary(0)
    assert fake.current_device() == 0


def test_module_is_loaded_once_per_device(fake):
    _launch_pack(0)
    _launch_pack(0)
    _in_thread(_launch_pack, 0)
    _launch_pack(1)
    loads = [c for c in fake.calls if c.what == "module_load_data"]
    assert sorted(c.context for c in loads) == [primary(0)] * 3 + [primary(1)] * 3  # 3 sources
    assert sorted(fake.images) == sorted(f"{n}-sm90".encode() for n in loader.ENTRY_POINTS for _ in range(2))


def test_driver_load_failure_is_a_kernel_unavailable_error(fake, monkeypatch):
    def refuse(image):
        raise kernels.driver.DriverError("cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE (200)")

    monkeypatch.setattr(fake, "module_load_data", refuse)
    with pytest.raises(kernels.KernelUnavailableError, match=r"quantize\.cu.*cuda:0.*INVALID_IMAGE"):
        loader.get_function("quantize.cu", "qb_pack", torch.device("cuda", 0))


def test_first_use_loads_every_module_so_capture_needs_no_load(fake):
    """Prefill ran only one kernel; the decode graph's capture then needs another family's kernel, which must
    already be loaded: the first use of any kernel loads every module and looks every entry point up."""
    _launch_pack(0)
    assert {c.what for c in fake.calls if c.what.startswith("module_get_function")} == {
        f"module_get_function {e}" for entries in loader.ENTRY_POINTS.values() for e in entries
    }
    before = len(fake.calls)
    fake.capturing = True
    source, entry = loader.matmul_entry_point("gemv", 2, 3)
    kernels.launch(source, entry, (1,), (256,), (None,) * 7 + (1,) * 12, torch.device("cuda", 0))
    assert [c.what for c in fake.calls[before:]] == ["launch"]


def test_capture_before_any_load_is_a_clear_error(fake):
    fake.capturing = True
    with pytest.raises(kernels.KernelsNotLoadedError, match=r"not loaded on cuda:1.*capture.*warmup"):
        _launch_pack(1)
    with pytest.raises(kernels.KernelsNotLoadedError, match="cuda:0"):
        kernels.load_modules(torch.device("cuda", 0))
    assert fake.calls == []  # nothing was attempted inside the capture
    fake.capturing = False
    assert kernels.load_modules(torch.device("cuda", 1)) == dict.fromkeys(loader.ENTRY_POINTS)
    fake.capturing = True
    _launch_pack(1)
    assert fake.calls[-1].what == "launch"


def test_failed_module_is_not_retried_and_others_still_load(fake, monkeypatch):
    attempts = []
    real = loader.load_compiled

    def fail_gemm(name, arch):
        attempts.append(name)
        if name == "gemm.cu":
            raise kernels.KernelUnavailableError("NVRTC failed to compile gemm.cu for sm_90")
        return real(name, arch)

    monkeypatch.setattr(loader, "load_compiled", fail_gemm)
    errors = kernels.load_modules(torch.device("cuda", 0))
    assert errors["quantize.cu"] is None and errors["gemv.cu"] is None
    assert "gemm.cu for sm_90" in str(errors["gemm.cu"])
    _launch_pack(0)
    with pytest.raises(kernels.KernelUnavailableError, match="gemm.cu"):
        loader.get_function(*loader.matmul_entry_point("gemm", 2, 3), torch.device("cuda", 0))
    assert attempts.count("gemm.cu") == 1
