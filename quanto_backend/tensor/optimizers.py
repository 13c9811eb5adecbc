"""Optimizers choose quantization parameters (scales and shifts) and nothing else.

* :class:`AbsmaxOptimizer`: symmetric scale ``absmax / qmax`` along an axis (the 8-bit formats).
* :class:`MinMaxOptimizer`: affine scale and shift from each group's min and max (the 2/4-bit formats).
* :class:`MseOptimizer`: the clip of each group's min-max range with the least squared error, then one
  least-squares refit (the 4-bit default).
* :class:`HqqOptimizer`: half-quadratic quantization, refining min-max parameters to minimise an lp-norm of the
  reconstruction error (Badri & Shaji, 2023); the scale is refitted too, which matters most at 2 bits.

Affine parameters follow the convention of :mod:`quanto_backend.ops.reference`: ``w ~= (q - shift) * scale``.

A custom optimizer subclasses :class:`SymmetricOptimizer` (or :class:`AbsmaxOptimizer`) or :class:`AffineOptimizer`
and overrides ``optimize``, in this library's form or in optimum-quanto's (``optimize(base, qtype, axis)``, see
the classes).
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..qtypes import QType

__all__ = [
    "AbsmaxOptimizer",
    "AffineOptimizer",
    "SymmetricOptimizer",
    "HqqOptimizer",
    "MinMaxOptimizer",
    "MseOptimizer",
    "as_optimizer",
    "choose_qparams",
    "default_affine_optimizer",
]


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


class SymmetricOptimizer:
    """Base of the optimizers of the symmetric 8-bit formats: a subclass implements
    ``optimize(base, qtype, axis)`` (optimum-quanto's form), returning the scale in ``base``'s dtype, 0-dim for
    ``axis=None``, ``[out, 1, ...]`` for ``axis=0``.

    Called as ``optimizer(base, qtype, axis)`` (optimum-quanto's signature): ``axis=None`` gives one scale for the
    whole tensor, an int keeps that axis; a single slice along ``axis`` is the same as per-tensor.
    """

    def __call__(self, base: torch.Tensor, qtype: QType, axis: int | None = None) -> torch.Tensor:
        if axis not in (None, 0, -1):
            raise ValueError(f"axis must be None, 0 (first axis) or -1 (last axis), got {axis!r}")
        if axis is not None and base.ndim > 0 and base.shape[axis] == 1:
            axis = None  # one slice along the axis: the same as per-tensor
        return self.optimize(base, qtype, axis)

    def optimize(self, base: torch.Tensor, qtype: QType, axis: int | None = None) -> torch.Tensor:
        raise NotImplementedError


class AbsmaxOptimizer(SymmetricOptimizer):
    """Symmetric scales ``absmax / qmax``; all-zero slices get scale 1 so they quantize to exact zeros. The scale
    has ``base``'s dtype (see :class:`SymmetricOptimizer` for the call)."""

    def optimize(self, base: torch.Tensor, qtype: QType, axis: int | None = None) -> torch.Tensor:
        w = base.float()
        # max(-min, max) is the absmax, from one pass that makes no copy of the weight (abs() would).
        if axis is None:
            low, high = w.aminmax()
        else:
            axis %= w.ndim
            low, high = torch.aminmax(w.movedim(axis, 0).reshape(w.shape[axis], -1), dim=1)
            shape = [1] * w.ndim
            shape[axis] = -1
            low, high = low.view(shape), high.view(shape)
        absmax = torch.maximum(-low, high)
        scale = absmax / qtype.qmax
        return torch.where(absmax > 0, scale, torch.ones_like(scale)).to(base.dtype)


@functools.cache
def _takes_axis(optimize) -> bool:
    """Whether an ``optimize`` method has optimum-quanto's form ``optimize(base, qtype, axis)`` (a third argument
    besides ``self``, required) rather than this library's ``optimize(groups, qtype)``."""
    params = [
        p
        for p in inspect.signature(optimize).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params) >= 4 and params[3].default is inspect.Parameter.empty


class AffineOptimizer:
    """Base of the optimizers for the affine group-wise formats; subclasses implement ``optimize``, in either form:

    * ``optimize(groups, qtype)``: ``groups`` ``[..., n_groups, group_size]``; returns this library's
      ``(scale, shift)``, each ``[..., n_groups]``, with ``w ~= (q - shift) * scale``.
    * ``optimize(base, qtype, axis)`` (optimum-quanto's): ``base`` is the grouped weight ``[n_groups_total,
      group_size]`` and ``axis`` 0; returns optimum-quanto's ``(scale, shift)``, each ``[n_groups_total, 1]``, with
      ``w ~= q * scale - shift``, which this class converts (``qtype.bits`` is what optimum-quanto's own optimizers
      read: the codes are ``[0, 2**bits - 1]``).

    Two ways to call one:

    * ``optimizer(groups, qtype)``: ``groups`` is the weight grouped as ``[..., n_groups, group_size]``; returns
      this library's ``(scale, shift)``, each ``[..., n_groups]`` float32, with ``w ~= (q - shift) * scale``.
    * ``optimizer(base, qtype, axis, group_size)`` (optimum-quanto's signature): ``base`` is the weight
      ``[out, ...]``, ``axis`` must be 0 (output channels), ``group_size=None`` means one group per output
      channel. Returns optimum-quanto's ``(scale, shift)`` in ``base``'s dtype, shaped ``[n_groups_total, 1]``
      (``[out, 1, ...]`` without groups), with ``w ~= q * scale - shift``; ``zeropoint=True`` returns the shift as
      uint8 codes instead (``w ~= (q - shift) * scale``). Both feed ``quantize_weight(base, qtype, axis, scale,
      shift, group_size)``.
    """

    def __call__(
        self,
        base: torch.Tensor,
        qtype: QType,
        axis: int | None = None,
        group_size: int | None = None,
        zeropoint: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if axis is None and group_size is None and not zeropoint:
            return self._optimize(base, qtype)
        if axis not in (0, -1):
            raise ValueError(f"axis must be 0 (first axis) or -1 (last axis), got {axis!r}")
        if axis == -1:
            raise ValueError(
                "axis=-1 is not supported: quanto_backend quantizes weights along axis 0 (one scale per output "
                "channel); quantize the transposed weight instead"
            )
        flat = base.reshape(base.shape[0], -1)
        size = flat.shape[1] if group_size is None else group_size
        if not isinstance(size, int) or size <= 0 or flat.shape[1] % size:
            raise ValueError(
                f"group_size must divide the {flat.shape[1]} inputs per output channel, got {group_size!r}"
            )
        scale, shift = self._optimize(flat.unflatten(1, (-1, size)), qtype)
        shape = (-1, 1) if group_size is not None else (base.shape[0], *([1] * (base.ndim - 1)))
        if zeropoint:
            codes = shift.round().clamp(qtype.qmin, qtype.qmax).to(torch.uint8)
            return scale.to(base.dtype).reshape(shape), codes.reshape(shape)
        return scale.to(base.dtype).reshape(shape), (shift * scale).to(base.dtype).reshape(shape)

    def optimize(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` of ``groups`` ``[..., n_groups, group_size]``, each ``[..., n_groups]`` float32."""
        raise NotImplementedError

    def _optimize(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        """This library's ``(scale, shift)`` of ``groups``, from an ``optimize`` of either form."""
        if not _takes_axis(type(self).optimize):
            return self.optimize(groups, qtype)
        rows = groups.reshape(-1, groups.shape[-1])  # optimum-quanto's grouping: [n_groups_total, group_size]
        scale, shift = self.optimize(rows, qtype, 0)
        if scale.numel() != rows.shape[0] or shift.numel() != rows.shape[0]:
            raise ValueError(
                f"{type(self).__name__}.optimize(base, qtype, axis) must return a scale and a shift per group "
                f"({rows.shape[0]}), got shapes {tuple(scale.shape)} and {tuple(shift.shape)}"
            )
        scale = scale.float().reshape(groups.shape[:-1])
        shift = shift.float().reshape(groups.shape[:-1])
        return scale, shift / scale  # optimum-quanto's shift is in the weight's units, this library's in codes


class MinMaxOptimizer(AffineOptimizer):
    """Maps each group's ``[min, max]`` onto the code range ``[0, qmax]``."""

    def optimize(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
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

    Each group keeps the best parameters it has seen. The refinement stops early once a step lowers the mean
    squared error by less than ``tolerance`` (relative): on the weights of all-MiniLM-L6-v2 (int4, groups of 128)
    the default takes about 10 steps instead of 20 for an error within 0.2% of theirs. Each step costs about 20
    passes over the weight, which matters on CPU, where quantize-on-load runs this on every weight.

    Args:
        iterations: at most this many refinement steps (each one quantizes the weight once).
        lp_norm: the ``p`` of the sparsity-promoting error norm.
        beta, kappa: the penalty weight of the half-quadratic split and its growth per step.
        tolerance: stop when a step improves the mean squared error by less than this fraction (0: only once a
            step improves nothing).
        iters: optimum-quanto's name for ``iterations`` (give one or the other).
        verbose: print the mean squared error before the refinement and after each step.
    """

    def __init__(
        self,
        iterations: int | None = None,
        lp_norm: float = 0.7,
        beta: float = 10.0,
        kappa: float = 1.01,
        tolerance: float = 2e-3,
        iters: int | None = None,
        verbose: bool = False,
    ):
        if iterations is not None and iters is not None and iterations != iters:
            raise ValueError(f"Give iterations or iters, not both (got {iterations!r} and {iters!r})")
        iterations = next((n for n in (iterations, iters) if n is not None), 20)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        self.iterations = iterations
        self.verbose = verbose
        self.lp_norm = lp_norm
        self.beta = beta
        self.kappa = kappa
        self.tolerance = tolerance

    @property
    def iters(self) -> int:
        """optimum-quanto's name for :attr:`iterations`."""
        return self.iterations

    def optimize(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        w = groups.float()
        scale, shift = MinMaxOptimizer().optimize(w, qtype)
        codes, residual, error = self._quantize(w, scale, shift, qtype)
        best_scale, best_shift, best_error = scale, shift, error
        mean_error = best_error.mean().item()
        if self.verbose:
            print(f"HQQ start error: {mean_error:.6g}")
        beta = self.beta
        for step in range(self.iterations):
            scale, shift = self._fit(codes, self._target(w, residual, beta), scale)
            beta *= self.kappa
            codes, residual, error = self._quantize(w, scale, shift, qtype)
            improved = error < best_error
            best_scale = torch.where(improved, scale, best_scale)
            best_shift = torch.where(improved, shift, best_shift)
            best_error = torch.minimum(error, best_error)
            previous, mean_error = mean_error, best_error.mean().item()
            if self.verbose:
                print(f"HQQ error at step {step}: {mean_error:.6g}")
            if previous - mean_error <= self.tolerance * previous:
                break
        return best_scale, best_shift

    @staticmethod
    def _quantize(w, scale, shift, qtype):
        """The codes of ``w`` under ``(scale, shift)``, the reconstruction error ``w - dequantized`` and its
        per-group mean square."""
        scale, shift = scale.unsqueeze(-1), shift.unsqueeze(-1)
        codes = (w / scale).add_(shift).round_().clamp_(qtype.qmin, qtype.qmax)
        residual = torch.sub(codes, shift).mul_(scale).neg_().add_(w)
        return codes, residual, torch.linalg.vecdot(residual, residual) / w.shape[-1]

    def _target(self, w: torch.Tensor, residual: torch.Tensor, beta: float) -> torch.Tensor:
        """``w`` minus the lp-shrunk residual ``sign(r) * relu(|r| - |r| ** (p - 1) / beta)``.

        The shrunk value is 0 wherever ``|r| <= beta ** (-1 / (2 - p))`` (about 0.17 for the defaults), which holds
        for every residual of a typical weight; the costly power is computed only where it does not.
        """
        magnitude = residual.abs()
        large = magnitude > beta ** (-1 / (2 - self.lp_norm))
        if not large.any():
            return w
        m = magnitude[large]
        shrunk = torch.zeros_like(residual)
        shrunk[large] = torch.copysign(m - m.pow(self.lp_norm - 1) / beta, residual[large])
        return w - shrunk

    @staticmethod
    def _fit(codes, target, scale):
        """Least-squares ``target ~= a * codes + b`` per group; groups whose codes are all equal keep the old
        scale and only move the shift."""
        codes_mean = codes.mean(dim=-1, keepdim=True)
        centered = codes - codes_mean
        var = torch.linalg.vecdot(centered, centered)
        cov = torch.linalg.vecdot(centered, target)  # the centered codes sum to 0: no need to center the target
        a = torch.where(var > 0, cov / var.clamp_min(1e-12), scale)
        a = torch.where(a > 0, a, scale)
        b = target.mean(dim=-1) - a * codes_mean.squeeze(-1)
        return a, -b / a


class MseOptimizer(AffineOptimizer):
    """Clip search: per group, the shrink of the ``[min, max]`` range (among ``shrink``) whose quantization has the
    least squared error, then one least-squares refit of scale and shift to the chosen codes.

    At 4 bits (all-MiniLM-L6-v2, groups of 128) its reconstruction error is within 1% of :class:`HqqOptimizer`'s
    (relative error 0.1003 against HQQ's 0.0993 and min-max's 0.1065; seven factors from 1.0 to 0.7 give 0.0997
    for twice the search), for a fifteenth to a thirtieth of HQQ's time and 7 to 10 times min-max's (one thread,
    1024 x 2816 and 12000 x 1024 weights). At 2 bits HQQ's iterated refit of the scale is worth its cost.

    Why it is cheap: shrinking ``[min, max]`` by ``f`` about 0 multiplies the step by ``f`` and keeps the shift, so
    every candidate's codes are an affine map of the same normalized weight ``u = (w - min) / step``, and each
    candidate costs five elementwise passes; the weight goes through in blocks of groups small enough for the
    passes to stay in cache. The refit needs no error check: the least-squares fit to fixed codes does not raise
    the error, and re-rounding under the fitted scale and shift picks each weight's nearest code.

    Args:
        shrink: the fractions of the min-max range tried (min-max itself, 1.0, is always a candidate, so the search
            never does worse than min-max).
        refit: finish with the least-squares refit.
    """

    # Elements per block (three float32 work buffers of 4 MiB): large enough that each elementwise op is one
    # parallel region worth its start-up (about 40 ops per block; with smaller blocks, a 2-thread load on a busy
    # machine spent most of its time waiting at the regions' barriers), small next to one float layer.
    block_elements = 1 << 20

    def __init__(self, shrink: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7), refit: bool = True):
        if not shrink or any(not 0.0 < f <= 1.0 for f in shrink):
            raise ValueError(f"shrink factors must be in (0, 1], got {shrink!r}")
        self.shrink = tuple(shrink)
        self.refit = refit

    def optimize(self, groups: torch.Tensor, qtype: QType) -> tuple[torch.Tensor, torch.Tensor]:
        size = groups.shape[-1]
        flat = groups.detach().reshape(-1, size)  # scales are chosen, not trained
        scale = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
        shift = torch.empty_like(scale)
        rows = max(1, min(flat.shape[0], self.block_elements // size))
        buffers = [torch.empty(rows, size, dtype=torch.float32, device=flat.device) for _ in range(3)]
        for start in range(0, flat.shape[0], rows):
            stop = min(start + rows, flat.shape[0])
            self._optimize_block(
                flat[start:stop].float(),
                qtype,
                scale[start:stop],
                shift[start:stop],
                *(b[: stop - start] for b in buffers),
            )
        return scale.reshape(groups.shape[:-1]), shift.reshape(groups.shape[:-1])

    def _optimize_block(self, w, qtype, scale_out, shift_out, u, t, c) -> None:
        """Write the block ``w``'s scales and shifts into ``scale_out`` and ``shift_out``; ``u``, ``t``, ``c``
        are work buffers of ``w``'s shape."""
        qmin, qmax = qtype.qmin, qtype.qmax
        scale, shift = MinMaxOptimizer().optimize(w, qtype)
        # u = w / scale + shift: the min-max codes before rounding, in [qmin, qmax]. (A multiply then an add:
        # addcmul is several times slower on CPU.)
        torch.mul(w, scale.reciprocal().unsqueeze(-1), out=u).add_(shift.unsqueeze(-1))
        factor = torch.ones_like(scale)
        error = self._error(u, qmin, qmax, c)  # in units of the min-max step, squared
        for f in self.shrink:
            if f == 1.0:
                continue
            # Step f * scale, same shift: codes u / f + shift * (1 - 1 / f).
            torch.add((shift * (1 - 1 / f)).unsqueeze(-1), u, alpha=1 / f, out=t)
            candidate = self._error(t, qmin, qmax, c).mul_(f * f)
            factor.masked_fill_(candidate < error, f)  # in place: no tensor made of the Python float
            torch.minimum(candidate, error, out=error)
        if not self.refit:
            scale_out.copy_(scale * factor)
            shift_out.copy_(shift)
            return
        torch.mul(u, factor.reciprocal().unsqueeze(-1), out=t).add_((shift * (1 - 1 / factor)).unsqueeze(-1))
        codes = torch.clamp(t, qmin, qmax, out=c).round_()
        # Least squares u ~= alpha * codes + beta per group, from sums (codes and u are both within [qmin, qmax],
        # so the sums lose nothing to cancellation); a group of equal codes keeps its step and only refits beta.
        n = u.shape[-1]
        codes_sum, u_sum = codes.sum(dim=-1), u.sum(dim=-1)
        codes_sq = torch.linalg.vector_norm(codes, dim=-1).square_()
        cross = torch.mul(codes, u, out=t).sum(dim=-1)
        var = n * codes_sq - codes_sum * codes_sum
        alpha = torch.where(var > 0, (n * cross - codes_sum * u_sum) / var.clamp_min(1e-12), factor)
        alpha = torch.where(alpha > 0, alpha, factor)
        beta = (u_sum - alpha * codes_sum) / n
        # w = scale * (u - shift) = scale * alpha * (codes - (shift - beta) / alpha)
        scale_out.copy_(scale * alpha)
        shift_out.copy_((shift - beta) / alpha)

    @staticmethod
    def _error(t: torch.Tensor, qmin: int, qmax: int, out: torch.Tensor) -> torch.Tensor:
        """Per-group sum of squared distances of ``t`` to its nearest code in ``[qmin, qmax]``."""
        torch.clamp(t, qmin, qmax, out=out).round_().sub_(t)
        return torch.linalg.vector_norm(out, dim=-1).square_()


def default_affine_optimizer(qtype: QType) -> AffineOptimizer:
    """The optimizer of 2/4-bit weights when none is given: the cheap clip search at 4 bits, HQQ at 2 bits (where
    its iterated refit of the scale is worth several times the cost)."""
    return HqqOptimizer() if qtype.bits <= 2 else MseOptimizer()


_OPTIMIZERS = {"absmax": AbsmaxOptimizer, "minmax": MinMaxOptimizer, "hqq": HqqOptimizer, "mse": MseOptimizer}


def as_optimizer(value) -> SymmetricOptimizer | AffineOptimizer | None:
    """Turn ``None``, a name (``"absmax"``, ``"minmax"``, ``"mse"``, ``"hqq"``) or an optimizer instance into an
    optimizer."""
    if value is None or isinstance(value, (SymmetricOptimizer, AffineOptimizer)):
        return value
    if isinstance(value, str) and value.lower() in _OPTIMIZERS:
        return _OPTIMIZERS[value.lower()]()
    raise ValueError(f"Unsupported optimizer {value!r}; accepted: {', '.join(_OPTIMIZERS)} or an optimizer instance")
