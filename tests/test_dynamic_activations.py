import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quanto_backend import (
    Calibration,
    QActivation,
    QLinear,
    freeze,
    ops,
    qfloat8,
    qint8,
    quantization_map,
    quantize,
    quantize_activation,
    quint8,
    requantize,
)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 16))


def _tokens() -> torch.Tensor:
    # Tokens of very different magnitudes: one per-tensor scale would crush the small ones.
    return torch.randn(2, 6, 32) * torch.logspace(-2, 1, 6).view(1, 6, 1)


@pytest.mark.parametrize("qtype", [qint8, qfloat8])
def test_dynamic_needs_no_calibration_and_quantizes_per_token(qtype):
    model = _model()
    qmodel = freeze(quantize(copy.deepcopy(model), weights=qint8, activations=qtype, activation_scales="dynamic"))
    assert "input_scale" not in qmodel[0]._buffers and "output_scale" not in qmodel[0]._buffers
    assert type(qmodel[1]) is nn.LayerNorm  # nothing to do for a normalization: its consumer quantizes per token
    x = _tokens()
    with torch.no_grad():
        out = qmodel(x)
        # The first layer by hand: per-token activation codes times the int8 weight (int8 x int8 runs quantized;
        # float8 codes meet int8 weights dequantized).
        codes, scale = ops.quantize_per_token(x, qtype.dtype)
        assert scale.shape == (2, 6, 1)
        layer = qmodel[0]
        if qtype == qint8:
            first = ops.linear_a8w8(codes, scale, layer.weight, layer.weight_scale, layer.bias, x.dtype)
        else:
            first = ops.linear_w8(codes.float() * scale, layer.weight, layer.weight_scale, layer.bias)
        torch.testing.assert_close(qmodel[0](x), first)
    expected = model(x)
    per_token_error = ((out - expected).norm(dim=-1) / expected.norm(dim=-1)).max()
    assert per_token_error < (0.02 if qtype == qint8 else 0.1)  # float8 e4m3: 3 mantissa bits


def test_dynamic_beats_static_per_tensor_on_tokens_of_different_scales():
    model = _model()
    x = _tokens()
    expected = model(x)
    dynamic = freeze(quantize(copy.deepcopy(model), weights=qint8, activations=qint8, activation_scales="dynamic"))
    static = quantize(copy.deepcopy(model), weights=qint8, activations=qint8)
    with torch.no_grad(), Calibration():
        static(x)
    freeze(static)

    def worst(m):
        with torch.no_grad():
            out = m(x)
        out = out.dequantize() if isinstance(out, QActivation) else out
        return ((out - expected).norm(dim=-1) / expected.norm(dim=-1)).max()

    assert worst(dynamic) < 0.25 * worst(static)


def test_dynamic_modules_are_skipped_by_calibration():
    model = quantize(_model(), weights=qint8, activations=qint8, activation_scales="dynamic")
    with torch.no_grad(), Calibration():
        out = model(torch.randn(3, 32))
    assert not isinstance(out, QActivation) and "input_scale" not in model[2]._buffers


def test_dynamic_config_round_trips_through_requantize():
    model = freeze(quantize(_model(), weights=qint8, activations=qfloat8, activation_scales="dynamic"))
    qmap = quantization_map(model)
    assert qmap["0"]["activation_scales"] == "dynamic" and "1" not in qmap
    with torch.device("meta"):
        skeleton = _model()
    requantize(skeleton, model.state_dict(), qmap, device="cpu")
    assert isinstance(skeleton[0], QLinear) and skeleton[0].activation_scales == "dynamic"
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))


def test_dynamic_model_compiles():
    model = freeze(quantize(_model(), weights=qint8, activations=qint8, activation_scales="dynamic"))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_dynamic_trains_with_straight_through_gradients():
    model = quantize(nn.Sequential(nn.Linear(8, 4)), weights=qint8, activations=qint8, activation_scales="dynamic")
    x = torch.randn(3, 8, requires_grad=True)
    model(x).sum().backward()
    torch.testing.assert_close(x.grad, model[0].weight.detach().sum(0).expand(3, 8), rtol=0.02, atol=0.02)


def test_per_token_activation_quantization_keeps_each_row_accurate():
    x = _tokens()
    q = quantize_activation(x, qint8)
    assert q.scale.shape == (2, 6, 1)
    relative = (q.dequantize() - x).abs().amax(-1) / x.abs().amax(-1)
    assert relative.max() <= 0.5 / 127 + 1e-6
    torch.testing.assert_close(F.linear(q, torch.eye(32)), q.dequantize())


def test_bad_activation_scales_raise():
    with pytest.raises(ValueError, match="activation_scales"):
        quantize(_model(), weights=qint8, activations=qint8, activation_scales="per-token")
    with pytest.raises(ValueError, match="symmetric"):
        quantize(_model(), weights=qint8, activations=quint8, activation_scales="dynamic")
    with pytest.raises(ValueError, match="needs symmetric activations"):
        quantize(_model(), weights=qint8, activation_scales="dynamic")
