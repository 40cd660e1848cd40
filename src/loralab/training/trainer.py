"""The Hugging Face Trainer with the hooks loralab changes: packed rows per optimizer step, logits only at trained
targets, the held-out loss computed padding-free, and the CPU speed path around training."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from loralab import decisions
from loralab.config import ExperimentConfig
from loralab.cpu.speed_path import speed_path
from loralab.launch import launched_processes
from loralab.loss import heldout_example_losses, mean_loss, response_loss_sum
from loralab.packing import RowCollator
from loralab.precision import loss_scaling
from loralab.switches import Switches
from loralab.training.callbacks import NonFiniteLoss


class ResponseOnlyTrainer(Trainer):
    """The Trainer with two hooks changed. Each batch is one optimizer step's examples as packed rows
    (loralab.packing.pack_rows; the Trainer's accumulation is 1, see training_arguments): training_step runs
    forward and backward on one row at a time. compute_loss asks the model for logits only at trained
    targets (see loralab.loss) and normalises by the trained-token count of the whole optimizer step, so
    how the examples are split into rows does not change the gradients. On a CPU, train runs on loralab's
    CPU speed path (loralab.cpu.speed_path.speed_path), with the frozen weights in oneDNN's layout when
    ``onednn_weights``."""

    def __init__(self, *args, switches: Switches, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches = switches
        self.example_losses: list[tuple[float, int]] = []  # the last held-out pass's, per example (evaluate)

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
        if s.cpu_pieces is None:  # off a CPU: PEFT's and transformers' own kernels
            return super().train(resume_from_checkpoint, **kwargs)
        start = time.perf_counter()
        with speed_path(self.model, s.row_tokens, s.longest_row_tokens, s.onednn_weights, s.cpu_pieces,
                        checkpointing=s.gradient_checkpointing, fast_row_tokens=s.fast_row_tokens) as switched:
            if switched.onednn_weights:
                print(f"train: {switched.onednn_weights} frozen weights put in oneDNN's layout for this CPU's matmuls "
                      f"in {time.perf_counter() - start:.0f} s "
                      "(train.onednn_weights; `loralab plan CONFIG` shows the memory)")
            return super().train(resume_from_checkpoint, **kwargs)

    # Not the Trainer's evaluation loop: it pads batches and builds full-vocabulary logits; heldout_loss packs
    # rows and computes logits only at trained positions (the same loss: tests/test_heldout_loss.py).
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The held-out loss (loralab.loss.heldout_loss, token-weighted like training), logged through the
        Trainer's log so every tracker in train.report_to and metrics.jsonl get it. Main process only."""
        examples = list(eval_dataset if eval_dataset is not None else self.eval_dataset or [])
        metrics = {}
        if examples and self.is_world_process_zero():
            # per example too: the eval stage's interval on the held-out loss (MetricsLog keeps them)
            self.example_losses = heldout_example_losses(self.model, examples, self.args.device)
            metrics = {f"{metric_key_prefix}_loss": round(mean_loss(self.example_losses), 6)}
            self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pieces = self.switches.cpu_pieces
        # the frozen-head loss where measured faster
        head = {} if pieces is None or pieces.head_loss else {"fused_head": False}
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
        fp16=loss_scaling(switches.precision),
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
