"""QuantoConfig: the one quantization config of quanto-backend for transformers and diffusers.

It subclasses both libraries' ``QuantizationConfigMixin`` so that a single object works in
``PreTrainedModel.from_pretrained``, ``ModelMixin.from_pretrained`` and ``PipelineQuantizationConfig``
(whose ``quant_backend`` mode requires the same ``__init__`` signature in both libraries' registries).
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin as DiffusersQuantizationConfigMixin
from transformers.utils.quantization_config import QuantizationConfigMixin as TransformersQuantizationConfigMixin

from ..nn.qmodule import ACTIVATION_SCALES
from ..qtypes import QType, as_qtype
from ..tensor import ACTIVATION_QTYPES, DEFAULT_GROUP_SIZE, WEIGHT_QTYPES, group_layout

# The optimizers a config may name for 2/4-bit weights (8-bit weights have only "absmax").
OPTIMIZER_NAMES_PACKED = ("mse", "minmax", "hqq")

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "QuantoBackendMethod", "QuantoConfig"]

# Version of the on-disk layout (tensor names, packing, sign of the shift, scale shapes) that a checkpoint's
# ``quantization_config`` records. Bump it when a change would make an older reader load a newer checkpoint wrong.
# 1: an output left float had no ``output_scale``; a QLayerNorm had no ``input_scale``.
# 2: every module with static activations has both scales, and an ``output_quantized`` bool; a static qint8 input
#    may carry an ``input_zero_point`` (int8 codes with a zero-point, set by calibration). Format 1 still loads.
FORMAT_VERSION = 2


class QuantoBackendMethod(str, Enum):
    """The ``quant_method`` of quanto-backend.

    diffusers reads ``quant_method.value``, so this must be an Enum; it is a ``str`` so that dict lookups and
    ``json.dumps`` see the plain name. It differs from the libraries' built-in ``"quanto"`` (optimum-quanto).
    """

    QUANTO_BACKEND = "quanto_backend"

    def __str__(self) -> str:
        return self.value


QUANT_METHOD = QuantoBackendMethod.QUANTO_BACKEND


def _qtype_name(qtype: QType) -> str:
    return qtype.name.removeprefix("q")


class QuantoConfig(TransformersQuantizationConfigMixin, DiffusersQuantizationConfigMixin):
    """Quantization config of quanto-backend for ``from_pretrained`` in transformers and diffusers.

    Example::

        import quanto_backend  # registers "quanto_backend" with transformers and diffusers
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quanto_backend.QuantoConfig("int8"))

    Args:
        weights: weight format: ``"int8"``, ``"int4"``, ``"int2"``, ``"float8"`` (= ``"float8_e4m3fn"``),
            ``"float8_e5m2"``, or a qtype (``qint8``...). ``weights_dtype=`` (diffusers' spelling) is accepted too.
        activations: ``None`` (weight-only), ``"int8"``, ``"uint8"``, ``"float8"``, ``"float8_e5m2"`` or
            ``"float8_e4m3fnuz"``. Static activation scales are set by running :class:`~quanto_backend.Calibration`
            on the loaded model; until then int8/float8 inputs are quantized with dynamic per-token scales (never
            with the placeholder scales), uint8 ones refuse to run, and ``save_pretrained`` refuses to save.
        activation_scales: ``"static"`` (per tensor, set by calibration) or ``"dynamic"`` (per token, computed on
            the fly: no calibration; int8 and float8 activations).
        group_size: inputs per group of the 2/4-bit formats (default 128; recorded as the number it resolves to).
            Refused for 8-bit weights (one scale per output channel), as by :func:`~quanto_backend.quantize`.
        optimizer: how quantize-on-load chooses 2/4-bit scales and shifts: ``None`` (the default of
            :func:`~quanto_backend.quantize_weight`), ``"mse"``, ``"minmax"`` or ``"hqq"`` (slower, sometimes a bit
            more accurate); 8-bit weights take only ``"absmax"``. Recorded in ``config.json`` when given; a
            pre-quantized checkpoint never re-runs it.
        modules_to_not_convert: module names (or fnmatch patterns) to keep float. ``None`` keeps the libraries'
            defaults float (transformers: the output embedding / ``lm_head``, tied weights, the last module).
            Tied weights always stay float, whatever this says.
        format_version: the on-disk format version (written by this library; a newer one is refused).

    Raises:
        ValueError: an unsupported value, naming it and listing the accepted ones.
        TypeError: an unknown keyword argument.
    """

    def __init__(
        self,
        weights: QType | str | None = None,
        activations: QType | str | None = None,
        group_size: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        format_version: int = FORMAT_VERSION,
        weights_dtype: QType | str | None = None,
        activation_scales: str = "static",
        optimizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        # ``from_dict`` passes the serialized ``quant_method`` back; anything else is a typo or a newer field.
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if kwargs:
            accepted = (
                "weights, activations, group_size, modules_to_not_convert, format_version, weights_dtype, "
                "activation_scales, optimizer"
            )
            raise TypeError(f"QuantoConfig got unknown arguments {sorted(kwargs)}; accepted: {accepted}")
        if str(getattr(method, "value", method)) != QUANT_METHOD.value:
            raise ValueError(f"QuantoConfig quant_method must be {QUANT_METHOD.value!r}, got {method!r}")
        if weights is not None and weights_dtype is not None and weights != weights_dtype:
            raise ValueError(f"Give weights or weights_dtype, not both (got {weights!r} and {weights_dtype!r})")
        weights = weights if weights is not None else weights_dtype
        if weights is None:
            weights = "int8"
        self.quant_method = QUANT_METHOD
        self.weights = _qtype_name(as_qtype(weights, WEIGHT_QTYPES, "weights"))
        self.activations = (
            None if activations is None else _qtype_name(as_qtype(activations, ACTIVATION_QTYPES, "activations"))
        )
        if activation_scales not in ACTIVATION_SCALES:
            raise ValueError(f"Unsupported activation_scales {activation_scales!r}; accepted: static, dynamic")
        if activation_scales == "dynamic" and self.activations in (None, "uint8"):
            raise ValueError(
                f"activation_scales='dynamic' needs int8 or float8 activations, got activations={activations!r}"
            )
        self.activation_scales = activation_scales
        self.group_size = self._check_group_size(group_size)
        if optimizer is not None:  # only written when given, so that default configs stay as they were
            self.optimizer = self._check_optimizer(optimizer)
        self.modules_to_not_convert = self._check_modules(modules_to_not_convert)
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise ValueError(f"quantization_config format_version must be a positive int, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"quantization_config format_version {format_version} was written by a newer quanto-backend; this "
                f"version reads format_version <= {FORMAT_VERSION}. Upgrade quanto-backend (pip install -U "
                "quanto-backend) to load this checkpoint."
            )
        self.format_version = format_version

    # ---- validation ----------------------------------------------------------------------------------------
    @property
    def weights_qtype(self) -> QType:
        """The weight qtype (a :class:`~quanto_backend.QType`)."""
        return as_qtype(self.weights, WEIGHT_QTYPES, "weights")

    @property
    def activations_qtype(self) -> QType | None:
        """The activation qtype, or ``None`` for weight-only quantization."""
        return None if self.activations is None else as_qtype(self.activations, ACTIVATION_QTYPES, "activations")

    @property
    def weights_dtype(self) -> str:
        """diffusers' name for :attr:`weights`."""
        return self.weights

    def _check_group_size(self, group_size: int | None) -> int | None:
        if not self.weights_qtype.is_packed:
            if group_size is not None:
                raise ValueError(
                    f"group_size={group_size!r} applies only to int4/int2 weights, not {self.weights!r}; "
                    "leave it None for 8-bit weights"
                )
            return None
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if isinstance(group_size, bool):
            raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
        group_layout(group_size, group_size)  # raises a ValueError naming the accepted values
        return group_size

    optimizer: str | None = None

    def _check_optimizer(self, optimizer: str) -> str:
        accepted = OPTIMIZER_NAMES_PACKED if self.weights_qtype.is_packed else ("absmax",)
        if not isinstance(optimizer, str) or optimizer.lower() not in accepted:
            raise ValueError(
                f"Unsupported optimizer {optimizer!r} for {self.weights} weights; accepted: {', '.join(accepted)}"
            )
        return optimizer.lower()

    @staticmethod
    def _check_modules(modules: list[str] | str | None) -> list[str] | None:
        if modules is None:
            return None
        if isinstance(modules, str):
            return [modules]
        if isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules):
            return list(modules)
        raise TypeError(f"modules_to_not_convert must be None or a list of module names, got {modules!r}")

    # ---- serialization and equality ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written into ``config.json``'s ``quantization_config``."""
        d = copy.deepcopy({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        d["quant_method"] = QUANT_METHOD.value
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantoConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, like the libraries' configs


# Importing the libraries above may have fired the registration hook while this module was incomplete.
from .registration import finish_pending_registration  # noqa: E402

finish_pending_registration(__name__)
