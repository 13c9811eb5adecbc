"""`quanto-backend --output DIR` saves models that transformers' from_pretrained reloads."""

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from quanto_backend import QLinear
from quanto_backend.cli import main
from quanto_backend.evaluate import default_model_dir


def test_output_saves_reloadable_models(tmp_path):
    # A tiny BERT with the real MiniLM tokenizer keeps the command fast.
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp_path / "bert")
    out_dir = tmp_path / "out"
    assert main(["--model", str(tmp_path / "bert"), "--weights", "int8,int4", "--quiet", "--output", str(out_dir)]) == 0
    for name, dtype in (("int8", torch.int8), ("int4", torch.uint8)):
        model = AutoModel.from_pretrained(out_dir / name)
        assert model.config.quantization_config.weights == name
        dense = model.encoder.layer[0].intermediate.dense
        assert isinstance(dense, QLinear) and dense.weight.dtype == dtype
        tokenizer = AutoTokenizer.from_pretrained(out_dir / name)
        with torch.no_grad():
            out = model(**tokenizer(["A sentence."], return_tensors="pt")).last_hidden_state
        assert torch.isfinite(out).all()
