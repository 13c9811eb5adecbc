"""transformers: quantize-on-load, save/reload, activations + Calibration, dequantize, training, compile."""

import json

import pytest
import torch
from conftest import cosine
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

from quanto_backend import Calibration, QLayerNorm, QLinear, QuantoConfig

WEIGHTS = ["int8", "int4", "int2", "float8"]
STORAGE = {"int8": torch.int8, "int4": torch.uint8, "int2": torch.uint8, "float8": torch.float8_e4m3fn}
MIN_COSINE = {"int8": 0.999, "float8": 0.995, "int4": 0.98, "int2": 0.8}


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("weights", WEIGHTS)
def test_quantize_on_load_then_save_and_reload_bit_identically(llama_dir, tmp_path, tokens, weights):
    ref = logits(AutoModelForCausalLM.from_pretrained(llama_dir), tokens)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights=weights))
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QLinear) and down.frozen and down.weight.dtype == STORAGE[weights]
    assert type(model.lm_head) is torch.nn.Linear  # the output embedding stays float by default
    out = logits(model, tokens)
    assert cosine(out, ref) > MIN_COSINE[weights]

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "quanto_backend" and saved["format_version"] >= 1
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() in {"I8", "U8", "F8_E4M3"}
        assert "model.layers.0.mlp.down_proj.weight_scale" in f.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no float checkpoint, no quantization_config
    assert reloaded.config.quantization_config == model.config.quantization_config
    expected, found = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == found.keys()
    for key in expected:
        assert expected[key].dtype == found[key].dtype and torch.equal(expected[key], found[key]), key
    assert torch.equal(logits(reloaded, tokens), out)


def test_bf16_load_keeps_scales_in_compute_dtype(llama_dir, tmp_path, tokens):
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.bfloat16, quantization_config=QuantoConfig(weights="int4", group_size=32)
    )
    proj = model.model.layers[1].self_attn.q_proj
    assert proj.weight_scale.dtype == torch.bfloat16 and proj.weight_scale.shape == (64, 2)
    assert not proj.weight_scale.requires_grad
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[1].self_attn.q_proj.weight_scale.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded, tokens), logits(model, tokens))


def test_tied_embeddings_stay_float_even_when_asked(tied_llama_dir, tokens):
    for skip in (None, []):
        model = AutoModelForCausalLM.from_pretrained(
            tied_llama_dir, quantization_config=QuantoConfig(weights="int8", modules_to_not_convert=skip)
        )
        assert type(model.lm_head) is torch.nn.Linear
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_lm_head_is_quantized_when_the_user_asks(llama_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=QuantoConfig(weights="int8", modules_to_not_convert=[])
    )
    assert isinstance(model.lm_head, QLinear)
    ref = logits(AutoModelForCausalLM.from_pretrained(llama_dir), tokens)
    assert cosine(logits(model, tokens), ref) > 0.999


def test_modules_to_not_convert_keeps_modules_float(llama_dir):
    config = QuantoConfig(weights="int8", modules_to_not_convert=["mlp", "model.layers.1.self_attn.q_proj"])
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].self_attn.k_proj, QLinear)


@pytest.mark.parametrize("activations", ["int8", "float8"])
def test_activation_quantized_model_calibrates_saves_and_reloads(bert_dir, tmp_path, tokens, activations):
    ref = AutoModel.from_pretrained(bert_dir)
    config = QuantoConfig(weights="int8", activations=activations)
    model = AutoModel.from_pretrained(bert_dir, quantization_config=config)
    assert isinstance(model.encoder.layer[0].attention.output.LayerNorm, QLayerNorm)
    dense = model.encoder.layer[0].intermediate.dense
    assert dense.input_scale.item() == 1.0  # not calibrated yet
    with torch.no_grad(), Calibration():
        model(tokens)
    assert dense.input_scale.item() != 1.0
    with torch.no_grad():
        out = model(tokens).last_hidden_state
        expected = ref(tokens).last_hidden_state
    assert cosine(out, expected) > 0.99

    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).last_hidden_state, out)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_dequantize_gives_a_float_model_matching_the_quantized_outputs(llama_dir, tokens, weights):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights=weights))
    out = logits(model, tokens)
    model = model.dequantize()
    assert not any(isinstance(m, QLinear) for m in model.modules())
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    # The quantized CPU kernel may compute differently (e.g. int8 activations): equal up to its own rounding.
    torch.testing.assert_close(logits(model, tokens), out, atol=0.01 * out.abs().max().item(), rtol=0)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_training_step_through_a_loaded_model(llama_dir, tmp_path, tokens, weights):
    AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights=weights)).save_pretrained(
        tmp_path
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.hf_quantizer.is_trainable
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.is_floating_point() for p in trainable)
    frozen_weight = model.model.layers[0].mlp.down_proj.weight.clone()
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    losses = []
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)  # got gradients
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, frozen_weight)


def test_torch_compile_of_a_loaded_model(llama_dir, tmp_path, tokens):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights="int4"))
    assert model.hf_quantizer.is_compileable
    expected = logits(model, tokens)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(tokens).logits
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("activations", ["int8", "float8"])
def test_dynamic_per_token_activations_need_no_calibration(llama_dir, tmp_path, tokens, activations):
    ref = logits(AutoModelForCausalLM.from_pretrained(llama_dir), tokens)
    config = QuantoConfig(weights="int8", activations=activations, activation_scales="dynamic")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, QLinear) and proj.activation_scales == "dynamic"
    assert "input_scale" not in dict(proj.named_buffers())  # nothing to calibrate
    out = logits(model, tokens)
    assert cosine(out, ref) > 0.99

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.activation_scales == "dynamic"
    assert torch.equal(logits(reloaded, tokens), out)
