"""QLinear, QConv2d, QLayerNorm: dynamic until freeze, flat frozen state, straight-through gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quanto_backend import (
    Calibration,
    QActivation,
    QConv2d,
    QLayerNorm,
    QLinear,
    freeze,
    qfloat8,
    qint2,
    qint4,
    qint8,
    quantize,
)


def _linear(dtype=torch.float32):
    return nn.Sequential(nn.Linear(64, 32, dtype=dtype))


@pytest.mark.parametrize(
    "qtype, group_size, storage, scale_shape",
    [
        (qint8, None, (torch.int8, (32, 64)), (32, 1)),
        (qfloat8, None, (torch.float8_e4m3fn, (32, 64)), (32, 1)),
        (qint4, 32, (torch.uint8, (32, 32)), (32, 2)),
        (qint2, 32, (torch.uint8, (32, 16)), (32, 2)),
    ],
)
def test_qlinear_frozen_state(qtype, group_size, storage, scale_shape):
    model = _linear(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    quantize(model, weights=qtype, group_size=group_size)
    qlinear = model[0]
    assert isinstance(qlinear, QLinear) and not qlinear.frozen
    assert qlinear.weight.dtype == torch.bfloat16  # float until freeze: quantized on the fly
    dynamic = model(x)
    freeze(model)
    assert qlinear.frozen
    state = model.state_dict()
    assert (state["0.weight"].dtype, tuple(state["0.weight"].shape)) == storage
    assert tuple(state["0.weight_scale"].shape) == scale_shape and state["0.weight_scale"].dtype == torch.bfloat16
    assert ("0.weight_shift" in state) == qtype.is_packed
    assert state["0.bias"].dtype == torch.bfloat16  # biases stay float
    assert all(type(t) is torch.Tensor or isinstance(t, nn.Parameter) for t in state.values())
    torch.testing.assert_close(model(x), dynamic, rtol=2e-2, atol=2e-2)


def test_quantized_output_is_close_to_float():
    float_model = _linear()
    x = torch.randn(8, 64)
    expected = float_model(x)
    model = quantize(_linear(), weights=qint8)
    model.load_state_dict(float_model.state_dict())
    freeze(model)
    assert ((model(x) - expected).norm() / expected.norm()) < 0.01


def test_freeze_frees_the_float_weight():
    model = quantize(_linear(), weights=qint8)
    float_weight = model[0].weight
    freeze(model)
    assert model[0].weight is not float_weight
    assert all(p.dtype != torch.float32 or n.endswith(("bias", "scale")) for n, p in model.named_parameters())


def test_ste_gradients_reach_the_float_weight():
    model = quantize(_linear(), weights=qint4, group_size=32)
    x = torch.randn(4, 64)
    model(x).sum().backward()
    weight = model[0].weight
    assert weight.grad is not None
    # Straight-through: the gradient is the one of a linear layer with the (fake-quantized) weight.
    torch.testing.assert_close(weight.grad, torch.ones(4, 32).t() @ x)


def test_activations_make_quantized_outputs():
    model = quantize(nn.Sequential(nn.Linear(64, 32)), weights=qint8, activations=qint8)
    out = model(torch.randn(2, 64))
    assert isinstance(out, QActivation) and out.qtype is qint8
    assert model[0].input_scale.shape == () and model[0].output_scale.shape == ()


@pytest.mark.parametrize("qtype", [qint8, qint4])
def test_qconv2d(qtype):
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 12, 12)
    expected = conv(x)
    model = quantize(nn.Sequential(conv), weights=qtype, group_size=16 if qtype.is_packed else None)
    assert isinstance(model[0], QConv2d)
    freeze(model)
    assert model[0].weight.dtype == qtype.dtype
    out = model(x)
    assert ((out - expected).norm() / expected.norm()) < (0.02 if qtype is qint8 else 0.15)


def test_qlayernorm_only_with_activations():
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    quantize(model, weights=qint8)
    assert type(model[1]) is nn.LayerNorm
    quantize(model, activations=qint8)
    assert isinstance(model[1], QLayerNorm)
    x = torch.randn(3, 16)
    with torch.no_grad(), Calibration():
        model(x)
    out = model(x)
    assert isinstance(out, QActivation)
    expected = F.layer_norm(model[0](x).dequantize(), (16,), model[1].weight, model[1].bias)
    torch.testing.assert_close(out.dequantize(), expected, atol=0.02, rtol=0)


def test_module_to_moves_quantized_storage():
    model = freeze(quantize(_linear(), weights=qint4, activations=qint8, group_size=32))
    model.to(torch.device("meta"))
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


def test_bad_qtypes_fail_at_quantize():
    with pytest.raises(ValueError, match="weights"):
        quantize(_linear(), weights="int3")
    with pytest.raises(ValueError, match="activations"):
        quantize(_linear(), activations=qint4)
    with pytest.raises(ValueError, match="group_size"):
        quantize(_linear(), weights=qint4, group_size=10)
