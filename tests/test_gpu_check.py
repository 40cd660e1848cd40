"""bench/gpu_check.sh passes its own dry run on a machine without a GPU: it parses, finds its inputs, would run."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(alpaca_path, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--data", str(alpaca_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "would run" in proc.stdout and "gpu_check.sh --dry-run: ok" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_gpu_check_names_a_missing_input(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--data",
                           str(tmp_path / "no.json")],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 2 and "missing input" in proc.stderr
