"""A kernel family that cannot be compiled or loaded, or that disagrees with the reference in its first-use
self-test, is disabled on that device with one warning naming it, and its ops return the reference's result.

Run on CPU: ops/cuda.py's CUDA implementations are called directly with CPU tensors, the kernels are emulated in
terms of the reference (tests/fake_cuda.py), and a "broken" kernel is that emulation with its output corrupted.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from fake_cuda import H100_SMS, emulate_launch, gemm_launches

import quanto_backend.kernels as kernels
import quanto_backend.ops.cuda as cuda_ops
from quanto_backend.ops import reference

CPU = torch.device("cpu")


@pytest.fixture
def launches(monkeypatch) -> list[str]:
    """Kernels 'run' on CPU tensors through the emulator; returns the entry points launched, in order."""
    launched: list[str] = []

    def launch(source, entry_point, grid, args, device):
        launched.append(entry_point)
        emulate_launch(source, entry_point, grid, args, device)

    monkeypatch.setattr(cuda_ops, "_launch", launch)
    monkeypatch.setattr(cuda_ops, "_kernels_ready", lambda *tensors: True)
    monkeypatch.setattr(cuda_ops, "_fp8_tensor_cores", lambda device: True)
    monkeypatch.setattr(cuda_ops, "_multiprocessors", lambda device: H100_SMS)
    monkeypatch.setattr(cuda_ops, "_health", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(kernels, "load_modules", lambda device: dict.fromkeys(kernels.ENTRY_POINTS))
    return launched


def _break(monkeypatch, prefix: str) -> None:
    """Kernels whose entry point starts with ``prefix`` return wrong numbers (off by 1.5x)."""
    launch = cuda_ops._launch

    def broken(source, entry_point, grid, args, device):
        launch(source, entry_point, grid, args, device)
        if entry_point.startswith(prefix):
            out = args[6]
            out.copy_(out.float() * 1.5)

    monkeypatch.setattr(cuda_ops, "_launch", broken)


def _w8_case(m: int):
    x = torch.randn(m, 256).to(torch.bfloat16)
    q, scale = reference.quantize_per_token(torch.randn(64, 256), torch.int8)
    return x, q, scale.to(torch.bfloat16)


def _family_warnings(record, family: str) -> list[str]:
    return [str(w.message) for w in record if f"the {family} CUDA kernels are disabled" in str(w.message)]


def test_all_families_pass_their_self_test_and_run(launches):
    x, q, scale = _w8_case(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cuda_ops._linear_w8(x, q, scale, None)
    assert cuda_ops._health == {(None, f): True for f in cuda_ops.FAMILIES}
    # Every entry point of every family ran in the self-tests, fp8 x fp8 included.
    assert set(launches) >= {e for entries in kernels.ENTRY_POINTS.values() for e in entries}
    assert launches[-1] == "qb_gemv<2, 3>"
    assert torch.equal(out, reference.linear_w8(x, q, scale, None))


def test_wrong_gemv_is_disabled_with_one_warning_and_the_reference_runs(launches, monkeypatch):
    _break(monkeypatch, "qb_gemv")
    x, q, scale = _w8_case(1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = cuda_ops._linear_w8(x, q, scale, None)
        again = cuda_ops._linear_w8(x, q, scale, None)
        launched_before = len(launches)
        big = cuda_ops._linear_w8(*_w8_case(40), None)  # the GEMM family passed its own self-test and still runs
    assert [str(w.message) for w in record] == _family_warnings(record, "gemv")
    (message,) = _family_warnings(record, "gemv")
    assert "self-test" in message and "linear_w8" in message and "relative error" in message
    assert torch.equal(out, reference.linear_w8(x, q, scale, None))
    assert torch.equal(again, out)
    assert launches[launched_before:] == gemm_launches("qb_gemm<2, 3>", 40, 256, 64)
    assert big.shape == (40, 64)
    assert cuda_ops._health[(None, "gemv")] is False and cuda_ops._health[(None, "gemm")] is True


def test_wrong_elementwise_kernel_disables_the_quantize_family(launches, monkeypatch):
    launch = cuda_ops._launch

    def wrong_pack(source, entry_point, grid, args, device):
        launch(source, entry_point, grid, args, device)
        if entry_point == "qb_pack":
            args[1][..., 0] ^= 1

    monkeypatch.setattr(cuda_ops, "_launch", wrong_pack)
    values = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match=r"the quantize CUDA kernels are disabled.*pack 2-bit") as record:
        out = cuda_ops._pack(values, 4)
    assert len(record) == 1
    assert torch.equal(out, reference.pack(values, 4))


def test_load_failure_takes_the_reference_with_one_warning(launches, monkeypatch):
    error = kernels.KernelUnavailableError("NVRTC failed to compile gemm.cu for sm_90:\nerror: something")
    monkeypatch.setattr(
        kernels, "load_modules", lambda device: {**dict.fromkeys(kernels.ENTRY_POINTS), "gemm.cu": error}
    )
    x_q, x_scale = reference.quantize_per_token(torch.randn(64, 256), torch.int8)
    w_q, w_scale = reference.quantize_per_token(torch.randn(32, 256), torch.int8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = cuda_ops._linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
        cuda_ops._linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
    (message,) = [str(w.message) for w in record]
    assert "the gemm CUDA kernels are disabled" in message and "could not be compiled or loaded" in message
    assert "gemm.cu for sm_90" in message
    assert torch.equal(out, reference.linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16))
    assert not any(e.startswith("qb_gemm") for e in launches)


def test_self_test_that_raises_disables_the_family(launches, monkeypatch):
    launch = cuda_ops._launch

    def failing(source, entry_point, grid, args, device):
        if source == "gemv.cu":
            raise kernels.driver.DriverError("cuLaunchKernel failed: CUDA_ERROR_INVALID_VALUE (1)")
        launch(source, entry_point, grid, args, device)

    monkeypatch.setattr(cuda_ops, "_launch", failing)
    x, q, scale = _w8_case(2)
    with pytest.warns(RuntimeWarning, match=r"the gemv CUDA kernels are disabled.*DriverError.*INVALID_VALUE"):
        out = cuda_ops._linear_w8(x, q, scale, None)
    assert torch.equal(out, reference.linear_w8(x, q, scale, None))


def test_capture_before_warmup_raises(launches, monkeypatch):
    """Even with every module already loaded, the self-tests cannot run inside a capture: a clear error, and
    nothing launched into the graph."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(kernels.KernelsNotLoadedError, match=r"CUDA graph is being captured.*ops\.warmup"):
        cuda_ops._linear_w8(*_w8_case(1), None)
    assert cuda_ops._health == {} and launches == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_ops._warmup(CPU)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launches.clear()
    cuda_ops._linear_w8(*_w8_case(1), None)  # prepared before the capture: the kernel is captured
    assert launches == ["qb_gemv<2, 3>"]


def test_warmup_rejects_a_cpu_device():
    with pytest.raises(ValueError, match="cpu is not a CUDA device"):
        cuda_ops.warmup("cpu")


def test_families_are_the_kernel_sources():
    assert cuda_ops.FAMILIES == tuple(s.removesuffix(".cu") for s in kernels.ENTRY_POINTS)
