"""The Trainer callbacks of a loralab run: the metrics log and its watchdog (non-finite or stalled training), and
Ctrl-C that stops after the current step with a checkpoint."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from loralab.errors import LoralabError
from loralab.files import read_jsonl
from loralab.runs.readers import training_rows


class NonFiniteLoss(LoralabError):
    def __init__(self, step: int, what: str, precision: str = ""):
        hint = (
            "with fp16 this is usually overflow: lower train.learning_rate, or set train.precision: fp32"
            if precision == "fp16"
            else "lower train.learning_rate or check the data"
        )
        super().__init__(f"training stopped at step {step}: the {what} is NaN or infinite; {hint} "
                         "(the last good checkpoint is kept)")


class TrainingStalled(LoralabError):
    """Training runs but learns nothing: a gradient norm of exactly 0, or a loss frozen at one value."""


FLAT_LOSS_ROWS = 5  # logged rows of one identical loss (on different batches) that mean a collapsed run


def stall_reason(rows: list[dict], lora_alpha: float, learning_rate: float) -> str | None:
    """Why the logged rows show a run that learns nothing, or None. A gradient norm of exactly 0 means no
    parameter gets a gradient; the same loss to 6 digits on FLAT_LOSS_ROWS different batches means the model
    no longer depends on its input (collapsed, e.g. a uniform prediction after a divergence)."""
    last = rows[-1]
    if last.get("grad_norm") == 0.0:
        return (f"the gradient norm is exactly 0 at step {last['step']}: no LoRA weight gets a gradient "
                f"(lora.lora_alpha {lora_alpha}, lora.target_modules, or labels that train no token?)")
    losses = [r["loss"] for r in rows[-FLAT_LOSS_ROWS:]]
    if len(losses) == FLAT_LOSS_ROWS and max(losses) - min(losses) <= 1e-6 * max(1.0, abs(losses[0])):
        return (f"the loss has stayed at {losses[0]:.6f} over {FLAT_LOSS_ROWS} logged steps on different batches, "
                f"up to "
                f"step {last['step']}: the model has collapsed; lower train.learning_rate (now {learning_rate:g})")
    return None


class MetricsLog(TrainerCallback):
    """Appends each log row to metrics.jsonl, stops on a non-finite loss or grad norm or a stalled run
    (stall_reason), and asks for the held-out loss (ResponseOnlyTrainer.evaluate) every ``eval_every`` steps and at
    the last step. The summary's train_loss is the mean of every logged step's loss in the file, so a resumed run's
    covers the whole run, not only its resumed part."""

    def __init__(self, path: Path, precision: str, eval_every: int, lora_alpha: float = 0.0,
                 learning_rate: float = 0.0, earlier_seconds: float = 0.0):
        self.path = path
        self.precision = precision
        self.eval_every = eval_every
        self.failure: LoralabError | None = None
        self.lora_alpha, self.learning_rate = lora_alpha, learning_rate  # named in stall messages
        self.rows: list[dict] = []
        self.earlier_seconds = earlier_seconds  # trained by earlier processes of a resumed run
        self.main_process = True  # under torchrun/accelerate only rank 0 writes (on_train_begin)
        # the trainer's last held-out pass per example, (loss sum, tokens) each (set by the train stage)
        self.example_losses: Callable[[], list[tuple[float, int]]] | None = None

    def _write(self, row: dict) -> None:
        if not self.main_process:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.main_process = state.is_world_process_zero

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == state.max_steps or (self.eval_every and step % self.eval_every == 0):
            control.should_evaluate = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
            if state.global_step in (0, state.max_steps) and self.example_losses is not None:
                # the untrained and the final adapter's, which loralab eval reuses with their interval
                row["eval_example_losses"] = [[round(s, 6), c] for s, c in self.example_losses()]
            self._write(row)
        elif "loss" in logs:
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "grad_norm": logs.get("grad_norm"),
                "learning_rate": logs.get("learning_rate"),
            }
            self._write(row)
            self.rows.append(row)
            # fp16 with loss scaling meets infinite gradients on purpose (the scaler then skips the step).
            bad_grad = self.precision != "fp16" and row["grad_norm"] is not None and not math.isfinite(row["grad_norm"])
            if not math.isfinite(row["loss"]) or bad_grad:
                self.failure = NonFiniteLoss(state.global_step,
                                             "loss" if not math.isfinite(row["loss"]) else "gradient norm",
                                             self.precision)
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False
                return
            reason = stall_reason(self.rows, self.lora_alpha, self.learning_rate)
            if reason is not None:
                self.failure = TrainingStalled(f"training stopped: {reason} (the last good checkpoint is kept)")
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False
        elif "train_runtime" in logs:
            summary = {"step": state.global_step, **{k: logs[k] for k in ("train_runtime", "train_loss") if k in logs}}
            if self.earlier_seconds and "train_runtime" in summary:  # every process of the run, not the last alone
                summary["train_runtime_last_process"] = summary["train_runtime"]
                summary["train_runtime"] = round(summary["train_runtime"] + self.earlier_seconds, 4)
            losses = ([r["loss"] for r in training_rows(read_jsonl(self.path))]
                      if self.main_process and self.path.exists() else [])
            if losses:
                summary["train_loss"] = sum(losses) / len(losses)
            self._write(summary)


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) ends training after the current optimizer step, with a checkpoint (the Trainer saves it), so
    `loralab train --resume` continues exactly; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ntrain: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
