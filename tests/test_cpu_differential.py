"""The CPU fast paths against the reference, on odd shapes, odd row counts and misaligned storage.

Each group of ``tests/cpu_differential.py`` runs in its own process: a crash inside a PyTorch kernel fails the test
and names the case that was running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quanto_backend.ops import cpu

WORKER = Path(__file__).with_name("cpu_differential.py")
sys.path.insert(0, str(WORKER.parent))
import cpu_differential  # noqa: E402

# The kernel each group must have reached on a CPU where its contract holds (the others have no CPU kernel).
KERNEL = {
    "int8": "_weight_int8pack_mm",
    "int4": "_weight_int4pack_mm_for_cpu",
    "int2": "_weight_int4pack_mm_for_cpu",
    "w8a8-static": "_weight_int8pack_mm",
    "w8a8-dynamic": "_weight_int8pack_mm",
}
# The groups also run under the other code paths this CPU can take, chosen by the environment: an AVX-512 machine
# runs ATen's AVX2 kernels, a Zen 3's (ATEN_CPU_CAPABILITY=avx2), and oneDNN without its VNNI GEMMs
# (ONEDNN_MAX_CPU_ISA=AVX2), where torch._int_mm's sums saturate. A fast path that passed on one set proves nothing
# about the other. Each variant has its own inductor cache: torch 2.13's mixes kernels compiled for different
# ATEN_CPU_CAPABILITY values, and crashes or computes garbage with them.
VARIANTS: dict[str, dict[str, str]] = {"native": {}}
if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
    VARIANTS["aten-avx2"] = {"ATEN_CPU_CAPABILITY": "avx2"}
    VARIANTS["onednn-avx2"] = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("group", list(cpu_differential.GROUPS))
def test_fast_paths_agree_with_the_reference(group, variant, tmp_path):
    env = {**os.environ, **VARIANTS[variant], "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run(
        [sys.executable, str(WORKER), group], capture_output=True, text=True, timeout=300, cwd=WORKER.parent, env=env
    )
    lines = proc.stdout.splitlines()
    started = [line.removeprefix("START ") for line in lines if line.startswith("START ")]
    if proc.returncode != 0:
        running = started[-1] if started else "before the first case"
        pytest.fail(f"the process died (exit {proc.returncode}) in case {running}\n{proc.stderr[-3000:]}")
    failures = [line for line in lines if line.startswith("FAIL ")]
    assert not failures, "\n".join(failures)
    summary = json.loads(next(line for line in lines if line.startswith("SUMMARY ")).removeprefix("SUMMARY "))
    assert summary["cases"] == len(cpu_differential.cases(group)) == len(started)
    if variant == "native":
        assert summary["holds"] == {name: getattr(cpu, name).holds() for name in cpu_differential.CONTRACTS}
    if group in KERNEL:
        kernel, contract = KERNEL[group], "INT4PACK" if "int4" in KERNEL[group] else "INT8PACK"
        if group.startswith("w8a8") and summary["a8w8_kernel_rows"] == 0:
            kernel, contract = "_int_mm", "INT_MM"  # exact sums at every row count (Zen 4)
        assert (summary["calls"][kernel] > 0) == summary["holds"][contract], summary
    # float8 weights, alone or with float8 activations, take the float16-bits conversion on every CPU.
    assert (summary["calls"]["float8_into"] > 0) == (group in ("float8", "w8a8-float8")), summary
