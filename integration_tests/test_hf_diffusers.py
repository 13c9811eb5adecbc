"""diffusers: quantize-on-load of a model, save/reload, pipelines (quant_backend and quant_mapping), hooks."""

import pytest
import torch
from conftest import cosine, pixart_inputs, run_pipeline
from diffusers import DiffusionPipeline, PixArtTransformer2DModel
from diffusers.quantizers import PipelineQuantizationConfig

from quanto_backend import QLinear, QuantoConfig
from quanto_backend.tensor import WEIGHT_QTYPES


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**pixart_inputs(), return_dict=False)[0]


@pytest.mark.parametrize("weights", ["int8", "int4", "float8"])
def test_model_quantize_on_load_save_and_reload(pixart_dir, tmp_path, weights):
    ref = run(PixArtTransformer2DModel.from_pretrained(pixart_dir))
    model = PixArtTransformer2DModel.from_pretrained(
        pixart_dir, quantization_config=QuantoConfig(weights_dtype=weights)
    )
    to_q = model.transformer_blocks[0].attn1.to_q
    assert isinstance(to_q, QLinear) and to_q.frozen and not to_q.weight_scale.requires_grad
    out = run(model)
    assert cosine(out, ref) > (0.99 if weights != "int4" else 0.97)
    model.save_pretrained(tmp_path)
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert torch.equal(run(reloaded), out)


def test_pipeline_quant_backend_quantizes_a_diffusers_and_a_transformers_component(pipeline_dir, tmp_path):
    ref = run_pipeline(DiffusionPipeline.from_pretrained(pipeline_dir))
    config = PipelineQuantizationConfig(
        quant_backend="quanto_backend",
        quant_kwargs={"weights_dtype": "int8"},
        components_to_quantize=["transformer", "text_encoder"],
    )
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=config)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q, QLinear)
    assert isinstance(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q, QLinear)
    assert not any(isinstance(m, QLinear) for m in pipe.vae.modules())
    out = run_pipeline(pipe)
    assert cosine(out, ref) > 0.99
    pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.text_encoder.encoder.block[0].layer[0].SelfAttention.q, QLinear)
    assert torch.equal(run_pipeline(reloaded), out)


def test_pipeline_quant_mapping_with_per_component_configs(pipeline_dir):
    config = PipelineQuantizationConfig(
        quant_mapping={"transformer": QuantoConfig(weights="int4", group_size=16), "text_encoder": QuantoConfig("int8")}
    )
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=config)
    to_q = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert to_q.weight_qtype.name == "qint4" and to_q.weight_scale.shape == (16, 1)
    assert pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.int8
    run_pipeline(pipe)


def test_device_maps_and_disk_offload(pixart_dir, tmp_path):
    config = QuantoConfig("int8")
    expected = run(PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=config))
    for device_map in ("auto", {"": "cpu"}):
        model = PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=config, device_map=device_map)
        assert torch.equal(run(model), expected)
    with pytest.raises(ValueError, match="cannot quantize on load with disk offload"):
        PixArtTransformer2DModel.from_pretrained(
            pixart_dir, quantization_config=config, device_map={"": "disk"}, offload_folder=tmp_path / "off"
        )
    PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=config).save_pretrained(tmp_path / "q")
    offloaded = PixArtTransformer2DModel.from_pretrained(
        tmp_path / "q", device_map="auto", max_memory={"cpu": 5_000}, offload_folder=tmp_path / "off"
    )
    assert "disk" in offloaded.hf_device_map.values()
    assert torch.equal(run(offloaded), expected)


def test_quantizer_hooks(pixart_dir):
    from accelerate.utils import CustomDtype
    from diffusers.quantizers.auto import DiffusersAutoQuantizer

    on_the_fly = DiffusersAutoQuantizer.from_config(QuantoConfig("int4"), pre_quantized=False)
    prequantized = DiffusersAutoQuantizer.from_config(QuantoConfig("int4"), pre_quantized=True)
    assert on_the_fly.adjust_target_dtype(torch.bfloat16) == CustomDtype.INT4
    quantizers = {
        q.name: DiffusersAutoQuantizer.from_config(QuantoConfig(q), pre_quantized=False) for q in WEIGHT_QTYPES
    }
    sizes = {name: quantizer.adjust_target_dtype(None) for name, quantizer in quantizers.items()}
    assert sizes["qfloat8_e4m3fnuz"] == sizes["qfloat8_e4m3fn"] == CustomDtype.FP8  # every format is sized
    assert prequantized.adjust_target_dtype(torch.bfloat16) == torch.bfloat16  # storage already sized
    assert on_the_fly.adjust_max_memory({"cpu": 1000}) == {"cpu": 900}
    assert on_the_fly.update_torch_dtype(None) == torch.float32
    assert on_the_fly.is_serializable and on_the_fly.is_trainable and on_the_fly.is_compileable

    model = PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=QuantoConfig("int8"))
    missing = ["transformer_blocks.0.attn1.to_q.input_scale", "pos_embed.proj.weight"]
    assert on_the_fly.update_missing_keys(model, missing, "") == ["pos_embed.proj.weight"]
    assert prequantized.update_missing_keys(model, missing, "") == missing


def test_dequantize(pixart_dir):
    model = PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=QuantoConfig("int8"))
    out = run(model)
    model.dequantize()
    assert not any(isinstance(m, QLinear) for m in model.modules())
    # The quantized CPU kernel may compute differently (e.g. int8 activations): equal up to its own rounding.
    torch.testing.assert_close(run(model), out, atol=0.01 * out.abs().max().item(), rtol=0)


def test_training_and_compile(pixart_dir):
    model = PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=QuantoConfig("int8"))
    expected = run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**pixart_inputs(), return_dict=False)[0], expected)
    model.train()
    out = model(**pixart_inputs(), return_dict=False)[0]
    out.square().mean().backward()
    assert model.transformer_blocks[0].attn1.to_q.bias.grad is not None
    assert model.transformer_blocks[0].attn1.to_q.weight.grad is None  # quantized storage is frozen
