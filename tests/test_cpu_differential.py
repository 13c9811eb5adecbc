"""The CPU fast paths against the reference, on odd shapes, odd row counts and misaligned storage.

Each group of ``tests/cpu_differential.py`` runs in its own process: a crash inside a PyTorch kernel fails the test
and names the case that was running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("group", list(cpu_differential.GROUPS))
def test_fast_paths_agree_with_the_reference(group):
    proc = subprocess.run(
        [sys.executable, str(WORKER), group], capture_output=True, text=True, timeout=300, cwd=WORKER.parent
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
    if group in KERNEL:
        kernel, contract = KERNEL[group], cpu.INT4PACK if "int4" in KERNEL[group] else cpu.INT8PACK
        if group.startswith("w8a8") and cpu.a8w8_kernel_max_rows(4096, 4096) == 0:
            kernel, contract = "_int_mm", cpu.INT_MM  # exact sums at every row count (Zen 4)
        assert (summary["calls"][kernel] > 0) == contract.holds(), summary
    # float8 weights, alone or with float8 activations, take the float16-bits conversion on every CPU.
    assert (summary["calls"]["float8_into"] > 0) == (group in ("float8", "w8a8-float8")), summary
