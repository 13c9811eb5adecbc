"""Observers: small modules that record activation ranges during calibration and answer ``(scale, zero_point)``.

An observer's ``forward(x)`` records ``x`` and returns it unchanged; :meth:`Observer.calculate_qparams` maps the
recorded range onto its qtype's codes with :func:`~quanto_backend.tensor.choose_qparams`:

* symmetric (``qint8``, float8, or ``quint8`` centred on 128): ``scale = absmax / half range``;
* asymmetric (``quint8`` only): ``scale = (max - min) / 255`` and an integer ``zero_point``.

A custom observer subclasses :class:`Observer` and implements ``observe(x)`` and ``bounds()``. Observers are used
by :class:`~quanto_backend.Calibration` (``Calibration(observer=HistogramObserver)``), by the static workflow of
:mod:`quanto_backend.static`, and (per axis) by :func:`~quanto_backend.smooth_quant`.
"""

from __future__ import annotations

import torch
from torch import nn

from .qtypes import QType, as_qtype, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2, qint8, quint8
from .tensor import QTensor, choose_qparams

__all__ = ["HistogramObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "Observer"]

OBSERVER_QTYPES = (qint8, quint8, qfloat8_e4m3fn, qfloat8_e4m3fnuz, qfloat8_e5m2)


class Observer(nn.Module):
    """Base class of the observers.

    Args:
        qtype: the activation format the parameters are for: ``qint8``, ``quint8`` or a float8 (default
            ``qint8`` when symmetric, ``quint8`` when not).
        symmetric: symmetric mapping (zero-point at the middle code); default: asymmetric for ``quint8`` only.
            An asymmetric mapping needs ``quint8``: it is what gives uint8 activations a zero-point.

    Subclasses implement :meth:`observe` (record a detached float tensor) and :meth:`bounds` (the range to
    quantize, 0-dim per tensor or 1-D per axis).
    """

    def __init__(self, qtype: QType | str | None = None, symmetric: bool | None = None):
        super().__init__()
        if symmetric is not None and not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool or None, got {symmetric!r}")
        if qtype is None:
            qtype = quint8 if symmetric is False else qint8
        self.qtype = as_qtype(qtype, OBSERVER_QTYPES, "observer qtype")
        self.symmetric = self.qtype != quint8 if symmetric is None else symmetric
        if not self.symmetric and self.qtype != quint8:
            raise ValueError(f"An asymmetric mapping gives uint8 activations: use qtype quint8, not {self.qtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x`` and return it unchanged."""
        values = x.dequantize() if isinstance(x, QTensor) else x
        if not values.is_floating_point():
            raise TypeError(f"{type(self).__name__} observes floating point tensors, got {values.dtype}")
        self.observe(values.detach())
        return x

    def observe(self, x: torch.Tensor) -> None:
        """Record the float tensor ``x``."""
        raise NotImplementedError

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` of the range to quantize, float32."""
        raise NotImplementedError

    @property
    def observed(self) -> bool:
        """Whether the observer has recorded anything yet."""
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)``: float32 and int32, 0-dim per tensor or 1-D per axis.

        Raises:
            RuntimeError: the observer has recorded nothing.
        """
        if not self.observed:
            raise RuntimeError(f"{type(self).__name__} has observed no data: run calibration samples through it first")
        min_val, max_val = self.bounds()
        return choose_qparams(min_val, max_val, self.qtype, self.symmetric)

    def extra_repr(self) -> str:
        return f"qtype={self.qtype}, symmetric={self.symmetric}"


def _reduce_dims(x: torch.Tensor, axis: int | None) -> list[int]:
    if axis is None:
        return list(range(x.ndim))
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return [d for d in range(x.ndim) if d != axis % x.ndim]


class MinMaxObserver(Observer):
    """The running minimum and maximum, over the whole tensor or per slice along ``axis``.

    Args:
        axis: ``None`` per tensor, or the kept dimension (e.g. ``-1``: per channel of the last dimension).
    """

    def __init__(self, qtype: QType | str | None = None, symmetric: bool | None = None, axis: int | None = None):
        super().__init__(qtype, symmetric)
        if axis is not None and not isinstance(axis, int):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        self.axis = axis
        # Non-persistent: calibration state, never part of a checkpoint.
        self.register_buffer("min_val", torch.empty(0), persistent=False)
        self.register_buffer("max_val", torch.empty(0), persistent=False)

    @property
    def observed(self) -> bool:
        return self.min_val.numel() > 0

    def _batch_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = _reduce_dims(x, self.axis)
        x = x.float()
        return x.amin(dim=dims), x.amax(dim=dims)

    def _check_shape(self, new_min: torch.Tensor) -> None:
        if self.observed and new_min.shape != self.min_val.shape:
            raise ValueError(
                f"{type(self).__name__}(axis={self.axis}) saw {tuple(new_min.shape)} channels after "
                f"{tuple(self.min_val.shape)}: the observed axis must keep its size"
            )

    def observe(self, x: torch.Tensor) -> None:
        new_min, new_max = self._batch_bounds(x)
        self._check_shape(new_min)
        if self.observed:
            new_min, new_max = torch.minimum(self.min_val, new_min), torch.maximum(self.max_val, new_max)
        self.min_val, self.max_val = new_min, new_max

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}"


class MovingAverageMinMaxObserver(MinMaxObserver):
    """A running average of each sample's minimum and maximum: one extreme batch moves the range only a little.

    Args:
        momentum: weight of the previous average (the first sample sets it), in ``[0, 1)``.
    """

    def __init__(
        self,
        qtype: QType | str | None = None,
        symmetric: bool | None = None,
        axis: int | None = None,
        momentum: float = 0.9,
    ):
        super().__init__(qtype, symmetric, axis)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        new_min, new_max = self._batch_bounds(x)
        self._check_shape(new_min)
        if self.observed:
            new_min = self.momentum * self.min_val + (1 - self.momentum) * new_min
            new_max = self.momentum * self.max_val + (1 - self.momentum) * new_max
        self.min_val, self.max_val = new_min, new_max


class HistogramObserver(Observer):
    """A histogram of every value seen (per tensor); the range keeps the central ``percentile`` percent of them
    and clips the rarest outliers on each side, which would otherwise waste most of the codes.

    Args:
        percentile: percentage of values kept inside the range, in ``(0, 100]`` (100 = min-max).
        bins: histogram resolution. The histogram spans the widest range seen; when a sample widens it, the
            counts are re-binned (each old bin's count moves to the new bin holding its centre).
    """

    def __init__(
        self,
        qtype: QType | str | None = None,
        symmetric: bool | None = None,
        percentile: float = 99.99,
        bins: int = 2048,
    ):
        super().__init__(qtype, symmetric)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        self.percentile = percentile
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64), persistent=False)
        self.register_buffer("min_val", torch.empty(0), persistent=False)
        self.register_buffer("max_val", torch.empty(0), persistent=False)

    @property
    def observed(self) -> bool:
        return self.min_val.numel() > 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.float().flatten()
        if x.numel() == 0:
            return
        lo, hi = x.min(), x.max()
        if self.observed:
            lo, hi = torch.minimum(lo, self.min_val), torch.maximum(hi, self.max_val)
            self.histogram = self._rebinned(lo, hi)
        self.histogram = self.histogram.to(x.device)
        self.min_val, self.max_val = lo, hi
        if hi > lo:
            self.histogram += torch.histc(x, self.bins, lo.item(), hi.item()).double()
        else:
            self.histogram[0] += x.numel()

    def _rebinned(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if lo == self.min_val and hi == self.max_val:
            return self.histogram
        width = (self.max_val - self.min_val) / self.bins
        centres = self.min_val + (torch.arange(self.bins, device=lo.device) + 0.5) * width
        index = ((centres - lo) / (hi - lo) * self.bins).long().clamp(0, self.bins - 1)
        return torch.zeros_like(self.histogram).index_add_(0, index, self.histogram)

    def _quantile(self, q: float) -> torch.Tensor:
        """The value below which a fraction ``q`` of the recorded values lie (linear inside a bin)."""
        cdf = torch.cumsum(self.histogram, 0)
        target = q * cdf[-1]
        i = int(torch.searchsorted(cdf, target).clamp(max=self.bins - 1))
        before = cdf[i - 1] if i > 0 else torch.zeros((), dtype=cdf.dtype, device=cdf.device)
        inside = ((target - before) / self.histogram[i].clamp_min(1)).clamp(0, 1)
        width = (self.max_val - self.min_val) / self.bins
        return (self.min_val + (i + inside.float()) * width).float()

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.percentile == 100.0 or self.max_val == self.min_val:
            return self.min_val, self.max_val
        tail = (100.0 - self.percentile) / 200.0  # clipped from each side
        return self._quantile(tail), self._quantile(1.0 - tail)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, percentile={self.percentile}, bins={self.bins}"
