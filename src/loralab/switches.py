"""How one run trains, every "auto" decided: the value loralab.decisions produces and the train stage, the
Trainer's hooks and the planning models read."""

from __future__ import annotations

from typing import NamedTuple

from loralab.cpu.catalogue import LEAN_ALLOCATOR_ROW_TOKENS, CpuPieces


class Switches(NamedTuple):
    """How one run trains on its device, every "auto" decided."""

    device: str
    """"cuda", "mps" or "cpu"."""
    precision: str
    row_tokens: int
    """Tokens per packed row (train.row_tokens, "auto" decided)."""
    longest_row_tokens: int
    """Tokens in the fullest row the data can make (the allocator is tuned for it)."""
    gradient_checkpointing: bool
    onednn_weights: bool
    liger_kernels: bool
    torch_compile: bool
    cpu_pieces: CpuPieces | None = None
    """What the CPU speed path switches on for training (None off a CPU: GPUs keep PEFT's and transformers' kernels)."""
    per_example_attention: bool = False
    """Whether cpu.attention replaces "sdpa" (the pieces say so, and the model asked for "sdpa")."""
    fast_row_tokens: int = LEAN_ALLOCATOR_ROW_TOKENS
    """Rows of up to this many tokens keep glibc's heap on a CPU (cpu.allocator.lean) and may take oneDNN weights:
    LEAN_ALLOCATOR_ROW_TOKENS, or more where the model's longer rows are small (decisions.fast_row_tokens)."""
    notes: tuple[str, ...] = ()
    """What a decision did that the user should hear about (gradient checkpointing turned on, say)."""
