"""loralab's CPU training speed path, switched on and off for a model as one piece (speed_path).

Each part keeps PEFT's and transformers' results (tests/test_fused.py, tests/test_onednn_weights.py) and
runs them faster on a CPU; the README's CPU training section has the figures:

* fused_lora: each LoRA linear's forward and backward as one autograd function;
* fused_norm: frozen RMSNorms with a closed-form backward;
* attention: causal attention per packed example as batched matmuls;
* head_loss: the frozen LM head's cross-entropy a chunk at a time (chosen per model by loralab.loss);
* onednn_weights: frozen linear weights kept in oneDNN's blocked layout for the run (bf16 or fp32);
* allocator: glibc's malloc tuned for the row length.

GPUs keep PEFT's and transformers' own kernels, which is where those are fast and where these were not measured.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

from loralab.decisions import CPU_SPEED_PATH, CpuPieces

ALL_PIECES = CPU_SPEED_PATH[(True, "bf16")]  # speed_path's default: the bf16 path, every piece on


class SpeedPath(NamedTuple):
    """What speed_path switched on."""

    per_example_attention: bool
    fused_lora_layers: int
    fused_rms_norms: int
    mmap_threshold: int | None
    """glibc's mmap threshold set for the rows (None: not glibc, or not tuned)."""
    onednn_weights: int
    """Frozen linear weights held in oneDNN's layout (0: plain weights)."""


@contextlib.contextmanager
def speed_path(model, row_tokens: int, longest_row_tokens: int | None = None, onednn_weights: bool = False,
               pieces: CpuPieces | None = None, checkpointing: bool = False) -> Iterator[SpeedPath]:
    """Run the body with ``model`` (a PEFT LoRA model, or a plain transformers one) on the CPU speed path:
    per-example attention, fused LoRA layers and RMSNorms, the allocator tuned for rows of up to
    ``longest_row_tokens`` (default ``row_tokens``; lean under gradient ``checkpointing`` where the pieces say so)
    and, with ``onednn_weights``, the frozen linear weights in oneDNN's layout for inputs of ``row_tokens`` rows;
    ``pieces`` (loralab.decisions.cpu_pieces; default: all) says which of the first four are on. However the body ends, all of it but the allocator's setting
is undone on the way out (see allocator.tune_allocator)."""
    from loralab.cpu import allocator, attention, fused_lora, fused_norm
    from loralab.cpu import onednn_weights as onednn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    on = pieces or ALL_PIECES
    with contextlib.ExitStack() as undo:
        per_example = on.per_example_attention and attention.use_per_example_attention(base)
        undo.callback(attention.undo_per_example_attention, base)
        lora_layers = fused_lora.fuse_lora_layers(model) if on.fused_lora else 0
        undo.callback(own_forwards_back, model, fused_lora._fused_forward)
        norms = fused_norm.fuse_rms_norms(model) if on.fused_norm else 0
        undo.callback(own_forwards_back, model, fused_norm._fused_forward)
        # stays: see tune_allocator
        lean = checkpointing and on.lean_when_checkpointing
        threshold = allocator.tune_allocator(longest_row_tokens or row_tokens, lean) if on.tuned_allocator else None
        converted = 0
        if onednn_weights:
            converted = undo.enter_context(onednn.onednn_weights(model, row_tokens))
            allocator.return_freed_memory()
        yield SpeedPath(per_example, lora_layers, norms, threshold, converted)


def own_forwards_back(model, patched) -> None:
    """Give every module of ``model`` whose forward was swapped for the function ``patched`` its class's own back."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is patched:
            del module.forward
