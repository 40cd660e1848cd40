"""Exact resume with real processes: a run killed with SIGKILL between checkpoints, or stopped with Ctrl-C (SIGINT),
then `loralab train --resume`, ends with the metrics.jsonl rows (every field: loss, grad_norm, learning_rate, epoch,
eval_loss, the summary's train_loss) and the adapter weights of an uninterrupted run, bit for bit, on the CPU speed
path in fp32 and in bf16 (where the CPU has native bf16): data order, RNG (LoRA dropout), scheduler and optimizer
come back from the checkpoint, and the speed path stays on however the model switches between train() and eval()."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_config
from safetensors.torch import load_file

from loralab.cpu import catalogue, fused_norm
from loralab.cpu import speed_path as sp
from loralab.devices import cpu_has_native_bf16

STEPS = 12
# The held-out loss at step 8 comes after the checkpoint each interrupted run resumes from (4 after SIGKILL, 5 or 6
# after Ctrl-C): its eval() and train() once dropped the fused RMSNorms, so only the uninterrupted run had them
# up to there (issue 26).
TRAIN = {"max_steps": STEPS, "save_steps": 4, "save_total_limit": 2, "logging_steps": 1, "warmup_steps": 2,
         "gradient_accumulation_steps": 4, "eval_loss_steps": 8, "device": "cpu", "report_to": []}


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


def _same_run(run: Path, reference: Path) -> None:
    """Assert the metrics rows equal, every field but the summary's train_runtime, and the adapters equal, bit for
    bit."""
    def logged(folder: Path) -> list[dict]:
        timing = ("train_runtime", "train_runtime_last_process")  # wall-clock time, not what was trained
        return [{k: v for k, v in r.items() if k not in timing} for r in _rows(folder)]

    rows, expected = logged(run), logged(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        assert got == want, f"step {want['step']}: resumed {got}, uninterrupted {want}"
    a, b = (load_file(run / "adapter/adapter_model.safetensors"),
            load_file(reference / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    differ = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"adapter tensors differ (max abs difference): {differ}"


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def reference(request, tmp_path_factory, tiny_model_dir, alpaca_path):
    """An uninterrupted run in each precision; returns (config writer, its run directory)."""
    precision = request.param
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("bf16 trains on a CPU only with native bf16 (AVX512-BF16 or AMX); this one has none")

    def config(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return write_config(folder / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                            data={"path": str(alpaca_path), "num_examples": 48, "eval_size": 4},
                            train={**TRAIN, "precision": precision})

    tmp = tmp_path_factory.mktemp(f"resume-{precision}")
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
    assert "resuming from step 4" in resumed.stdout
    _same_run(run, ref)
    summary = _rows(run)[-1]  # the runtime counts the killed process's time up to checkpoint 4 too
    assert summary["train_runtime"] > summary["train_runtime_last_process"] > 0


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
    _same_run(run, ref)


def test_the_speed_path_stays_on_when_the_model_switches_between_train_and_eval(tiny_model_dir):
    """transformers kernelizes the model again at each train() or eval() that changes its mode when the `kernels`
    package is installed (transformers 5 turns hub kernels on), which gave every RMSNorm its class's forward back:
    a resumed run lost the fused norms at its first step, an uninterrupted one at its first held-out loss."""
    from transformers import AutoModelForCausalLM

    from loralab.config import LoraSection
    from loralab.models.loading import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraSection())
    base = sp.base_model(model)
    kernels_before = getattr(base, "use_kernels", None), getattr(base, "kernels_mode", None)

    def fused_norms() -> int:
        return sum(getattr(m.__dict__.get("forward"), "__func__", None) is fused_norm._fused_forward
                   for m in model.modules())

    pieces = catalogue.ALL_PIECES._replace(tuned_allocator=False)  # glibc's setting would outlast the test
    with sp.speed_path(model, row_tokens=256, pieces=pieces) as switched:
        assert switched.fused_rms_norms > 0
        for mode in (False, True, False, True):  # the held-out loss, then training, twice over
            model.train(mode)
            assert fused_norms() == switched.fused_rms_norms
    assert fused_norms() == 0
    assert (getattr(base, "use_kernels", None), getattr(base, "kernels_mode", None)) == kernels_before
