"""The train stage: LoRA on the prepared split with the Hugging Face Trainer; adapter saved with PEFT."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from loralab import cpu, decisions, devices
from loralab.config import ExperimentConfig
from loralab.decisions import Switches
from loralab.errors import LoralabError
from loralab.gguf_models import model_source
from loralab.loss import heldout_loss, response_loss_sum
from loralab.modeling import add_lora, count_parameters, load_model, resolve_model_source
from loralab.packing import RowCollator
from loralab.rundir import (
    accelerate_cpu_started_one,
    launched_processes,
    COMPLETE_FILE,
    NEW_ADAPTER,
    RunDir,
    completeness,
    environment_info,
    mark_complete,
    read_jsonl,
    stage_inputs,
    swap_in_adapter,
    write_jsonl,
)
from loralab.runfiles import training_rows
from loralab.sources import prepare_hash, train_fingerprints, train_hash


class ResponseOnlyTrainer(Trainer):
    """The Trainer with two hooks changed. Each batch is one optimizer step's examples as packed rows
    (loralab.packing.pack_rows; the Trainer's accumulation is 1, see training_arguments): training_step runs
    forward and backward on one row at a time. compute_loss asks the model for logits only at trained
    targets (see loralab.loss) and normalises by the trained-token count of the whole optimizer step, so
    how the examples are split into rows does not change the gradients. On a CPU, train runs on loralab's
    CPU speed path (loralab.cpu.speed_path), with the frozen weights in oneDNN's layout when ``onednn_weights``."""

    def __init__(self, *args, switches: Switches, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches = switches

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs["rows"]
        total = None
        for i, row in enumerate(rows):
            # Under DDP the gradients are all-reduced once, after the step's last row.
            sync = contextlib.nullcontext() if i == len(rows) - 1 else self.accelerator.no_sync(model)
            with sync:
                loss = super().training_step(model, row, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def train(self, resume_from_checkpoint=None, **kwargs):
        """The Trainer's train, after the held-out loss of the untrained adapters (a fresh run), on the CPU speed path
        when the switches say so (however the run ends, the model is back to PEFT's and transformers' own
        forwards, with plain weights, when this returns)."""
        if resume_from_checkpoint is None:
            self.evaluate()
        s = self.switches
        if not s.cpu_speed_path:
            return super().train(resume_from_checkpoint, **kwargs)
        start = time.perf_counter()
        with cpu.speed_path(self.model, s.row_tokens, s.longest_row_tokens, s.onednn_weights, s.cpu_pieces,
                            checkpointing=s.gradient_checkpointing) as switched:
            if switched.onednn_weights:
                print(f"train: {switched.onednn_weights} frozen weights put in oneDNN's layout for this CPU's matmuls in "
                      f"{time.perf_counter() - start:.0f} s (train.onednn_weights; `loralab plan CONFIG` shows the memory)")
            return super().train(resume_from_checkpoint, **kwargs)

    # Not the Trainer's evaluation loop: it pads batches and builds full-vocabulary logits; heldout_loss packs
    # rows and computes logits only at trained positions (the same loss: tests/test_heldout_loss.py).
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The held-out loss (loralab.loss.heldout_loss, token-weighted like training), logged through the
        Trainer's log so every tracker in train.report_to and metrics.jsonl get it. Main process only."""
        examples = list(eval_dataset if eval_dataset is not None else self.eval_dataset or [])
        metrics = {}
        if examples and self.is_world_process_zero():
            metrics = {f"{metric_key_prefix}_loss": round(heldout_loss(self.model, examples, self.args.device), 6)}
            self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pieces = self.switches.cpu_pieces
        head = {} if pieces is None or pieces.head_loss else {"fused_head": False}  # the frozen-head loss where measured faster
        loss_sum, count = response_loss_sum(model, inputs, **head)
        if not torch.isfinite(loss_sum):
            raise NonFiniteLoss(self.state.global_step + 1, "loss", self.switches.precision)
        if num_items_in_batch is None:  # evaluation, or a caller that does not count: a plain mean
            self.loss_is_scaled_for_ga = False
            loss = loss_sum / max(count, 1)
        else:
            # Mean over every trained token of the accumulated step, so a step of 8 short examples
            # weighs tokens as one packed batch of the same 8 would.
            self.loss_is_scaled_for_ga = True
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients; the count was summed over ranks
        return (loss, None) if return_outputs else loss


class NonFiniteLoss(LoralabError):
    def __init__(self, step: int, what: str, precision: str = ""):
        hint = (
            "with fp16 this is usually overflow: lower train.learning_rate, or set train.precision: fp32"
            if precision == "fp16"
            else "lower train.learning_rate or check the data"
        )
        super().__init__(f"training stopped at step {step}: the {what} is NaN or infinite; {hint} (the last good checkpoint is kept)")


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

    def __init__(self, path: Path, precision: str, eval_every: int):
        self.path = path
        self.precision = precision
        self.eval_every = eval_every
        self.failure: LoralabError | None = None
        self.lora_alpha, self.learning_rate = 0.0, 0.0  # for stall messages (run sets them)
        self.rows: list[dict] = []
        self.main_process = True  # under torchrun/accelerate only rank 0 writes (on_train_begin)

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
            self._write({"step": state.global_step, "eval_loss": logs["eval_loss"]})
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
                self.failure = NonFiniteLoss(state.global_step, "loss" if not math.isfinite(row["loss"]) else "gradient norm", self.precision)
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
            losses = [r["loss"] for r in training_rows(read_jsonl(self.path))] if self.main_process and self.path.exists() else []
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
        print("\ntrain: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

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


def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the log has no duplicated or orphaned steps. The file
    is written row by row as the Trainer logs (a kill loses nothing logged), so it is cut here rather than rebuilt
    from the checkpoint's state.log_history."""
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= after_step and "train_runtime" not in r])


HASH_FILE = "train_hash.txt"  # which config the checkpoints beside it belong to


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() if path.exists() else None
    except (OSError, UnicodeDecodeError):
        return None


def _step(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def checkpoints(checkpoints_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [p for p in checkpoints_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=_step, reverse=True)


def newest_checkpoint(checkpoints_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (rundir.completeness: marked complete, every file as written), and a line
    for each newer one skipped."""
    skipped = []
    for folder in checkpoints(checkpoints_dir):
        _, why = completeness(folder)
        if why is None:
            return folder, skipped
        skipped.append(f"{folder.name} is {why}")
    return None, skipped


class CheckpointGuard(TrainerCallback):
    """After the Trainer writes checkpoint-N: mark it complete (rundir.mark_complete), then remove the oldest
    complete ones beyond train.save_total_limit, and incomplete ones. Written, then marked, then rotated: a
    kill at any instant leaves the previous complete checkpoint in place. A checkpoint saved outside the
    Trainer's save loop (on Ctrl-C, say) counts for --resume only once this on_save has run for it."""

    def __init__(self, checkpoints_dir: Path, train_hash: str, keep: int):
        self.checkpoints_dir, self.train_hash, self.keep = checkpoints_dir, train_hash, keep

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = self.checkpoints_dir / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            mark_complete(folder, train_hash=self.train_hash, step=state.global_step)
        complete = 0
        for older in checkpoints(self.checkpoints_dir):
            whole = (older / COMPLETE_FILE).is_file()
            complete += whole
            if not whole or complete > self.keep:
                shutil.rmtree(older, ignore_errors=True)


def training_arguments(cfg: ExperimentConfig, out_dir: Path, switches: Switches) -> TrainingArguments:
    """The Trainer's arguments for ``cfg`` with its switches decided (loralab.decisions.decide_switches)."""
    return TrainingArguments(**training_argument_values(cfg, out_dir, switches))


def training_argument_values(cfg: ExperimentConfig, out_dir: Path, switches: Switches) -> dict:
    """training_arguments' keyword arguments (a dict, so a test can read them on a device it only simulates)."""
    t = cfg.train
    checkpointing, processes = switches.gradient_checkpointing, launched_processes()[1]
    return dict(
        output_dir=str(out_dir),
        # One batch = this process's share of an optimizer step's examples, which ResponseOnlyTrainer splits into
        # rows itself; all processes together train per_device_train_batch_size x gradient_accumulation_steps.
        per_device_train_batch_size=decisions.per_process_examples(t, processes),
        ddp_backend="gloo" if switches.device == "cpu" and processes > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient every step
        gradient_accumulation_steps=1,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointGuard rotates, after marking the new one complete
        seed=t.seed,
        data_seed=t.seed,
        # Weights are already stored in bf16/fp16 (see load_model); fp16 adds autocast and the loss scaler
        # it needs on GPUs without bf16. bf16 autocast over bf16 weights would only add casts.
        fp16=decisions.loss_scaling(switches.precision),
        bf16=False,
        use_cpu=switches.device == "cpu",
        use_liger_kernel=switches.liger_kernels,
        torch_compile=switches.torch_compile,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        optim=t.optim,
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",  # TensorBoard: tracker_callbacks
        run_name=cfg.name,
        disable_tqdm=False,
    )


def decide(cfg: ExperimentConfig, train_examples: list[dict]) -> Switches:
    """How this run trains on the device it finds (loralab.decisions), before any weight is loaded."""
    facts = devices.probe(devices.detect_device(cfg.train.device))
    return decisions.decide_switches(cfg, facts, *decisions.example_lengths(train_examples))


def build_model(cfg: ExperimentConfig, switches: Switches):
    """The base model in the compute dtype with fresh LoRA adapters; read into memory rather than mapped when its
    weights will take oneDNN's layout (see load_model)."""
    torch.manual_seed(cfg.train.seed)
    base = load_model(cfg.model, switches.precision, switches.device, in_memory=switches.onednn_weights,
                      load_in_4bit=cfg.train.load_in_4bit)
    return add_lora(base, cfg.lora)


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(cfg: ExperimentConfig) -> None:
    """Each tracker in train.report_to needs its package; say which to install before any weight is loaded."""
    import importlib.util

    for name in cfg.train.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise LoralabError(f"train.report_to lists {name}, but its package is not installed: pip install "
                               f"{TRACKER_PACKAGES[name]} (or remove {name} from train.report_to)")


def tracker_callbacks(cfg: ExperimentConfig, run_root: Path, resume_step: int = 0) -> list:
    """The Trainer's TensorBoard callback writing into <run>/tensorboard/ (main process only), and environment
    defaults that keep MLflow and W&B in the run directory (W&B offline without an API key) unless set."""
    callbacks = []
    main_process = launched_processes()[0] == 0
    if "tensorboard" in cfg.train.report_to and main_process:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # purge_step: TensorBoard hides what an interrupted run logged after the checkpoint resumed from
        writer = SummaryWriter(log_dir=str(run_root / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        callbacks.append(TensorBoardCallback(writer))
    if "mlflow" in cfg.train.report_to:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_root / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", cfg.name)
    if "wandb" in cfg.train.report_to:
        os.environ.setdefault("WANDB_DIR", str(run_root.resolve()))
        os.environ.setdefault("WANDB_PROJECT", "loralab")
        if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
            os.environ["WANDB_MODE"] = "offline"
            if main_process:
                print(f"train: W&B logs offline into {run_root / 'wandb'} (no WANDB_API_KEY); `wandb sync` uploads them")
    return callbacks


def build_trainer(cfg: ExperimentConfig, model, train_examples: list[dict], out_dir: Path, callbacks: list,
                  switches: Switches, eval_examples: list[dict] | None = None) -> ResponseOnlyTrainer:
    """The ResponseOnlyTrainer `loralab train` runs: each optimizer step's examples in rows of switches.row_tokens,
    checkpointing, oneDNN weights and (on a CPU) the CPU speed path as ``switches`` say (see decide)."""
    return ResponseOnlyTrainer(
        model=model,
        args=training_arguments(cfg, out_dir, switches),
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=RowCollator(switches.row_tokens),
        callbacks=callbacks,
        switches=switches,
    )


def _say(text: str) -> None:
    """Print on the main process only (under torchrun/accelerate each process would repeat it)."""
    if launched_processes()[0] == 0:
        print(text)


def _start_logs(rundir: RunDir, expected: str, resume_from: Path | None) -> None:
    """A fresh run clears the old checkpoints and logs; a resumed one drops the checkpoints newer than the one it
    resumes from (incomplete or damaged: newest_checkpoint said so) and the rows logged after it. Main process only."""
    if launched_processes()[0] != 0:
        return
    if resume_from is None:
        shutil.rmtree(rundir.checkpoints_dir, ignore_errors=True)
        rundir.metrics_file.unlink(missing_ok=True)
        shutil.rmtree(rundir.root / "tensorboard", ignore_errors=True)
        rundir.checkpoints_dir.mkdir(parents=True)
        (rundir.checkpoints_dir / HASH_FILE).write_text(expected)
    else:
        for newer in checkpoints(rundir.checkpoints_dir):
            if _step(newer) > _step(resume_from):
                shutil.rmtree(newer)
        _truncate_metrics(rundir.metrics_file, _step(resume_from))


def run(cfg: ExperimentConfig, resume: bool = False, force: bool = False) -> str:
    """Train LoRA adapters; write adapter/, metrics.jsonl and checkpoints/; return the stage hash.

    Everything is checked and the trainer built before any file is touched; a finished checkpoint completes
    an adapter that is missing or damaged (and --resume on a finished run does nothing). Under torchrun or
    accelerate launch every process runs this with the same config (DDP): each trains its share of every step's
    examples, and only the main process (rank 0) writes to the run directory."""
    rundir = RunDir(cfg)
    prints = train_fingerprints(cfg)
    prepare_prints = {k: v for k, v in prints.items() if k != "model files"}
    rundir.require_current("prepare", prepare_hash(cfg, prepare_prints), "train",
                           stage_inputs(cfg, "prepare", prepare_prints))
    expected = train_hash(cfg, prints)
    inputs = stage_inputs(cfg, "train", prints)
    rank, processes = launched_processes()
    main = rank == 0
    if accelerate_cpu_started_one():
        _say("train: `accelerate launch --cpu` started one process, whatever --num_processes says; for N processes on "
             "CPUs use `accelerate launch --multi_gpu --num_processes N -m loralab train CONFIG` (gloo)")
    if rundir.is_current("train", expected) and not force:
        steps = rundir.stage_record("train").get("steps")
        state = "the run has already finished" if resume else "up to date"
        _say(f"train: {state} (step {steps}, {rundir.adapter_dir})" + ("; nothing to resume" if resume else ""))
        return expected
    resume_from = _checkpoint_to_resume(rundir, expected, required=resume) if resume or not force else None
    finished = resume_from is not None and _step(resume_from) >= cfg.train.max_steps
    if finished and _log_reaches(rundir, _step(resume_from)):
        if main:
            _finish_from_checkpoint(rundir, resume_from, expected, inputs)
        return expected
    if not resume:
        resume_from = None
    per_process = decisions.per_process_examples(cfg.train, processes)  # before anything is loaded or written

    start = time.perf_counter()
    trainer, log, stop, model, info = _prepare_training(cfg, rundir, expected, processes, per_process)
    log.lora_alpha, log.learning_rate = cfg.lora.lora_alpha, cfg.train.learning_rate
    with rundir.attempt("train", expected) if main else contextlib.nullcontext():
        if main:
            rundir.update_manifest(**info, gradient_checkpointing=trainer.args.gradient_checkpointing,
                                   row_tokens=trainer.switches.row_tokens, onednn_weights=trainer.switches.onednn_weights)
        if resume_from is not None:
            _say(f"train: resuming from step {_step(resume_from)} ({resume_from})")
        _start_logs(rundir, expected, resume_from)
        # The TensorBoard writer opens its event file at once: made after _start_logs cleared the old ones.
        for callback in tracker_callbacks(cfg, rundir.root, _step(resume_from) if resume_from else 0):
            trainer.add_callback(callback)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            _close_progress_bars(trainer)  # so an error message starts on its own line, not after a bar
        if log.failure is not None:
            raise log.failure
        step = trainer.state.global_step
        if stop.requested and step < cfg.train.max_steps:
            raise KeyboardInterrupt(f"checkpoint saved at step {step} of {cfg.train.max_steps} in "
                                    f"{rundir.checkpoints_dir}; resume with `loralab train CONFIG --resume`")
        if main:
            _save_adapter(model, rundir.adapter_dir, train_hash=expected, step=step)
            rundir.mark_done("train", expected, time.perf_counter() - start, inputs=inputs, steps=step)
    _say(f"train: adapter saved to {rundir.adapter_dir}")
    return expected


def _checkpoint_to_resume(rundir: RunDir, expected: str, required: bool) -> Path | None:
    """The newest complete checkpoint of this config, naming each newer one skipped; with ``required`` (--resume)
    a missing one is an error, otherwise None."""
    folder, skipped = newest_checkpoint(rundir.checkpoints_dir)
    same_config = _read_text(rundir.checkpoints_dir / HASH_FILE) == expected
    if not required:
        return folder if same_config else None
    for line in skipped:
        print(f"train: skipping {line}")
    if folder is None:
        found = "only incomplete or damaged checkpoints" if skipped else "no checkpoint"
        raise LoralabError(f"--resume: {found} in {rundir.checkpoints_dir}; run `loralab train CONFIG` to start afresh")
    if not same_config:
        raise LoralabError(f"--resume: {folder} was made with a different config; "
                           f"start afresh with `loralab train CONFIG`")
    return folder


def _log_reaches(rundir: RunDir, step: int) -> bool:
    """metrics.jsonl is readable and logged the run up to ``step`` (then only the adapter is missing)."""
    try:
        return rundir.metrics_file.is_file() and any(r.get("step", 0) >= step for r in read_jsonl(rundir.metrics_file))
    except LoralabError:
        return False


def _finish_from_checkpoint(rundir: RunDir, checkpoint: Path, expected: str, inputs: dict) -> None:
    """The run reached max_steps (its last checkpoint is complete) but its adapter is missing, damaged or was
    never swapped in: take the adapter from that checkpoint instead of training again."""
    start = time.perf_counter()
    with rundir.attempt("train", expected):
        new = rundir.root / NEW_ADAPTER
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(checkpoint / name, new / name)
        mark_complete(new, train_hash=expected, step=_step(checkpoint))
        swap_in_adapter(new, rundir.adapter_dir)
        rundir.mark_done("train", expected, time.perf_counter() - start, inputs=inputs, steps=_step(checkpoint))
    print(f"train: the run had finished at step {_step(checkpoint)}; adapter taken from {checkpoint} "
          f"-> {rundir.adapter_dir}")


def _prepare_training(cfg: ExperimentConfig, rundir: RunDir, expected: str, processes: int, per_process: int):
    """Everything that can fail on the config, the data or the model, before any file is touched:
    (trainer, metrics log, Ctrl-C handler, model, manifest fields)."""
    check_trackers(cfg)
    train_examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(rundir.train_file)]
    eval_examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(rundir.eval_file)]

    # Decided before loading: weights that will take oneDNN's layout are read into memory (load_model).
    switches = decide(cfg, train_examples)  # checks every switch before any weight is loaded
    device, precision = switches.device, switches.precision
    model = build_model(cfg, switches)
    counts = count_parameters(model)
    name = devices.device_name(device)
    _say(f"train: {counts} on {device} ({name}), precision {precision}")
    if processes > 1:
        _say(f"train: {processes} processes x {per_process} examples = {processes * per_process} examples per optimizer "
             f"step (train.per_device_train_batch_size x gradient_accumulation_steps, split over the processes)")
    info = {**environment_info(), "model_source": model_source(resolve_model_source(cfg.model)), "device": device,
            "device_name": name, "precision": precision, "parameters": counts.as_dict(),
            "processes": processes}
    log = MetricsLog(rundir.metrics_file, precision, cfg.train.eval_loss_steps)
    stop = StopOnInterrupt()
    guard = CheckpointGuard(rundir.checkpoints_dir, expected, cfg.train.save_total_limit)
    trainer = build_trainer(cfg, model, train_examples, rundir.checkpoints_dir, [log, stop, guard], switches,
                            eval_examples)
    return trainer, log, stop, model, info


def _close_progress_bars(trainer: Trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _save_adapter(model, adapter_dir: Path, **info) -> None:
    """Save to .adapter-new beside the target, mark it complete, then swap it in (rundir.swap_in_adapter): an old
    adapter is never half-overwritten, and a kill at any instant is finished or undone by the next command."""
    new = adapter_dir.with_name(NEW_ADAPTER)
    shutil.rmtree(new, ignore_errors=True)
    model.save_pretrained(new)
    mark_complete(new, **info)
    swap_in_adapter(new, adapter_dir)
