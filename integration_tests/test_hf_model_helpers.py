"""Model helpers: QuantizedModelForCausalLM and QuantizedPixArtTransformer2DModel (optimum-quanto's API)."""

import pytest
import torch
from conftest import pixart_inputs, run_pipeline, tiny_llama, tiny_pixart
from diffusers import DiffusionPipeline

import quanto_backend.models.base as helpers_base
from quanto_backend import QLinear, QuantizedModelForCausalLM, QuantizedPixArtTransformer2DModel, qint4


def test_causal_lm_quantize_save_and_reload(tmp_path, tokens):
    for tie in (False, True):
        qmodel = QuantizedModelForCausalLM.quantize(tiny_llama(tie=tie), weights=qint4, exclude="lm_head")
        assert isinstance(qmodel.model.layers[0].mlp.down_proj, QLinear)  # attribute access forwarded
        with torch.no_grad():
            out = qmodel(tokens).logits
        qmodel.save_pretrained(tmp_path / str(tie))
        reloaded = QuantizedModelForCausalLM.from_pretrained(tmp_path / str(tie))
        with torch.no_grad():
            assert torch.equal(reloaded(tokens).logits, out)
        if tie:
            assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_pixart_helper_reloads_and_goes_into_a_pipeline(pipeline_dir, tmp_path):
    qtransformer = QuantizedPixArtTransformer2DModel.quantize(tiny_pixart(), weights="int8")
    with torch.no_grad():
        expected = qtransformer(**pixart_inputs(), return_dict=False)[0]
    qtransformer.save_pretrained(tmp_path)
    reloaded = QuantizedPixArtTransformer2DModel.from_pretrained(tmp_path).to("cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(**pixart_inputs(), return_dict=False)[0], expected)

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.transformer = QuantizedPixArtTransformer2DModel.quantize(pipe.transformer, weights="int8")
    out = run_pipeline(pipe)
    pipe.transformer.save_pretrained(tmp_path / "t")
    pipe.transformer = QuantizedPixArtTransformer2DModel.from_pretrained(tmp_path / "t")
    assert torch.equal(run_pipeline(pipe), out)


def test_a_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    qmodel = QuantizedModelForCausalLM.quantize(tiny_llama(), weights="int8")
    qmodel.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(helpers_base, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        QuantizedModelForCausalLM.quantize(tiny_llama(seed=1), weights="int4").save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_helpers_refuse_float_models_and_plain_loading_fails_visibly(tmp_path):
    with pytest.raises(ValueError, match="wraps a quantized model"):
        QuantizedModelForCausalLM(tiny_llama())
    QuantizedModelForCausalLM.quantize(tiny_llama(), weights="int8").save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):  # no model.safetensors: quantized values never land in float modules
        AutoModelForCausalLM.from_pretrained(tmp_path)
