"""A NaN loss stops training at once with an actionable message, keeping the last good checkpoint."""

import pytest
import torch
from conftest import write_config

from loralab import cli
from loralab.errors import LoralabError
from loralab.training import callbacks, trackers, trainer


def test_forced_nan_stops_training_and_keeps_last_checkpoint(tmp_path, tiny_model_dir, alpaca_path, monkeypatch,
                                                             capsys):
    cfg = write_config(
        tmp_path / "exp.yaml",
        model={"name_or_path": str(tiny_model_dir)},
        data={"path": str(alpaca_path)},
        # row_tokens 1: every example is a row of its own, two rows (forward passes) per optimizer step
        train={"max_steps": 6, "save_steps": 2, "gradient_accumulation_steps": 2, "logging_steps": 1, "row_tokens": 1},
    )
    assert cli.main(["prepare", str(cfg)]) == 0
    real = trainer.response_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, count = real(model, batch)
        if calls["n"] == 7:  # first row of optimizer step 4
            loss = loss * torch.tensor(float("nan"))
        return loss, count

    monkeypatch.setattr(trainer, "response_loss_sum", poisoned)
    capsys.readouterr()
    assert cli.main(["train", str(cfg)]) == 2
    stderr = capsys.readouterr().err  # progress bars share stderr; the error is one line of its own
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("loralab: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    err = errors[0]
    assert err.startswith("loralab: error: training stopped at step 4: the loss is NaN or infinite")
    assert "learning_rate" in err and "last good checkpoint is kept" in err
    rd = tmp_path / "runs" / "t"
    assert sorted(p.name for p in (rd / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (rd / "adapter").exists()
    assert calls["n"] == 7  # stopped at once: no further forward pass


def test_fp16_hint_mentions_loss_scale_and_fp32():
    err = callbacks.NonFiniteLoss(12, "loss", "fp16")
    assert "fp16" in str(err) and "train.precision: fp32" in str(err) and "learning_rate" in str(err)


def test_only_the_main_process_writes_metrics(tmp_path):
    from transformers import TrainerControl, TrainerState

    from loralab.training.callbacks import MetricsLog

    for main, expected in [(False, ""), (True, '"loss": 1.5')]:
        path = tmp_path / f"metrics-{main}.jsonl"
        log = MetricsLog(path, "fp32", 0)
        state = TrainerState(is_world_process_zero=main)
        state.global_step, state.epoch = 1, 0.1
        log.on_train_begin(None, state, TrainerControl())
        log.on_log(None, state, TrainerControl(), logs={"loss": 1.5, "grad_norm": 0.3, "learning_rate": 1e-4})
        text = path.read_text() if path.exists() else ""
        assert (expected in text) if expected else text == ""


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_without_its_package_is_one_clear_error(tracker):
    import importlib.util

    from loralab.config import config_from_dict

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    cfg = config_from_dict({"name": "t", "train": {"report_to": ["tensorboard", tracker]}})
    with pytest.raises(LoralabError, match=f"train.report_to lists {tracker}, but its package is not installed: "
                                                 f"pip install {tracker}"):
        trackers.check_trackers(cfg)
