"""loralab.training: the train recipe's pieces that need no model: the watchdog's reasons, and checkpoints a run
can trust (found newest complete first, resumed only for the same config, the log cut back to them)."""

from __future__ import annotations

import json

import pytest

from loralab.errors import LoralabError
from loralab.files import COMPLETE_FILE, mark_complete, read_jsonl
from loralab.training.callbacks import FLAT_LOSS_ROWS, stall_reason
from loralab.training.checkpoints import (
    HASH_FILE,
    adapter_from_checkpoint,
    checkpoint_to_resume,
    log_reaches,
    newest_checkpoint,
    start_logs,
)


def _rows(losses, grad=1.0):
    return [{"step": i + 1, "loss": loss, "grad_norm": grad} for i, loss in enumerate(losses)]


def test_the_watchdog_names_why_a_run_learns_nothing():
    assert stall_reason(_rows([2.0, 1.9, 1.8]), 16, 2e-4) is None
    assert "gradient norm is exactly 0 at step 3" in stall_reason(_rows([2.0, 1.9, 1.8], grad=0.0), 16, 2e-4)
    flat = stall_reason(_rows([7.0] * FLAT_LOSS_ROWS), 16, 2e-4)
    assert f"stayed at 7.000000 over {FLAT_LOSS_ROWS} logged steps" in flat and "now 0.0002" in flat
    assert stall_reason(_rows([7.0] * (FLAT_LOSS_ROWS - 1)), 16, 2e-4) is None


def _checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    (path / "adapter_config.json").write_text("{}")
    if complete:
        mark_complete(path, step=step)
    return path


def test_resume_takes_the_newest_complete_checkpoint_of_the_same_config(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, 2)
    four = _checkpoint(folder, 4)
    _checkpoint(folder, 6, complete=False)
    newest, skipped = newest_checkpoint(folder)
    assert newest == four and skipped == ["checkpoint-6 is incomplete (its save was interrupted)"]
    (folder / HASH_FILE).write_text("abc")
    assert checkpoint_to_resume(folder, "abc", required=True) == four
    assert "skipping checkpoint-6" in capsys.readouterr().out
    assert checkpoint_to_resume(folder, "other", required=False) is None
    with pytest.raises(LoralabError, match="was made with a different config"):
        checkpoint_to_resume(folder, "other", required=True)
    with pytest.raises(LoralabError, match="--resume: no checkpoint in"):
        checkpoint_to_resume(tmp_path / "none", "abc", required=True)


def test_starting_afresh_clears_and_resuming_cuts_back_to_the_checkpoint(tmp_path):
    folder, metrics, board = tmp_path / "checkpoints", tmp_path / "metrics.jsonl", tmp_path / "tensorboard"
    _checkpoint(folder, 2)
    _checkpoint(folder, 4)
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}, {"step": 3, "loss": 1.8},
            {"step": 3, "train_runtime": 1.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    start_logs(folder, metrics, board, "abc", resume_from=folder / "checkpoint-2")
    assert [p.name for p in folder.iterdir() if p.is_dir()] == ["checkpoint-2"]
    assert read_jsonl(metrics) == rows[:2] and log_reaches(metrics, 2) and not log_reaches(metrics, 3)
    board.mkdir()
    start_logs(folder, metrics, board, "abc", resume_from=None)
    assert sorted(p.name for p in folder.iterdir()) == [HASH_FILE] and not metrics.exists() and not board.exists()
    assert (folder / HASH_FILE).read_text() == "abc"


def test_an_adapter_taken_from_a_checkpoint_is_swapped_in_whole(tmp_path):
    checkpoint = _checkpoint(tmp_path / "checkpoints", 4)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"old")
    (adapter / "README.md").write_text("---\nbase_model: org/model\n---\n# the card\n")
    adapter_from_checkpoint(checkpoint, adapter, step=4)
    assert (adapter / "README.md").read_text().endswith("# the card\n")  # the model card is kept
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"weights 4"
    assert json.loads((adapter / COMPLETE_FILE).read_text())["step"] == 4
    assert not (tmp_path / ".adapter-new").exists() and not (tmp_path / ".adapter-old").exists()


def test_a_resumed_runs_runtime_counts_every_process(tmp_path):
    from loralab.training.callbacks import MetricsLog
    from loralab.training.checkpoints import train_seconds

    checkpoint = _checkpoint(tmp_path / "checkpoints", 4)
    assert train_seconds(checkpoint) == 0.0 and train_seconds(None) == 0.0
    mark_complete(checkpoint, step=4, train_seconds=12.5)
    assert train_seconds(checkpoint) == 12.5
    log = MetricsLog(tmp_path / "metrics.jsonl", "fp32", 0, earlier_seconds=12.5)
    state = type("State", (), {"global_step": 8, "is_world_process_zero": True})()
    log.on_log(None, state, None, logs={"train_runtime": 10.0, "train_loss": 1.0})
    summary = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert summary["train_runtime"] == 22.5 and summary["train_runtime_last_process"] == 10.0
