"""Two processes through torchrun (DDP, gloo on CPU) against one: the same effective batch of examples per step,
the same losses within 1e-4 (LoRA dropout off: each process draws its own), one metrics.jsonl and one adapter."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config
from safetensors.torch import load_file

from loralab import decisions, launch
from loralab.config import TrainConfig
from loralab.errors import LoralabError
from loralab.launch import launched_processes

TRAIN = {"max_steps": 3, "save_steps": 100, "logging_steps": 1, "warmup_steps": 1, "per_device_train_batch_size": 1,
         "gradient_accumulation_steps": 8, "precision": "fp32", "device": "cpu", "report_to": []}


def _loralab(prefix: list[str], *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([*prefix, "-m", "loralab", *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _torchrun(n: int, folder: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]


def _accelerate(n: int, folder: Path | None = None) -> list[str]:
    # accelerate's --multi_gpu is its torchrun launcher and starts n processes on CPUs too; --cpu starts one.
    return [*_accelerate_launch(), "--multi_gpu", f"--num_processes={n}", "--main_process_port=0"]


def _accelerate_mpirun(n: int, folder: Path) -> list[str]:
    """accelerate's multi-CPU launcher: --cpu with an MPI hostfile (OpenMPI, which must be told it may run as root)."""
    (folder / "hostfile").write_text(f"localhost slots={n}\n")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    return ["env", "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", *_accelerate_launch(), "--cpu",
            f"--num_processes={n}", f"--mpirun_hostfile={folder / 'hostfile'}", f"--main_process_port={port}"]


def _accelerate_launch() -> list[str]:
    """`accelerate launch` of this Python, given the defaults it would otherwise warn about or read from a config."""
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_machines=1", "--mixed_precision=no",
            "--dynamo_backend=no"]


def test_examples_per_process_keep_the_effective_batch():
    train = TrainConfig(per_device_train_batch_size=1, gradient_accumulation_steps=8)
    assert [decisions.per_process_examples(train, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(LoralabError, match=r"16 processes are more than the examples of an optimizer step \(8 = "):
        decisions.per_process_examples(train, 16)
    with pytest.raises(LoralabError, match="do not split evenly over 3 processes"):
        decisions.per_process_examples(train, 3)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, alpaca_path) -> Path:
    """A folder with prepared/ (a prepared run directory, not trained) and p1/ (the same trained by one process)."""
    root = tmp_path_factory.mktemp("multiprocess")
    folder = root / "p1"
    folder.mkdir()
    cfg = _config(folder, tiny_model_dir, alpaca_path)
    _loralab([sys.executable], "prepare", str(cfg))
    shutil.copytree(folder / "runs", root / "prepared")  # the same prepared data for every launcher
    _loralab([sys.executable], "train", str(cfg))
    return root


def _config(folder: Path, tiny_model_dir: Path, alpaca_path: Path) -> Path:
    return write_config(folder / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                        data={"path": str(alpaca_path), "num_examples": 40, "eval_size": 4},
                        lora={"lora_dropout": 0.0}, train=TRAIN)


@pytest.mark.parametrize("launcher", [
    pytest.param(_torchrun, id="torchrun"), pytest.param(_accelerate, id="accelerate"),
    pytest.param(_accelerate_mpirun, id="accelerate-mpirun",
                 marks=pytest.mark.skipif(shutil.which("mpirun") is None,
                                          reason="no mpirun (apt install openmpi-bin)"))])
def test_two_processes_match_one(launcher, one_process_run, tiny_model_dir, alpaca_path):
    folder = one_process_run / launcher.__name__.strip("_")
    folder.mkdir()
    cfg = _config(folder, tiny_model_dir, alpaca_path)
    shutil.copytree(one_process_run / "prepared", folder / "runs")  # prepared data: hashes match the config
    double = _loralab(launcher(2, folder), "train", str(cfg))
    assert "2 processes x 4 examples = 8 examples per optimizer step" in double.stdout
    assert double.stdout.count("adapter saved") == 1  # only rank 0 speaks and writes
    assert "started one process" not in double.stdout
    runs = {1: one_process_run / "p1/runs/t", 2: folder / "runs/t"}
    rows = {n: [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] for n, run in runs.items()}
    losses = {n: [r["loss"] for r in rows[n] if "loss" in r] for n in (1, 2)}
    print(f"{launcher.__name__.strip('_')}\nstep  1 process  2 processes  difference")
    for step, (a, b) in enumerate(zip(losses[1], losses[2], strict=False), 1):
        print(f"{step:>4}  {a:.6f}   {b:.6f}     {abs(a - b):.2e}")
    # One process would train 4 of the step's 8 examples: only both halves give the single-process loss.
    assert len(losses[2]) == TRAIN["max_steps"] == len(losses[1])
    assert losses[2] == pytest.approx(losses[1], abs=1e-4, rel=0)
    evals = {n: [r["eval_loss"] for r in rows[n] if "eval_loss" in r] for n in (1, 2)}
    assert evals[2] == pytest.approx(evals[1], abs=1e-4, rel=0) and len(evals[2]) == 2
    assert sorted(p.name for p in runs[2].glob("metrics*")) == ["metrics.jsonl"]
    assert sorted(p.name for p in runs[2].glob("adapter*")) == ["adapter"]
    a, b = (load_file(runs[n] / "adapter/adapter_model.safetensors") for n in (2, 1))
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
    assert lines and "2 processes are more than the examples of an optimizer step (1 = " in lines[0], (
        proc.stderr[-3000:])
    assert not (tmp_path / "runs/t/metrics.jsonl").exists() and not (tmp_path / "runs/t/adapter").exists()


def _accelerate_cpu_env(n: int) -> dict[str, str]:
    """The environment `accelerate launch --cpu --num_processes n` gives the process it starts."""
    proc = subprocess.run([*_accelerate_launch(), "--cpu", f"--num_processes={n}", "--no_python", "env", "-0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split("=", 1) for line in proc.stdout.split("\0") if "=" in line)


def test_accelerate_cpu_starting_one_process_is_noticed():
    assert launch.accelerate_cpu_started_one(_accelerate_cpu_env(2))  # --cpu asked for 2 and started 1
    assert not launch.accelerate_cpu_started_one(_accelerate_cpu_env(1))
    assert launched_processes(_accelerate_cpu_env(2)) == (0, 1)


@pytest.mark.parametrize("env", [{}, {"RANK": "1", "WORLD_SIZE": "2"}, {"PMI_RANK": "3", "PMI_SIZE": "4"},
                                 {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
                                 {"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "3", "RANK": "0"}])
def test_the_rank_is_read_where_accelerate_reads_it(env, monkeypatch):
    from accelerate.utils import get_cpu_distributed_information

    for name in (*launch.RANK_VARIABLES, *launch.SIZE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    info = get_cpu_distributed_information()
    assert launched_processes() == (info.rank, info.world_size)
