"""A plan of a training run: peak memory and time on a device, predicted before loading any weight, from the run's
inputs (config.json, the LoRA and train sections, the example lengths) and its decided switches. Arithmetic only:
no torch, no file; loralab.decisions decides the switches and asks here whether a candidate fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loralab.errors import LoralabError
from loralab.planning.inputs import PlanInputs, row_layout
from loralab.planning.memory import MemoryItem, memory_model
from loralab.planning.profiles import DeviceProfile
from loralab.planning.shapes import lora_trainable_params, model_shape
from loralab.planning.timing import time_model
from loralab.switches import Switches


@dataclass
class Suggestion:
    settings: list[str]
    """The config change as ``section.key=value`` overrides (``--set`` arguments)."""
    note: str
    peak_bytes: float
    fits: bool
    microbatch_seconds: float


@dataclass
class Plan:
    device: DeviceProfile
    precision: str
    total_params: int
    trainable_params: int
    peak_tokens: int
    """Tokens in the fullest row (the longest examples that fit in train.row_tokens), which sets peak memory."""
    mean_tokens: float
    memory: list[MemoryItem]
    flops_per_microbatch: float
    microbatch_seconds: float
    step_seconds: float
    run_seconds: float
    tokens_per_second: float
    max_steps: int
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    onednn_weights: bool = False
    """Whether the frozen weights are in oneDNN's layout (train.onednn_weights, "auto" decided)."""

    @property
    def peak_bytes(self) -> float:
        return sum(item.bytes for item in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device.memory_bytes




def plan_for(inputs: PlanInputs, switches: Switches) -> Plan:
    """Peak memory and time of training ``inputs`` with ``switches``: rows, then the memory model, then the time
    model. ``inputs.notes`` lead the plan's notes (what the decisions said)."""
    profile, precision, train = inputs.profile, switches.precision, inputs.train
    if not inputs.lengths:
        raise LoralabError("plan needs at least one training example length")
    if precision not in profile.peak_flops:
        raise LoralabError(f"{profile.description} cannot train in {precision}; set train.precision to one of "
                           f"{', '.join(profile.peak_flops)}")
    shape = model_shape(inputs.model_config)
    rows = row_layout(inputs, switches)
    notes = list(inputs.notes)
    notes.append(f"rows of up to {rows.row_tokens:,} tokens (train.row_tokens): {rows.rows_per_step:.1f} per optimizer "
                 f"step of {inputs.per_step} examples on average")
    if inputs.lora.use_dora:
        notes.append("DoRA runs PEFT's own forward (not loralab's fused CPU LoRA layers), "
                     "rebuilding each adapted weight")
    if inputs.attn_implementation == "eager":
        notes.append("attn_implementation eager keeps heads x tokens^2 attention probabilities per layer; "
                     "sdpa does not")
    memory, per_token = memory_model(shape, inputs, switches, rows)
    times = time_model(shape, inputs, switches, rows, per_token)
    step_s = rows.rows_per_step * times.microbatch_seconds
    return Plan(
        device=profile, precision=precision, total_params=shape.total_params,
        trainable_params=lora_trainable_params(shape, inputs.lora), peak_tokens=rows.peak_tokens,
        mean_tokens=rows.mean_tokens, memory=memory, flops_per_microbatch=times.flops,
        microbatch_seconds=times.microbatch_seconds, step_seconds=step_s, run_seconds=train.max_steps * step_s,
        tokens_per_second=rows.mean_tokens / times.microbatch_seconds, max_steps=train.max_steps, notes=notes,
        onednn_weights=switches.onednn_weights,
    )
