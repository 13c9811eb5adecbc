"""The QTensor family behaves like the float tensors it stands for."""

import pytest
import torch
import torch.nn.functional as F

from quanto_backend import QActivation, qfloat8, qint2, qint4, qint8, quantize_activation, quantize_weight

WEIGHT_CASES = [(qint8, None), (qfloat8, None), (qint4, 32), (qint2, 32)]


def _close(actual, expected):
    # The CPU kernels behind the quantized ops compute in bfloat16 (see quanto_backend/ops/cpu.py).
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("qtype, group_size", WEIGHT_CASES)
def test_f_linear_uses_the_quantized_weight(qtype, group_size):
    w, x, b = torch.randn(24, 64), torch.randn(5, 64), torch.randn(24)
    q = quantize_weight(w, qtype, group_size=group_size)
    _close(F.linear(x, q, b), F.linear(x, q.dequantize(), b))


def test_linear_routes_to_the_quantized_op(monkeypatch):
    from quanto_backend.tensor import linear

    calls = []
    monkeypatch.setattr(linear.ops, "linear_w8", lambda *a: calls.append(a) or torch.zeros(2, 4))
    F.linear(torch.randn(2, 8), quantize_weight(torch.randn(4, 8), qint8))
    assert len(calls) == 1 and calls[0][1].dtype == torch.int8


def test_matmul_and_transpose():
    w, x = torch.randn(24, 64), torch.randn(5, 64)
    q = quantize_weight(w, qint8)
    qt = q.t()
    assert qt.shape == (64, 24) and type(qt) is type(q)
    _close(torch.matmul(x, qt), x @ q.dequantize().t())
    _close(x @ qt, x @ q.dequantize().t())
    torch.testing.assert_close(qt.t().dequantize(), q.dequantize())


def test_conv2d():
    w, x = torch.randn(8, 3, 3, 3), torch.randn(2, 3, 10, 10)
    for qtype in (qint8, qint4):
        q = quantize_weight(w, qtype, group_size=16)
        torch.testing.assert_close(F.conv2d(x, q, padding=1), F.conv2d(x, q.dequantize(), padding=1))


@pytest.mark.parametrize("qtype, group_size", WEIGHT_CASES)
def test_detach_clone_to(qtype, group_size):
    q = quantize_weight(torch.randn(8, 64), qtype, group_size=group_size)
    for other in (q.detach(), q.clone(), q.to("cpu"), q.to(torch.bfloat16)):
        assert type(other) is type(q) and other.qtype is q.qtype
    torch.testing.assert_close(q.clone().dequantize(), q.dequantize())
    bf16 = q.to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.scale.dtype == torch.bfloat16
    assert torch.equal(bf16.qdata.view(torch.uint8), q.qdata.view(torch.uint8))
    with pytest.raises(TypeError, match="floating point"):
        q.to(torch.int32)


def test_to_meta_moves_every_inner_tensor():
    q = quantize_weight(torch.randn(8, 64), qint4, group_size=32)
    m = q.to("meta")
    assert m.device.type == "meta" and m.qdata.device.type == m.scale.device.type == m.shift.device.type == "meta"


def test_other_ops_see_dequantized_values():
    q = quantize_weight(torch.randn(8, 64), qint8)
    torch.testing.assert_close(q + 1, q.dequantize() + 1)
    torch.testing.assert_close(torch.relu(q), torch.relu(q.dequantize()))


@pytest.mark.parametrize("qtype", [qint8, qfloat8])
def test_activation_static_and_dynamic(qtype):
    x = torch.randn(4, 10, 32)
    static = quantize_activation(x, qtype, scale=x.abs().amax() / qtype.qmax)
    dynamic = quantize_activation(x, qtype)
    assert isinstance(static, QActivation) and static.qtype is qtype and static.scale.ndim == 0
    assert dynamic.scale.shape == (4, 10, 1)
    for a in (static, dynamic):
        assert a.shape == x.shape and a.dtype == x.dtype
        assert ((a.dequantize() - x).norm() / x.norm()) < 0.06


def test_activation_times_weight_runs_quantized():
    x, w = torch.randn(3, 64), torch.randn(16, 64)
    a = quantize_activation(x, qint8)
    q = quantize_weight(w, qint8)
    _close(F.linear(a, q), F.linear(a.dequantize(), q.dequantize()))


def test_dequantize_is_differentiable():
    """Gradients flow straight through quantization and dequantization of activations."""
    x = torch.randn(4, 16, requires_grad=True)
    a = quantize_activation(x, qint8)
    assert a.requires_grad
    (a.dequantize() * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_gradients_through_ops_on_activations():
    x = torch.randn(4, 16, requires_grad=True)
    torch.relu(quantize_activation(x, qint8)).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
