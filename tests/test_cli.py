"""The quanto-backend command on a tiny local model (the default model runs in integration_tests)."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from quanto_backend.cli import main, run
from quanto_backend.evaluate import default_model_dir


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    BertModel(config).save_pretrained(path)
    BertTokenizerFast.from_pretrained(default_model_dir()).save_pretrained(path)
    return path


def test_report_on_a_local_model(tiny_bert, tmp_path, capsys):
    rows = run(
        [
            "--model",
            str(tiny_bert),
            "--weights",
            "int8,int2",
            "--group-size",
            "32",
            "--quiet",
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    assert [r["weights"] for r in rows] == ["float32", "qint8", "qint2"]
    assert rows[0]["cosine"] == pytest.approx(1.0)
    assert rows[1]["cosine"] > 0.99 and rows[2]["cosine"] < rows[1]["cosine"]
    assert rows[2]["linear_mb"] < rows[1]["linear_mb"] < rows[0]["linear_mb"] / 3
    out = capsys.readouterr().out
    assert "qint8" in out and "cosine" in out and "latency" in out
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == rows


def test_bad_arguments_are_reported(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--quiet"]) == 2
    assert "config.json" in capsys.readouterr().out
    assert main(["--weights", "int3", "--quiet"]) == 2
    assert "int3" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_llama_without_tokenizer(tmp_path_factory):
    # As in the README's Hugging Face example: a model folder built from a config, with no tokenizer files.
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_a_folder_without_tokenizer_runs_on_random_token_ids(tiny_llama_without_tokenizer, capsys):
    rows = run(["--model", str(tiny_llama_without_tokenizer), "--weights", "int4", "--group-size", "32", "--quiet"])
    assert [r["weights"] for r in rows] == ["float32", "qint4"]
    assert 0.5 < rows[1]["cosine"] < 1.0  # quantized, measured against the float model
    assert "no tokenizer" in capsys.readouterr().out


def test_an_already_quantized_folder_is_refused_not_requantized(tiny_llama_without_tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from quanto_backend import QuantoConfig

    qconfig = QuantoConfig(weights="int4", group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_without_tokenizer, quantization_config=qconfig)
    model.save_pretrained(tmp_path / "int4")
    assert main(["--model", str(tmp_path / "int4"), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "already-quantized" in out and "quant_method=quanto_backend" in out and "weights=int4" in out
    assert "cosine" not in out  # no table: nothing was re-quantized or labelled float32
