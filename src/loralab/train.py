"""The train stage: LoRA on the prepared split with the Hugging Face Trainer; adapter saved with PEFT."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from loralab import cpu, plan, prepare
from loralab.config import ExperimentConfig
from loralab.cpu.onednn_weights import onednn_weights_available
from loralab.errors import LoralabError
from loralab.gguf_models import model_source
from loralab.loss import heldout_loss, response_loss_sum
from loralab.modeling import (
    add_lora,
    check_bitsandbytes,
    choose_precision,
    count_parameters,
    detect_device,
    device_name,
    load_model,
    resolve_model_source,
)
from loralab.packing import RowCollator
from loralab.rundir import RunDir, environment_info, read_jsonl, stage_hash


class ResponseOnlyTrainer(Trainer):
    """The Trainer with two hooks changed. Each batch is one optimizer step's examples as packed rows
    (loralab.packing.pack_rows; the Trainer's accumulation is 1, see training_arguments): training_step runs
    forward and backward on one row at a time. compute_loss asks the model for logits only at trained
    targets (see loralab.loss) and normalises by the trained-token count of the whole optimizer step, so
    how the examples are split into rows does not change the gradients. On a CPU, train runs on loralab's
    CPU speed path (loralab.cpu.speed_path), with the frozen weights in oneDNN's layout when ``onednn_weights``."""

    def __init__(self, *args, row_tokens: int, precision: str, cpu_speed_path: bool = False,
                 longest_row_tokens: int | None = None, onednn_weights: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_tokens = row_tokens
        self.precision = precision
        self.cpu_speed_path = cpu_speed_path
        self.longest_row_tokens = longest_row_tokens
        self.onednn_weights = onednn_weights

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
        when self.cpu_speed_path is set (however the run ends, the model is back to PEFT's and transformers' own
        forwards, with plain weights, when this returns)."""
        if resume_from_checkpoint is None:
            self.evaluate()
        if not self.cpu_speed_path:
            return super().train(resume_from_checkpoint, **kwargs)
        start = time.perf_counter()
        with cpu.speed_path(self.model, self.row_tokens, self.longest_row_tokens, self.onednn_weights) as switched:
            if switched.onednn_weights:
                print(f"train: {switched.onednn_weights} frozen weights put in oneDNN's layout for this CPU's matmuls in "
                      f"{time.perf_counter() - start:.0f} s (train.onednn_weights; `loralab plan CONFIG` shows the memory)")
            return super().train(resume_from_checkpoint, **kwargs)

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
        loss_sum, count = response_loss_sum(model, inputs)
        if not torch.isfinite(loss_sum):
            raise NonFiniteLoss(self.state.global_step + 1, "loss", self.precision)
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


class MetricsLog(TrainerCallback):
    """Appends each log row to metrics.jsonl, stops on a non-finite loss or grad norm, and asks for the held-out
    loss (ResponseOnlyTrainer.evaluate) every ``eval_every`` steps and at the last step."""

    def __init__(self, path: Path, precision: str, eval_every: int):
        self.path = path
        self.precision = precision
        self.eval_every = eval_every
        self.failure: NonFiniteLoss | None = None
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
            # fp16 with loss scaling meets infinite gradients on purpose (the scaler then skips the step).
            bad_grad = self.precision != "fp16" and row["grad_norm"] is not None and not math.isfinite(row["grad_norm"])
            if not math.isfinite(row["loss"]) or bad_grad:
                self.failure = NonFiniteLoss(state.global_step, "loss" if not math.isfinite(row["loss"]) else "gradient norm", self.precision)
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False
        elif "train_runtime" in logs:
            self._write({"step": state.global_step, **{k: logs[k] for k in ("train_runtime", "train_loss") if k in logs}})



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
    """On resume, drop rows logged after the checkpoint so the log has no duplicated or orphaned steps."""
    if path.exists():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= after_step and "train_runtime" not in r]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


HASH_FILE = "train_hash.txt"  # which config the checkpoints beside it belong to


def _read_text(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def newest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = [p for p in checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def training_arguments(cfg: ExperimentConfig, out_dir: Path, precision: str, device: str,
                       gradient_checkpointing: bool = False) -> TrainingArguments:
    """The Trainer's arguments; ``gradient_checkpointing`` is cfg.train's, with "auto" already decided."""
    t = cfg.train
    return TrainingArguments(
        output_dir=str(out_dir),
        # One batch = this process's share of an optimizer step's examples, which ResponseOnlyTrainer splits into
        # rows itself; all processes together train per_device_train_batch_size x gradient_accumulation_steps.
        per_device_train_batch_size=plan.per_process_examples(t, launched_processes()[1]),
        ddp_backend="gloo" if device == "cpu" and launched_processes()[1] > 1 else None,
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
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        # Weights are already stored in bf16/fp16 (see load_model); fp16 adds autocast and the loss scaler
        # it needs on GPUs without bf16. bf16 autocast over bf16 weights would only add casts.
        fp16=precision == "fp16",
        bf16=False,
        use_cpu=device == "cpu",
        use_liger_kernel=t.liger_kernels,
        torch_compile=t.torch_compile,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        optim=t.optim,
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",  # TensorBoard: tracker_callbacks
        run_name=cfg.name,
        disable_tqdm=False,
    )


def build_model(cfg: ExperimentConfig, precision: str, device: str, onednn_weights: bool = False):
    """The base model in the compute dtype with fresh LoRA adapters; read into memory rather than mapped when its
    weights will take oneDNN's layout (see load_model)."""
    torch.manual_seed(cfg.train.seed)
    base = load_model(cfg.model, precision, device, in_memory=onednn_weights, load_in_4bit=cfg.train.load_in_4bit)
    return add_lora(base, cfg.lora)


def decide_switches(cfg: ExperimentConfig, device: str, precision: str, lengths: list[int], trained: list[int]) -> tuple[bool, bool]:
    """(gradient checkpointing, oneDNN weights): train.gradient_checkpointing and train.onednn_weights, with
    "auto" decided by loralab.plan's memory estimate for this device from the training examples' lengths and
    trained counts (plan.example_lengths). oneDNN weights need oneDNN's ops in this PyTorch too."""
    train = cfg.train
    if train.onednn_weights == "auto" and not onednn_weights_available(torch.bfloat16):
        train = replace(train, onednn_weights=False)
    if train.gradient_checkpointing != "auto" and train.onednn_weights != "auto":
        return bool(train.gradient_checkpointing), bool(train.onednn_weights)
    profile = plan.resolve_profile("cpu" if device == "cpu" else "auto")
    resolved = plan.resolve_switches(
        plan.read_model_config(cfg.model), cfg.lora, train, lengths, profile, precision,
        trained_counts=trained, attn_implementation=cfg.model.attn_implementation,
    )
    if resolved.gradient_checkpointing and train.gradient_checkpointing == "auto":
        print(f"train: the estimate says this run would not fit {profile.description} without gradient checkpointing; "
              f"turning it on (about 1/3 more compute; `loralab plan CONFIG` shows the figures)")
    return bool(resolved.gradient_checkpointing), bool(resolved.onednn_weights)


def check_switches(cfg: ExperimentConfig, device: str, precision: str | None = None) -> None:
    """train.liger_kernels and train.torch_compile are for CUDA GPUs (Liger needs its package);
    train.onednn_weights: true for bf16 on a CPU whose PyTorch has oneDNN (checked once ``precision`` is known);
    QLoRA and the 8-bit optimizer need bitsandbytes (QLoRA a CUDA GPU)."""
    check_bitsandbytes(cfg.train.load_in_4bit, cfg.train.optim, device)
    for key, on in (("liger_kernels", cfg.train.liger_kernels), ("torch_compile", cfg.train.torch_compile)):
        if on and device != "cuda":
            raise LoralabError(f"train.{key} is for CUDA GPUs and this run trains on {device}; set train.{key}: false")
    if cfg.train.liger_kernels:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise LoralabError("train.liger_kernels needs the liger-kernel package: pip install liger-kernel "
                               "(or set train.liger_kernels: false)")
    if cfg.train.onednn_weights is True and precision is not None and (
        device != "cpu" or precision != "bf16" or not onednn_weights_available(torch.bfloat16)
    ):
        raise LoralabError(f"train.onednn_weights is for bf16 training on a CPU with oneDNN, and this run trains on {device} "
                           f"in {precision}; set train.onednn_weights: auto")


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(cfg: ExperimentConfig) -> None:
    """Each tracker in train.report_to needs its package; say which to install before any weight is loaded."""
    import importlib.util

    for name in cfg.train.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise LoralabError(f"train.report_to lists {name}, but its package is not installed: pip install "
                               f"{TRACKER_PACKAGES[name]} (or remove {name} from train.report_to)")


def launched_processes() -> tuple[int, int]:
    """(this process's rank, the number of processes) as torchrun and accelerate launch set them; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


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


def build_trainer(cfg: ExperimentConfig, model, train_examples: list[dict], out_dir: Path, precision: str, device: str,
                  callbacks: list, switches: tuple[bool, bool] | None = None,
                  eval_examples: list[dict] | None = None) -> ResponseOnlyTrainer:
    """The ResponseOnlyTrainer `loralab train` runs: each optimizer step's examples in rows of train.row_tokens
    (resolved for this device), checkpointing and oneDNN weights as decide_switches decides them for this
    device (``switches``, where the caller already has them), on a CPU the CPU speed path (loralab.cpu) with the
    allocator tuned for the fullest row; both are switched on in ResponseOnlyTrainer.train."""
    check_switches(cfg, device, precision)
    lengths, trained = plan.example_lengths(train_examples)
    checkpointing, onednn = switches or decide_switches(cfg, device, precision, lengths, trained)
    row_tokens = plan.resolve_row_tokens(cfg.train, device, lengths)
    return ResponseOnlyTrainer(
        model=model,
        args=training_arguments(cfg, out_dir, precision, device, checkpointing),
        train_dataset=train_examples,
        eval_dataset=eval_examples or None,
        data_collator=RowCollator(row_tokens),
        callbacks=callbacks,
        row_tokens=row_tokens,
        precision=precision,
        cpu_speed_path=device == "cpu",
        longest_row_tokens=plan.fullest_row_tokens(cfg.train, device, lengths),
        onednn_weights=onednn,
    )


def current_hash(cfg: ExperimentConfig) -> str:
    return stage_hash(cfg, "train", prepare.current_hash(cfg))


def _say(text: str) -> None:
    """Print on the main process only (under torchrun/accelerate each process would repeat it)."""
    if launched_processes()[0] == 0:
        print(text)


def _checkpoint_to_resume(rundir: RunDir, expected: str) -> Path:
    resume_from = newest_checkpoint(rundir.checkpoints_dir)
    if resume_from is None:
        raise LoralabError(f"--resume: no checkpoint in {rundir.checkpoints_dir}; run `loralab train CONFIG` to start")
    if _read_text(rundir.checkpoints_dir / HASH_FILE) != expected:
        raise LoralabError(f"--resume: {resume_from} was made with a different config; start afresh with `loralab train CONFIG`")
    return resume_from


def _start_logs(rundir: RunDir, expected: str, resume_step: int | None) -> None:
    """A fresh run clears the old checkpoints and logs; a resumed one drops the rows logged after its checkpoint.
    Main process only."""
    if launched_processes()[0] != 0:
        return
    if resume_step is None:
        shutil.rmtree(rundir.checkpoints_dir, ignore_errors=True)
        rundir.metrics_file.unlink(missing_ok=True)
        shutil.rmtree(rundir.root / "tensorboard", ignore_errors=True)
        rundir.checkpoints_dir.mkdir(parents=True)
        (rundir.checkpoints_dir / HASH_FILE).write_text(expected)
    else:
        _truncate_metrics(rundir.metrics_file, resume_step)


def run(cfg: ExperimentConfig, resume: bool = False, force: bool = False) -> str:
    """Train LoRA adapters; write adapter/, metrics.jsonl and checkpoints/; return the stage hash.

    Under torchrun or accelerate launch every process runs this with the same config (DDP): each trains its share
    of every step's examples, and only the main process (rank 0) writes to the run directory."""
    rundir = RunDir(cfg)
    upstream = prepare.current_hash(cfg)
    rundir.require_current("prepare", upstream, "train")
    expected = stage_hash(cfg, "train", upstream)
    if not force and not resume and rundir.is_current("train", expected):
        _say(f"train: up to date ({rundir.adapter_dir})")
        return expected
    resume_from = _checkpoint_to_resume(rundir, expected) if resume else None
    rank, processes = launched_processes()
    main = rank == 0
    per_process = plan.per_process_examples(cfg.train, processes)  # before anything is loaded or written

    start = time.perf_counter()
    device = detect_device(cfg.train.device)
    precision = choose_precision(device, cfg.train.precision)
    check_switches(cfg, device, precision)  # before loading any weight
    check_trackers(cfg)
    train_examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(rundir.train_file)]
    eval_examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(rundir.eval_file)]

    # Decided before loading: weights that will take oneDNN's layout are read into memory (load_model).
    switches = decide_switches(cfg, device, precision, *plan.example_lengths(train_examples))
    model = build_model(cfg, precision, device, onednn_weights=switches[1])
    counts = count_parameters(model)
    _say(f"train: {counts} on {device} ({device_name(device)}), precision {precision}")
    if processes > 1:
        _say(f"train: {processes} processes x {per_process} examples = {processes * per_process} examples per optimizer "
             f"step (train.per_device_train_batch_size x gradient_accumulation_steps, split over the processes)")
    if main:
        rundir.update_manifest(**environment_info(), model_source=model_source(resolve_model_source(cfg.model)),
                               device=device, device_name=device_name(device), precision=precision,
                               parameters=counts.as_dict(), processes=processes)

    resume_step = int(resume_from.name.split("-")[-1]) if resume_from else None
    if resume_from:
        _say(f"train: resuming from step {resume_step} ({resume_from})")
    _start_logs(rundir, expected, resume_step)
    log = MetricsLog(rundir.metrics_file, precision, cfg.train.eval_loss_steps)
    stop = StopOnInterrupt()
    callbacks = [log, stop, *tracker_callbacks(cfg, rundir.root, resume_step or 0)]
    trainer = build_trainer(cfg, model, train_examples, rundir.checkpoints_dir, precision, device, callbacks, switches,
                            eval_examples)
    if main:
        rundir.update_manifest(gradient_checkpointing=trainer.args.gradient_checkpointing, row_tokens=trainer.row_tokens,
                               onednn_weights=trainer.onednn_weights)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        _close_progress_bars(trainer)  # so an error message starts on its own line, not after a bar
    if log.failure is not None:
        raise log.failure
    step = trainer.state.global_step
    if stop.requested and step < cfg.train.max_steps:
        raise KeyboardInterrupt(f"checkpoint saved at step {step} of {cfg.train.max_steps} in {rundir.checkpoints_dir}; "
                                f"resume with `loralab train CONFIG --resume`")
    if main:
        _save_adapter(model, rundir.adapter_dir)
        rundir.mark_done("train", expected, time.perf_counter() - start, steps=step)
    _say(f"train: adapter saved to {rundir.adapter_dir}")
    return expected


def _close_progress_bars(trainer: Trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _save_adapter(model, adapter_dir: Path) -> None:
    """Save to a fresh folder beside the target, then swap it in: an old adapter is never half-overwritten."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=".adapter-"))
    try:
        model.save_pretrained(tmp)
        old = adapter_dir.with_name(".adapter-old")
        shutil.rmtree(old, ignore_errors=True)
        if adapter_dir.exists():
            adapter_dir.rename(old)
        tmp.rename(adapter_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
