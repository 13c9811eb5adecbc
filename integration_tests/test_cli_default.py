"""The main job: `quanto-backend` with no arguments, on the embedded real model."""

import subprocess
import sys


def test_default_run_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "quanto_backend.cli", "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = {line.split()[0]: line.split()[1:] for line in lines[lines.index(next(l for l in lines if l.startswith("weights"))) + 1 :]}
    assert set(table) == {"float32", "qint8", "qint4", "qfloat8_e4m3fn"}
    assert float(table["qint8"][2]) > 0.999 and float(table["qint4"][2]) > 0.95
    assert float(table["qint4"][0]) < float(table["qint8"][0]) < float(table["float32"][0]) / 3
