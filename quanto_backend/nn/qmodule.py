"""QModuleMixin: what every quantized module shares, and the registry mapping a torch module class to its
quantized class (adding a quantized module is one file with ``@register_qmodule``).

State of a quantized module (all plain tensors, see the README's "On-disk format"):

* ``weight``: the float weight until :meth:`QModuleMixin.freeze`, then the quantized storage (int8, float8,
  or 2/4-bit codes packed into uint8); ``weight_scale`` and, for 2/4-bit, ``weight_shift`` appear with it.
* ``input_scale`` and ``output_scale``: 0-dim float32 static activation scales, on every module with static
  activations (also where they are unused: a normalization's input, an output that is not quantized); none with
  ``activation_scales="dynamic"`` (one scale per token, computed on the fly).
* ``input_zero_point`` and ``output_zero_point``: 0-dim int32, with the asymmetric ``quint8`` activations; and
  ``input_zero_point`` alone on a ``qint8`` module whose calibrated input was mostly one-sided (int8 codes
  ``clamp(round(x / input_scale) + input_zero_point, -128, 127)``, see :class:`~quanto_backend.Calibration`).
* ``output_quantized``: 0-dim bool, with static activations: whether the output is quantized (cleared by
  :meth:`QModuleMixin.disable_output_quantization`, e.g. by ``Calibration(streamline=True)``), so that a save
  and reload keeps the choice. Format 1 checkpoints said the same by leaving ``output_scale`` out: see
  :meth:`QModuleMixin.upgrade_state_dict`.
* ``input_smooth``: ``[in_features]`` float32 SmoothQuant factors the input is divided by (the weight was
  multiplied by them), where :func:`~quanto_backend.smooth_quant` could not fold them into a normalization.
* ``bias``: never quantized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import aligned
from ..qtypes import QType, as_qtype, qint8, quint8
from ..tensor import (
    ACTIVATION_QTYPES,
    WEIGHT_QTYPES,
    GroupedQWeight,
    PerAxisAffineQWeight,
    PerAxisQWeight,
    QActivation,
    as_optimizer,
    group_layout,
    quantize_activation,
    quantize_weight,
)

__all__ = [
    "ACTIVATION_SCALES",
    "LEGACY_ACTIVATION_BUFFERS",
    "OUTPUT_QUANTIZED",
    "QModuleMixin",
    "initial_buffer",
    "qmodule_class",
    "quantize_module",
    "register_qmodule",
]

# "static": per-tensor scales (and zero-points) fixed by calibration; "dynamic": symmetric per-token scales
# computed on the fly, which need no calibration.
ACTIVATION_SCALES = ("static", "dynamic")

# The buffer recording whether a module's output is quantized (format 2; format 1 removed ``output_scale``).
OUTPUT_QUANTIZED = "output_quantized"
# The activation tensors that a format 1 checkpoint could lack, and :meth:`QModuleMixin.upgrade_state_dict` adds.
LEGACY_ACTIVATION_BUFFERS = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")


def initial_buffer(name: str, like: torch.Tensor, device: torch.device, module: nn.Module) -> torch.Tensor:
    """The value a quantization buffer starts from, on ``device``: scales (and SmoothQuant factors) 1,
    zero-points 0, ``output_quantized`` what the module was built with (``True`` unless told otherwise)."""
    if name == OUTPUT_QUANTIZED:
        return torch.tensor(module.__dict__.get("_output_quantized", True), device=device)
    fill = torch.ones_like if like.is_floating_point() else torch.zeros_like
    return fill(like, device=device)


_QMODULE_CLASSES: dict[type[nn.Module], type[QModuleMixin]] = {}
# The keywords of init_quantization that a quantized module's constructor passes on to it.
_QCONFIG_OPTIONS = ("group_size", "quantize_output", "activation_scales", "input_smooth", "input_zero_point")


def register_qmodule(module_cls: type[nn.Module]):
    """Class decorator: declare the decorated class the quantized version of ``module_cls``."""

    def decorator(qmodule_cls: type[QModuleMixin]) -> type[QModuleMixin]:
        _QMODULE_CLASSES[module_cls] = qmodule_cls
        return qmodule_cls

    return decorator


def qmodule_class(module: nn.Module) -> type[QModuleMixin] | None:
    """The quantized class for ``module`` (exact class first, then the nearest registered base class)."""
    if isinstance(module, QModuleMixin):
        return None
    for cls in type(module).__mro__:
        if cls in _QMODULE_CLASSES:
            return _QMODULE_CLASSES[cls]
    return None


def quantize_module(
    module: nn.Module,
    weights: QType | str | None = None,
    activations: QType | str | None = None,
    optimizer=None,
    **qconfig: Any,
) -> QModuleMixin | None:
    """The quantized replacement of ``module`` (sharing its tensors), or ``None`` if it has no quantized class.

    Takes the options of :func:`~quanto_backend.quantize` (``group_size``, ``activation_scales``...) as keywords.
    """
    qcls = qmodule_class(module)
    if qcls is None:
        return None
    return qcls.from_module(module, weights=weights, activations=activations, optimizer=optimizer, **qconfig)


class QModuleMixin:
    """Mixed into a torch module class to make its quantized version.

    A subclass implements ``qcreate`` (build an empty module of the same geometry on ``meta``) and
    ``qforward`` (the computation from a possibly quantized input); weights are quantized on the fly until
    :meth:`freeze`.
    """

    weight_qtype: QType | None
    activation_qtype: QType | None
    # Whether the module quantizes its input with a static ``input_scale`` (a normalization does not).
    quantizes_input = True

    def __init__(
        self,
        *args: Any,
        weights: QType | str | None = None,
        activations: QType | str | None = None,
        optimizer=None,
        quantize_input: bool = True,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> None:
        """Build the torch module from ``*args`` and its own keywords (``bias``, ``dtype``...), then set up its
        quantization: ``QLinear(in_features, out_features, bias=True, device=None, dtype=None, weights=None,
        activations=None, optimizer=None, quantize_input=True)`` (optimum-quanto's constructor), and the same shape
        for every quantized module. Other quantization options (``group_size``, ``quantize_output``,
        ``activation_scales``, ``input_smooth``) are keywords too. ``quantize_input=False`` leaves the input float.
        """
        qconfig = {k: kwargs.pop(k) for k in _QCONFIG_OPTIONS if k in kwargs}
        super().__init__(*args, device=device, **kwargs)
        if not quantize_input:
            self.quantizes_input = False
        self.init_quantization(weights, activations, optimizer, device=device, **qconfig)

    def init_quantization(
        self,
        weights: QType | str | None = None,
        activations: QType | str | None = None,
        optimizer=None,
        group_size: int | None = None,
        quantize_output: bool = True,
        device: torch.device | str | None = None,
        activation_scales: str = "static",
        input_smooth: bool = False,
        input_zero_point: bool = False,
    ) -> None:
        self.weight_qtype = None if weights is None else as_qtype(weights, WEIGHT_QTYPES, "weights")
        self.activation_qtype = None if activations is None else as_qtype(activations, ACTIVATION_QTYPES, "activations")
        if activation_scales not in ACTIVATION_SCALES:
            raise ValueError(f"Unsupported activation_scales {activation_scales!r}; accepted: static, dynamic")
        if activation_scales == "dynamic" and (self.activation_qtype is None or self.activation_qtype == quint8):
            raise ValueError(
                f"activation_scales='dynamic' needs symmetric activations (int8 or float8), got {activations!r}"
            )
        self.activation_scales = activation_scales
        self.optimizer = as_optimizer(optimizer)
        self.group_size = group_size
        if self.weight_qtype is not None and self.weight_qtype.is_packed:
            group_layout(self.weight_shape[1:].numel(), group_size)  # validates group_size early
        elif self.weight_qtype is not None and group_size is not None:
            # 8-bit weights have one scale per output channel: a group size would be silently meaningless
            # (QuantoConfig refuses it with the same message).
            raise ValueError(
                f"group_size={group_size!r} applies only to int4/int2 weights, not {self.weight_qtype.name}; "
                "leave it None for 8-bit weights"
            )
        if self.activation_qtype is not None and activation_scales == "static":
            # Both scales exist on every module, used or not (a normalization's input, an output left float), as in
            # optimum-quanto: the state has one shape whatever calibration decided, and calibration records both.
            for side in ("input", "output"):
                self.register_buffer(f"{side}_scale", torch.ones((), device=device))
                if self.activation_qtype == quint8:
                    self.register_buffer(f"{side}_zero_point", torch.zeros((), dtype=torch.int32, device=device))
            self.register_buffer(OUTPUT_QUANTIZED, torch.tensor(bool(quantize_output), device=device))
            self._output_quantized = bool(quantize_output)  # the buffer's value, known without reading it
        if input_smooth:
            self.register_buffer("input_smooth", torch.ones(self.weight_shape[1], device=device))
        if input_zero_point and self.activation_qtype != quint8:  # quint8 always has one
            self._check_input_zero_point()
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        self._calibrating = False

    @classmethod
    def qcreate(cls, module: nn.Module, **qconfig) -> QModuleMixin:
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module, **qconfig) -> QModuleMixin:
        """The quantized version of ``module``: built on ``meta``, then given ``module``'s own tensors (no copy)."""
        device = next(iter(module.parameters()), torch.empty(0)).device
        with torch.device("meta"):
            qmodule = cls.qcreate(module, **qconfig, device=device)
        for name, buffer in qmodule._buffers.items():  # scales start at 1, zero-points at 0, on the device
            if buffer is not None and buffer.device.type == "meta" and device.type != "meta":
                qmodule._buffers[name] = initial_buffer(name, buffer, device, qmodule)
        for name, param in module.named_parameters(recurse=False):
            setattr(qmodule, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(qmodule, name, buffer)
        qmodule.train(module.training)
        return qmodule

    # ---- weights -------------------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> torch.Size:
        """The float weight's shape, also once it is replaced by quantized storage."""
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype the module computes in: its scale's once frozen (the storage is int8/float8/uint8).

        peft reads it (as for bitsandbytes layers) to give LoRA adapters a float dtype, not the storage's.
        """
        return self.weight_scale.dtype if self.frozen else self.weight.dtype

    @property
    def frozen(self) -> bool:
        return "weight_scale" in self._parameters

    @property
    def quantizes_output(self) -> bool:
        """Whether the output is quantized (with ``output_scale``): the ``output_quantized`` buffer's value."""
        # A Python copy of the buffer, read when a state is loaded (read_output_quantized), not on every call: a
        # read of a GPU tensor waits for the device, and torch.compile would break its graph on it.
        return OUTPUT_QUANTIZED in self._buffers and self.__dict__.get("_output_quantized", True)

    def disable_output_quantization(self) -> None:
        """Leave the output float from now on (optimum-quanto's method name). ``output_scale`` stays; the
        ``output_quantized`` buffer records the choice, so a save and reload keep it."""
        self._set_output_quantized(False)

    def enable_output_quantization(self) -> None:
        """Quantize the output again, with ``output_scale`` (static activations only)."""
        if OUTPUT_QUANTIZED not in self._buffers:
            raise ValueError(
                f"{type(self).__name__} has no static output scale to quantize its output with (activations="
                f"{self.activation_qtype}, activation_scales={getattr(self, 'activation_scales', None)!r})"
            )
        self._set_output_quantized(True)

    def _set_output_quantized(self, value: bool) -> None:
        flag = self._buffers.get(OUTPUT_QUANTIZED)
        if flag is not None:
            if flag.device.type != "meta":
                flag.fill_(value)
            self._output_quantized = value

    def read_output_quantized(self) -> None:
        """Take :attr:`quantizes_output` from the ``output_quantized`` buffer, after a loader wrote it (done by
        ``load_state_dict`` and by the transformers / diffusers loaders)."""
        flag = self._buffers.get(OUTPUT_QUANTIZED)
        if flag is not None and flag.device.type != "meta":
            self._output_quantized = bool(flag.item())

    def upgrade_state_dict(self, state_dict: dict, prefix: str, missing_ok: bool = True) -> bool:
        """Bring, in place, this module's tensors of a format 1 ``state_dict`` to the current format.

        Format 1 had no ``output_quantized``: a module whose output was not quantized had no ``output_scale``
        (its ``output_zero_point`` could remain), and a QLayerNorm had no ``input_scale``. The missing tensors are
        added with their initial values, and ``output_quantized`` says whether ``output_scale`` was there.

        Args:
            state_dict: a mutable state dict (of this module, or of a model, with ``prefix``).
            prefix: this module's key prefix (``"layers.0."``).
            missing_ok: upgrade even if the state holds none of this module's quantization tensors (a streamlined
                format 1 int8 QLayerNorm holds none): for callers that know the state is this module's, as
                :func:`~quanto_backend.requantize` does from its quantization map. Otherwise (``load_state_dict``)
                a state without any of them, a float state dict for one, is left alone and fails on the missing
                scales.

        Returns:
            Whether the state was a format 1 one and was upgraded.
        """
        if OUTPUT_QUANTIZED not in self._buffers or prefix + OUTPUT_QUANTIZED in state_dict:
            return False
        names = [n for n in LEGACY_ACTIVATION_BUFFERS if n in self._buffers]
        if not missing_ok and not any(prefix + n in state_dict for n in (*names, "weight_scale")):
            return False
        state_dict[prefix + OUTPUT_QUANTIZED] = torch.tensor(prefix + "output_scale" in state_dict)
        for name in names:
            if prefix + name not in state_dict:
                state_dict[prefix + name] = initial_buffer(name, self._buffers[name], torch.device("cpu"), self)
        return True

    @property
    def qweight(self) -> PerAxisQWeight | PerAxisAffineQWeight | GroupedQWeight | None:
        """The quantized weight as a QTensor: built from the frozen storage, or quantized now from the float
        weight (gradients do not flow through it; see :meth:`forward` for training)."""
        if self.weight_qtype is None:
            return None
        if not self.frozen:
            return quantize_weight(self.weight.detach(), self.weight_qtype, self.group_size, self.optimizer)
        shape, dtype = self.weight_shape, self.weight_scale.dtype
        if self.weight_qtype.is_packed:
            padded_in = self.weight.shape[1] * 8 // self.weight_qtype.bits
            group_size = padded_in // self.weight_scale.shape[1]
            return GroupedQWeight(
                self.weight, self.weight_scale, self.weight_shift, self.weight_qtype, group_size, shape, dtype
            )
        if self.weight_qtype == quint8:
            qtype = self.weight_qtype
            return PerAxisAffineQWeight(self.weight, self.weight_scale, self.weight_shift, qtype, shape, dtype)
        return PerAxisQWeight(self.weight, self.weight_scale, self.weight_qtype, 0, shape, dtype)

    def freeze(self) -> None:
        """Replace the float weight by its quantized storage (on ``meta``: empty storage of the right shapes)."""
        if self.weight_qtype is not None and not self.frozen:
            self.set_quantized_weight(self.weight.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A frozen state dict (quantized ``weight``, ``weight_scale``...) loaded into a module that still holds its
        # float weight: freeze first, so that the storage has the shapes and dtypes of the checkpoint's tensors.
        if self.weight_qtype is not None and not self.frozen and prefix + "weight_scale" in state_dict:
            if self.weight.device.type == "meta":
                with torch.device("meta"):
                    self.freeze()
            else:
                self.freeze()
        self.upgrade_state_dict(state_dict, prefix, missing_ok=False)  # a format 1 state dict
        zero_point = state_dict.get(prefix + "input_zero_point")
        if zero_point is not None and "input_zero_point" not in self._buffers and self.activation_qtype == qint8:
            # Calibration gave the saved module's int8 input a zero-point: the buffer it loads into.
            self.set_input_zero_point(torch.zeros((), dtype=torch.int32, device=self.input_scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.read_output_quantized()
        self.align_storage()  # with assign=True the module now holds the checkpoint's own tensors

    def set_quantized_weight(self, weight: torch.Tensor) -> None:
        """Quantize the float ``weight`` (on its own device) into this module's storage, which it replaces.

        This is the per-parameter step of quantize-on-load: the module ends frozen.
        """
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(
                f"Weight of shape {tuple(weight.shape)} given to a module of weight shape {tuple(self.weight_shape)}"
            )
        qweight = quantize_weight(weight, self.weight_qtype, self.group_size, self.optimizer)
        for name in ("weight", "weight_scale", "weight_shift"):
            self._parameters.pop(name, None)
        self.weight = nn.Parameter(qweight.qdata, requires_grad=False)
        self.weight_scale = nn.Parameter(qweight.scale, requires_grad=False)
        if isinstance(qweight, (GroupedQWeight, PerAxisAffineQWeight)):
            self.weight_shift = nn.Parameter(qweight.shift, requires_grad=False)

    def align_storage(self) -> None:
        """Make the frozen storage contiguous and aligned as the CPU kernels' contracts require, copying only what
        is not (a checkpoint's tensors are views into one buffer, 4- or 8-byte aligned): done once, at load, so
        that no call falls back to the reference for it."""
        if not self.frozen:
            return
        for name in ("weight", "weight_scale", "weight_shift"):
            param = self._parameters.get(name)
            if param is None:
                continue
            storage = aligned(param.detach())
            if storage.data_ptr() != param.data_ptr():
                self._parameters[name] = nn.Parameter(storage, requires_grad=False)

    def _train_weight(self) -> torch.Tensor:
        """The float weight, fake-quantized with a straight-through gradient (quantization-aware training)."""
        weight = self.weight
        if self.weight_qtype is None:
            return weight
        return weight + (self.qweight.dequantize() - weight).detach()

    def _trains(self) -> bool:
        return not self.frozen and torch.is_grad_enabled() and self.weight.requires_grad

    # ---- activations ---------------------------------------------------------------------------------------
    @property
    def awaits_calibration(self) -> bool:
        """Whether this module's static activation scales are placeholders (a quantize-on-load that no
        :class:`~quanto_backend.Calibration` has followed yet): until they are calibrated the input is quantized
        with dynamic per-token scales and the output is left float, rather than with scales of 1."""
        return self.__dict__.get("_awaiting_calibration", False)

    def mark_awaiting_calibration(self, awaiting: bool = True) -> None:
        """Flag (or clear) the static activation scales as placeholders; see :attr:`awaits_calibration`."""
        static = self.activation_qtype is not None and self.activation_scales == "static"
        self._awaiting_calibration = awaiting and static

    def _check_input_zero_point(self) -> None:
        if self.activation_qtype != qint8 or self.activation_scales != "static" or not type(self).quantizes_input:
            raise ValueError(
                f"An input zero-point needs static qint8 input activations, not {self.activation_qtype} "
                f"({self.activation_scales}) on {type(self).__name__}"
            )

    def set_input_zero_point(self, zero_point: torch.Tensor | None) -> None:
        """Give a static ``qint8`` input an int32 zero-point (asymmetric int8 codes), or remove it (``None``:
        symmetric again). :class:`~quanto_backend.Calibration` does this where the input is mostly one-sided."""
        self._check_input_zero_point()
        if zero_point is None:
            self._buffers.pop("input_zero_point", None)
            return
        zero_point = torch.as_tensor(zero_point).to(device=self.input_scale.device, dtype=torch.int32).reshape(())
        if "input_zero_point" in self._buffers:
            self.input_zero_point.copy_(zero_point)
        else:
            self.register_buffer("input_zero_point", zero_point.clone())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_qtype is None or not self.quantizes_input:
            return x
        if isinstance(x, QActivation) and x.qtype_name == self.activation_qtype.name:
            return x
        if self.activation_scales == "dynamic":
            return quantize_activation(x, self.activation_qtype)  # one scale per token, on the fly
        if self.awaits_calibration and not self._calibrating:
            if self.activation_qtype == quint8:
                raise RuntimeError(
                    "This module's quint8 activation scales and zero-points were never calibrated (quantize-on-load "
                    "creates them as placeholders): run the model under quanto_backend.Calibration() first, or load "
                    "with symmetric activations (int8/float8), which use dynamic per-token scales until calibrated."
                )
            return quantize_activation(x, self.activation_qtype)  # placeholder scales: per token until calibrated
        return quantize_activation(x, self.activation_qtype, self.input_scale, self._buffers.get("input_zero_point"))

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        if not self.quantizes_output or self._calibrating or self.awaits_calibration:
            return y
        return quantize_activation(y, self.activation_qtype, self.output_scale, self._buffers.get("output_zero_point"))

    def smooth_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / input_smooth`` where SmoothQuant left its factors on this module; ``x`` otherwise."""
        smooth = self._buffers.get("input_smooth")
        if smooth is None:
            return x
        x = x.dequantize() if isinstance(x, QActivation) else x
        return x / smooth.to(x.dtype)

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        input = self.quantize_input(self.smooth_input(input))
        return self.quantize_output(self.qforward(input, *args, **kwargs))

    def qforward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def qconfig(self) -> dict[str, Any]:
        """What :func:`~quanto_backend.requantize` needs to rebuild this module's skeleton."""
        qconfig = {
            "weights": None if self.weight_qtype is None else self.weight_qtype.name,
            "activations": None if self.activation_qtype is None else self.activation_qtype.name,
            "group_size": self.group_size,
            "quantize_output": self.quantizes_output,
            "activation_scales": self.activation_scales,
            "input_smooth": "input_smooth" in self._buffers,
        }
        if self.activation_qtype == qint8 and "input_zero_point" in self._buffers:
            qconfig["input_zero_point"] = True  # written only when set: maps without it read as before
        if self.quantizes_input != type(self).quantizes_input:  # built with quantize_input=False
            qconfig["quantize_input"] = self.quantizes_input
        return qconfig

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.weight_qtype}, activations={self.activation_qtype}"
