"""optimum-quanto 0.2.7 model folders, and ``quant_method: "quanto"`` configs of transformers and diffusers, load
with quanto_backend alone (no optimum-quanto installed) and compute what optimum-quanto computed on them.

The fixtures were written by tests/fixtures/optimum_quanto/make_fixtures.py (optimum-quanto's helpers' and
diffusers' own save_pretrained); their expected outputs are optimum-quanto's, after its own reload.
"""

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

import quanto_backend
from quanto_backend import QLinear, QuantizedModelForCausalLM, QuantizedPixArtTransformer2DModel
from quanto_backend.integrations import registration
from quanto_backend.integrations.quanto_alias import optimum_quanto_installed

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "optimum_quanto"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pixart_sample(model, io):
    with torch.no_grad():
        return model(
            hidden_states=io["hidden_states"],
            encoder_hidden_states=io["encoder_hidden_states"],
            timestep=io["timestep"],
            return_dict=False,
        )[0]


def test_optimum_quanto_is_not_installed_here():
    # Everything below runs without it: otherwise these tests would prove nothing.
    assert not optimum_quanto_installed()


@pytest.mark.parametrize("name", ["llama_qint4", "llama_qint8", "llama_qint8_tied"])
def test_causal_lm_helper_folders_load(name):
    model = QuantizedModelForCausalLM.from_pretrained(FIXTURES / name)
    assert isinstance(model.model.layers[0].mlp.down_proj, QLinear) and model.model.layers[0].mlp.down_proj.frozen
    assert not isinstance(model.lm_head, QLinear)  # the fixture left it float
    io = load_file(FIXTURES / name / "io.safetensors")
    with torch.no_grad():
        logits = model(input_ids=io["input_ids"]).logits
    assert rel(logits, io["logits"]) < 1e-3
    if name.endswith("tied"):  # transformers saved the tied lm_head as the input embedding only
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sharded_helper_folder_loads(tmp_path):
    import json
    import shutil

    from safetensors.torch import save_file

    source = FIXTURES / "llama_qint4"
    for name in ("config.json", "quanto_qmap.json"):
        shutil.copy(source / name, tmp_path / name)
    state = load_file(source / "model.safetensors")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = QuantizedModelForCausalLM.from_pretrained(tmp_path)
    io = load_file(source / "io.safetensors")
    with torch.no_grad():
        assert rel(model(input_ids=io["input_ids"]).logits, io["logits"]) < 1e-3


def test_pixart_helper_folder_loads():
    model = QuantizedPixArtTransformer2DModel.from_pretrained(FIXTURES / "pixart_qint8")
    io = load_file(FIXTURES / "pixart_qint8" / "io.safetensors")
    assert rel(pixart_sample(model, io), io["sample"]) < 1e-3


def test_diffusers_quanto_checkpoint_loads_and_saves_in_this_format(tmp_path):
    from diffusers import PixArtTransformer2DModel

    folder = FIXTURES / "pixart_diffusers_int8"
    model = PixArtTransformer2DModel.from_pretrained(folder)
    assert isinstance(model.transformer_blocks[0].attn1.to_q, QLinear)
    assert type(model.pos_embed.proj) is torch.nn.Conv2d  # diffusers' quanto backend left its convs float
    io = load_file(folder / "io.safetensors")
    sample = pixart_sample(model, io)
    assert rel(sample, io["sample"]) < 1e-3
    model.save_pretrained(tmp_path)
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.to_dict()["quant_method"] == "quanto_backend"
    assert torch.equal(pixart_sample(reloaded, io), sample)


def test_sharded_diffusers_quanto_checkpoint_with_split_modules_loads(tmp_path):
    import json
    import shutil

    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    source = FIXTURES / "pixart_diffusers_int8"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    state = load_file(source / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)  # alternate keys: most modules' weight._data and weight._scale land in different shards
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = PixArtTransformer2DModel.from_pretrained(tmp_path)
    io = load_file(source / "io.safetensors")
    assert rel(pixart_sample(model, io), io["sample"]) < 1e-3


def test_diffusers_quanto_int4_checkpoint_keeps_its_group_sizes():
    from diffusers import PixArtTransformer2DModel

    folder = FIXTURES / "pixart_diffusers_int4"
    model = PixArtTransformer2DModel.from_pretrained(folder)
    # optimum-quanto grouped the 192 caption inputs by 96 (this library's default would be 128, padded).
    assert model.caption_projection.linear_1.group_size == 96
    io = load_file(folder / "io.safetensors")
    assert rel(pixart_sample(model, io), io["sample"]) < 1e-3


def test_transformers_quanto_config_quantizes_on_load(tmp_path):
    import transformers

    tiny_llama().save_pretrained(tmp_path / "float")
    theirs = transformers.QuantoConfig(weights="int8")  # optimum-quanto's config in transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=theirs)
    ours = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=quanto_backend.QuantoConfig(weights="int8")
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLinear)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)


def test_transformers_prequantized_quanto_config_fails_clearly(tmp_path):
    import json

    import transformers

    tiny_llama().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "quanto", "weights": "int8", "activations": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="QuantizedModelForCausalLM"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_quanto_alias_is_registered_only_without_optimum_quanto(monkeypatch):
    from transformers.quantizers import auto as transformers_auto

    sentinel = object()
    monkeypatch.setitem(transformers_auto.AUTO_QUANTIZER_MAPPING, "quanto", sentinel)
    monkeypatch.setattr("quanto_backend.integrations.quanto_alias.optimum_quanto_installed", lambda: True)
    assert registration.register_quanto_alias() is False
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["quanto"] is sentinel
