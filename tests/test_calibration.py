import pytest
import torch
from torch import nn

from quanto_backend import Calibration, QActivation, qint8, quantize


def _model():
    return quantize(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), weights=qint8, activations=qint8)


def test_scales_follow_the_momentum_average():
    model = _model()
    a, b = torch.randn(4, 16), torch.randn(4, 16) * 3
    with torch.no_grad(), Calibration(momentum=0.9):
        model(a)
        first = model[0].input_scale.clone()
        model(b)
    torch.testing.assert_close(first, a.abs().amax() / 127)
    torch.testing.assert_close(model[0].input_scale, 0.9 * first + 0.1 * b.abs().amax() / 127)


def test_output_scale_tracks_the_output():
    model = _model()
    x = torch.randn(4, 16)
    with torch.no_grad(), Calibration():
        out = model(x)
    assert isinstance(out, QActivation)
    with torch.no_grad():
        float_out = model[2].qforward(model[2].quantize_input(model[1](model[0](x))))
    torch.testing.assert_close(model[2].output_scale, float_out.abs().amax() / 127, rtol=0.05, atol=0)


def test_streamline_drops_outputs_consumed_by_float_ops():
    model = _model()
    with torch.no_grad(), Calibration(streamline=True):
        model(torch.randn(4, 16))
    assert not model[0].quantizes_output  # consumed by ReLU
    assert model[2].quantizes_output  # the model's output


def test_no_streamline_keeps_every_output():
    model = _model()
    with torch.no_grad(), Calibration(streamline=False):
        model(torch.randn(4, 16))
    assert model[0].quantizes_output and model[2].quantizes_output


def test_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        Calibration(momentum=1.5)
