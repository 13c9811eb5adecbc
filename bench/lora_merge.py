"""LoRA merge into quantized weights: merged vs unmerged logits of a tiny Llama, per weight format, for the way
``quanto_backend.lora`` requantizes and two alternatives that keep the module's own grid.

The adapters are realistic ones: peft's default init (B = 0), then AdamW steps on the quantized, frozen base
(QLoRA) on a next-token task, which leaves ``||delta|| / ||W||`` about 0.11 at the default lr (the LoRA paper
reports 0.06-0.11 for GPT-3's W_q). Three ways to put ``dequantize(W) + delta`` back into the format:

* ``fresh`` (the library's): quantize it from scratch, with the module's optimizer (new scales, and shifts);
* ``grid``: keep the module's scales (and shifts) and round onto them, clipping what leaves their range;
* ``best``: per row (8-bit) or group (2/4-bit), whichever of the two reconstructs the merged weight better.

Also recorded: the adapter's effect (unmerged vs the base alone) and the format's own error (the float model
with the same adapters merged, then quantized, vs that float model).

    python bench/lora_merge.py                    # bench/results/lora_merge-cpu.json
    python bench/lora_merge.py --quick --output /tmp/lm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from plot import machine_info  # bench/plot.py, next to this script
from transformers import LlamaConfig, LlamaForCausalLM

import quanto_backend.lora as lora
from quanto_backend import freeze, ops, quantize
from quanto_backend.tensor import GroupedQWeight, PerAxisQWeight, quantize_weight

RESULTS = Path(__file__).parent / "results"
FORMATS = ("int8", "float8", "int4", "int2")
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
ISSUE_TARGETS = {"int8": 0.01, "int4": 0.05}
VOCAB = 256


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    return LlamaForCausalLM(config).eval()


SUCCESSOR = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))


def task_batch(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences of a deterministic language: each token is followed by ``SUCCESSOR[token]``."""
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
    for t in range(1, length):
        ids[:, t] = SUCCESSOR[ids[:, t - 1]]
    return ids


def train_adapters(model, steps: int, lr: float, seed: int = 1) -> float:
    """AdamW on the adapters (the base is frozen); returns the last loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = task_batch(8, 32, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _on_grid(module, weight: torch.Tensor, best: bool):
    """``weight`` rounded onto ``module``'s own scales (and shifts); with ``best``, per row/group the better of that
    and a fresh quantization."""
    old = module.qweight
    fresh = quantize_weight(weight.to(module.compute_dtype), module.weight_qtype, None, module.optimizer)
    if isinstance(old, GroupedQWeight):
        bits, size = old.qtype.bits, old.group_size
        flat = weight.reshape(weight.shape[0], -1).float()
        n, padded = flat.shape[1], old.scale.shape[1] * size
        flat = torch.cat([flat, flat[:, -1:].expand(-1, padded - n)], dim=1)
        kept = ops.quantize_affine(flat, old.scale, old.shift, bits)
        if not best:
            return GroupedQWeight(kept, old.scale, old.shift, old.qtype, size, old.shape, old.dtype)
        errors = []
        for codes, scale, shift in ((kept, old.scale, old.shift), (fresh.qdata, fresh.scale, fresh.shift)):
            err = (ops.dequantize_affine(codes, scale, shift, bits).float() - flat)[:, :n]
            errors.append(torch.nn.functional.pad(err, (0, padded - n)).unflatten(1, (-1, size)).square().sum(-1))
        take = errors[1] < errors[0]
        qdata = torch.where(take.repeat_interleave(size * bits // 8, dim=1), fresh.qdata, kept)
        scale, shift = torch.where(take, fresh.scale, old.scale), torch.where(take, fresh.shift, old.shift)
        return GroupedQWeight(qdata, scale, shift, old.qtype, size, old.shape, old.dtype)
    assert isinstance(old, PerAxisQWeight)
    kept = ops.quantize_symmetric(weight.to(old.dtype), old.scale, old.qtype.dtype)
    if not best:
        return PerAxisQWeight(kept, old.scale, old.qtype, old.axis, old.shape, old.dtype)
    dims = tuple(range(1, weight.ndim))
    target = weight.float()
    err_kept = (ops.dequantize_symmetric(kept, old.scale).float() - target).square().sum(dims, keepdim=True)
    err_fresh = (ops.dequantize_symmetric(fresh.qdata, fresh.scale).float() - target).square().sum(dims, keepdim=True)
    take = err_fresh < err_kept
    qdata = torch.where(take, fresh.qdata.view(torch.uint8), kept.view(torch.uint8)).view(kept.dtype)
    return PerAxisQWeight(qdata, torch.where(take, fresh.scale, old.scale), old.qtype, old.axis, old.shape, old.dtype)


def _store_on_grid(best: bool):
    library_store = lora._store_weight

    def store(module, weight, group_size):
        if not module.frozen:
            return library_store(module, weight, group_size)
        qweight = _on_grid(module, weight, best)
        module._parameters["weight"] = torch.nn.Parameter(qweight.qdata, requires_grad=False)
        module._parameters["weight_scale"] = torch.nn.Parameter(qweight.scale, requires_grad=False)
        if "weight_shift" in module._parameters:
            module._parameters["weight_shift"] = torch.nn.Parameter(qweight.shift, requires_grad=False)

    return store


STRATEGIES = {"fresh": lora._store_weight, "grid": _store_on_grid(False), "best": _store_on_grid(True)}


@torch.no_grad()
def _merge_errors(peft_model, ids: torch.Tensor) -> dict[str, float]:
    unmerged = peft_model(ids).logits
    with peft_model.disable_adapter():
        base_only = peft_model(ids).logits
    row = {"adapter_effect": _rel(unmerged, base_only)}
    library_store = lora._store_weight
    try:
        for name, store in STRATEGIES.items():
            lora._store_weight = store
            peft_model.merge_adapter()
            row[name] = _rel(peft_model(ids).logits, unmerged)
            peft_model.unmerge_adapter()
    finally:
        lora._store_weight = library_store
    return row


def measure(weights: str, seed: int, steps: int, lr: float) -> dict:
    model = tiny_llama(seed)
    quantize(model, weights=weights, exclude=["lm_head"])
    freeze(model)
    config = lora.register_quantized_lora(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    peft_model = get_peft_model(model, config)
    loss = train_adapters(peft_model, steps, lr)
    layers = [m for m in peft_model.modules() if isinstance(m, lora.QuantizedLoraLinear)]
    ratios = [(m.get_delta_weight("default").norm() / m.get_base_layer().qweight.dequantize().norm()).item()
              for m in layers]  # fmt: skip
    ids = task_batch(4, 64, torch.Generator().manual_seed(5))
    row = {"seed": seed, "loss": loss, "delta_over_W": statistics.mean(ratios), **_merge_errors(peft_model, ids)}
    # the format's own error: the same adapters merged into the float model, which is then quantized
    adapters = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    float_model = get_peft_model(tiny_llama(seed), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).eval()
    loaded = float_model.load_state_dict(adapters, strict=False)
    assert not loaded.unexpected_keys and not any("lora_" in k for k in loaded.missing_keys), loaded
    float_merged = float_model.merge_and_unload()
    with torch.no_grad():
        reference = float_merged(ids).logits
        quantize(float_merged, weights=weights, exclude=["lm_head"])
        freeze(float_merged)
        row["own_error"] = _rel(float_merged(ids).logits, reference)
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, few steps, for the tests")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--output", type=Path, default=RESULTS / "lora_merge-cpu.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    seeds, steps = ((0,), 3) if args.quick else ((0, 1, 2), args.steps)
    rows = {w: [measure(w, seed, steps, args.lr) for seed in seeds] for w in args.formats}
    summary = {
        w: {
            k: round(statistics.mean(r[k] for r in rs), 5)
            for k in ("delta_over_W", "adapter_effect", *STRATEGIES, "own_error")
        }  # fmt: skip
        for w, rs in rows.items()
    }
    report = {
        "benchmark": "lora_merge",
        "machine": machine_info(),
        "setup": {
            "model": "random-init Llama, hidden 128, 2 layers",
            "adapters": f"r 8, alpha 16 on {TARGETS}",
            "training": f"{steps} AdamW steps, lr {args.lr}, batch 8 x 32, on the quantized base",
            "eval": "4 x 64 tokens of the task",
            "seeds": list(seeds),
        },  # fmt: skip
        "issue_targets": ISSUE_TARGETS,
        "mean": summary,
        "rows": rows,
        "command": "python bench/lora_merge.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
