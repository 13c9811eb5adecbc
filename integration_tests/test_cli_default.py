"""The main job: `quanto-backend` with no arguments, on the embedded real model."""

import subprocess
import sys


def test_default_run_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "quanto_backend.cli", "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("weights"))
    table = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[header + 1 :]}
    assert set(table) == {"float32", "qint8", "qint4", "qfloat8_e4m3fn"}
    layers_mb, model_mb, cosine, latency_ms = range(4)
    assert table["qint8"][cosine] > 0.999 and table["qint4"][cosine] > 0.95
    assert table["qint4"][layers_mb] < table["qint8"][layers_mb] < table["float32"][layers_mb] / 3
    assert all(row[latency_ms] > 0 for row in table.values())
