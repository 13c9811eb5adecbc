"""transformers flows that crashed or returned garbage on AVX-512 CPUs: odd hidden sizes, and W8A8 checkpoints
reloaded from safetensors (whose int8 tensors are not 16-byte aligned)."""

import pytest
import torch
from conftest import cosine, tiny_llama
from transformers import AutoModelForCausalLM

from quanto_backend import Calibration, QLinear, QuantoConfig
from quanto_backend.ops import cpu


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def llama40_dir(tmp_path_factory):
    """A tiny Llama of hidden size 40: in_features 40 and 88, outside the int8 kernel's contract (multiples of 16)."""
    path = tmp_path_factory.mktemp("llama40")
    tiny_llama(vocab_size=128, hidden_size=40, intermediate_size=88, head_dim=10).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_hidden_size_int8_model_matches_float_and_generates(llama40_dir, dtype):
    ref = AutoModelForCausalLM.from_pretrained(llama40_dir, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        llama40_dir, dtype=dtype, quantization_config=QuantoConfig(weights="int8")
    )
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    for tokens in (prompt, prompt[:, :1]):  # several rows, then the one-row decode shape
        assert cosine(logits(model, tokens), logits(ref, tokens)) > 0.99
    # Decode with the KV cache, one row per step (where the kernel returned NaN/Inf/1e30 on AVX-512): each step's
    # logits against the float model's on the same prefix.
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    steps = torch.cat(out.logits).float()
    assert cosine(steps, logits(ref, out.sequences)[0, 4:-1].float()) > 0.99


@pytest.mark.parametrize("activations", ["int8", "dynamic"])
def test_w8a8_checkpoint_reloads_aligned_and_equal(llama_dir, tmp_path, tokens, activations):
    config = (
        QuantoConfig(weights="int8", activations="int8", activation_scales="dynamic")
        if activations == "dynamic"
        else QuantoConfig(weights="int8", activations="int8")
    )
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    if activations == "int8":  # static scales are saved only once calibrated
        with torch.no_grad(), Calibration():
            model(tokens)
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for module in reloaded.modules():
        if isinstance(module, QLinear):
            assert module.weight.data_ptr() % cpu.ALIGNMENT == 0 and module.weight.is_contiguous()
    assert torch.equal(logits(reloaded, tokens), expected)
