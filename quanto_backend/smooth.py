"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights of the Linears a normalization
feeds, so that 8-bit activations lose less.

For a Linear with input ``x`` and weight ``W``, ``x @ W.T == (x / s) @ (W * s).T`` for any per-input-channel
``s``. Choosing ``s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha)`` flattens the outlier channels of ``x``
(hard to quantize per tensor) into ``W`` (easy to quantize per output channel). The division by ``s`` is free
where it folds into the normalization producing ``x`` (its weight and bias are divided by ``s``): that needs the
normalization's output to feed only those Linears, as in pre-norm blocks (Llama: ``input_layernorm`` ->
``q/k/v_proj``, ``post_attention_layernorm`` -> ``gate/up_proj``; OPT: ``self_attn_layer_norm`` -> ``q/k/v_proj``,
``final_layer_norm`` -> ``fc1``). In post-norm blocks (BERT) the normalization's output is also the residual, so
folding would change the model: there a quantized Linear keeps ``s`` as its ``input_smooth`` buffer and divides
its input by it before quantizing (one elementwise operation, exact).

Typical use::

    quantize(model, weights=qint8, activations=qint8)
    smooth_quant(model, samples, alpha=0.5)
    with torch.no_grad(), Calibration():
        for sample in samples:
            model(**sample)
    freeze(model)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .nn import QModuleMixin
from .observers import MinMaxObserver
from .quantize import _as_patterns
from .tensor import QTensor

__all__ = ["smooth_quant"]

# Functions that read a tensor's metadata, not its values: they do not make the tensor's consumer a real one.
_METADATA_FUNCTIONS = {
    "__get__",
    "size",
    "dim",
    "numel",
    "nelement",
    "__len__",
    "is_floating_point",
    "is_contiguous",
    "get_device",
    "ndimension",
    "element_size",
    "data_ptr",
}


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and their look-alikes (``LlamaRMSNorm``, ``T5LayerNorm``, ...) with a per-channel
    weight; whether dividing that weight divides the output is checked numerically before it is relied on."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return isinstance(module.weight, torch.Tensor)
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return name.endswith(("RMSNorm", "LayerNorm")) and isinstance(weight, nn.Parameter) and weight.ndim == 1


class _Tracer(TorchFunctionMode):
    """Records, over calibration samples, each Linear's per-channel input range, which normalization produced
    each Linear's input, and which normalization outputs are also consumed by something other than a Linear."""

    def __init__(self, linears: dict[str, nn.Linear], others: list[nn.Module], norms: dict[str, nn.Module]):
        super().__init__()
        self.linears, self.others, self.norms = linears, others, norms
        self.stats = {name: MinMaxObserver(axis=-1) for name in linears}
        self.feeder: dict[str, str | None] = {}  # Linear -> the norm feeding it (None: not a norm, or several)
        self.shared: set[str] = set()  # norms whose output has a consumer other than a Linear
        self.norm_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # first (input, output) of each norm
        self._outputs: dict[int, tuple[torch.Tensor, str]] = {}  # id(norm output) -> (it, norm name)
        self._depth = 0  # > 0 while a Linear runs: its internal ops are not consumers
        self._handles: list = []

    def _norm_of(self, x: Any) -> str | None:
        entry = self._outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is x else None

    def __enter__(self):
        for name, linear in self.linears.items():
            self._handles.append(linear.register_forward_pre_hook(self._linear_pre_hook(name)))
        for module in self.others:
            self._handles.append(module.register_forward_pre_hook(self._enter_linear))
        for module in [*self.linears.values(), *self.others]:
            self._handles.append(module.register_forward_hook(self._leave_linear))
        for name, norm in self.norms.items():
            self._handles.append(norm.register_forward_hook(self._norm_hook(name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()
        return super().__exit__(*exc)

    def _enter_linear(self, module, args):
        self._depth += 1
        for arg in args:
            norm = self._norm_of(arg)
            if norm is not None:
                self.shared.add(norm)  # a Linear that is not smoothed reads this norm's output

    def _leave_linear(self, module, args, output):
        self._depth -= 1

    def _linear_pre_hook(self, name: str):
        def hook(module, args):
            self._depth += 1
            x = args[0].dequantize() if isinstance(args[0], QTensor) else args[0]
            self.stats[name](module.smooth_input(x) if isinstance(module, QModuleMixin) else x)
            norm = self._norm_of(args[0])
            previous = self.feeder.get(name, norm)
            self.feeder[name] = norm if previous == norm else None

        return hook

    def _norm_hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                # Copied before the output is registered: the copy must not count as a consumer.
                if name not in self.norm_io and args:
                    self.norm_io[name] = (args[0].detach().clone(), output.detach().clone())
                self._outputs[id(output)] = (output, name)

        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._depth == 0 and getattr(func, "__name__", "") not in _METADATA_FUNCTIONS:
            for arg in tree_flatten((args, kwargs))[0]:
                norm = self._norm_of(arg)
                if norm is not None:
                    self.shared.add(norm)
        return func(*args, **kwargs)

    def end_sample(self) -> None:
        self._outputs.clear()  # ids of freed tensors may be reused by the next sample


@contextmanager
def _float_activations(model: nn.Module) -> Iterator[None]:
    """Run quantized modules with float activations: statistics must describe the float model."""
    saved = [(m, m.activation_qtype) for m in model.modules() if isinstance(m, QModuleMixin)]
    try:
        for module, _ in saved:
            module.activation_qtype, module._calibrating = None, True
        yield
    finally:
        for module, qtype in saved:
            module.activation_qtype, module._calibrating = qtype, False


def _run(model: nn.Module, sample: Any) -> None:
    if isinstance(sample, Mapping):
        model(**sample)
    elif isinstance(sample, (tuple, list)):
        model(*sample)
    else:
        model(sample)


def _factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_absmax.clamp_min(1e-5).pow(alpha) / weight_absmax.clamp_min(1e-5).pow(1 - alpha)
    # A channel never active (or never weighted) keeps its scale: there is nothing to migrate.
    return torch.where((act_absmax > 0) & (weight_absmax > 0), s, torch.ones_like(s))


def _weight_absmax(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().float().abs().amax(dim=0)


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor, io: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Divide ``norm``'s output by ``s`` through its parameters and multiply the Linears' weights by ``s``;
    undo and return False if the norm's output did not follow (e.g. a ``(1 + weight)`` RMSNorm)."""
    weight, bias = norm.weight, getattr(norm, "bias", None)
    saved = weight.detach().clone(), None if bias is None else bias.detach().clone()
    weight.div_(s.to(weight.dtype))
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    x, expected = io
    with _float_activations(norm):
        got = norm(x).float() * s
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(got, expected.float(), rtol=tolerance, atol=tolerance * expected.abs().max().item()):
        weight.copy_(saved[0])
        if isinstance(bias, torch.Tensor):
            bias.copy_(saved[1])
        return False
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype))
    return True


@torch.no_grad()
def _smooth_at_runtime(linear: QModuleMixin, s: torch.Tensor) -> None:
    linear.weight.mul_(s.to(linear.weight.dtype))
    linear.register_buffer("input_smooth", s.to(linear.weight.device, torch.float32))


@torch.no_grad()
def smooth_quant(
    model: nn.Module,
    samples: Iterable[Any],
    alpha: float = 0.5,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> dict[str, str]:
    """Migrate the activation outliers of the Linears fed by a LayerNorm/RMSNorm into their weights (in place).

    The model computes the same function afterwards (up to rounding); only its quantization gets easier. Run it
    after :func:`~quanto_backend.quantize` and before calibration and :func:`~quanto_backend.freeze` (on a float
    model, only the foldable normalizations can be smoothed: the others are skipped with a warning).

    Args:
        model: a float or quantized (not frozen) model.
        samples: calibration inputs: each is passed as ``model(**sample)`` (a mapping), ``model(*sample)`` (a
            tuple or list) or ``model(sample)``.
        alpha: migration strength in ``[0, 1]``: 0 leaves the activations alone, 1 moves all of their range
            into the weights; 0.5 suits most models.
        include: fnmatch patterns of Linear names to smooth (default: all fed by a normalization).
        exclude: fnmatch patterns of Linear names to leave alone.

    Returns:
        ``{linear name: how it was smoothed}``: ``"folded into <norm name>"`` or ``"input_smooth"``.

    Raises:
        ValueError: ``alpha`` out of range, no samples, or a chosen quantized Linear is already frozen.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    include, exclude = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    linears: dict[str, nn.Linear] = {}
    others: list[nn.Module] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        chosen = (not include or any(fnmatch(name, p) for p in include)) and not any(fnmatch(name, p) for p in exclude)
        if not chosen or "input_smooth" in module._buffers:
            others.append(module)
            continue
        if isinstance(module, QModuleMixin) and module.frozen:
            raise ValueError(f"Linear {name!r} is frozen: smooth_quant must run before freeze()")
        linears[name] = module
    norms = {name: m for name, m in model.named_modules() if _is_norm(m)}

    tracer = _Tracer(linears, others, norms)
    count = 0
    with _float_activations(model), tracer:
        for sample in samples:
            _run(model, sample)
            tracer.end_sample()
            count += 1
    if count == 0:
        raise ValueError("smooth_quant needs at least one calibration sample, got none")

    groups: dict[str, list[str]] = {}
    for name, norm in tracer.feeder.items():
        if norm is not None and tracer.stats[name].observed:
            groups.setdefault(norm, []).append(name)
    report: dict[str, str] = {}
    skipped: list[str] = []
    for norm_name, names in groups.items():
        members = [linears[n] for n in names]
        act = torch.stack([_absmax(tracer.stats[n]) for n in names]).amax(dim=0)
        weight = torch.stack([_weight_absmax(m) for m in members]).amax(dim=0)
        s = _factors(act, weight.to(act.device), alpha)
        io = tracer.norm_io.get(norm_name)
        norm = norms[norm_name]
        if norm_name not in tracer.shared and io is not None and _fold(norm, members, s.to(norm.weight.device), io):
            report.update({n: f"folded into {norm_name}" for n in names})
            continue
        for name, linear in zip(names, members, strict=True):
            if not isinstance(linear, QModuleMixin):
                skipped.append(name)
                continue
            s = _factors(_absmax(tracer.stats[name]), _weight_absmax(linear).to(act.device), alpha)
            _smooth_at_runtime(linear, s.to(linear.weight.device))
            report[name] = "input_smooth"
    if skipped:
        warnings.warn(
            f"smooth_quant left {len(skipped)} float Linears unsmoothed (e.g. {skipped[0]!r}): their normalization "
            "also feeds other consumers, so only a quantized Linear can hold the factors; call quantize() first",
            stacklevel=3,  # the caller of smooth_quant, past torch.no_grad's wrapper
        )
    return report


def _absmax(observer: MinMaxObserver) -> torch.Tensor:
    min_val, max_val = observer.bounds()
    return torch.maximum(-min_val, max_val)
