"""The CPU speed path switched on for a model, and off again, as one piece: for training (the pieces
cpu.catalogue.training_pieces picks) or for inference (evaluation, generation, the held-out loss).

However the body of either context ends, the model is back on PEFT's and transformers' own forwards with plain
weights (the allocator's setting alone stays: see allocator.tune_allocator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

from loralab.cpu import allocator, attention, fused_lora, fused_mlp, fused_norm
from loralab.cpu import onednn_weights as onednn
from loralab.cpu.catalogue import ALL_PIECES, LEAN_ALLOCATOR_ROW_TOKENS, CpuPieces, inference_pieces
from loralab.cpu.forwards import base_model, own_forwards_back


class Switched(NamedTuple):
    """What a speed_path context switched on."""

    per_example_attention: bool
    fused_lora_layers: int
    fused_rms_norms: int
    mmap_threshold: int | None
    """glibc's mmap threshold set for the rows (None: not glibc, or not tuned)."""
    onednn_weights: int
    """Frozen linear weights held in oneDNN's layout (0: plain weights)."""
    row_attention_layers: int = 0
    """Llama attention layers run as one autograd node a packed row (loralab.cpu.attention.RowAttention)."""
    fused_mlps: int = 0
    """SiLU-gated MLPs whose silu(gate) * up runs as one autograd function (loralab.cpu.fused_mlp)."""


@contextlib.contextmanager
def speed_path(model, row_tokens: int, longest_row_tokens: int | None = None, onednn_weights: bool = False,
               pieces: CpuPieces | None = None, checkpointing: bool = False,
               fast_row_tokens: int = LEAN_ALLOCATOR_ROW_TOKENS) -> Iterator[Switched]:
    """Train with ``model`` (a PEFT LoRA model, or a plain transformers one) on the CPU speed path: per-example
    attention (a Llama's with its RoPE, one node a row), fused LoRA layers, RMSNorms and SwiGLUs, the allocator
    tuned for rows of up to ``longest_row_tokens`` (default ``row_tokens``; lean for rows over ``fast_row_tokens``,
    and under gradient ``checkpointing`` where the pieces say so: allocator.lean) and, with ``onednn_weights``, the
    frozen linear weights in oneDNN's layout for inputs of ``row_tokens`` rows. ``pieces``
    (cpu.catalogue.training_pieces; default: all) says which are on."""
    on = pieces or ALL_PIECES
    with contextlib.ExitStack() as undo:
        undo.enter_context(hub_kernels_off(model))  # first in, last out: before any forward is swapped
        per_example = on.per_example_attention and attention.use_per_example_attention(base_model(model))
        undo.callback(attention.undo_per_example_attention, base_model(model))
        row_layers = attention.fuse_row_attention(model) if per_example else 0
        undo.callback(own_forwards_back, model, attention._row_attention_forward)
        lora_layers = fused_lora.fuse_lora_layers(model) if on.fused_lora else 0
        undo.callback(own_forwards_back, model, fused_lora._fused_forward)
        norms = fused_norm.fuse_rms_norms(model) if on.fused_norm else 0
        undo.callback(own_forwards_back, model, fused_norm._fused_forward)
        mlps = fused_mlp.fuse_swiglu(model) if on.fused_mlp else 0
        undo.callback(own_forwards_back, model, fused_mlp._fused_forward)
        # stays: see tune_allocator
        lean = checkpointing and on.lean_when_checkpointing
        threshold = (allocator.tune_allocator(longest_row_tokens or row_tokens, lean, fast_row_tokens)
                     if on.tuned_allocator else None)
        converted = 0
        if onednn_weights:
            converted = undo.enter_context(onednn.onednn_weights(model, row_tokens))
            allocator.return_freed_memory()
        yield Switched(per_example, lora_layers, norms, threshold, converted, row_layers, mlps)


@contextlib.contextmanager
def hub_kernels_off(model) -> Iterator[None]:
    """transformers' hub kernels (the ``kernels`` package) off for the body, and back on after, for every model in
    ``model`` that has them on.

    transformers 5 turns them on in from_pretrained whenever ``kernels`` is installed (it is a dependency), and each
    train() or eval() that changes the mode kernelizes the model again: every module of a class marked for a hub
    kernel (Llama's, Mistral's and Qwen's RMSNorm among them) loses the forward set on it and takes its class's
    back, there being no hub kernel for a CPU. The fused RMSNorms of the speed path were so dropped, without a word,
    at the Trainer's model.train() on the first step of a resumed run and at the held-out loss's eval() and train()
    in the middle of any run: a resumed run then took other roundings than an uninterrupted one (issue 26)."""
    held = [(m, m.kernels_mode) for m in model.modules()
            if hasattr(m, "set_use_kernels") and getattr(m, "use_kernels", False) is True]
    for module, _ in held:
        module.use_kernels = False  # kernelizes once more, every class's own forward: nothing is swapped yet
    try:
        yield
    finally:
        for module, mode in held:
            module.set_use_kernels(True, mode=mode)


def model_device_type(model) -> str:
    """"cpu", "cuda" or "mps": where ``model``'s input embeddings live."""
    return model.get_input_embeddings().weight.device.type


@contextlib.contextmanager
def inference_path(model, rows_hint: int) -> Iterator[Switched]:
    """Run inference with ``model`` on the pieces cpu.catalogue.inference_pieces picks for its device: on a CPU,
    per-example attention (packed rows attended example by example) and the linear weights prepacked for oneDNN
    for inputs of about ``rows_hint`` rows (put back bit for bit on the way out); on a GPU or a Mac, nothing.
    The weights are put back outside any inference_mode of the body, so they can be merged into or trained after."""
    on = inference_pieces(model_device_type(model))
    if on is None:
        yield Switched(False, 0, 0, None, 0)
        return
    with contextlib.ExitStack() as undo:
        per_example = on.per_example_attention and attention.use_per_example_attention(base_model(model))
        undo.callback(attention.undo_per_example_attention, base_model(model))
        converted = (undo.enter_context(onednn.onednn_weights(model, rows_hint, inference=True))
                     if on.onednn_weights else 0)
        yield Switched(per_example, 0, 0, None, converted)
