"""The operator seam: CPU implementations against plain float math, and the fake (meta) implementations."""

import pytest
import torch
import torch.nn.functional as F

from quanto_backend import ops
from quanto_backend.ops import reference


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    packed = ops.pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(ops.unpack(packed, bits), codes)


def test_pack_layout_is_low_bits_first():
    # The documented layout: value 2j in bits 0-3, value 2j+1 in bits 4-7.
    assert ops.pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21
    assert ops.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 0b00111001


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_symmetric(dtype):
    x = torch.randn(8, 32)
    qmax = 127 if dtype == torch.int8 else torch.finfo(dtype).max
    scale = x.abs().amax(-1, keepdim=True) / qmax
    q = ops.quantize_symmetric(x, scale, dtype)
    assert q.dtype == dtype
    back = ops.dequantize_symmetric(q, scale)
    rel = ((back - x).norm() / x.norm()).item()
    assert rel < (0.01 if dtype == torch.int8 else 0.08)


def test_quantize_symmetric_int8_rounds_and_clamps():
    q = ops.quantize_symmetric(torch.tensor([0.5, 1.5, -1000.0, 1000.0]), torch.tensor(1.0), torch.int8)
    assert q.tolist() == [0, 2, -128, 127]  # round half to even, int8's whole range (as optimum-quanto)
    # -128 is reached only beyond -127.5: it is the closer code there, and nowhere else does the range change.
    x = torch.tensor([-127.4, -127.6, -128.4, -300.0])
    assert ops.quantize_symmetric(x, torch.tensor(1.0), torch.int8).tolist() == [-127, -128, -128, -128]


def test_quantize_per_token():
    x = torch.randn(3, 5, 16)
    x[1, 2] = 0
    q, scale = ops.quantize_per_token(x, torch.int8)
    assert scale.shape == (3, 5, 1) and scale.dtype == torch.float32
    assert scale[1, 2].item() == 1.0 and (q[1, 2] == 0).all()
    assert (q.abs().amax(-1)[scale.squeeze(-1) != 1] == 127).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_affine_roundtrip_is_within_half_a_step(bits):
    w = torch.randn(16, 64)
    groups = w.unflatten(1, (2, 32))
    wmin, wmax = groups.amin(-1), groups.amax(-1)
    scale = (wmax - wmin) / (2**bits - 1)
    shift = -wmin / scale
    packed = ops.quantize_affine(w, scale, shift, bits)
    back = ops.dequantize_affine(packed, scale, shift, bits)
    step = scale.repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.int8, torch.float8_e4m3fn])
def test_linear_w8_matches_dequantized(dtype, wdtype):
    x = torch.randn(3, 7, 64, dtype=dtype)
    w = torch.randn(48, 64)
    scale = (w.abs().amax(1, keepdim=True) / (127 if wdtype == torch.int8 else 448)).to(dtype)
    q = ops.quantize_symmetric(w, scale, wdtype)
    bias = torch.randn(48, dtype=dtype)
    expected = F.linear(x.float(), q.float() * scale.float(), bias.float())
    truth = reference.linear_w8(x, q, scale, bias)
    tol = 1e-4 if dtype == torch.float32 else 0.1  # bfloat16 keeps 8 bits: outputs of ~10 are off by ~0.04
    torch.testing.assert_close(truth.float(), expected, rtol=tol, atol=tol)
    # The op may run a CPU kernel that computes in bfloat16 (see ops/cpu.py): bfloat16-level agreement.
    out = ops.linear_w8(x, q, scale, bias)
    assert out.dtype == dtype and out.shape == (3, 7, 48)
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)


def test_linear_affine_ignores_padding():
    in_features, padded = 60, 64
    w = torch.randn(8, padded)
    scale = torch.rand(8, 2) * 0.1 + 0.05
    shift = torch.full((8, 2), 7.5)
    packed = ops.quantize_affine(w, scale, shift, 4)
    x = torch.randn(2, in_features)
    out = ops.linear_affine(x, packed, scale, shift, 4, None)
    dense = ops.dequantize_affine(packed, scale, shift, 4)[:, :in_features]
    torch.testing.assert_close(out, F.linear(x, dense))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("per_token", [False, True])
def test_linear_a8w8(dtype, per_token):
    x = torch.randn(5, 2000)
    w = torch.randn(16, 2000)
    qmax = 127 if dtype == torch.int8 else 448
    x_scale = x.abs().amax(-1, keepdim=True) / qmax if per_token else x.abs().amax() / qmax
    w_scale = w.abs().amax(1, keepdim=True) / qmax
    xq, wq = ops.quantize_symmetric(x, x_scale, dtype), ops.quantize_symmetric(w, w_scale, dtype)
    truth = reference.linear_a8w8(xq, x_scale, wq, w_scale, None, torch.float32)
    expected = (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double().t()
    torch.testing.assert_close(truth, expected.float(), rtol=1e-5, atol=1e-4)
    if dtype == torch.int8:  # the reference accumulates int8 x int8 exactly
        acc = (xq.to(torch.int64) @ wq.to(torch.int64).t()).double()
        torch.testing.assert_close(truth.double(), acc * x_scale.double() * w_scale.double().t(), rtol=1e-6, atol=0)
    # The op's CPU kernel rounds its accumulator to bfloat16 before scaling (see ops/cpu.py).
    out = ops.linear_a8w8(xq, x_scale, wq, w_scale, None, torch.float32)
    torch.testing.assert_close(out, truth, rtol=1e-2, atol=1e-2 * truth.abs().max().item())


def _opcheck_cases():
    w = torch.randn(8, 64)
    s8 = w.abs().amax(1, keepdim=True) / 127
    q8 = reference.quantize_symmetric(w, s8, torch.int8)
    scale, shift = torch.rand(8, 2) + 0.1, torch.full((8, 2), 1.5)
    packed = reference.quantize_affine(w, scale, shift, 2)
    x = torch.randn(3, 64)
    xs = torch.tensor(0.02)
    xq = reference.quantize_symmetric(x, xs, torch.int8)
    return [
        (ops.pack, (torch.randint(0, 16, (4, 8), dtype=torch.uint8), 4)),
        (ops.unpack, (torch.randint(0, 255, (4, 8), dtype=torch.uint8), 2)),
        (ops.quantize_symmetric, (w, s8, torch.int8)),
        (ops.dequantize_symmetric, (q8, s8)),
        (ops.quantize_per_token, (x, torch.float8_e4m3fn)),
        (ops.quantize_affine, (w, scale, shift, 2)),
        (ops.dequantize_affine, (packed, scale, shift, 2)),
        (ops.linear_w8, (x, q8, s8, torch.randn(8))),
        (ops.linear_affine, (x, packed, scale, shift, 2, None)),
        (ops.linear_a8w8, (xq, xs, q8, s8, None, torch.float32)),
    ]


@pytest.mark.parametrize("op, args", _opcheck_cases(), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    """Schema, fake (meta) implementation and torch.compile registration agree with the real op."""
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
