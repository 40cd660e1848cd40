"""Exact resume with real processes: a run killed with SIGKILL between checkpoints, or stopped with Ctrl-C (SIGINT),
then `loralab train --resume`, ends with the metrics.jsonl rows and adapter weights of an uninterrupted run
(CPU, fp32, within 1e-6): data order, RNG (LoRA dropout), scheduler and optimizer come back from the checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config
from safetensors.torch import load_file

STEPS = 12
TRAIN = {"max_steps": STEPS, "save_steps": 4, "save_total_limit": 2, "logging_steps": 1, "warmup_steps": 2,
         "gradient_accumulation_steps": 2, "precision": "fp32", "eval_loss_steps": 6, "device": "cpu",
         "report_to": []}


def _loralab(*args, **popen):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.Popen([sys.executable, "-m", "loralab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _run(*args) -> subprocess.CompletedProcess:
    proc = _loralab(*args)
    out, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steps_logged(run: Path) -> int:
    try:
        return max((r["step"] for r in _rows(run) if "loss" in r), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def _interrupt(cfg: Path, run: Path, sig: int, after_step: int) -> subprocess.CompletedProcess:
    """Start `loralab train`, send ``sig`` once it has logged ``after_step``; return the finished process."""
    proc = _loralab("train", str(cfg))
    deadline = time.monotonic() + 1500
    while _steps_logged(run) < after_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=1500)
    return subprocess.CompletedProcess(["train"], proc.returncode, out, err)


def _same_run(run: Path, reference: Path) -> float:
    """Assert equal metrics rows (timings aside) and adapters; return the adapters' max abs difference."""
    timing = {"train_runtime", "train_loss"}
    rows = [r for r in _rows(run) if not timing & set(r)]
    expected = [r for r in _rows(reference) if not timing & set(r)]
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected]
    for got, want in zip(rows, expected, strict=False):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6, rel=0), (key, got, want)
    a, b = (load_file(run / "adapter/adapter_model.safetensors"),
            load_file(reference / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, alpaca_path):
    """An uninterrupted run; returns (config writer, its run directory)."""
    def config(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return write_config(folder / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                            data={"path": str(alpaca_path), "num_examples": 48, "eval_size": 4}, train=TRAIN)

    tmp = tmp_path_factory.mktemp("resume")
    cfg = config(tmp / "reference")
    _run("prepare", str(cfg))
    _run("train", str(cfg))
    return config, tmp / "reference" / "runs" / "t"


def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, reference):
    config, ref = reference
    cfg, run = config(tmp_path), tmp_path / "runs" / "t"
    _run("prepare", str(cfg))
    killed = _interrupt(cfg, run, signal.SIGKILL, after_step=6)
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists()
    resumed = _run("train", str(cfg), "--resume")
    assert "resuming from" in resumed.stdout
    diff = _same_run(run, ref)
    print(f"SIGKILL + resume vs uninterrupted: adapter max abs difference {diff:.3g}")
    assert diff <= 1e-6


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, reference):
    config, ref = reference
    cfg, run = config(tmp_path), tmp_path / "runs" / "t"
    _run("prepare", str(cfg))
    stopped = _interrupt(cfg, run, signal.SIGINT, after_step=5)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert "Traceback" not in stopped.stderr
    step = _steps_logged(run)
    assert last.startswith(f"loralab: interrupted: checkpoint saved at step {step} of {STEPS}") and "--resume" in last
    assert (run / "checkpoints" / f"checkpoint-{step}").is_dir()
    resumed = _run("train", str(cfg), "--resume")
    assert f"resuming from step {step}" in resumed.stdout
    diff = _same_run(run, ref)
    print(f"Ctrl-C at step {step} + resume vs uninterrupted: adapter max abs difference {diff:.3g}")
    assert diff <= 1e-6
