"""LoRA on quantized modules, through peft's extension point for custom LoRA layers (peft is an optional extra:
``pip install quanto-backend[lora]``).

peft wraps any ``nn.Linear``/``nn.Conv2d``, so it already wraps :class:`~quanto_backend.QLinear` and
:class:`~quanto_backend.QConv2d`, and training through them works; but its merge adds the delta to ``weight.data``,
which for a frozen module is int8/float8/packed storage. The layers here merge by requantizing
``dequantize(W) + delta`` into the module's own format (the module stays quantized) and unmerge by putting the
original storage tensors back (exact: they are the same tensor objects).

Two ways in:

* :func:`register_quantized_lora` registers the layers with a ``LoraConfig`` before ``get_peft_model``;
* :func:`convert_lora_layers` turns LoRA layers peft (or diffusers' ``load_lora_adapter``) has already created around
  quantized modules into these layers, for models whose ``LoraConfig`` was built out of reach.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

try:
    from peft import LoraConfig
    from peft.tuners.lora import Conv2d as LoraConv2d
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("quanto_backend.lora needs peft: pip install 'quanto-backend[lora]'") from error

from .nn import QConv2d, QLinear, QModuleMixin
from .tensor import GroupedQWeight, quantize_weight

__all__ = ["QuantizedLoraConv2d", "QuantizedLoraLinear", "convert_lora_layers", "register_quantized_lora"]

_STORAGE = ("weight", "weight_scale", "weight_shift", "bias")


def _float_weight(module: QModuleMixin) -> torch.Tensor:
    """The module's weight as float32 ``weight_shape``: dequantized storage, or the float weight before freeze."""
    if module.frozen:
        return module.qweight.dequantize().float()
    return module.weight.detach().float()


def _store_weight(module: QModuleMixin, weight: torch.Tensor, group_size: int | None) -> None:
    """Replace the module's weight by ``weight`` (float32), quantized into the module's format if it is frozen.

    New parameters are assigned (none is written in place), so the previous ones can be put back untouched.
    """
    if not module.frozen:
        old = module.weight
        module._parameters["weight"] = nn.Parameter(weight.to(old.dtype), requires_grad=old.requires_grad)
        return
    qweight = quantize_weight(weight.to(module.compute_dtype), module.weight_qtype, group_size, module.optimizer)
    module._parameters["weight"] = nn.Parameter(qweight.qdata, requires_grad=False)
    module._parameters["weight_scale"] = nn.Parameter(qweight.scale, requires_grad=False)
    if "weight_shift" in module._parameters:
        module._parameters["weight_shift"] = nn.Parameter(qweight.shift, requires_grad=False)


class _QuantizedLoraMixin:
    """merge/unmerge/delete_adapter for a peft LoRA layer whose base layer is a quantized module."""

    def _check_mergeable(self, adapter_names: list[str]) -> None:
        base = self.get_base_layer()
        if not isinstance(base, QModuleMixin):
            raise TypeError(f"{type(self).__name__} wraps quantized modules, got {type(base).__name__}")
        if getattr(base, "groups", 1) > 1:
            raise NotImplementedError("Merging LoRA into a grouped convolution (groups > 1) is not supported")
        variants = [name for name in adapter_names if name in self.lora_variant]
        if variants:
            raise NotImplementedError(
                f"Merging LoRA variants (DoRA and others) into quantized modules is not supported: {variants}"
            )

    def _restore_storage(self) -> None:
        base = self.get_base_layer()
        for name, param in self._unmerged_storage.items():
            base._parameters[name] = param
        self._unmerged_storage = None

    def _merge_into_base(self, adapter_names: list[str], safe_merge: bool) -> None:
        """Requantize the original weight plus the deltas of ``adapter_names`` into the base module."""
        base = self.get_base_layer()
        qweight = base.qweight if base.frozen else None
        group_size = qweight.group_size if isinstance(qweight, GroupedQWeight) else None
        weight = _float_weight(base)
        bias = None if base.bias is None else base.bias.detach().float()
        for name in adapter_names:
            weight = weight + self.get_delta_weight(name).float().reshape(weight.shape)
            if self.lora_bias[name]:
                if bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True`: the base layer has no bias")
                bias = bias + self.lora_B[name].bias.detach().float() * self.scaling[name]
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapters {adapter_names} seem to be broken")
        _store_weight(base, weight, group_size)
        if bias is not None and any(self.lora_bias[name] for name in adapter_names):
            base._parameters["bias"] = nn.Parameter(bias.to(base.bias.dtype), requires_grad=base.bias.requires_grad)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the adapters (default: the active ones) into the base weight, requantized in its own format."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:
            return
        self._check_mergeable(adapter_names)
        # Every merge starts again from the original storage: the error of one requantization, not of several.
        previous = list(self.merged_adapters)
        if previous:
            self._restore_storage()
        base = self.get_base_layer()
        storage = {name: base._parameters[name] for name in _STORAGE if base._parameters.get(name) is not None}
        try:
            # it raises (NaNs, a lora_bias without bias) before it replaces any tensor
            self._merge_into_base(previous + adapter_names, safe_merge)
        except BaseException:
            if previous:
                self._merge_into_base(previous, False)
                self._unmerged_storage = storage
            raise
        self._unmerged_storage = storage
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the original (pre-merge) storage back: bit for bit the tensors the module had."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._restore_storage()
        self.merged_adapters.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            remaining = [name for name in self.merged_adapters if name != adapter_name]
            self.unmerge()
            super().delete_adapter(adapter_name)
            if remaining:
                self.merge(adapter_names=remaining)
            return
        super().delete_adapter(adapter_name)


class QuantizedLoraLinear(_QuantizedLoraMixin, LoraLinear):
    """peft's LoRA ``Linear`` around a :class:`~quanto_backend.QLinear` (merge requantizes)."""

    _unmerged_storage: dict[str, nn.Parameter] | None = None


class QuantizedLoraConv2d(_QuantizedLoraMixin, LoraConv2d):
    """peft's LoRA ``Conv2d`` around a :class:`~quanto_backend.QConv2d` (merge requantizes).

    The adapters are plain ``nn.Conv2d`` (peft builds them with the base layer's class), and the kernel rank is
    taken from the float weight's shape (frozen 2/4-bit storage is 2-D).
    """

    _unmerged_storage: dict[str, nn.Parameter] | None = None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        base = self.get_base_layer()
        self._kernel_dim = len(base.weight_shape)
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        for adapters in (self.lora_A, self.lora_B):
            adapters[adapter_name] = _plain_conv(adapters[adapter_name])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_a.dtype
        if weight_a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_a, weight_b = weight_a.float(), weight_b.float()
        # [out, r, 1, 1] composed with [r, in, kh, kw]: a 1x1 second conv is a matrix product over r
        delta = torch.einsum("or,rikl->oikl", weight_b.flatten(1), weight_a) * self.scaling[adapter]
        return delta.to(dtype)


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as a plain ``nn.Conv2d`` (peft builds LoRA convs with the base layer's class, here QConv2d)."""
    if type(conv) is nn.Conv2d:
        return conv
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    plain.load_state_dict(conv.state_dict())
    plain.requires_grad_(conv.weight.requires_grad)
    return plain


_LAYERS = {QLinear: QuantizedLoraLinear, QConv2d: QuantizedLoraConv2d}


def register_quantized_lora(config: LoraConfig) -> LoraConfig:
    """Register the quantized LoRA layers with ``config`` (peft's custom-module dispatch); returns ``config``.

    Example::

        config = register_quantized_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        model = get_peft_model(quantized_model, config)
        model = model.merge_and_unload()  # still quantized
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_quantized_lora takes a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module(_LAYERS)
    return config


def convert_lora_layers(model: nn.Module) -> int:
    """Turn the LoRA layers that peft created around quantized modules into the quantized LoRA layers, in place.

    For models whose ``LoraConfig`` could not be registered (for instance diffusers' ``load_lora_adapter``): only
    methods differ, and for convolutions the adapters' class (peft builds them as QConv2d). peft gives the adapters
    the module's ``compute_dtype``; adapters found in float8 (a peft that casts them to the storage dtype) are
    refused, their weights are lost. Call it before merging; returns how many layers were converted.
    """
    converted = 0
    for module in model.modules():
        for lora_cls, quantized_cls in ((LoraLinear, QuantizedLoraLinear), (LoraConv2d, QuantizedLoraConv2d)):
            if type(module) is lora_cls and isinstance(module.get_base_layer(), QModuleMixin):
                if module.merged:
                    raise ValueError("convert_lora_layers needs unmerged LoRA layers: call unmerge() first")
                module.__class__ = quantized_cls
                base = module.get_base_layer()
                for adapters in (module.lora_A, module.lora_B):
                    for name in list(adapters.keys()):
                        layer = _plain_conv(adapters[name]) if quantized_cls is QuantizedLoraConv2d else adapters[name]
                        if layer.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                            raise ValueError(
                                f"The LoRA adapter {name!r} of {type(base).__name__} was cast to "
                                f"{layer.weight.dtype} by peft, which loses it: convert before loading the adapter's "
                                "weights, or register the layers with register_quantized_lora"
                            )
                        adapters[name] = layer
                converted += 1
    return converted
