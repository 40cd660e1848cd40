"""Retraining over a finished run (issue 26): the new attempt trains in <run>/.retrain/ and replaces the finished run
only once it has finished, so a retrain that diverges or is killed leaves every file of the finished run, and its
manifest, exactly as they were; --resume continues the staged attempt, and the swap is finished by the next command
whenever a kill stops it.

One finished tiny run (`loralab run`: prepare, train, eval, report) is built once, and each case works on a copy of
it. The diverging and killed retrains are real processes (`python -m loralab`), as in tests/test_reliability.py.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_reliability as reliability
import yaml
from test_reliability import RUN

import loralab
from loralab import cli
from loralab.files import COMPLETE_FILE
from loralab.runs import recovery
from loralab.runs.layout import RETRAIN_DIR
from loralab.runs.lock import LOCK_FILE

# The same finished tiny run (built once), and a private copy of it per case, as test_reliability's.
finished, work = reliability.finished, reliability.work  # pytest fixtures


def run_files(run: Path) -> dict[str, str]:
    """sha256 of every file of the run directory, the staging area and the lock aside."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()
            and p.relative_to(run).parts[0] not in (RETRAIN_DIR, LOCK_FILE)}


def manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def _env() -> dict:
    src = str(Path(loralab.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def assert_kept(work: Path, before: dict[str, str], record: dict) -> None:
    """The finished run is exactly as it was: every file, and the manifest saying train finished."""
    assert run_files(work / RUN) == before
    train = manifest(work / RUN / "manifest.json")["stages"]["train"]
    assert train["status"] == "done" and train == record


def test_a_diverging_retrain_leaves_the_finished_run_as_it_was(work, capsys):
    before, record = run_files(work / RUN), manifest(work / RUN / "manifest.json")["stages"]["train"]
    proc = subprocess.run([sys.executable, "-m", "loralab", "train", "exp.yaml",
                           *_sets("train.learning_rate=1e6", "train.max_steps=6")],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "training stopped" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "is kept as it was" in proc.stdout, proc.stdout
    assert_kept(work, before, record)
    assert (work / RUN / "checkpoints/checkpoint-4" / COMPLETE_FILE).is_file()
    # The attempt recorded its own failure in the staging area, not in the run's manifest.
    assert manifest(work / RUN / RETRAIN_DIR / "manifest.json")["stages"]["train"]["status"] == "failed"
    # The run is still whole for the stages after it.
    assert cli.main(["eval", "exp.yaml"]) == 0 and "eval: up to date" in capsys.readouterr().out


HOLD_AFTER_A_STAGED_CHECKPOINT = """
import sys, time
from loralab import cli
from loralab.training import checkpoints
real = checkpoints.CheckpointGuard.on_save
def save_then_hold(self, args, state, control, **kwargs):
    real(self, args, state, control, **kwargs)
    if ".retrain" in str(self.checkpoints_dir):
        time.sleep(3600)  # checkpoint-N is marked complete: held here, however fast the machine, until killed
checkpoints.CheckpointGuard.on_save = save_then_hold
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_retrain_killed_with_sigkill_leaves_the_run_and_resumes(work, capsys, tmp_path):
    before, record = run_files(work / RUN), manifest(work / RUN / "manifest.json")["stages"]["train"]
    old_adapter = (work / RUN / "adapter/adapter_model.safetensors").read_bytes()
    overrides = _sets("train.max_steps=6", "train.learning_rate=1e-3")
    staged = work / RUN / RETRAIN_DIR
    with open(tmp_path / "retrain.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_A_STAGED_CHECKPOINT, "train", "exp.yaml",
                                 *overrides], env=_env(), stdout=log, stderr=subprocess.STDOUT)
    marker = staged / "checkpoints/checkpoint-2" / COMPLETE_FILE
    deadline = time.monotonic() + 900
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and marker.is_file(), (tmp_path / "retrain.log").read_text()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert_kept(work, before, record)
    attempt = manifest(staged / "manifest.json")["stages"]["train"]
    assert attempt["status"] == "running" and attempt["hash"] != record["hash"]
    assert cli.main(["report", "exp.yaml"]) == 0  # the finished run is still reported (its lock taken over)
    capsys.readouterr()
    before = run_files(work / RUN)

    # --resume with the same settings continues the staged attempt and swaps it in once it finishes.
    proc = subprocess.run([sys.executable, "-m", "loralab", "train", "exp.yaml", "--resume", *overrides],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from step 2 ({RUN / RETRAIN_DIR / 'checkpoints/checkpoint-2'})" in proc.stdout
    assert "the new run replaced the previous one" in proc.stdout
    assert not staged.exists() and not (work / RUN / recovery.DONE_RETRAIN).exists()
    run = work / RUN
    train = manifest(run / "manifest.json")["stages"]["train"]
    assert train["status"] == "done" and train["hash"] == attempt["hash"] and train["steps"] == 6
    assert (run / "adapter/adapter_model.safetensors").read_bytes() != old_adapter
    assert (run / "checkpoints/train_hash.txt").read_text() == attempt["hash"]
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6
    # Unchanged: what train does not write (data, eval and report files until they run again).
    kept = ("data/train.jsonl", "data/eval.jsonl", "data/stats.json", "eval_results.csv", "predictions.jsonl",
            "examples.md", "report.md")
    assert {k: run_files(run)[k] for k in kept} == {k: before[k] for k in kept}
    # The new run is the one on record: train up to date, eval made from the old train runs again.
    argv = ["exp.yaml", "--set", "train.max_steps=6", "--set", "train.learning_rate=1e-3"]
    assert cli.main(["train", *argv]) == 0 and "train: up to date" in capsys.readouterr().out
    assert cli.main(["report", *argv]) == 2 and "earlier attempt of 'train'" in capsys.readouterr().err


def test_loralab_run_retrains_beside_the_run_and_swaps_it_in(work, capsys):
    old = manifest(work / RUN / "manifest.json")["stages"]
    assert cli.main(["run", "exp.yaml", "--set", "train.max_steps=6"]) == 0
    out = capsys.readouterr().out
    assert f"training in {RUN / RETRAIN_DIR}" in out and "the new run replaced the previous one" in out
    assert "eval: up to date" not in out
    stages = manifest(work / RUN / "manifest.json")["stages"]
    assert stages["train"]["steps"] == 6 and stages["train"]["hash"] != old["train"]["hash"]
    assert stages["eval"]["hash"] != old["eval"]["hash"] and stages["prepare"] == old["prepare"]
    assert not (work / RUN / RETRAIN_DIR).exists()
    assert len(list((work / RUN / "tensorboard").glob("events.out.tfevents.*"))) == 1  # only the new run's log


def test_resume_over_a_finished_run_without_a_retrain_says_so(work, capsys):
    before = run_files(work / RUN)
    assert cli.main(["train", "exp.yaml", "--resume", "--set", "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "the finished run in runs/t (step 4) was made with a different config" in err
    assert "`loralab train CONFIG` to retrain" in err and len(err.strip().splitlines()) == 1
    assert run_files(work / RUN) == before and not (work / RUN / RETRAIN_DIR).exists()


# ---------------------------------------------------------------------------------------------------
# The swap itself: a kill at any step is finished (or, before its plan is written, undone) by the next command.

OLD = {"adapter/w": "old-a", "checkpoints/checkpoint-4/w": "old-c", "tensorboard/e": "old-t", "metrics.jsonl": "old-m",
       "config.yaml": "old-y", "manifest.json": "old-j", "data/train.jsonl": "data"}
NEW = {"adapter/w": "new-a", "checkpoints/checkpoint-6/w": "new-c", "metrics.jsonl": "new-m", "config.yaml": "new-y",
       "manifest.json": "new-j"}  # no tensorboard/: the old one goes all the same


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _read(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


class Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", range(12))
def test_a_swap_killed_at_any_step_is_finished_by_the_next_command(tmp_path, monkeypatch, kill_at):
    root = tmp_path / "run"
    _write(root, OLD)
    _write(root / RETRAIN_DIR, NEW)
    count = {"n": 0}
    real_replace, real_rename = os.replace, Path.rename

    def step(real):
        def wrapped(*args, **kwargs):
            if count["n"] == kill_at:
                raise Killed
            count["n"] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "replace", step(real_replace))
    monkeypatch.setattr(Path, "rename", step(real_rename))
    try:
        recovery.swap_in_retrain(root / RETRAIN_DIR, root)
        killed = False
    except Killed:
        killed = True
    monkeypatch.undo()
    # At every instant the run's manifest is whole: the old one or the new one.
    assert (root / "manifest.json").read_text() in ("old-j", "new-j")
    recovery.recover_interrupted_writes(root)
    if kill_at == 0:  # before the plan was written: the old run stands, the staged one waits for --resume
        assert killed and _read(root) == {**OLD, **{f"{RETRAIN_DIR}/{k}": v for k, v in NEW.items()}}
    else:
        assert _read(root) == {**NEW, "data/train.jsonl": "data"}
    assert killed == (kill_at < SWAP_STEPS)


SWAP_STEPS = 10  # the plan written, 3 folders moved aside, 2 moved in, 3 files replaced, the staging area renamed
