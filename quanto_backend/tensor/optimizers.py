"""Optimizers choose quantization parameters (scales and shifts) and nothing else.

* :class:`AbsmaxOptimizer`: symmetric scale ``absmax / qmax`` along an axis (the 8-bit formats).
* :class:`MinMaxOptimizer`: affine scale and shift from each group's min and max (the 2/4-bit formats).
* :class:`HqqOptimizer`: half-quadratic quantization, refining min-max parameters to minimise an lp-norm of the
  reconstruction error (Badri & Shaji, 2023); the scale is refitted too, which matters most at 2 bits.

Affine parameters follow the convention of :mod:`quanto_backend.ops.reference`: ``w ~= (q - shift) * scale``.
"""

from __future__ import annotations

import torch

from ..qtypes import QType

__all__ = ["AbsmaxOptimizer", "AffineOptimizer", "HqqOptimizer", "MinMaxOptimizer", "as_optimizer", "choose_qparams"]


def choose_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qtype: QType, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` mapping the observed range ``[min_val, max_val]`` onto ``qtype``'s codes.

    The range is widened to include 0, so that 0 (padding, ReLU) is exact. Symmetric: ``scale = absmax / half
    range`` and the zero-point is the middle code (0 for ``qint8``/float8, 128 for ``quint8``). Asymmetric
    (integer qtypes only): ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = qmin - round(min / scale)``,
    an integer so that integer kernels stay exact. A range of zero width gets scale 1.

    Returns float32 ``scale`` and int32 ``zero_point``, both shaped like ``min_val``.
    """
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    if qtype.is_floating_point and not symmetric:
        raise ValueError(f"{qtype} has no zero-point: only a symmetric mapping is accepted")
    if symmetric:
        absmax = torch.maximum(-min_val, max_val)
        zero_point = torch.full_like(absmax, round((qtype.qmin + qtype.qmax) / 2 + 0.25))
        scale = absmax / ((qtype.qmax - qtype.qmin) / 2)
    else:
        scale = (max_val - min_val) / (qtype.qmax - qtype.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero_point = (qtype.qmin - (min_val / scale).round()).clamp(qtype.qmin, qtype.qmax)
    return scale, zero_point.to(torch.int32)


class AbsmaxOptimizer:
    """Symmetric per-axis scales; all-zero rows get scale 1 so they quantize to exact zeros."""

    def __call__(self, w: torch.Tensor, qtype: QType, axis: int | None = 0) -> torch.Tensor:
        w = w.float()
        if axis is None:
            absmax = w.abs().amax()
        else:
            dims = [d for d in range(w.ndim) if d != axis % w.ndim]
            absmax = w.abs().amax(dim=dims, keepdim=True)
        scale = absmax / qtype.qmax
        return torch.where(absmax > 0, scale, torch.ones_like(scale))


class AffineOptimizer:
    """Base of the optimizers for the affine group-wise formats.

    ``__call__`` takes the weight grouped as ``[..., n_groups, group_size]`` and returns ``(scale, shift)``,
    each ``[..., n_groups]`` in float32. Subclasses plug in by overriding ``__call__``.
    """

    def __call__(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxOptimizer(AffineOptimizer):
    """Maps each group's ``[min, max]`` onto the code range ``[0, qmax]``."""

    def __call__(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        groups = groups.float()
        wmin, wmax = groups.amin(dim=-1), groups.amax(dim=-1)
        # A constant group (all zeros included) gets scale |value| (or 1) and lands exactly on code 0.
        flat = wmax == wmin
        scale = torch.where(flat, wmin.abs(), (wmax - wmin) / qtype.qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        shift = -wmin / scale
        return scale, shift


class HqqOptimizer(AffineOptimizer):
    """Half-quadratic quantization: alternately shrink the error with an lp-norm proximal step (p < 1, robust to
    outliers) and refit the affine parameters by least squares to the shrunk target.

    Args:
        iterations: refinement steps (each one quantizes the weight once).
        lp_norm: the ``p`` of the sparsity-promoting error norm.
        beta, kappa: the penalty weight of the half-quadratic split and its growth per step.
    """

    def __init__(self, iterations: int = 20, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01):
        self.iterations = iterations
        self.lp_norm = lp_norm
        self.beta = beta
        self.kappa = kappa

    def __call__(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        w = groups.float()
        scale, shift = MinMaxOptimizer()(w, qtype)
        best_scale, best_shift = scale, shift
        best_error = self._error(w, scale, shift, qtype)
        beta = self.beta
        for _ in range(self.iterations):
            codes = self._codes(w, scale, shift, qtype)
            residual = w - (codes - shift.unsqueeze(-1)) * scale.unsqueeze(-1)
            target = w - self._shrink(residual, beta)
            scale, shift = self._fit(codes, target, scale, shift)
            beta *= self.kappa
            error = self._error(w, scale, shift, qtype)
            improved = error < best_error
            best_scale = torch.where(improved, scale, best_scale)
            best_shift = torch.where(improved, shift, best_shift)
            best_error = torch.minimum(error, best_error)
        return best_scale, best_shift

    @staticmethod
    def _codes(w, scale, shift, qtype):
        return (w / scale.unsqueeze(-1) + shift.unsqueeze(-1)).round().clamp(qtype.qmin, qtype.qmax)

    def _error(self, w, scale, shift, qtype):
        codes = self._codes(w, scale, shift, qtype)
        return (w - (codes - shift.unsqueeze(-1)) * scale.unsqueeze(-1)).square().mean(dim=-1)

    def _shrink(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(self.lp_norm - 1) / beta)

    @staticmethod
    def _fit(codes, target, scale, shift):
        """Least-squares ``target ~= a * codes + b`` per group; groups whose codes are all equal keep the old
        scale and only move the shift."""
        codes_mean = codes.mean(dim=-1, keepdim=True)
        target_mean = target.mean(dim=-1, keepdim=True)
        var = (codes - codes_mean).square().sum(dim=-1)
        cov = ((codes - codes_mean) * (target - target_mean)).sum(dim=-1)
        a = torch.where(var > 0, cov / var.clamp_min(1e-12), scale)
        a = torch.where(a > 0, a, scale)
        b = target_mean.squeeze(-1) - a * codes_mean.squeeze(-1)
        return a, -b / a


_OPTIMIZERS = {"absmax": AbsmaxOptimizer, "minmax": MinMaxOptimizer, "hqq": HqqOptimizer}


def as_optimizer(value) -> AbsmaxOptimizer | AffineOptimizer | None:
    """Turn ``None``, a name (``"absmax"``, ``"minmax"``, ``"hqq"``) or an optimizer instance into an optimizer."""
    if value is None or isinstance(value, (AbsmaxOptimizer, AffineOptimizer)):
        return value
    if isinstance(value, str) and value.lower() in _OPTIMIZERS:
        return _OPTIMIZERS[value.lower()]()
    raise ValueError(f"Unsupported optimizer {value!r}; accepted: {', '.join(_OPTIMIZERS)} or an optimizer instance")
