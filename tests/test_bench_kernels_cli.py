"""bench/kernels.py runs end to end in its CPU quick mode and writes a well-formed JSON report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH.parent))  # the script imports bench/plot.py as `plot`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def test_cpu_quick_run_writes_report(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "QUICK_CPU_SHAPES", ((128, 96),))
    monkeypatch.setattr(bench, "QUICK_CPU_M_VALUES", (1, 3))
    output = tmp_path / "kernels.json"
    assert bench.main(["--device", "cpu", "--quick", "--repeats", "2", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    cases = {(r["qtype"], r["mode"]) for r in report["linear"]}
    assert cases == set(bench.CASES)
    assert len(report["linear"]) == len(bench.CASES) * 2
    for row in report["linear"]:
        assert row["in_features"] == 128 and row["out_features"] == 96 and row["m"] in (1, 3)
        assert row["time_ms"] > 0 and row["bytes"] > 128 * 96 // 4
        for name in ("float32", "bfloat16"):
            assert row[f"speedup_vs_{name}"] == pytest.approx(row[f"{name}_linear_ms"] / row["time_ms"])
    assert {r["qtype"] for r in report["quantize"]} == {"int8", "int4", "int2", "float8"}
    assert all(r["gbps"] > 0 for r in report["quantize"])


def test_peak_bandwidth_override(bench):
    import torch

    assert bench.peak_bandwidth_gbps(torch.device("cpu"), 100.0) == 100.0
    assert bench.peak_bandwidth_gbps(torch.device("cpu"), None) is None
    assert bench.device_label(torch.device("cpu")) == "cpu"
