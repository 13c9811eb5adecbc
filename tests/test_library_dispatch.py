"""Many rows of activations go to a library GEMM: weight-only formats dequantize (our kernel) and call F.linear
(cuBLAS on a GPU), int8 x int8 calls torch._int_mm, float8 x float8 calls torch._scaled_mm, each only inside its
checked contract; outside it our kernels or the reference run.

On CPU: the CUDA implementations of ops/cuda.py are called directly with CPU tensors, the device checks and our
kernels are faked (tests/fake_cuda.py emulates them), and torch._int_mm / torch._scaled_mm run for real on CPU, so
the int8 and float8 paths' math is checked against the reference, not only the decisions.
"""

from __future__ import annotations

import pytest
import torch
from fake_cuda import gemm_launches
from test_kernel_fallback import launches  # noqa: F401  (fixture: kernels emulated on CPU)

import quanto_backend.ops.cuda as cuda_ops
from quanto_backend.ops import reference

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture
def gpu(launches, monkeypatch):  # noqa: F811
    """CPU tensors count as one CUDA device of capability sm_90; records the library GEMM calls."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    monkeypatch.setattr(cuda_ops, "_one_cuda_device", lambda *tensors: torch.device("cpu"))
    monkeypatch.setattr(cuda_ops, "_capability", lambda device: (9, 0))
    int_mm, scaled_mm = torch._int_mm, torch._scaled_mm

    def spy_int_mm(a, b):
        calls.append(("_int_mm", a, b))
        return int_mm(a, b)

    def spy_scaled_mm(a, b, **kwargs):
        calls.append(("_scaled_mm", a, b))
        return scaled_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", spy_int_mm)
    monkeypatch.setattr(torch, "_scaled_mm", spy_scaled_mm)
    return calls, launches


def _a8w8(m, k, n, x_dtype=torch.int8, w_dtype=torch.int8, per_token=True, shape=None):
    x = torch.randn(m, k) * 2
    if per_token:
        x_q, x_scale = reference.quantize_per_token(x, x_dtype)
    else:
        x_scale = (x.abs().amax() / (127.0 if x_dtype == torch.int8 else torch.finfo(x_dtype).max)).float()
        x_q = reference.quantize_symmetric(x, x_scale, x_dtype)
    w_q, w_scale = reference.quantize_per_token(torch.randn(n, k), w_dtype)
    if shape is not None:
        x_q = x_q.reshape(*shape, k)
        x_scale = x_scale.reshape(*shape, 1) if per_token else x_scale
    return x_q, x_scale, w_q, w_scale


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_many_rows_use_int_mm_bit_for_bit(gpu, per_token, out_dtype, with_bias):
    calls, launched = gpu
    m = cuda_ops.INT8_LIBRARY_ROWS + 44
    x_q, x_scale, w_q, w_scale = _a8w8(m, 256, 64, per_token=per_token, shape=(4, m // 4))
    bias = torch.randn(64).to(out_dtype) if with_bias else None
    out = cuda_ops._linear_a8w8(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    ((name, a, b),) = calls
    assert name == "_int_mm" and a.shape == (m, 256) and a.is_contiguous()
    assert b.shape == (256, 64) and b.stride() == (1, 256)  # the weight's transpose: column-major, no copy
    assert not launched  # no kernel, not even a self-test
    expected = reference.linear_a8w8(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    assert out.shape == (4, m // 4, 64) and out.dtype == out_dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("m", "k", "n", "kernel"),
    [
        (cuda_ops.INT8_LIBRARY_ROWS - 1, 256, 64, "qb_gemm<3, 3>"),  # below the threshold: our GEMM
        (cuda_ops.INT8_LIBRARY_ROWS, 260, 64, "qb_gemm<3, 3>"),  # K not a multiple of 8
        (cuda_ops.INT8_LIBRARY_ROWS, 256, 60, "qb_gemm<3, 3>"),  # N not a multiple of 8
        (4, 256, 64, "qb_gemv<3, 3>"),
    ],
)
def test_int8_outside_the_int_mm_contract_uses_our_kernels(gpu, m, k, n, kernel):
    calls, launched = gpu
    x_q, x_scale, w_q, w_scale = _a8w8(m, k, n)
    out = cuda_ops._linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16)
    expected = [kernel] if kernel.startswith("qb_gemv") else gemm_launches(kernel, m, k, n)
    assert calls == [] and launched[-len(expected) :] == expected
    assert torch.equal(out, reference.linear_a8w8(x_q, x_scale, w_q, w_scale, None, torch.bfloat16))


def test_int_mm_contract():
    c = cuda_ops.INT_MM
    ok = dict(m=17, k=64, n=64, a_dtype=torch.int8, b_dtype=torch.int8, capability=(8, 0))
    assert c.accepts(**ok)
    assert not c.accepts(**{**ok, "m": 16})  # torch._int_mm: self.size(0) needs to be greater than 16
    assert not c.accepts(**{**ok, "k": 68}) and not c.accepts(**{**ok, "n": 12})
    assert c.accepts(**{**ok, "k": 131072}) and not c.accepts(**{**ok, "k": 131080})  # int32 stays exact
    assert not c.accepts(**{**ok, "a_dtype": E4M3})


def test_scaled_mm_contract():
    c = cuda_ops.SCALED_MM
    ok = dict(m=1, k=64, n=64, a_dtype=E4M3, b_dtype=E4M3, capability=(9, 0))
    assert c.accepts(**ok) and c.accepts(**{**ok, "a_dtype": E5M2}) and c.accepts(**{**ok, "b_dtype": E5M2})
    assert not c.accepts(**{**ok, "a_dtype": E5M2, "b_dtype": E5M2})
    assert not c.accepts(**{**ok, "k": 72}) and not c.accepts(**{**ok, "n": 72})
    assert not c.accepts(**{**ok, "capability": (8, 6)}) and c.accepts(**{**ok, "capability": (8, 9)})


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(E4M3, E4M3), (E4M3, E5M2), (E5M2, E4M3)])
@pytest.mark.parametrize("per_token", [True, False])
def test_fp8_many_rows_use_scaled_mm(gpu, x_dtype, w_dtype, per_token):
    calls, launched = gpu
    m = cuda_ops.FP8_LIBRARY_ROWS + 3
    x_q, x_scale, w_q, w_scale = _a8w8(m, 128, 48, x_dtype, w_dtype, per_token)
    bias = torch.randn(48)
    out = cuda_ops._linear_a8w8(x_q, x_scale, w_q, w_scale, bias, torch.bfloat16)
    ((name, a, b),) = calls
    assert name == "_scaled_mm" and a.stride() == (128, 1) and b.shape == (128, 48) and b.stride() == (1, 128)
    assert not launched
    expected = reference.linear_a8w8(x_q, x_scale, w_q, w_scale, bias, torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)


def test_fp8_outside_the_scaled_mm_contract(gpu, monkeypatch):
    calls, launched = gpu
    m = cuda_ops.FP8_LIBRARY_ROWS
    args = _a8w8(m, 128, 48, E5M2, E5M2)  # no e5m2 x e5m2 in cuBLASLt: our GEMM
    cuda_ops._linear_a8w8(*args, None, torch.bfloat16)
    assert calls == [] and launched[-1:] == gemm_launches("qb_gemm<6, 6>", m, 128, 48)  # 2 k-tiles: not split
    monkeypatch.setattr(cuda_ops, "_capability", lambda device: (8, 0))
    monkeypatch.setattr(cuda_ops, "_fp8_tensor_cores", lambda device: False)
    launched.clear()
    args = _a8w8(m, 128, 48, E4M3, E4M3)  # sm_80: no float8 tensor cores at all, the reference
    out = cuda_ops._linear_a8w8(*args, None, torch.bfloat16)
    assert calls == [] and launched == []
    assert torch.equal(out, reference.linear_a8w8(*args, None, torch.bfloat16))


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_weight_only_many_rows_dequantize_then_linear(gpu, scale_dtype):
    calls, launched = gpu
    m = cuda_ops.WEIGHT_ONLY_LIBRARY_ROWS
    x = torch.randn(m, 256).to(torch.bfloat16)
    q, scale = reference.quantize_per_token(torch.randn(64, 256), torch.int8)
    scale = scale.to(scale_dtype)
    cuda_ops._warmup(x.device)  # the self-tests, before the first use, launch every kernel
    launched.clear()
    out = cuda_ops._linear_w8(x, q, scale, None)
    assert launched == ["qb_dequantize_symmetric"]
    assert torch.equal(out, reference.linear_w8(x, q, scale, None))
    launched.clear()
    cuda_ops._linear_w8(x[:-1], q, scale, None)  # one row fewer: our GEMM
    assert launched == gemm_launches("qb_gemm<2, 3>", m - 1, 256, 64) == ["qb_gemm<2, 3>", "qb_gemm_reduce<2, 3>"]


def test_affine_many_rows_dequantize_then_linear(gpu):
    calls, launched = gpu
    m, k = cuda_ops.WEIGHT_ONLY_LIBRARY_ROWS + 1, 200  # in_features padded to 256 (group 128)
    w = torch.randn(64, 256)
    w[:, k:] = 0
    lo, hi = w.unflatten(-1, (2, 128)).amin(-1), w.unflatten(-1, (2, 128)).amax(-1)
    scale = ((hi - lo) / 15).to(torch.float16)
    shift = (-lo / scale.float()).to(torch.float16)
    packed = reference.quantize_affine(w, scale, shift, 4)
    x = torch.randn(m, k).to(torch.float16)
    bias = torch.randn(64).to(torch.float16)
    cuda_ops._warmup(x.device)
    launched.clear()
    out = cuda_ops._linear_affine(x, packed, scale, shift, 4, bias)
    assert launched == ["qb_dequantize_affine"]
    assert torch.equal(out, reference.linear_affine(x, packed, scale, shift, 4, bias))


def test_thresholds_are_named_constants():
    assert cuda_ops.GEMV_MAX_M < cuda_ops.INT8_LIBRARY_ROWS <= cuda_ops.WEIGHT_ONLY_LIBRARY_ROWS
    assert cuda_ops.INT_MM.min_rows > cuda_ops.GEMV_MAX_M


def test_split_k_fills_the_sms_and_gives_every_split_work():
    # M <= 128 and N = 4096 on an H100: 32 output tiles; K = 4096 of bfloat16 activations: 128 k-tiles.
    assert cuda_ops.split_k(32, 128, 132) == (5, 26)  # 160 blocks for 132 SMs
    assert cuda_ops.split_k(132, 128, 132) == (1, 128)  # the output tiles alone fill the GPU
    assert cuda_ops.split_k(1, 1, 132) == (1, 1) and cuda_ops.split_k(1, 2, 132) == (1, 2)  # too short to split
    assert cuda_ops.split_k(1, 1000, 132) == (cuda_ops.SPLIT_K_MAX, 125)
    for tiles in (1, 2, 7, 31, 64, 131):
        for k_tiles in (1, 2, 3, 5, 17, 64, 1000):
            splits, per_split = cuda_ops.split_k(tiles, k_tiles, 132)
            assert 1 <= splits <= cuda_ops.SPLIT_K_MAX and (splits - 1) * per_split < k_tiles <= splits * per_split
            assert splits == 1 or per_split >= cuda_ops.SPLIT_K_MIN_TILES
