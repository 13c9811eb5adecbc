"""Every CUDA kernel against the plain-torch reference (quanto_backend/ops/reference.py) on the GPU.

The elementwise kernels and the int8 x int8 matmul reproduce the reference bit for bit; the other matmuls
accumulate in a different order (and the weight-only ones skip the reference's rounding of the dequantized weight)
so they are compared to a float32 truth with a tolerance of a few output ulps, which any layout or indexing bug
exceeds by orders of magnitude.
"""

from __future__ import annotations

import types

import pytest
import torch

import quanto_backend.ops.cuda as cuda_ops
from quanto_backend import ops
from quanto_backend.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

DEVICE = "cuda"
M_VALUES = (1, 2, 7, 16, 64, 333, 2048)
# (in_features, out_features): tile-aligned, and neither a multiple of any tile nor 16-byte aligned rows.
SHAPES = ((256, 128), (4100, 1000))
HALF = (torch.float16, torch.bfloat16)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.fixture(autouse=True)
def kernels_only(monkeypatch):
    """Makes a fallback to the reference inside ops/cuda.py an error, so these tests prove the kernels ran."""
    from quanto_backend.kernels import kernels_unavailable_reason

    reason = kernels_unavailable_reason()
    assert reason is None, f"the CUDA kernels cannot run: {reason}"

    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"ops/cuda.py fell back to reference.{name}")

        return fail

    names = [n for n in dir(reference) if not n.startswith("_") and callable(getattr(reference, n))]
    monkeypatch.setattr(cuda_ops, "reference", types.SimpleNamespace(**{n: refuse(n) for n in names}))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype in FP8 or actual.dtype in (torch.int8, torch.uint8):
        assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_matmul_close(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> None:
    """Max error relative to the largest output: a few ulps of the output dtype."""
    assert actual.shape == truth.shape and actual.dtype == dtype
    assert torch.isfinite(actual).all()
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 2.5e-3, torch.float32: 1e-4}[dtype]
    err = (actual.float() - truth).abs().max() / truth.abs().max().clamp_min(1e-6)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


# --- elementwise kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [(3, 64), (1000, 4224), (2, 5, 8)])
def test_pack_unpack(bits, shape):
    values = torch.randint(0, 2**bits, shape, dtype=torch.uint8, device=DEVICE, generator=gen())
    packed = ops.pack(values, bits)
    assert_bits_equal(packed, reference.pack(values, bits))
    assert_bits_equal(ops.unpack(packed, bits), values)
    wide = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE, generator=gen(1))  # unmasked codes
    assert_bits_equal(ops.pack(wide, bits), reference.pack(wide, bits))
    strided = values.transpose(0, -1).contiguous().transpose(0, -1)  # same shape, column-major
    assert_bits_equal(ops.pack(strided, bits), reference.pack(strided, bits))


def _scales(x: torch.Tensor, per_row: bool, dtype: torch.dtype, qmax: float) -> torch.Tensor:
    if per_row:
        s = x.float().abs().amax(dim=-1, keepdim=True) / qmax
    else:
        s = x.float().abs().amax() / qmax
    return s.clamp_min(1e-8).to(dtype)


@pytest.mark.parametrize("qdtype", [torch.int8, *FP8])
@pytest.mark.parametrize("x_dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 4100), (2, 3, 333), (1000, 256)])
def test_quantize_dequantize_symmetric(qdtype, x_dtype, per_row, scale_dtype, shape):
    x = (torch.randn(shape, device=DEVICE, generator=gen()) * 3).to(x_dtype)
    qmax = 127.0 if qdtype == torch.int8 else torch.finfo(qdtype).max
    scale = _scales(x, per_row, scale_dtype, qmax)
    q = ops.quantize_symmetric(x, scale, qdtype)
    assert_bits_equal(q, reference.quantize_symmetric(x, scale, qdtype))
    # Out-of-range values saturate like the reference's clamp.
    assert_bits_equal(ops.quantize_symmetric(x * 4, scale, qdtype), reference.quantize_symmetric(x * 4, scale, qdtype))
    assert_bits_equal(ops.dequantize_symmetric(q, scale), reference.dequantize_symmetric(q, scale))
    xt = x.transpose(0, -1)  # non-contiguous input, per-tensor scale
    s0 = scale.flatten()[0]
    assert_bits_equal(ops.quantize_symmetric(xt, s0, qdtype), reference.quantize_symmetric(xt, s0, qdtype))


@pytest.mark.parametrize("qdtype", [torch.int8, *FP8])
@pytest.mark.parametrize("x_dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", [(1, 4096), (333, 4100), (2, 7, 64), (14336, 512)])
def test_quantize_per_token(qdtype, x_dtype, shape):
    x = (torch.randn(shape, device=DEVICE, generator=gen()) * 5).to(x_dtype)
    x[0] = 0  # an all-zero row gets scale 1
    q, scale = ops.quantize_per_token(x, qdtype)
    q_ref, scale_ref = reference.quantize_per_token(x, qdtype)
    assert_bits_equal(scale, scale_ref)
    assert_bits_equal(q, q_ref)
    q, scale = ops.quantize_per_token(x.transpose(0, -1), qdtype)
    q_ref, scale_ref = reference.quantize_per_token(x.transpose(0, -1), qdtype)
    assert_bits_equal(scale, scale_ref)
    assert_bits_equal(q, q_ref)


def _affine_params(w: torch.Tensor, group_size: int, bits: int, dtype: torch.dtype):
    groups = w.float().unflatten(-1, (-1, group_size))
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-6)
    shift = -lo / scale
    return scale.to(dtype), shift.to(dtype)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("w_dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("out_features", [1000, 64])
def test_quantize_dequantize_affine(bits, group_size, w_dtype, out_features):
    w = torch.randn(out_features, 4224, device=DEVICE, generator=gen()).to(w_dtype)
    scale, shift = _affine_params(w, group_size, bits, w_dtype)
    packed = ops.quantize_affine(w, scale, shift, bits)
    assert_bits_equal(packed, reference.quantize_affine(w, scale, shift, bits))
    assert_bits_equal(
        ops.dequantize_affine(packed, scale, shift, bits), reference.dequantize_affine(packed, scale, shift, bits)
    )


# --- matmuls ---------------------------------------------------------------------------------------------------


def _activations(m: int, k: int, dtype: torch.dtype, contiguous: bool, seed: int = 0) -> torch.Tensor:
    if contiguous:
        return torch.randn(m, k, device=DEVICE, generator=gen(seed)).to(dtype)
    # Every other column of a wider tensor: a non-contiguous view with the same values pattern.
    return torch.randn(m, 2 * k, device=DEVICE, generator=gen(seed)).to(dtype)[:, ::2]


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", [torch.int8, *FP8])
@pytest.mark.parametrize("x_dtype", HALF)
def test_linear_w8(m, shape, w_dtype, x_dtype):
    k, n = shape
    x = _activations(m, k, x_dtype, contiguous=m != 7)
    w = torch.randn(n, k, device=DEVICE, generator=gen(1))
    qmax = 127.0 if w_dtype == torch.int8 else torch.finfo(w_dtype).max
    scale = _scales(w, True, x_dtype, qmax)
    q = reference.quantize_symmetric(w, scale, w_dtype)
    bias = torch.randn(n, device=DEVICE, generator=gen(2)).to(x_dtype) if m % 2 else None
    out = ops.linear_w8(x, q, scale, bias)
    truth = x.float() @ (q.float() * scale.float()).t() + (0 if bias is None else bias.float())
    assert_matmul_close(out, truth, x_dtype)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("in_features", [256, 4100])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("x_dtype", HALF)
def test_linear_affine(m, in_features, bits, group_size, x_dtype):
    n = 1000
    padded = -(-in_features // group_size) * group_size
    w = torch.randn(n, padded, device=DEVICE, generator=gen(1))
    w[:, in_features:] = 0
    scale, shift = _affine_params(w, group_size, bits, x_dtype)
    packed = reference.quantize_affine(w, scale, shift, bits)
    x = _activations(m, in_features, x_dtype, contiguous=m != 2)
    bias = torch.randn(n, device=DEVICE, generator=gen(2)).to(x_dtype) if m % 2 else None
    out = ops.linear_affine(x, packed, scale, shift, bits, bias)
    w_ref = reference.dequantize_affine(packed, scale, shift, bits)[:, :in_features].to(x_dtype).float()
    truth = x.float() @ w_ref.t() + (0 if bias is None else bias.float())
    assert_matmul_close(out, truth, x_dtype)


def _a8w8_inputs(m, k, n, qdtype, wdtype, per_token, seed=0):
    x = torch.randn(m, k, device=DEVICE, generator=gen(seed)) * 2
    if per_token:
        x_q, x_scale = reference.quantize_per_token(x, qdtype)
    else:
        x_scale = (x.abs().amax() / (127.0 if qdtype == torch.int8 else torch.finfo(qdtype).max)).float()
        x_q = reference.quantize_symmetric(x, x_scale, qdtype)
    w_q, w_scale = reference.quantize_per_token(torch.randn(n, k, device=DEVICE, generator=gen(seed + 1)), wdtype)
    return x_q, x_scale, w_q, w_scale


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, *HALF])
def test_linear_a8w8_int8_is_exact(m, shape, per_token, out_dtype):
    k, n = shape
    x_q, x_scale, w_q, w_scale = _a8w8_inputs(m, k, n, torch.int8, torch.int8, per_token)
    w_scale = w_scale.to(out_dtype if out_dtype != torch.float32 else torch.float32)
    bias = torch.randn(n, device=DEVICE, generator=gen(3)).to(out_dtype) if m % 2 else None
    out = ops.linear_a8w8(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    assert_bits_equal(out, reference.linear_a8w8(x_q, x_scale, w_q, w_scale, bias, out_dtype))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="float8 mma needs sm_89"
)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_dtype", FP8)
@pytest.mark.parametrize("w_dtype", FP8)
@pytest.mark.parametrize("per_token", [False, True])
def test_linear_a8w8_float8(m, shape, x_dtype, w_dtype, per_token):
    k, n = shape
    x_q, x_scale, w_q, w_scale = _a8w8_inputs(m, k, n, x_dtype, w_dtype, per_token)
    bias = torch.randn(n, device=DEVICE, generator=gen(3)) if m % 2 else None
    out = ops.linear_a8w8(x_q, x_scale, w_q, w_scale, bias, torch.bfloat16)
    truth = (x_q.float() @ w_q.float().t()) * x_scale * w_scale.t() + (0 if bias is None else bias)
    assert_matmul_close(out, truth, torch.bfloat16)


def test_linear_3d_input_and_empty_batch():
    x = torch.randn(2, 3, 4100, device=DEVICE, generator=gen()).to(torch.bfloat16)
    w = torch.randn(1000, 4100, device=DEVICE, generator=gen(1))
    q, scale = reference.quantize_per_token(w, torch.int8)
    scale = scale.to(torch.bfloat16)
    out = ops.linear_w8(x, q, scale, None)
    assert out.shape == (2, 3, 1000)
    assert_matmul_close(out, x.float() @ (q.float() * scale.float()).t(), torch.bfloat16)
    assert ops.linear_w8(x[:, :0], q, scale, None).shape == (2, 0, 1000)


# --- CUDA graphs and torch.compile -----------------------------------------------------------------------------


def _quantized_linear_inputs(m: int):
    k, n = 4096, 1000
    x = torch.randn(m, k, device=DEVICE, generator=gen()).to(torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, generator=gen(1))
    scale, shift = _affine_params(w, 128, 4, torch.bfloat16)
    packed = ops.quantize_affine(w.to(torch.bfloat16), scale, shift, 4)
    w8, w8_scale = ops.quantize_per_token(w, torch.int8)
    return x, packed, scale, shift, w8, w8_scale


def _quantized_block(x, packed, scale, shift, w8, w8_scale):
    h = ops.linear_affine(x, packed, scale, shift, 4, None)
    h_q, h_scale = ops.quantize_per_token(h.repeat(1, 5)[:, : w8.shape[1]], torch.int8)
    return ops.linear_a8w8(h_q, h_scale, w8, w8_scale, None, torch.bfloat16)


@pytest.mark.parametrize("m", [1, 64])
def test_cuda_graph_capture_and_replay(m):
    inputs = _quantized_linear_inputs(m)
    x = inputs[0]
    _quantized_block(*inputs)  # compile and load the modules before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _quantized_block(*inputs)
    x.copy_(torch.randn(x.shape, device=DEVICE, generator=gen(7)).to(x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert_bits_equal(static_out, _quantized_block(*inputs))


@pytest.mark.parametrize("m", [1, 64])
def test_torch_compile_fullgraph(m):
    inputs = _quantized_linear_inputs(m)
    compiled = torch.compile(_quantized_block, fullgraph=True)
    assert_bits_equal(compiled(*inputs), _quantized_block(*inputs))
