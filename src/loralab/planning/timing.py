"""Time of a training micro-batch on a device: matmul FLOPs over the device's peak x efficiency (forward 2 x params
per token, backward 2 x params for the input gradient only: the frozen base needs no weight gradient; one more
forward with checkpointing), attention over its own head_dim-dependent efficiency, activation traffic over memory
bandwidth, dropout masks, and per-layer host overhead. A whole run is max_steps x rows per step x micro-batch.
"""

from __future__ import annotations

import statistics
from typing import NamedTuple

from loralab.planning.inputs import PlanInputs, Rows, fused_lora_on
from loralab.planning.memory import DTYPE_BYTES, PER_EXAMPLE_MAX_TOKENS
from loralab.planning.profiles import attention_efficiency
from loralab.planning.shapes import ModelShape, lora_trainable_params, target_names
from loralab.switches import Switches


class Times(NamedTuple):
    flops: float
    """Per micro-batch."""
    microbatch_seconds: float


def attention_seconds(shape: ModelShape, inputs: PlanInputs, switches: Switches, peak: float, rows: Rows,
                      recompute: float) -> tuple[float, float]:
    """(FLOPs, seconds) of attention per micro-batch. QK^T and AV are 4 x q_dim FLOPs per (query, key) pair
    forward, backward ~2.5x that. One example per row runs the causal kernel (about half the pairs, whole blocks on
    the diagonal); a packed row with a block mask pays every pair of the row."""
    profile, lengths, act_bytes = inputs.profile, inputs.lengths, DTYPE_BYTES[switches.precision]
    n_layers, q_dim = shape.num_layers, shape.num_heads * shape.head_dim
    if not rows.packed or inputs.attn_implementation == "flash_attention_2":
        block = profile.attention_block
        pairs = statistics.fmean(sum(min(n * n, n * n / 2 + n * block / 2) for n in r) for r in rows.rows)
    else:
        pairs = statistics.fmean(sum(r) ** 2 for r in rows.rows)
    attention = n_layers * 4 * q_dim * pairs * (3.5 + recompute)
    seconds = attention / (peak * attention_efficiency(profile, shape.head_dim))
    if switches.per_example_attention:
        # Per example, as batched matmuls over the full L x L scores (the causal half is masked, not skipped)
        # at the matmul efficiency, plus the per-score work (mask, softmax, its backward).
        short = [n for n in lengths if n <= PER_EXAMPLE_MAX_TOKENS]
        long_share = 1 - sum(short) / sum(lengths)
        full_pairs = statistics.fmean(sum(n * n for n in r if n <= PER_EXAMPLE_MAX_TOKENS) for r in rows.rows)
        mat_s = n_layers * 4 * q_dim * full_pairs * 3 / (peak * profile.efficiency)
        # memory-bound work on probabilities stored in the compute dtype: score_s_per_element was measured in bf16, and
        # fp32 moves twice the bytes (bench/plan_validation.py, tiny model at 1,024 tokens, AVX2 approximated)
        scores_s = n_layers * shape.num_heads * full_pairs * profile.score_s_per_element * act_bytes / 2
        seconds = seconds * long_share + mat_s + scores_s
    return attention, seconds


def time_model(shape: ModelShape, inputs: PlanInputs, switches: Switches, rows: Rows, per_token: float) -> Times:
    """FLOPs and seconds of one micro-batch (an average row of the first steps)."""
    lora, profile, precision = inputs.lora, inputs.profile, switches.precision
    b, n_layers = DTYPE_BYTES[precision], shape.num_layers
    total, trainable = shape.total_params, lora_trainable_params(shape, lora)
    dense, head = n_layers * shape.layer_linear_params, shape.vocab_size * shape.hidden_size
    mean_tokens, mean_trained = rows.mean_tokens, rows.mean_trained
    # Frozen base: forward 2 x params per token, backward 2 x params (input gradient only). The head runs
    # only at trained positions. LoRA: forward 2x, backward 4x (input and weight gradients) its params.
    # Checkpointing runs the layers' forward once more.
    layers_forward = 2 * (dense + trainable) * mean_tokens
    recompute = 1.0 if switches.gradient_checkpointing else 0.0
    matmul = 2 * layers_forward + 4 * head * mean_trained + 2 * trainable * mean_tokens + recompute * layers_forward
    peak = profile.peak_flops[precision]
    attention, attention_s = attention_seconds(shape, inputs, switches, peak, rows, recompute)
    weight_reads_s = (2 + recompute) * total * b / profile.bandwidth  # small micro-batches only read weights
    efficiency = profile.efficiency * (profile.onednn_speedup.get(precision, 1.0) if switches.onednn_weights else 1.0)
    matmul_s = max(matmul / (peak * efficiency), weight_reads_s)
    # Elementwise work (norms, casts, SiLU, RoPE, the loss) streams the activations: each saved byte is
    # written, read back by the backward pass, and its gradient written and read; the loss ~30 bytes per logit.
    elementwise_s = (4 * mean_tokens * n_layers * per_token + 30 * mean_trained * shape.vocab_size) / profile.bandwidth
    dropout_inputs = sum(shape.module_dims()[m][0] for m in target_names(lora)) if lora.lora_dropout > 0 else 0
    # a mask per forward
    dropout_s = (1 + recompute) * mean_tokens * n_layers * dropout_inputs * profile.dropout_s_per_element
    if fused_lora_on(switches):
        # loralab.cpu.fused_lora.drop_positions draws p x N numbers, in forward and backward, instead of N masks
        dropout_s *= 2 * lora.lora_dropout
    device_s = matmul_s + attention_s + elementwise_s + dropout_s
    host_s = n_layers * profile.op_overhead_s * (1 + recompute / 2) + profile.step_overhead_s
    return Times(matmul + attention, max(device_s, host_s) if profile.async_dispatch else device_s + host_s)

