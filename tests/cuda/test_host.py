"""The host side of the kernels on a real GPU: the first-use self-tests pass, worker threads launch, a graph
captures a kernel family that was first needed inside it, and the library GEMMs agree with the reference."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import quanto_backend.ops.cuda as cuda_ops
from quanto_backend import ops
from quanto_backend.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_warmup_self_tests_pass_on_this_gpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.warmup("cuda") == dict.fromkeys(cuda_ops.FAMILIES, True)


def test_launch_from_a_new_thread():
    w = torch.randn(256, 512, device="cuda")
    q, scale = ops.quantize_per_token(w, torch.int8)
    x = torch.randn(3, 512, device="cuda").to(torch.bfloat16)
    results, errors = [], []

    def work():
        try:
            results.append(ops.linear_w8(x, q, scale.to(torch.bfloat16), None))
            torch.cuda.synchronize()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    expected = ops.linear_w8(x, q, scale.to(torch.bfloat16), None)
    torch.testing.assert_close(results[0], expected, rtol=0, atol=0)


def test_graph_captures_a_family_first_needed_in_the_capture():
    """Prefill runs only the GEMM; the decode graph then captures the GEMV for the first time."""
    w = torch.randn(256, 512, device="cuda")
    q, scale = ops.quantize_per_token(w, torch.int8)
    scale = scale.to(torch.bfloat16)
    ops.linear_w8(torch.randn(64, 512, device="cuda").to(torch.bfloat16), q, scale, None)
    x = torch.randn(1, 512, device="cuda").to(torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.linear_w8(x, q, scale, None)
    x.copy_(torch.randn(1, 512, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.linear_w8(x, q, scale, None), rtol=0, atol=0)


@pytest.mark.parametrize("m", [cuda_ops.INT8_LIBRARY_ROWS, 2048])
def test_int_mm_path_is_exact(m):
    x_q, x_scale = reference.quantize_per_token(torch.randn(m, 4096, device="cuda"), torch.int8)
    w_q, w_scale = reference.quantize_per_token(torch.randn(1024, 4096, device="cuda"), torch.int8)
    out = ops.linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
    assert torch.equal(out, reference.linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="float8 needs sm_89"
)
def test_scaled_mm_path():
    m = cuda_ops.FP8_LIBRARY_ROWS
    x_q, x_scale = reference.quantize_per_token(torch.randn(m, 4096, device="cuda"), torch.float8_e4m3fn)
    w_q, w_scale = reference.quantize_per_token(torch.randn(1024, 4096, device="cuda"), torch.float8_e4m3fn)
    out = ops.linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
    truth = (x_q.float() @ w_q.float().t()) * x_scale * w_scale.t()
    err = (out.float() - truth).abs().max() / truth.abs().max()
    assert err < 1.6e-2
