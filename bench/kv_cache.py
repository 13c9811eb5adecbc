"""QuantizedCache against transformers' DynamicCache: logits error, bytes held and CPU decode-step time.

* error: issue 15's setup (a randomly initialised Llama, hidden 128, 2 layers, 4 heads, 2 KV heads, 80 tokens fed one
  at a time, residual_length 16), relative error of all the logits vs a DynamicCache;
* bytes: the cache after 4096 tokens of a Llama-3-8B-like layer (8 KV heads, head_dim 128, bfloat16), as a
  fraction of the bfloat16 DynamicCache;
* step time: one decode step of a small Llama (hidden 512, 4 layers, head_dim 64) after a prompt, the caches
  measured in alternation (round-robin) so that load on a shared machine hits them alike. Wall time with
  ``--threads`` threads, and the CPU time of one thread (``step_time_one_thread``): a single compute thread's CPU
  time is not inflated when other processes take the core, so it is the steadier figure on a shared machine.

    python bench/kv_cache.py                      # bench/results/kv_cache-cpu.json
    python bench/kv_cache.py --quick --output /tmp/kv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from plot import machine_info  # bench/plot.py, next to this script
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from quanto_backend import QuantizedCache

RESULTS = Path(__file__).parent / "results"
# (label, QuantizedCache kwargs); q_group_size is set per model (it must divide head_dim)
CONFIGS = (
    ("int8", dict(nbits=8)),
    ("int4", dict(nbits=4)),
    ("int2", dict(nbits=2)),
    ("float8", dict(nbits=8, float8=True)),
    ("int4 minmax", dict(nbits=4, optimizer="minmax")),
)
ANCHOR = {"int4": 0.0499, "int2": 0.2323, "int8": "refused by optimum-quanto's cache"}


def _llama(seed: int = 0, **kwargs) -> LlamaForCausalLM:
    base = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=4096,
    )
    base.update(kwargs)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**base)).eval()


@torch.no_grad()
def _teacher_forced(model, ids, cache) -> torch.Tensor:
    return torch.cat([model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits for t in range(ids.shape[1])], 1)


def measure_error(tokens: int) -> dict[str, float]:
    model = _llama()
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    reference = _teacher_forced(model, ids, DynamicCache(config=model.config))
    errors = {}
    for label, kwargs in CONFIGS:
        cache = QuantizedCache(model.config, q_group_size=32, residual_length=16, **kwargs)
        logits = _teacher_forced(model, ids, cache)
        errors[label] = round(((logits - reference).norm() / reference.norm()).item(), 5)
    return errors


def measure_bytes(tokens: int) -> dict[str, float]:
    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=1)
    torch.manual_seed(2)
    prompt = tokens - 100  # then 100 decoded tokens, so the full-precision residual is not empty
    steps = [torch.randn(2, 1, 8, n, 128, dtype=torch.bfloat16) for n in [prompt] + [1] * 100]
    reference = DynamicCache(config=config)
    for kv in steps:
        reference.update(kv[0], kv[1], 0)
    reference_bytes = sum(t.numel() * t.element_size() for t in (reference.layers[0].keys, reference.layers[0].values))
    ratios = {}
    for label, kwargs in CONFIGS:
        cache = QuantizedCache(config, **kwargs)  # defaults: q_group_size 64, residual_length 128
        for kv in steps:
            cache.update(kv[0], kv[1], 0)
        ratios[label] = round(cache.nbytes / reference_bytes, 4)
    return {"tokens": tokens, "bf16_bytes": reference_bytes, "ratio_to_bf16": ratios}


@torch.no_grad()
def measure_step_time(prompt_len: int, steps: int, rounds: int, clock=time.perf_counter) -> dict:
    model = _llama(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=1024)  # fmt: skip
    torch.manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    makers = {"DynamicCache": lambda: DynamicCache(config=model.config)}
    for label, kwargs in CONFIGS:
        makers[label] = lambda kwargs=kwargs: QuantizedCache(model.config, q_group_size=64, **kwargs)
    times: dict[str, list[float]] = {name: [] for name in makers}
    for round_ in range(rounds + 1):  # round 0 warms up and is not recorded
        for name, make in makers.items():  # interleaved: each round runs every cache once
            cache = make()
            token = model(input_ids=prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
            for _ in range(steps):  # each step timed alone: the context grows by one token a step, a 1/1024 change
                start = clock()
                token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
                if round_:
                    times[name].append((clock() - start) * 1e3)
    # On a shared machine a step is slowed by other processes, never sped up: the minimum and the lower quartile
    # estimate the cost of the step itself, the median what one could expect under this load. The mean includes
    # the steps that flush the residual into quantized blocks (one per residual_length steps), amortized.
    summary = {}
    stats = (("min", min), ("q1", lambda t: statistics.quantiles(t, n=4)[0]), ("median", statistics.median),
             ("mean", statistics.mean))  # fmt: skip
    for stat, fn in stats:
        values = {name: round(fn(t), 3) for name, t in times.items()}
        summary[f"{stat}_ms_per_step"] = values
        summary[f"{stat}_ratio_to_dynamic"] = {name: round(v / values["DynamicCache"], 3) for name, v in values.items()}
    return {
        "prompt_tokens": prompt_len,
        "decode_steps": steps,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        **summary,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "kv_cache-cpu.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values -> cache rename
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = {
            "benchmark": "kv_cache",
            "machine": machine_info(),
            "note": "step times on a shared, loaded machine: noisy; caches measured round-robin in one process",
            "anchor_optimum_quanto_error": ANCHOR,
            "error": measure_error(24 if args.quick else 80),
            "bytes": measure_bytes(256 if args.quick else 4096),
            "step_time": measure_step_time(32, 4, 1) if args.quick else measure_step_time(1024, 32, 6),
        }
        torch.set_num_threads(1)
        # 128 steps (the default residual_length): each round's steps include one flush per layer
        step_args = (32, 4, 1) if args.quick else (1024, 128, 4)
        one_thread = measure_step_time(*step_args, clock=time.thread_time)
        report["step_time_one_thread"] = {"clock": "time.thread_time", **one_thread}
    finally:
        torch.set_num_threads(threads)
    report["command"] = "python bench/kv_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("error", "bytes")}, indent=1))
    for key in ("step_time", "step_time_one_thread"):
        for stat in ("min", "q1", "median", "mean"):
            print(key, stat, json.dumps(report[key][f"{stat}_ratio_to_dynamic"]))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
