"""The ``quanto-backend`` command: quantize a model several ways and report size, accuracy and CPU latency.

With no arguments it quantizes the embedded all-MiniLM-L6-v2 to int8, int4 and float8 weights.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from .evaluate import (
    default_model_dir,
    linear_nbytes,
    load_sentences,
    mean_cosine,
    median_latency,
    sentence_embeddings,
    weights_nbytes,
)
from .qtypes import as_qtype
from .quantize import freeze, quantize
from .tensor import WEIGHT_QTYPES

DEFAULT_WEIGHTS = ("int8", "int4", "float8")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quanto-backend", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a local transformers model folder")
    parser.add_argument(
        "--weights",
        default=",".join(DEFAULT_WEIGHTS),
        help=f"comma-separated weight qtypes (default: {','.join(DEFAULT_WEIGHTS)})",
    )
    parser.add_argument("--group-size", type=int, default=None, help="inputs per group for int2/int4 (default 128)")
    parser.add_argument("--exclude", action="append", default=None, help="fnmatch pattern of modules to keep float")
    parser.add_argument("--json", type=Path, default=None, help="also write the table to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="save each quantized model to OUTPUT/<weights> (safetensors + config.json with its quantization_config)"
        " for transformers' from_pretrained after `import quanto_backend`",
    )
    args = parser.parse_args(argv)
    args.weights = [as_qtype(w.strip(), WEIGHT_QTYPES, "weights") for w in args.weights.split(",") if w.strip()]
    return args


# Files of which at least one is in a folder that holds a tokenizer (fast, WordPiece, BPE or SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
)


class RandomTokens:
    """Stands in for the tokenizer of a model folder that has none: each sentence becomes ``length`` token ids
    drawn from the model's vocabulary, seeded by the sentence, so every configuration sees the same inputs."""

    def __init__(self, vocab_size: int, length: int = 16):
        self.vocab_size, self.length = vocab_size, length

    def __call__(self, sentences: list[str], **kwargs) -> dict[str, torch.Tensor]:
        seeds = [zlib.crc32(sentence.encode()) for sentence in sentences]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        ids = [torch.randint(0, self.vocab_size, (self.length,), generator=g) for g in generators]
        input_ids = torch.stack(ids)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _check_not_quantized(model_dir: Path) -> None:
    """Refuse a folder whose ``config.json`` says its weights are quantized: the report compares quantizations of
    a float model with that float model, which such a folder no longer holds."""
    config = json.loads((model_dir / "config.json").read_text())
    qconfig = config.get("quantization_config")
    if qconfig is None:
        return
    method = qconfig.get("quant_method", "unknown") if isinstance(qconfig, dict) else qconfig
    details = ", ".join(f"{k}={qconfig[k]}" for k in ("weights", "activations", "group_size") if qconfig.get(k))
    raise ValueError(
        f"{model_dir} holds an already-quantized model (quant_method={method}{', ' + details if details else ''}); "
        "quanto-backend quantizes a float model and measures each quantization against it: point --model at the "
        "float checkpoint it was made from"
    )


def _load(model_dir: Path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # ours is the one that tells the user how far along the run is

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a transformers model folder (no config.json)")
    _check_not_quantized(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    causal = any(arch.endswith("ForCausalLM") for arch in (config.architectures or []))
    model_cls = AutoModelForCausalLM if causal else AutoModel
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = RandomTokens(config.vocab_size)
    return (lambda: model_cls.from_pretrained(model_dir, dtype=torch.float32).eval()), tokenizer


def _save(model_dir: Path, tokenizer, qtype, args: argparse.Namespace) -> None:
    """Save ``model_dir`` quantized to ``qtype`` as transformers' quantize-on-load makes it (the format that
    ``from_pretrained`` reloads), with its tokenizer, into ``args.output / <weights>``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .integrations import QuantoConfig

    config = AutoConfig.from_pretrained(model_dir)
    causal = any(arch.endswith("ForCausalLM") for arch in (config.architectures or []))
    model_cls = AutoModelForCausalLM if causal else AutoModel
    group_size = args.group_size if qtype.is_packed else None
    qconfig = QuantoConfig(weights=qtype, group_size=group_size, modules_to_not_convert=args.exclude)
    out = args.output / qtype.name.removeprefix("q")
    model_cls.from_pretrained(model_dir, dtype=torch.float32, quantization_config=qconfig).save_pretrained(out)
    if not isinstance(tokenizer, RandomTokens):
        tokenizer.save_pretrained(out)


def run(argv: list[str] | None = None) -> list[dict]:
    """Run the command and return its table rows (one dict per configuration, float first)."""
    args = _parse_args(argv)
    model_dir = args.model or default_model_dir()
    load, tokenizer = _load(model_dir)
    sentences = load_sentences()
    timed_batch = sentences[:16]
    rows = []
    configs = [None, *args.weights]
    with tqdm(configs, desc="quantizing", disable=args.quiet, unit="config") as progress:
        for qtype in progress:
            progress.set_postfix_str(str(qtype or "float32"))
            model = load()
            if qtype is not None:
                group_size = args.group_size if qtype.is_packed else None  # 8-bit weights take no group size
                quantize(model, weights=qtype, group_size=group_size, exclude=args.exclude)
                freeze(model)
                if args.output is not None:
                    _save(model_dir, tokenizer, qtype, args)
            embeddings = sentence_embeddings(model, tokenizer, sentences)
            if qtype is None:
                reference = embeddings
            latency = median_latency(lambda m=model: sentence_embeddings(m, tokenizer, timed_batch), repeats=5)
            rows.append(
                {
                    "weights": str(qtype or "float32"),
                    "linear_mb": linear_nbytes(model) / 2**20,
                    "size_mb": weights_nbytes(model) / 2**20,
                    "cosine": mean_cosine(embeddings, reference),
                    "latency_ms": latency * 1e3,
                }
            )
    inputs = None if not isinstance(tokenizer, RandomTokens) else f"{tokenizer.length} random token ids per sentence"
    _print_table(model_dir, rows, len(sentences), len(timed_batch), inputs)
    if args.json:
        args.json.write_text(json.dumps({"model": str(model_dir), "rows": rows}, indent=2))
    return rows


def _print_table(model_dir: Path, rows: list[dict], n_sentences: int, batch: int, inputs: str | None = None) -> None:
    print(f"model: {model_dir}")
    if inputs is not None:
        print(f"inputs: the folder has no tokenizer, so each of the {n_sentences} sentences is {inputs}")
    print(f"cosine: mean over {n_sentences} sentences of mean-pooled last hidden states vs float32")
    print(f"latency: median CPU time of one forward pass over {batch} sentences ({torch.get_num_threads()} threads)")
    print("size: MB of the Linear/Conv2d layers (those quantized) and of the whole model")
    print(f"{'weights':<16}{'layers (MB)':>12}{'model (MB)':>12}{'cosine':>10}{'latency (ms)':>14}")
    for r in rows:
        print(
            f"{r['weights']:<16}{r['linear_mb']:>12.2f}{r['size_mb']:>12.2f}{r['cosine']:>10.5f}{r['latency_ms']:>14.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        run(argv)
    except (FileNotFoundError, ValueError) as e:
        print(f"quanto-backend: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
