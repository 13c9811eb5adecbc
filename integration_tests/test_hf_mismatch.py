"""Checkpoints that do not match their quantization_config fail loudly, naming the tensor or field; loading a
quanto_backend checkpoint with quanto_backend's import hook off and without importing it does not go unnoticed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quanto_backend import QuantoConfig

KEY = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def int4_dir(llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("int4")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights="int4"))
    model.save_pretrained(path)
    return path


def edit_checkpoint(src, dst, tensors=None, config=None):
    dst.mkdir(exist_ok=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    if tensors is not None:
        state = load_file(src / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        data = json.loads((src / "config.json").read_text())
        config(data["quantization_config"])
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def test_missing_scale_names_the_tensor(int4_dir, tmp_path):
    path = edit_checkpoint(int4_dir, tmp_path / "c", tensors=lambda s: s.pop(f"{KEY}.weight_scale"))
    with pytest.raises(ValueError, match=f"lacks tensor '{KEY}.weight_scale'"):
        AutoModelForCausalLM.from_pretrained(path)


def test_wrong_shape_names_the_tensor(int4_dir, tmp_path):
    def halve(state):
        state[f"{KEY}.weight_shift"] = state[f"{KEY}.weight_shift"][:32]

    path = edit_checkpoint(int4_dir, tmp_path / "c", tensors=halve)
    with pytest.raises(ValueError, match=f"'{KEY}.weight_shift' has shape \\(32, 1\\).*needs \\(64, 1\\)"):
        AutoModelForCausalLM.from_pretrained(path)


def test_config_disagreeing_with_tensors_names_the_tensor(int4_dir, tmp_path):
    path = edit_checkpoint(int4_dir, tmp_path / "c", config=lambda q: q.update(weights="int8", group_size=None))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\..*' has shape"):
        AutoModelForCausalLM.from_pretrained(path)


def test_unknown_weights_qtype_names_the_value(int4_dir, tmp_path):
    path = edit_checkpoint(int4_dir, tmp_path / "c", config=lambda q: q.update(weights="int3"))
    with pytest.raises(ValueError, match="weights 'int3'; accepted:.*int4"):
        AutoModelForCausalLM.from_pretrained(path)


def test_newer_format_version_names_the_field(int4_dir, tmp_path):
    path = edit_checkpoint(int4_dir, tmp_path / "c", config=lambda q: q.update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99 .* newer quanto-backend"):
        AutoModelForCausalLM.from_pretrained(path)


def test_unknown_config_field_is_refused(int4_dir, tmp_path):
    path = edit_checkpoint(int4_dir, tmp_path / "c", config=lambda q: q.update(new_field=1))
    with pytest.raises(TypeError, match="new_field"):
        AutoModelForCausalLM.from_pretrained(path)


def test_diffusers_shape_check_names_the_tensor():
    from diffusers.quantizers.auto import DiffusersAutoQuantizer

    quantizer = DiffusersAutoQuantizer.from_config(QuantoConfig(weights="int4"), pre_quantized=True)
    with pytest.raises(ValueError, match="'blocks.0.ff.weight' has shape \\(4, 4\\).*needs \\(4, 8\\)"):
        quantizer.check_quantized_param_shape("blocks.0.ff.weight", torch.empty(4, 8), torch.empty(4, 4))
    assert quantizer.check_quantized_param_shape("w", torch.empty(4, 8), torch.empty(4, 8))


def _run_without_import(code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with quanto_backend's import hook turned off (what a user who disables it gets)."""
    env = os.environ | {"QUANTO_BACKEND_AUTOLOAD": "0"}
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_loading_without_importing_quanto_backend_is_visible(llama_dir, int4_dir, pixart_dir, tmp_path):
    int8_dir = tmp_path / "int8"
    AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QuantoConfig(weights="int8")).save_pretrained(
        int8_dir
    )
    from diffusers import PixArtTransformer2DModel

    pixart_q = tmp_path / "pixart"
    PixArtTransformer2DModel.from_pretrained(pixart_dir, quantization_config=QuantoConfig("int8")).save_pretrained(
        pixart_q
    )
    # transformers only warns for an unknown method: the log names it, and packed 2/4-bit storage cannot load
    # into float modules (shape mismatch, an error).
    result = _run_without_import(
        f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(int8_dir)!r})
        """
    )
    assert "Unknown quantization type, got quanto_backend" in result.stderr
    assert "weight_scale" in result.stderr  # reported as unexpected keys
    result = _run_without_import(
        f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(int4_dir)!r})
        """
    )
    assert result.returncode != 0 and "mismatch" in result.stderr.lower()
    # diffusers refuses an unknown method
    result = _run_without_import(
        f"""
        from diffusers import PixArtTransformer2DModel
        PixArtTransformer2DModel.from_pretrained({str(pixart_q)!r})
        """
    )
    assert result.returncode != 0 and "Unknown quantization type, got quanto_backend" in result.stderr
    # and with the import, both load
    result = _run_without_import(
        f"""
        import quanto_backend
        from transformers import AutoModelForCausalLM
        from diffusers import PixArtTransformer2DModel
        AutoModelForCausalLM.from_pretrained({str(int4_dir)!r})
        PixArtTransformer2DModel.from_pretrained({str(pixart_q)!r})
        """
    )
    assert result.returncode == 0, result.stderr
