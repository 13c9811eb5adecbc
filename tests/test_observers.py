import functools

import pytest
import torch
from torch import nn

from quanto_backend import (
    Calibration,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    choose_qparams,
    qfloat8,
    qint8,
    quantize,
    quantize_activation,
    quint8,
)


def test_minmax_symmetric_int8_maps_absmax_to_127():
    obs = MinMaxObserver(qint8)
    obs(torch.tensor([-0.5, 2.0]))
    obs(torch.tensor([-3.0, 1.0]))
    scale, zero_point = obs.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor(3.0 / 127))
    assert zero_point.item() == 0 and zero_point.dtype == torch.int32


def test_minmax_asymmetric_uint8_uses_the_whole_range_and_keeps_zero_exact():
    x = torch.rand(1000) * 4 - 1  # [-1, 3]
    obs = MinMaxObserver(quint8, symmetric=False)
    obs(x)
    scale, zero_point = obs.calculate_qparams()
    torch.testing.assert_close(scale, (x.max() - x.min()) / 255)
    assert zero_point.item() == round(-x.min().item() / scale.item())
    q = quantize_activation(x, quint8, scale, zero_point)
    assert (q.dequantize() - x).abs().max() <= scale / 2 + 1e-6
    zero = quantize_activation(torch.zeros(3), quint8, scale, zero_point)
    assert torch.equal(zero.dequantize(), torch.zeros(3))


def test_asymmetric_beats_symmetric_on_a_one_sided_range():
    x = torch.rand(4096) * 6  # post-ReLU like: symmetric wastes half the codes
    errors = {}
    for qtype, symmetric in ((qint8, True), (quint8, False)):
        obs = MinMaxObserver(qtype, symmetric=symmetric)
        obs(x)
        q = quantize_activation(x, qtype, *([obs.calculate_qparams()[0]] if symmetric else obs.calculate_qparams()))
        errors[symmetric] = (q.dequantize() - x).abs().mean()
    assert errors[False] < 0.6 * errors[True]


def test_symmetric_uint8_centres_on_128():
    obs = MinMaxObserver(quint8, symmetric=True)
    obs(torch.tensor([-1.0, 2.0]))
    scale, zero_point = obs.calculate_qparams()
    assert zero_point.item() == 128
    torch.testing.assert_close(scale, torch.tensor(2.0 / 127.5))


def test_float8_is_symmetric():
    obs = MinMaxObserver(qfloat8)
    obs(torch.tensor([-448.0 * 2, 3.0]))
    scale, zero_point = obs.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor(2.0))
    assert zero_point.item() == 0


def test_per_axis_minmax_keeps_one_range_per_channel():
    obs = MinMaxObserver(quint8, symmetric=False, axis=-1)
    a, b = torch.randn(2, 5, 8), torch.randn(3, 7, 8)
    obs(a)
    obs(b)
    both = torch.cat([a.reshape(-1, 8), b.reshape(-1, 8)])
    min_val, max_val = obs.bounds()
    torch.testing.assert_close(min_val, both.amin(0))
    torch.testing.assert_close(max_val, both.amax(0))
    scale, zero_point = obs.calculate_qparams()
    assert scale.shape == (8,) and zero_point.shape == (8,)
    with pytest.raises(ValueError, match="channels"):
        obs(torch.randn(4, 9))


def test_moving_average_follows_the_momentum():
    obs = MovingAverageMinMaxObserver(qint8, momentum=0.75)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-5.0, 3.0]))
    min_val, max_val = obs.bounds()
    torch.testing.assert_close(min_val, torch.tensor(0.75 * -1 + 0.25 * -5))
    torch.testing.assert_close(max_val, torch.tensor(0.75 * 1 + 0.25 * 3))


def test_histogram_ignores_rare_outliers():
    x = torch.randn(100_000)
    x[:5] = 1000.0  # 0.005% of the values
    minmax, hist = MinMaxObserver(qint8), HistogramObserver(qint8, percentile=99.99)
    minmax(x)
    hist(x)
    assert minmax.calculate_qparams()[0] > 7.0  # dominated by the outliers
    low, high = hist.bounds()
    expected = torch.quantile(x.double(), torch.tensor([0.00005, 0.99995], dtype=torch.double))
    assert 3.0 < high < 5.0 and -5.0 < low < -3.0
    # The histogram spans [-4, 1000] in 2048 bins: its quantiles are good to about one bin (0.5).
    torch.testing.assert_close(torch.stack([low, high]).double(), expected, atol=0.6, rtol=0)


def test_histogram_rebins_when_the_range_grows():
    hist = HistogramObserver(quint8, symmetric=False, percentile=99.0, bins=1024)
    parts = [torch.randn(20_000) * s for s in (0.5, 1.0, 2.0)]
    for part in parts:
        hist(part)
    assert hist.histogram.sum().item() == 60_000
    x = torch.cat(parts)
    expected = torch.quantile(x, torch.tensor([0.005, 0.995]))
    low, high = hist.bounds()
    torch.testing.assert_close(torch.stack([low, high]), expected, atol=0.1, rtol=0.02)


def test_histogram_percentile_100_is_minmax():
    x = torch.randn(1000)
    hist = HistogramObserver(quint8, symmetric=False, percentile=100.0)
    hist(x)
    torch.testing.assert_close(torch.stack(hist.bounds()), torch.stack([x.min(), x.max()]))


def test_observer_returns_its_input_and_accepts_constant_tensors():
    obs = HistogramObserver(qint8)
    x = torch.full((4,), 2.0)
    assert obs(x) is x
    scale, _ = obs.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor(2.0 / 127))
    zeros = MinMaxObserver(qint8)
    zeros(torch.zeros(3))
    assert zeros.calculate_qparams()[0].item() == 1.0  # a zero-width range gets scale 1, not 0


class _AbsPercentObserver(Observer):
    """A custom observer: the range is +-k times the largest mean absolute value seen."""

    def __init__(self, qtype=None, symmetric=None, k: float = 3.0):
        super().__init__(qtype, symmetric)
        self.k = k
        self.level = None

    @property
    def observed(self) -> bool:
        return self.level is not None

    def observe(self, x):
        level = x.abs().mean()
        self.level = level if self.level is None else torch.maximum(self.level, level)

    def bounds(self):
        return -self.k * self.level, self.k * self.level


def test_custom_observer_plugs_into_calibration():
    model = quantize(nn.Sequential(nn.Linear(16, 16)), weights=qint8, activations=quint8)
    x = torch.randn(8, 16)
    with torch.no_grad(), Calibration(observer=functools.partial(_AbsPercentObserver, k=2.0)):
        model(x)
    # Built with qtype=quint8 and no symmetric argument: an asymmetric mapping of [-2m, 2m].
    scale, zero_point = choose_qparams(-2 * x.abs().mean(), 2 * x.abs().mean(), quint8, symmetric=False)
    torch.testing.assert_close(model[0].input_scale, scale)
    assert model[0].input_zero_point.item() == zero_point.item() and 127 <= zero_point.item() <= 128


@pytest.mark.parametrize("observer", [MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver])
def test_calibration_with_observers_sets_zero_points(observer):
    model = quantize(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), weights=qint8, activations=quint8)
    x = torch.randn(64, 16) + 2.0  # mostly positive inputs: the zero-point moves away from 128
    with torch.no_grad(), Calibration(observer=observer):
        model(x)
    scale, zero_point = model[0].input_scale, model[0].input_zero_point
    assert zero_point.dtype == torch.int32 and 0 <= zero_point.item() < 100
    assert (x.max() - x.min()) / 255 * 0.9 <= scale <= (x.max() - x.min()) / 255 * 1.01
    with torch.no_grad():
        torch.testing.assert_close(
            model(x).dequantize(),
            nn.functional.linear(torch.relu(model[0].qforward(x)), *_float(model[2])),
            atol=0.1,
            rtol=0.05,
        )


def _float(linear):
    return linear.qweight.dequantize(), linear.bias


def test_default_calibration_of_uint8_modules_uses_a_moving_minmax():
    model = quantize(nn.Sequential(nn.Linear(4, 4)), weights=qint8, activations=quint8)
    a, b = torch.tensor([[0.0, 1.0, 2.0, 4.0]]), torch.tensor([[-2.0, 0.0, 1.0, 8.0]])
    with torch.no_grad(), Calibration(momentum=0.5):
        model(a)
        model(b)
    low, high = 0.5 * 0 + 0.5 * -2.0, 0.5 * 4.0 + 0.5 * 8.0
    torch.testing.assert_close(model[0].input_scale, torch.tensor((high - low) / 255))


def test_bad_observer_arguments_raise():
    with pytest.raises(ValueError, match="quint8"):
        MinMaxObserver(qint8, symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), qfloat8, symmetric=False)
    with pytest.raises(ValueError, match="observer qtype"):
        MinMaxObserver("int4")
    with pytest.raises(ValueError, match="percentile"):
        HistogramObserver(percentile=0)
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(bins=1)
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageMinMaxObserver(momentum=1.0)
    with pytest.raises(TypeError, match="axis"):
        MinMaxObserver(axis="last")
    with pytest.raises(TypeError, match="floating point"):
        MinMaxObserver()(torch.arange(3))
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver().calculate_qparams()
    with pytest.raises(TypeError, match="observer"):
        Calibration(observer="minmax")


def test_calibration_refuses_per_axis_observers():
    model = quantize(nn.Sequential(nn.Linear(4, 4)), weights=qint8, activations=qint8)
    with pytest.raises(ValueError, match="per-axis"), torch.no_grad():
        with Calibration(observer=functools.partial(MinMaxObserver, axis=-1)):
            model(torch.randn(2, 4))
