"""Peak memory of a training run on a device: the frozen weights, the LoRA state, what autograd saves for the fullest
row's backward, the logits, the backward's buffers and the framework, each with a note of what it is.

The model is loralab's own training loop (see loralab.stages.train): base weights frozen in the compute dtype; LoRA
weights, their gradients and AdamW's moments in fp32; one micro-batch = one packed row, the fullest possible row
setting the peak; activations as autograd saves them per decoder layer (or, checkpointed, each layer's boundary
plus one layer recomputed), times what the allocator holds per live byte; logits only at trained positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loralab.config import LoraSection
from loralab.cpu import allocator
from loralab.cpu.catalogue import LEAN_ALLOCATOR_ROW_TOKENS
from loralab.cpu.catalogue import LOSS_CHUNK_ROWS as CHUNK_ROWS
from loralab.planning.inputs import PlanInputs, Rows, fused_lora_on, head_loss_on, swiglu_on
from loralab.planning.shapes import ModelShape, lora_modules, lora_trainable_params, target_names
from loralab.switches import Switches

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LORA_STATE_BYTES = 4 + 4 + 8  # fp32 weight + fp32 gradient + AdamW exp_avg and exp_avg_sq
LOGITS_PEAK_BYTES = 12  # per kept logit at the loss backward: fp32 log-probs + incoming grad + outgoing grad
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8  # 4 bits + double-quantised absmax constants (QLoRA paper: 0.127 bits)
OPTIMIZER_8BIT_STATE_BYTES = 4 + 4 + 2  # fp32 weight + gradient + two 8-bit AdamW states (block constants ignored)
# Inputs that adapted linears of one layer share: q/k/v read the same normed hidden state, gate/up another.
_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                 "up_proj": "mlp_in"}
PER_EXAMPLE_MAX_TOKENS = 1024  # loralab.cpu.attention.MATERIALISED_MAX_TOKENS: longer examples use SDPA's kernel
HEAP_HELD_FACTOR = 1.3  # memory glibc's heap holds per live activation byte on the CPU path (bench/plan_validation.py)
# Over a run whose rows change length from step to step, the kept heap fragments and grows: by this much of the held
# activations of a row of up to LEAN_ALLOCATOR_ROW_TOKENS per natural log of the steps (fitted on one 500-step
# SmolLM2-135M run on the 2-core Zen 5; a 250-step run of 2,048-token rows, about one a step, grew as much as one of
# 1,024-token rows: docs/benchmarks.md).
HEAP_GROWTH_PER_LOG_STEP = 0.2


@dataclass
class MemoryItem:
    label: str
    bytes: float
    note: str = ""


def base_weights_item(shape: ModelShape, precision: str, load_in_4bit: bool) -> MemoryItem:
    """The frozen base: every weight in the compute dtype, or (QLoRA) the decoder's linears in NF4."""
    b = DTYPE_BYTES[precision]
    total = shape.total_params
    if not load_in_4bit:
        return MemoryItem("base weights", total * b, f"{total:,} params x {b} bytes ({precision}), frozen")
    linear = shape.num_layers * sum(a * o for a, o in shape.module_dims().values())
    return MemoryItem("base weights", linear * NF4_BYTES_PER_PARAM + (total - linear) * b,
                      f"{linear:,} linear weights in 4-bit NF4 (QLoRA), {total - linear:,} others x {b} bytes "
                      f"({precision})")


def trainable_state_item(trainable: int, lora: LoraSection, optim: str) -> MemoryItem:
    per = OPTIMIZER_8BIT_STATE_BYTES if optim == "adamw_bnb_8bit" else LORA_STATE_BYTES
    what = "8-bit AdamW" if optim == "adamw_bnb_8bit" else "AdamW"
    extra = "; DoRA magnitudes" if lora.use_dora else ""
    extra += f"; {', '.join(lora.modules_to_save)} in full" if lora.modules_to_save else ""
    return MemoryItem(f"LoRA params + grads + {what}", trainable * per,
                      f"{trainable:,} trainable x {per} bytes{extra}")


# The estimate -------------------------------------------------------------------------------------


def activation_bytes_per_token(shape: ModelShape, lora: LoraSection, act_bytes: int, mask_bytes: int,
                               fused: bool = False, per_example: bool = False, swiglu: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer's backward (no checkpointing).

    ``fused``: LoRA layers run through loralab.cpu.fused_lora, which keeps each distinct input once in the
    compute dtype, the rank-r product and the positions dropout zeroed (int32, a share lora_dropout of each input's
    elements), instead of PEFT's fp32 input copies and masks. ``per_example``: attention runs through
    loralab.cpu.attention, which keeps q, k and v but not its output (its probabilities are counted per row).
    ``swiglu``: the MLP's silu(gate) * up runs through loralab.cpu.fused_mlp, which keeps gate and up only.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norms = 2 * h * 4  # RMSNorm computes in fp32 and keeps its fp32 input
    mlp = (2 if swiglu else 3) * i * act_bytes  # gate, silu(gate), up: the frozen down_proj keeps nothing
    attention = (2 * q + 2 * kv) * act_bytes + shape.num_heads * 4  # q, output, k, v; log-sum-exp
    if per_example:
        attention = (q + 2 * kv) * act_bytes
    dims = shape.module_dims()
    if fused:
        inputs = {_SHARED_INPUT.get(m, m): dims[m][0] for m in target_names(lora)}
        adapters = sum(inputs.values()) * act_bytes + len(target_names(lora)) * lora.r * act_bytes
        adapters += sum(dims[m][0] for m in target_names(lora)) * lora.lora_dropout * 4  # dropped positions
        return norms + mlp + attention + adapters
    # PEFT upcasts each adapted linear's input to the fp32 LoRA dtype; lora_A keeps it (and dropout its mask).
    per_input = 4 + (mask_bytes if lora.lora_dropout > 0 else 0)
    adapters = sum(dims[m][0] * per_input + lora.r * 4 for m in target_names(lora))
    return norms + mlp + attention + adapters


def backward_transient_per_token(shape: ModelShape, act_bytes: int) -> float:
    """Gradients alive at once inside one layer's backward (the MLP's, the widest, plus the norms')."""
    return 4 * shape.intermediate_size * act_bytes + 4 * shape.hidden_size * 4



def saved_activation_bytes(shape: ModelShape, inputs: PlanInputs, switches: Switches, rows: Rows, per_token: float,
                           b: int) -> tuple[float, str]:
    """Bytes autograd keeps for the fullest row's backward, and what they are."""
    attn_implementation, checkpointing = inputs.attn_implementation, switches.gradient_checkpointing
    n_layers, peak_tokens = shape.num_layers, rows.peak_tokens
    # A checkpointed layer keeps about two hidden-size tensors per token (its input and the residual it
    # returns, measured on CPU); the backward pass recomputes one layer at a time.
    kept_per_layer = 2 * shape.hidden_size * b
    if checkpointing:
        saved = peak_tokens * (n_layers * kept_per_layer + per_token)
        note = f"{n_layers} checkpointed layer inputs + 1 recomputed layer, {peak_tokens:,} tokens"
    else:
        saved = peak_tokens * n_layers * per_token
        note = f"{n_layers} layers x {peak_tokens:,} tokens x {per_token / 1e3:.0f} kB"
    saved += peak_tokens * shape.hidden_size * (b + 4)  # embeddings out, final norm's fp32 input
    if rows.packed and attn_implementation != "flash_attention_2" and not switches.per_example_attention:
        saved += peak_tokens**2  # the packed row's block-causal mask (bool, tokens x tokens)
    layers_kept = 1 if checkpointing else n_layers
    if switches.per_example_attention:
        # per-example attention keeps each example's (heads x L x L) probabilities in the compute dtype
        short = sum(n * n for n in rows.peak_examples if n <= PER_EXAMPLE_MAX_TOKENS)
        saved += layers_kept * shape.num_heads * short * b
    if attn_implementation == "eager":
        # eager attention materialises (heads, tokens, tokens) probabilities and keeps them per layer
        saved += layers_kept * shape.num_heads * peak_tokens**2 * (b + 4)
    return saved, note


def heap_growth_items(held_bytes: float, held: float, rows: Rows, steps: int) -> list[MemoryItem]:
    """What a kept heap (``held`` > 1) grows by over ``steps`` optimizer steps when the rows change length (packed
    real data does; rows of one length reuse the same blocks every step): HEAP_GROWTH_PER_LOG_STEP x ln(steps) x the
    held activations (``held_bytes``, the fullest row's), of at most LEAN_ALLOCATOR_ROW_TOKENS of its tokens. Nothing
    otherwise (an empty list)."""
    if held == 1.0 or steps < 2 or len({sum(r) for r in rows.rows}) < 2:
        return []
    growing = held_bytes * min(1.0, LEAN_ALLOCATOR_ROW_TOKENS / rows.peak_tokens)
    grown = growing * HEAP_GROWTH_PER_LOG_STEP * math.log(steps)
    part = "" if rows.peak_tokens <= LEAN_ALLOCATOR_ROW_TOKENS else f" of {LEAN_ALLOCATOR_ROW_TOKENS:,} of its tokens"
    note = (f"the kept heap fragmenting over {steps:,} steps of rows of varying length "
            f"({HEAP_GROWTH_PER_LOG_STEP:g} x ln(steps) x the activations{part})")
    return [MemoryItem("heap growth", grown, note)]


def layer_activation_bytes(shape: ModelShape, inputs: PlanInputs, switches: Switches, act_bytes: int) -> float:
    """activation_bytes_per_token with the pieces the switches turn on."""
    return activation_bytes_per_token(shape, inputs.lora, act_bytes, inputs.profile.dropout_mask_bytes,
                                      fused=fused_lora_on(switches), per_example=switches.per_example_attention,
                                      swiglu=swiglu_on(inputs, switches))


def memory_model(shape: ModelShape, inputs: PlanInputs, switches: Switches,
                 rows: Rows) -> tuple[list[MemoryItem], float]:
    """The peak's parts for the fullest row, and the activation bytes per token of one layer (the time model's
    too)."""
    lora, train, profile, precision = inputs.lora, inputs.train, inputs.profile, switches.precision
    checkpointing, pieces, fused_head = (switches.gradient_checkpointing, switches.cpu_pieces,
                                         head_loss_on(inputs, switches))
    b = DTYPE_BYTES[precision]
    trainable = lora_trainable_params(shape, lora)
    per_token = layer_activation_bytes(shape, inputs, switches, b)
    saved, act_note = saved_activation_bytes(shape, inputs, switches, rows, per_token, b)
    peak_tokens, peak_trained = rows.peak_tokens, rows.peak_trained
    if fused_head:  # loralab.cpu.head_loss: one chunk of fp32 logits, and the hidden states' gradient
        logits = CHUNK_ROWS * shape.vocab_size * (4 + b) + peak_trained * shape.hidden_size * b
        logits_note = (f"{CHUNK_ROWS} positions x {shape.vocab_size:,} vocab at a time (of the {peak_trained:,} "
                       f"trained), fp32 for the loss")
    else:
        logits = peak_trained * shape.vocab_size * LOGITS_PEAK_BYTES
        logits_note = f"only the {peak_trained:,} trained positions x {shape.vocab_size:,} vocab, fp32 for the loss"
    # loralab.cpu.allocator.tune_allocator: rows up to switches.fast_row_tokens keep glibc's heap, which holds
    # more than the live activations (HEAP_HELD_FACTOR, from bench/plan_validation.py); longer rows, and checkpointed
    # runs where the CPU pieces say so, give freed memory back at once (the rule: allocator.lean).
    if pieces is not None and pieces.tuned_allocator:
        lean = allocator.lean(peak_tokens, checkpointing and pieces.lean_when_checkpointing, switches.fast_row_tokens)
        held = 1.0 if lean else HEAP_HELD_FACTOR
    else:
        held = profile.allocator_factor
    transient = peak_tokens * backward_transient_per_token(shape, b) * held
    if checkpointing:
        buffers_note = "gradients inside one layer's backward, on top of its recomputed activations"
    elif fused_head:
        buffers_note = "gradients inside one layer's backward"
    else:
        # Each layer's backward reuses the memory its freed activations leave, so only the part larger
        # than the logits (freed just before) adds to the peak. Both rules match CPU measurements.
        transient = max(0.0, transient - logits)
        buffers_note = "gradients inside one layer's backward, beyond the memory the logits freed"
    act_note += f", x{held:g} held by the allocator" if held != 1.0 else ""
    memory = [
        base_weights_item(shape, precision, train.load_in_4bit),
        trainable_state_item(trainable, lora, train.optim),
        MemoryItem("activations", saved * held, act_note),
        *heap_growth_items(saved * held, held, rows, train.max_steps),
        MemoryItem("logits (fp32)", logits, logits_note),
        MemoryItem("backward buffers", transient, buffers_note),
        MemoryItem("framework", profile.framework_bytes,
                   "runtime before any weight: CUDA context on GPUs, Python + libraries on CPU"),
    ]
    if lora.use_dora:
        # PEFT's DoRA builds each adapted weight (W + scale B A) in fp32 to take its norm, one module at a time
        largest = max(a * o for a, o in lora_modules(shape, lora))
        memory.append(MemoryItem("DoRA weight norm", largest * 4,
                                 "the largest adapted weight rebuilt in fp32 for its norm"))
    if switches.onednn_weights:
        memory.append(onednn_weights_item(shape, b))
    return memory, per_token


def onednn_weights_item(shape: ModelShape, b: int) -> MemoryItem:
    """loralab.cpu.onednn_weights: each frozen linear weight reordered both ways, its plain copy released, except a
    tied head's, which the embeddings read: its two reordered copies come on top."""
    params = shape.num_layers * sum(a * o for a, o in shape.module_dims().values())
    params += shape.vocab_size * shape.hidden_size * (2 if shape.tied_embeddings else 1)
    tied = " (the tied head's kept: the embeddings read it)" if shape.tied_embeddings else ""
    return MemoryItem("oneDNN weights", params * b, f"{params:,} weights' worth: the frozen linears in oneDNN's "
                                                    f"layout both ways, plain copies released{tied}")
