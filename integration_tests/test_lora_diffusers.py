"""diffusers LoRA on a transformer quantized on load with QuantoConfig: load_lora_adapter (what a pipeline's
load_lora_weights calls for its transformer), fuse_lora / unfuse_lora, hot swap, set_adapters, delete_adapters."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from quanto_backend import QLinear, QuantoConfig
from quanto_backend.lora import QuantizedLoraLinear, convert_lora_layers

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "proj_mlp"]


def _tiny_flux() -> FluxTransformer2DModel:
    # inner dim 64 and every in_features a multiple of 64 (inside the int8 CPU kernel's contract)
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
    ).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
    )


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(), return_dict=False)[0]


def _lora_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A LoRA adapter in diffusers' state-dict format, with realistic (non-zero) weights."""
    model = _tiny_flux()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name="tmp")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if "lora_A" in name else 0.15))
    return get_peft_model_state_dict(model, adapter_name="tmp")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _storage(model) -> dict[str, torch.Tensor]:
    """The base model's tensors, named as without LoRA layers (peft moves them under ``base_layer``)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux")
    _tiny_flux().save_pretrained(path)
    return path


@pytest.mark.parametrize("weights", ["int8", "float8", "int4"])
def test_load_fuse_unfuse_hotswap_on_a_quantized_transformer(flux_dir, weights):
    first, second = _lora_state_dict(1), _lora_state_dict(2)
    reference = {}
    float_model = FluxTransformer2DModel.from_pretrained(flux_dir).eval()
    base_float = _run(float_model)
    for name, state_dict in (("first", first), ("second", second)):
        float_model.load_lora_adapter(state_dict, prefix=None, adapter_name=name)
        float_model.set_adapters(name)
        reference[name] = _run(float_model)
    assert _rel(reference["first"], base_float) > 0.05  # the adapter matters

    model = FluxTransformer2DModel.from_pretrained(flux_dir, quantization_config=QuantoConfig(weights=weights)).eval()
    own_error = _rel(_run(model), base_float)  # the format's own quantization error on this model
    storage = _storage(model)
    model.load_lora_adapter(first, prefix=None, adapter_name="default")
    assert convert_lora_layers(model) > 0
    to_q = model.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, QuantizedLoraLinear) and type(to_q.get_base_layer()) is QLinear
    unfused = _run(model)
    assert _rel(unfused, reference["first"]) <= 1.5 * own_error

    model.fuse_lora()
    base = to_q.get_base_layer()
    assert to_q.merged and base.frozen and base.weight.dtype == storage["transformer_blocks.0.attn.to_q.weight"].dtype
    fused = _run(model)
    # two roundings (the base's and the merge's), each the size of the format's own error
    assert _rel(fused, reference["first"]) <= 2 * own_error, (_rel(fused, reference["first"]), own_error)
    model.unfuse_lora()
    after = _storage(model)
    assert all(torch.equal(after[k], storage[k]) for k in storage)  # exact restore
    assert torch.equal(_run(model), unfused)

    # hot swap: the second adapter's weights replace the first's in place (same rank and targets)
    model.load_lora_adapter(second, prefix=None, adapter_name="default", hotswap=True)
    assert isinstance(to_q, QuantizedLoraLinear)
    assert _rel(_run(model), reference["second"]) <= 1.5 * own_error
    model.fuse_lora()
    assert _rel(_run(model), reference["second"]) <= 2 * own_error
    model.unfuse_lora()
    assert all(torch.equal(v, storage[k]) for k, v in _storage(model).items())


def test_set_adapters_and_delete_adapters(flux_dir):
    first, second = _lora_state_dict(1), _lora_state_dict(2)
    model = FluxTransformer2DModel.from_pretrained(flux_dir, quantization_config=QuantoConfig(weights="int8")).eval()
    storage = _storage(model)
    base = _run(model)
    model.load_lora_adapter(first, prefix=None, adapter_name="first")
    model.load_lora_adapter(second, prefix=None, adapter_name="second")
    convert_lora_layers(model)
    model.set_adapters("first")
    only_first = _run(model)
    model.set_adapters(["first", "second"], weights=[1.0, 0.5])
    both = _run(model)
    assert _rel(both, only_first) > 0.01
    model.fuse_lora(adapter_names=["first", "second"])
    assert _rel(_run(model), both) <= 0.03
    model.unfuse_lora()
    assert torch.equal(_run(model), both)
    model.delete_adapters("second")
    model.set_adapters("first")
    assert torch.equal(_run(model), only_first)
    model.delete_adapters("first")
    assert torch.equal(_run(model), base)
    assert all(torch.equal(v, storage[k]) for k, v in _storage(model).items())
