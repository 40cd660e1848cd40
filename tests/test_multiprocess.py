"""Two processes through torchrun (DDP, gloo on CPU) against one: the same effective batch of examples per step,
the same losses within 1e-4 (LoRA dropout off: each process draws its own), one metrics.jsonl and one adapter."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_config
from loralab import decisions
from loralab.config import TrainConfig
from loralab.errors import LoralabError

TRAIN = {"max_steps": 3, "save_steps": 100, "logging_steps": 1, "warmup_steps": 1, "per_device_train_batch_size": 1,
         "gradient_accumulation_steps": 8, "precision": "fp32", "device": "cpu", "report_to": []}


def _loralab(prefix: list[str], *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([*prefix, "-m", "loralab", *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def test_examples_per_process_keep_the_effective_batch():
    train = TrainConfig(per_device_train_batch_size=1, gradient_accumulation_steps=8)
    assert [decisions.per_process_examples(train, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(LoralabError, match=r"16 processes are more than the examples of an optimizer step \(8 = "):
        decisions.per_process_examples(train, 16)
    with pytest.raises(LoralabError, match="do not split evenly over 3 processes"):
        decisions.per_process_examples(train, 3)


def test_two_processes_match_one(tmp_path, tiny_model_dir, alpaca_path):
    cfgs = {}
    for n in (1, 2):
        folder = tmp_path / f"p{n}"
        folder.mkdir()
        cfgs[n] = write_config(folder / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                               data={"path": str(alpaca_path), "num_examples": 40, "eval_size": 4},
                               lora={"lora_dropout": 0.0}, train=TRAIN)
    _loralab([sys.executable], "prepare", str(cfgs[1]))
    shutil.copytree(tmp_path / "p1" / "runs", tmp_path / "p2" / "runs")  # same prepared data, hashes match the config
    _loralab([sys.executable], "train", str(cfgs[1]))
    double = _loralab(_torchrun(2), "train", str(cfgs[2]))
    assert "2 processes x 4 examples = 8 examples per optimizer step" in double.stdout
    assert double.stdout.count("adapter saved") == 1  # only rank 0 speaks and writes
    rows = {n: [json.loads(l) for l in (tmp_path / f"p{n}" / "runs/t/metrics.jsonl").read_text().splitlines()]
            for n in (1, 2)}
    losses = {n: [r["loss"] for r in rows[n] if "loss" in r] for n in (1, 2)}
    print("step  1 process  2 processes  difference")
    for step, (a, b) in enumerate(zip(losses[1], losses[2]), 1):
        print(f"{step:>4}  {a:.6f}   {b:.6f}     {abs(a - b):.2e}")
    assert len(losses[2]) == TRAIN["max_steps"] == len(losses[1])
    assert losses[2] == pytest.approx(losses[1], abs=1e-4, rel=0)
    evals = {n: [r["eval_loss"] for r in rows[n] if "eval_loss" in r] for n in (1, 2)}
    assert evals[2] == pytest.approx(evals[1], abs=1e-4, rel=0) and len(evals[2]) == 2
    run = tmp_path / "p2" / "runs/t"
    assert sorted(p.name for p in run.glob("metrics*")) == ["metrics.jsonl"]
    assert sorted(p.name for p in run.glob("adapter*")) == ["adapter"]
    a, b = load_file(run / "adapter/adapter_model.safetensors"), load_file(tmp_path / "p1/runs/t/adapter/adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_more_processes_than_examples_per_step_is_one_line(tmp_path, tiny_model_dir, alpaca_path):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path), "num_examples": 16, "eval_size": 2},
                       train=dict(TRAIN, gradient_accumulation_steps=1))
    _loralab([sys.executable], "prepare", str(cfg))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run([*_torchrun(2), "-m", "loralab", "train", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("loralab: error:")]
    assert lines and "2 processes are more than the examples of an optimizer step (1 = " in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "runs/t/metrics.jsonl").exists() and not (tmp_path / "runs/t/adapter").exists()
