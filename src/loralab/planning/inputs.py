"""What a plan is computed from: the run's inputs (PlanInputs) and how its examples fall into rows (Rows)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from loralab.config import LoraSection, TrainConfig
from loralab.cpu.catalogue import PLAIN_HEAD_MODELS
from loralab.packing import peak_row, plan_rows
from loralab.planning.profiles import DeviceProfile
from loralab.switches import Switches


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan depends on besides the decided switches."""

    model_config: dict[str, Any]
    """The model's config.json."""
    lora: LoraSection
    train: TrainConfig
    """Steps, batch, optimizer, QLoRA; its "auto" switches are decided into the Switches, not read from here."""
    lengths: list[int]
    """Token counts of the training examples."""
    profile: DeviceProfile
    trained_counts: list[int] | None = None
    """Trained (response) tokens of each example; None: every token trained, the worst case for the logits."""
    attn_implementation: str = "sdpa"
    notes: list[str] = field(default_factory=list)

    @property
    def trained(self) -> list[int]:
        return list(self.lengths) if self.trained_counts is None else list(self.trained_counts)

    @property
    def per_step(self) -> int:
        """Examples in one optimizer step."""
        return self.train.per_device_train_batch_size * self.train.gradient_accumulation_steps


def fused_lora_on(switches: Switches) -> bool:
    return switches.cpu_pieces is not None and switches.cpu_pieces.fused_lora


def swiglu_on(inputs: PlanInputs, switches: Switches) -> bool:
    """Whether a SiLU-gated MLP keeps two activations, not three (cpu.fused_mlp): the pieces say so and the model is
    of the Llama family with a SiLU."""
    pieces = switches.cpu_pieces
    return (pieces is not None and pieces.fused_mlp and inputs.model_config.get("model_type") in PLAIN_HEAD_MODELS
            and inputs.model_config.get("hidden_act", "silu") == "silu")


def head_loss_on(inputs: PlanInputs, switches: Switches) -> bool:
    """Whether the frozen-head loss (cpu.head_loss) runs: the pieces say so and the model's head is plain."""
    pieces = switches.cpu_pieces
    return pieces is not None and pieces.head_loss and inputs.model_config.get("model_type") in PLAIN_HEAD_MODELS


class Rows(NamedTuple):
    """How a run's examples fall into rows: the fullest row sets the memory, the first steps' rows the time."""

    row_tokens: int
    peak_examples: list[int]
    """Lengths of the examples in the fullest row."""
    peak_trained: int
    rows: list[list[int]]
    rows_per_step: float
    mean_tokens: float
    mean_trained: float
    packed: bool
    """Whether any row holds more than one example."""

    @property
    def peak_tokens(self) -> int:
        return sum(self.peak_examples)


def typical_rows(lengths: list[int], per_step: int, row_tokens: int, steps: int = 64) -> list[list[int]]:
    """The rows of the first ``steps`` optimizer steps, taking the examples in order (each row a list of lengths)."""
    rows = []
    for start in range(0, min(len(lengths), steps * per_step), per_step):
        step = lengths[start : start + per_step]
        rows += [[step[i] for i in group] for group in plan_rows(step, row_tokens)]
    return rows


def row_layout(inputs: PlanInputs, switches: Switches) -> Rows:
    lengths, trained_counts, per_step = inputs.lengths, inputs.trained, inputs.per_step
    row_tokens = switches.row_tokens
    peak = peak_row(lengths, per_step, row_tokens)
    rows = typical_rows(lengths, per_step, row_tokens)
    mean_tokens = statistics.fmean(sum(r) for r in rows)
    return Rows(
        row_tokens=row_tokens, peak_examples=[lengths[i] for i in peak],
        peak_trained=sum(sorted(trained_counts, reverse=True)[: len(peak)]), rows=rows,
        rows_per_step=len(rows) / math.ceil(sum(len(r) for r in rows) / per_step), mean_tokens=mean_tokens,
        mean_trained=mean_tokens * sum(trained_counts) / sum(lengths),
        packed=max(len(r) for r in rows) > 1 or len(peak) > 1,
    )
