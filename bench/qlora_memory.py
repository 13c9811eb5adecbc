"""Peak memory of one LoRA training step (forward, backward, AdamW step) on a quantized frozen base vs a bfloat16
base, CPU: a Llama built from a config (random weights), the same LoRA adapters (r 16 on every projection).

Each configuration runs in its own process (glibc told to map every block of 64 KiB or more on its own, so that
freed tensors leave the RSS): the float weights are built, quantized and freed, one warm-up step runs, the free
pages are given back (malloc_trim), the kernel's peak-RSS counter is reset (/proc/self/clear_refs), and one measured
step runs; its peak resident memory is read from VmHWM. Linux only.

    python bench/qlora_memory.py                  # bench/results/qlora_memory-cpu.json
    python bench/qlora_memory.py --quick --output /tmp/q.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from plot import machine_info  # bench/plot.py, next to this script

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("bfloat16", "int8", "int4", "int2")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=4096, batch=2, seq=256),
    "quick": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, batch=1, seq=16),
}  # fmt: skip


# glibc serves large blocks from its heap once freed ones raised its mmap threshold, and keeps freed heap pages
# resident: the RSS would then count transients long gone. A fixed threshold maps every block of 64 KiB or more on
# its own and unmaps it when freed, so the peak RSS follows the peak of live tensors.
_CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _storage_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def child(config_name: str, size: str, threads: int) -> dict:
    """One configuration, in this process: build, quantize, measure one training step."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from quanto_backend import freeze, quantize
    from quanto_backend.lora import register_quantized_lora

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    rss_imports = _kib("VmRSS")  # the runtime and libraries, before any model exists
    shape = dict(SIZES[size])
    batch, seq = shape.pop("batch"), shape.pop("seq")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    if config_name != "bfloat16":
        quantize(model, weights=config_name, exclude=["lm_head"])
        freeze(model)
    base_bytes = _storage_bytes(model)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    peft_model = get_peft_model(model, register_quantized_lora(lora)).train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    step()  # warm-up: AdamW's state and the allocator's pools exist from here on
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {
        "config": config_name,
        "base_storage_MiB": round(base_bytes / 2**20, 2),
        "rss_after_imports_MiB": round(rss_imports / 1024, 1),
        "rss_before_step_MiB": round(rss_before / 1024, 1),
        "peak_rss_step_MiB": round(_kib("VmHWM") / 1024, 1),
        "peak_above_imports_MiB": round((_kib("VmHWM") - rss_imports) / 1024, 1),
        "step_s": round(seconds, 3),
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--output", type=Path, default=RESULTS / "qlora_memory-cpu.json")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    if args.child:
        print(json.dumps(child(args.child, size, args.threads)))
        return 0
    rows = []
    for name in args.configs:
        command = [sys.executable, __file__, "--child", name, "--threads", str(args.threads)] + (
            ["--quick"] if args.quick else []
        )
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=_CHILD_ENV).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    reference = next((r for r in rows if r["config"] == "bfloat16"), None)
    for row in rows:
        if reference is not None:
            row["peak_above_imports_vs_bfloat16"] = round(
                row["peak_above_imports_MiB"] / reference["peak_above_imports_MiB"], 3
            )
    report = {
        "benchmark": "qlora_memory",
        "machine": machine_info(),
        "model": SIZES[size],
        "note": "peak RSS of the process during one step, also less the RSS after imports (the runtime and "
        "libraries); "
        "step times on a shared, loaded machine are noisy",
        "rows": rows,
        "command": "python bench/qlora_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
