"""The train stage: LoRA on the prepared split with the Hugging Face Trainer; adapter saved with PEFT."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
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

    def train(self, *args, **kwargs):
        """The Trainer's train, on the CPU speed path when self.cpu_speed_path is set (however the run ends, the
        model is back to PEFT's and transformers' own forwards, with plain weights, when this returns)."""
        if not self.cpu_speed_path:
            return super().train(*args, **kwargs)
        start = time.perf_counter()
        with cpu.speed_path(self.model, self.row_tokens, self.longest_row_tokens, self.onednn_weights) as switched:
            if switched.onednn_weights:
                print(f"train: {switched.onednn_weights} frozen weights put in oneDNN's layout for this CPU's matmuls in "
                      f"{time.perf_counter() - start:.0f} s (train.onednn_weights; `loralab plan CONFIG` shows the memory)")
            return super().train(*args, **kwargs)

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
    """Appends each log row to metrics.jsonl, stops on a non-finite loss or grad norm, and logs held-out loss."""

    def __init__(self, path: Path, precision: str, eval_examples: list[dict], eval_every: int, device):
        self.path = path
        self.precision = precision
        self.eval_examples = eval_examples
        self.eval_every = eval_every
        self.device = device
        self.model = None
        self.failure: NonFiniteLoss | None = None
        self.main_process = True  # under torchrun/accelerate only rank 0 writes and evaluates (on_train_begin)

    def _write(self, row: dict) -> None:
        if not self.main_process:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _log_eval(self, step: int) -> None:
        if self.eval_examples and self.model is not None and self.main_process:
            loss = heldout_loss(self.model, self.eval_examples, self.device)
            self._write({"step": step, "eval_loss": round(loss, 6)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.main_process = state.is_world_process_zero
        if state.global_step == 0:
            self._log_eval(0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_every and state.global_step % self.eval_every == 0 and state.global_step < state.max_steps:
            self._log_eval(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
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
        elif "train_runtime" in logs:
            self._write({"step": state.global_step, **{k: logs[k] for k in ("train_runtime", "train_loss") if k in logs}})

    def on_train_end(self, args, state, control, **kwargs):
        if self.failure is None:
            self._log_eval(state.global_step)


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
        # One batch = one optimizer step's examples, which ResponseOnlyTrainer splits into rows itself.
        per_device_train_batch_size=t.per_device_train_batch_size * t.gradient_accumulation_steps,
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
        report_to="none",
        disable_tqdm=False,
    )


def build_model(cfg: ExperimentConfig, precision: str, device: str, onednn_weights: bool = False):
    """The base model in the compute dtype with fresh LoRA adapters; read into memory rather than mapped when its
    weights will take oneDNN's layout (see load_model)."""
    torch.manual_seed(cfg.train.seed)
    return add_lora(load_model(cfg.model, precision, device, in_memory=onednn_weights), cfg.lora)


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
    train.onednn_weights: true for bf16 on a CPU whose PyTorch has oneDNN (checked once ``precision`` is known)."""
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


def build_trainer(cfg: ExperimentConfig, model, train_examples: list[dict], out_dir: Path, precision: str, device: str,
                  callbacks: list, switches: tuple[bool, bool] | None = None) -> ResponseOnlyTrainer:
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


def run(cfg: ExperimentConfig, resume: bool = False, force: bool = False) -> str:
    """Train LoRA adapters; write adapter/, metrics.jsonl and checkpoints/; return the stage hash."""
    rundir = RunDir(cfg)
    upstream = prepare.current_hash(cfg)
    rundir.require_current("prepare", upstream, "train")
    expected = stage_hash(cfg, "train", upstream)
    if not force and not resume and rundir.is_current("train", expected):
        print(f"train: up to date ({rundir.adapter_dir})")
        return expected

    resume_from = None
    if resume:
        resume_from = newest_checkpoint(rundir.checkpoints_dir)
        if resume_from is None:
            raise LoralabError(f"--resume: no checkpoint in {rundir.checkpoints_dir}; run `loralab train CONFIG` to start")
        if _read_text(rundir.checkpoints_dir / HASH_FILE) != expected:
            raise LoralabError(f"--resume: {resume_from} was made with a different config; start afresh with `loralab train CONFIG`")

    start = time.perf_counter()
    device = detect_device(cfg.train.device)
    precision = choose_precision(device, cfg.train.precision)
    check_switches(cfg, device, precision)  # before loading any weight
    train_examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(rundir.train_file)]
    eval_examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(rundir.eval_file)]

    # Decided before loading: weights that will take oneDNN's layout are read into memory (load_model).
    switches = decide_switches(cfg, device, precision, *plan.example_lengths(train_examples))
    model = build_model(cfg, precision, device, onednn_weights=switches[1])
    counts = count_parameters(model)
    print(f"train: {counts} on {device} ({device_name(device)}), precision {precision}")
    rundir.update_manifest(
        **environment_info(), model_source=model_source(resolve_model_source(cfg.model)),
        device=device, device_name=device_name(device), precision=precision, parameters=counts.as_dict()
    )

    if resume_from is None:
        shutil.rmtree(rundir.checkpoints_dir, ignore_errors=True)
        rundir.metrics_file.unlink(missing_ok=True)
        rundir.checkpoints_dir.mkdir(parents=True)
        (rundir.checkpoints_dir / HASH_FILE).write_text(expected)
    else:
        _truncate_metrics(rundir.metrics_file, int(resume_from.name.split("-")[-1]))
    log = MetricsLog(rundir.metrics_file, precision, eval_examples, cfg.train.eval_loss_steps, device)
    trainer = build_trainer(cfg, model, train_examples, rundir.checkpoints_dir, precision, device, [log], switches)
    rundir.update_manifest(gradient_checkpointing=trainer.args.gradient_checkpointing, row_tokens=trainer.row_tokens,
                           onednn_weights=trainer.onednn_weights)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        _close_progress_bars(trainer)  # so an error message starts on its own line, not after a bar
    if log.failure is not None:
        raise log.failure

    _save_adapter(model, rundir.adapter_dir)
    rundir.mark_done("train", expected, time.perf_counter() - start, steps=trainer.state.global_step)
    print(f"train: adapter saved to {rundir.adapter_dir}")
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
