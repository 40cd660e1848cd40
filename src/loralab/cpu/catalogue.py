"""Which pieces of loralab.cpu run where: one entry per CPU kind (native bf16 or not) and precision for training,
and the pieces inference (evaluation, generation, the held-out loss) uses on any CPU.

No torch import: planning reads this catalogue too, and `loralab plan` must stay cheap to import. The benchmark
behind each entry is named beside it; its figures are in the docs' benchmarks page.
"""

from __future__ import annotations

from typing import NamedTuple

PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # logits = lm_head(final hidden), nothing after
LOSS_CHUNK_ROWS = 256  # positions per logits chunk of cpu.head_loss: 256 x vocab fp32 logits, kept for the process
LEAN_ALLOCATOR_ROW_TOKENS = 1024  # cpu.allocator: longer rows give freed memory back at once, unless they are "fast"
# Rows longer than LEAN_ALLOCATOR_ROW_TOKENS stay fast (glibc's heap kept, oneDNN weights allowed) while the activations
# autograd keeps for them fit this budget; then train.row_tokens "auto" is LONG_ROW_TOKENS, one row for most optimizer
# steps of short examples. A thin model's 2,048-token rows fit (SmolLM2-135M's in bf16: faster whole steps,
# bench/real_model.py and docs/benchmarks.md), a wide one's do not (TinyLlama's: the kept heap costs gigabytes).
FAST_ROW_ACTIVATION_BYTES = 1.5e9
LONG_ROW_TOKENS = 2048


class CpuPieces(NamedTuple):
    """Which pieces of loralab.cpu a training run on a CPU switches on (cpu.speed_path.speed_path), and its row
    length."""

    fused_lora: bool
    """loralab.cpu.fused_lora instead of PEFT's LoRA forward."""
    fused_norm: bool
    """loralab.cpu.fused_norm instead of transformers' RMSNorm."""
    per_example_attention: bool
    """loralab.cpu.attention over "sdpa" (an explicit "eager" or "flash_attention_2" is kept)."""
    head_loss: bool
    """loralab.cpu.head_loss: the frozen head's loss a chunk at a time, instead of the model's head at trained
    positions."""
    tuned_allocator: bool
    """loralab.cpu.allocator: glibc's mmap threshold set for the row length."""
    row_tokens: int
    """train.row_tokens "auto" (LONG_ROW_TOKENS instead where those rows are fast: decisions.fast_row_tokens)."""
    lean_when_checkpointing: bool = False
    """Under gradient checkpointing, glibc's lean mmap threshold (freed memory back at once) even on short rows."""
    fused_mlp: bool = True
    """loralab.cpu.fused_mlp: a SiLU-gated MLP keeps gate and up, not silu(gate) as well."""


# Per CPU kind (native bf16 or not) and precision, each entry chosen by the bench named beside it; a pair not
# measured takes the measured one of the same precision.
TRAINING = {
    # bench/train_throughput.py; under checkpointing bench/plan_validation.py: the kept heap costs some memory and
    # saves step time, so it stays
    (True, "bf16"): CpuPieces(True, True, True, True, True, 1024, lean_when_checkpointing=False),
    # bench/cpu_switches.py --precision fp32 (AVX2 approximated); under checkpointing the kept heap costs gigabytes
    # for a few percent of step time, so it goes
    (False, "fp32"): CpuPieces(True, True, True, True, True, 1024, lean_when_checkpointing=True),
}
ALL_PIECES = TRAINING[(True, "bf16")]


class InferencePieces(NamedTuple):
    """Which pieces of loralab.cpu evaluation, generation and the held-out loss switch on (no weight is trained)."""

    per_example_attention: bool
    """Packed prompts prefilled end to end, each attended alone (loralab.cpu.attention over "sdpa")."""
    onednn_weights: bool
    """Frozen linear weights prepacked for oneDNN for the pass, put back bit for bit after
    (bench/eval_throughput.py)."""


INFERENCE = InferencePieces(per_example_attention=True, onednn_weights=True)


def training_pieces(precision: str, native_bf16: bool) -> CpuPieces:
    """TRAINING's pieces for a CPU with or without ``native_bf16`` training in ``precision`` (fp32 matmuls take
    the same MKL path with or without native bf16, so an unmeasured pair takes its precision's measured entry)."""
    found = TRAINING.get((native_bf16, precision))
    if found is None:
        found = next((v for (_, p), v in TRAINING.items() if p == precision), ALL_PIECES)
    return found


def inference_pieces(device_type: str) -> InferencePieces | None:
    """The pieces inference on ``device_type`` ("cpu", "cuda", "mps") switches on: INFERENCE on a CPU, None
    elsewhere (GPUs keep transformers' and PyTorch's kernels, which is where those are fast)."""
    return INFERENCE if device_type == "cpu" else None
