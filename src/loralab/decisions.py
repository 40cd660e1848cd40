"""Every rule that decides how a run trains, in one place: precision per device, row tokens, checkpointing,
the CPU speed path and the oneDNN weight layout. Train, plan, eval, inspect and the benches ask here.

No torch import at module level: loralab.estimate and `loralab plan` must stay cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

from loralab import LEAN_ALLOCATOR_ROW_TOKENS
from loralab.data import trained_token_count
from loralab.errors import LoralabError

if TYPE_CHECKING:
    from loralab.config import ExperimentConfig, TrainConfig
    from loralab.devices import DeviceFacts


# Precision -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrecisionSupport:
    """What one device kind can train in, with and without native bf16, and what "auto" picks."""

    with_bf16: tuple[str, ...]
    without_bf16: tuple[str, ...]
    auto_with_bf16: str
    auto_without_bf16: str
    no_bf16_hint: str
    """Why bf16 is missing, for the error when it is forced."""


PRECISION_SUPPORT = {
    # fp16 on a GPU runs under autocast with the Trainer's loss scaler (see loss_scaling).
    "cuda": PrecisionSupport(("bf16", "fp16", "fp32"), ("fp16", "fp32"), "bf16", "fp16",
                             "has no native bf16 (needs compute capability 8.0+)"),
    "mps": PrecisionSupport(("bf16", "fp16", "fp32"), ("fp16", "fp32"), "bf16", "fp32",
                            "cannot compute in bf16 on this Mac's MPS backend (needs macOS 14+)"),
    # No fp16 on a CPU: no loss scaler there, and no CPU multiplies fp16 faster than bf16.
    "cpu": PrecisionSupport(("bf16", "fp32"), ("fp32",), "bf16", "fp32", "has no native bf16 (AVX512-BF16/AMX)"),
}


def supported_precisions(facts: DeviceFacts) -> tuple[str, ...]:
    support = PRECISION_SUPPORT[facts.kind]
    return support.with_bf16 if facts.native_bf16 else support.without_bf16


def choose_precision(facts: DeviceFacts, requested: str = "auto") -> str:
    """train.precision on this device: "auto" is bf16 where the hardware has it, fp16 (with loss scaling) on
    pre-Ampere GPUs, fp32 where nothing else is safe. A forced impossible choice is an error, not a slow path."""
    support = PRECISION_SUPPORT[facts.kind]
    if requested == "auto":
        return support.auto_with_bf16 if facts.native_bf16 else support.auto_without_bf16
    allowed = supported_precisions(facts)
    if requested == "fp16" and facts.kind == "cpu":
        raise LoralabError("fp16 training needs a GPU; on CPU set train.precision: bf16 (if the CPU supports it) or fp32")
    if requested not in allowed:
        why = support.no_bf16_hint if requested == "bf16" and "bf16" in support.with_bf16 else f"cannot train in {requested}"
        raise LoralabError(f"{facts.name} {why}; set train.precision to one of {', '.join(allowed)} (or auto)")
    return requested


def loss_scaling(precision: str) -> bool:
    """fp16 needs the Trainer's dynamic loss scaler (its range underflows small gradients); bf16 and fp32 do not."""
    return precision == "fp16"


# Rows ----------------------------------------------------------------------------------------------

def example_lengths(examples: list[dict]) -> tuple[list[int], list[int]]:
    """(token counts, trained-target counts: data.trained_token_count) of encoded examples."""
    lengths = [len(e["input_ids"]) for e in examples]
    trained = [trained_token_count(e["labels"]) for e in examples]
    return lengths, trained


def resolve_row_tokens(train: TrainConfig, device: str, lengths: list[int], precision: str = "bf16",
                       native_bf16: bool = True) -> int:
    """train.row_tokens with "auto" decided: on "cpu" (a device kind, or the cpu profile's name) the fastest row
    length measured for this CPU kind and precision (CPU_SPEED_PATH), the longest example elsewhere (whose fastest
    row length was not measured here; data.max_length bounds it)."""
    if train.row_tokens != "auto":
        return int(train.row_tokens)
    return cpu_pieces(precision, native_bf16).row_tokens if device == "cpu" else max(lengths)


def plan_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Best-fit-decreasing plan: group example indices into rows of at most ``max_tokens`` tokens.

    Longest first, each into the fullest row it still fits in; an example longer than max_tokens gets a row alone.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        best = -1
        for r, left in enumerate(room):
            if n <= left and (best < 0 or left < room[best]):
                best = r
        if best < 0:
            rows.append([i])
            room.append(max_tokens - n)
        else:
            rows[best].append(i)
            room[best] -= n
    return rows


def peak_row(lengths: list[int], per_step: int, row_tokens: int) -> list[int]:
    """Indices of the examples in the fullest row a step can make: the longest examples that fit together
    (one of ``per_step`` examples alone if it is longer than ``row_tokens``)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:per_step]
    row, used = [], 0
    for i in order:
        if used + lengths[i] <= row_tokens or not row:
            row.append(i)
            used += lengths[i]
    return row


def fullest_row_tokens(train: TrainConfig, device: str, lengths: list[int], precision: str = "bf16",
                       native_bf16: bool = True) -> int:
    """Tokens in the fullest row (peak_row) ``train``'s steps can make on ``device`` (as in resolve_row_tokens)."""
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    row_tokens = resolve_row_tokens(train, device, lengths, precision, native_bf16)
    return sum(lengths[i] for i in peak_row(lengths, per_step, row_tokens))


def per_process_examples(train: TrainConfig, processes: int) -> int:
    """Examples each of ``processes`` trains per optimizer step, so that all of them together see the recipe's
    per_device_train_batch_size x gradient_accumulation_steps (the effective batch does not grow with processes)."""
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    if processes > per_step:
        raise LoralabError(
            f"{processes} processes are more than the examples of an optimizer step ({per_step} = train."
            f"per_device_train_batch_size x train.gradient_accumulation_steps); launch at most {per_step} processes "
            f"(--nproc_per_node / --num_processes) or raise train.gradient_accumulation_steps")
    if per_step % processes:
        raise LoralabError(f"the {per_step} examples of an optimizer step do not split evenly over {processes} processes; "
                           f"launch a number of processes that divides {per_step}, or change train.gradient_accumulation_steps")
    return per_step // processes


# The CPU speed path (loralab.cpu) ------------------------------------------------------------------

class CpuPieces(NamedTuple):
    """Which pieces of loralab.cpu a training run on a CPU switches on (loralab.cpu.speed_path), and its row length."""

    fused_lora: bool
    """loralab.cpu.fused_lora instead of PEFT's LoRA forward."""
    fused_norm: bool
    """loralab.cpu.fused_norm instead of transformers' RMSNorm."""
    per_example_attention: bool
    """loralab.cpu.attention over "sdpa" (an explicit "eager" or "flash_attention_2" is kept)."""
    head_loss: bool
    """loralab.cpu.head_loss: the frozen head's loss a chunk at a time, instead of the model's head at trained positions."""
    tuned_allocator: bool
    """loralab.cpu.allocator: glibc's mmap threshold set for the row length."""
    row_tokens: int
    """train.row_tokens "auto"."""
    lean_when_checkpointing: bool = False
    """Under gradient checkpointing, glibc's lean mmap threshold (freed memory back at once) even on short rows."""


# Per CPU kind (native bf16 or not) and precision, each row measured by the bench named beside it; a pair not
# measured takes the measured one of the same precision.
CPU_SPEED_PATH = {
    # bench/train_throughput.py (README "Speed on a CPU"): AVX-512-BF16 EPYC, bf16. Checkpointed TinyLlama shape at
    # 1,024 tokens (bench/plan_validation.py): the kept heap costs 3.69 vs 3.03 GB and saves 19% of the step time
    (True, "bf16"): CpuPieces(True, True, True, True, True, 1024, lean_when_checkpointing=False),
    # bench/cpu_switches.py --precision fp32 with ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 (AVX2 EPYC approximated);
    # checkpointed TinyLlama shape at 1,024 tokens: the kept heap costs 8.01 vs 5.57 GB for 2% of the step time
    (False, "fp32"): CpuPieces(True, True, True, True, True, 1024, lean_when_checkpointing=True),
}


def cpu_pieces(precision: str, native_bf16: bool) -> CpuPieces:
    """CPU_SPEED_PATH's pieces for a CPU with or without ``native_bf16`` training in ``precision`` (fp32 matmuls take
    the same MKL path with or without native bf16, so an unmeasured pair takes its precision's measured row)."""
    found = CPU_SPEED_PATH.get((native_bf16, precision))
    if found is None:
        found = next((v for (_, p), v in CPU_SPEED_PATH.items() if p == precision), CPU_SPEED_PATH[(True, "bf16")])
    return found


def cpu_speed_path(device: str) -> bool:
    """Whether training runs loralab.cpu's speed path (the pieces cpu_pieces picks): on a CPU. GPUs keep PEFT's
    and transformers' kernels (fast there; these were not measured on one)."""
    return device == "cpu"


def per_example_attention_on(device: str, attn_implementation: str, precision: str = "bf16", native_bf16: bool = True) -> bool:
    """Whether the CPU speed path also swaps attention for loralab.cpu.attention: where cpu_pieces says so, and only
    over "sdpa" (an explicit "eager" or "flash_attention_2" is kept)."""
    return (cpu_speed_path(device) and attn_implementation == "sdpa"
            and cpu_pieces(precision, native_bf16).per_example_attention)


ONEDNN_PRECISIONS = ("bf16", "fp32")  # the precisions whose frozen weights loralab.cpu.onednn_weights can hold


def can_use_onednn_weights(device: str, precision: str, peak_tokens: int, checkpointing: bool) -> bool:
    """Whether train.onednn_weights "auto" may turn on (loralab.cpu.onednn_weights): bf16 or fp32 on "cpu" (a device, or the
    cpu profile's name), rows of up to LEAN_ALLOCATOR_ROW_TOKENS (the rows that trade memory for speed, as the
    allocator does) and no checkpointing (which says memory is short)."""
    return device == "cpu" and precision in ONEDNN_PRECISIONS and peak_tokens <= LEAN_ALLOCATOR_ROW_TOKENS and not checkpointing


# Switches of one run -------------------------------------------------------------------------------

class Switches(NamedTuple):
    """How one run trains on its device, every "auto" decided."""

    device: str
    precision: str
    row_tokens: int
    longest_row_tokens: int
    """Tokens in the fullest row the data can make (the allocator is tuned for it)."""
    gradient_checkpointing: bool
    onednn_weights: bool
    cpu_speed_path: bool
    liger_kernels: bool
    torch_compile: bool
    cpu_pieces: CpuPieces | None = None
    """What the CPU speed path switches on (None off a CPU)."""


def check_switches(cfg: ExperimentConfig, device: str, precision: str | None = None) -> None:
    """train.liger_kernels and train.torch_compile are for CUDA GPUs (Liger needs its package);
    train.onednn_weights: true is for bf16 or fp32 on a CPU whose PyTorch has oneDNN (checked once ``precision`` is known);
    QLoRA and the 8-bit optimizer need bitsandbytes (QLoRA a CUDA GPU)."""
    from loralab.modeling import check_bitsandbytes

    check_bitsandbytes(cfg.train.load_in_4bit, cfg.train.optim, device)
    for key, on in (("liger_kernels", cfg.train.liger_kernels), ("torch_compile", cfg.train.torch_compile)):
        if on and device != "cuda":
            raise LoralabError(f"train.{key} is for CUDA GPUs and this run trains on {device}; set train.{key}: false")
    if cfg.train.liger_kernels:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise LoralabError("train.liger_kernels needs the liger-kernel package: pip install liger-kernel "
                               "(or set train.liger_kernels: false)")
    if cfg.train.onednn_weights is True and precision is not None and (
        device != "cpu" or precision not in ONEDNN_PRECISIONS or not _onednn_available()
    ):
        raise LoralabError(f"train.onednn_weights is for bf16 or fp32 training on a CPU with oneDNN, and this run trains on {device} "
                           f"in {precision}; set train.onednn_weights: auto")


def _onednn_available() -> bool:
    import torch

    from loralab.cpu.onednn_weights import onednn_weights_available

    return onednn_weights_available(torch.bfloat16)


def decide_switches(cfg: ExperimentConfig, facts: DeviceFacts, lengths: list[int], trained: list[int],
                    model_config: dict | None = None, announce: bool = True) -> Switches:
    """Every switch of a run of ``cfg`` on the device ``facts`` describe, for training examples of these lengths
    and trained counts: "auto" checkpointing and oneDNN weights by loralab.estimate's memory estimate for the device
    (``model_config``: config.json, read from cfg.model when not given)."""
    from loralab import estimate, sources

    device = facts.kind
    precision = choose_precision(facts, cfg.train.precision)
    check_switches(cfg, device, precision)
    train = cfg.train
    if train.onednn_weights == "auto" and not (device == "cpu" and _onednn_available()):
        train = replace(train, onednn_weights=False)
    if train.gradient_checkpointing == "auto" or train.onednn_weights == "auto":
        profile = estimate.profile_for(facts)
        train = estimate.resolve_switches(
            model_config if model_config is not None else sources.read_model_config(cfg.model), cfg.lora, train, lengths,
            profile, precision, trained_counts=trained, attn_implementation=cfg.model.attn_implementation,
        )
        if announce and train.gradient_checkpointing and cfg.train.gradient_checkpointing == "auto":
            print(f"train: the estimate says this run would not fit {profile.description} without gradient checkpointing; "
                  f"turning it on (more compute; `loralab plan CONFIG` shows the figures)")
    native = facts.native_bf16
    on_cpu = cpu_speed_path(device)
    return Switches(
        device=device, precision=precision, row_tokens=resolve_row_tokens(train, device, lengths, precision, native),
        longest_row_tokens=fullest_row_tokens(train, device, lengths, precision, native),
        gradient_checkpointing=bool(train.gradient_checkpointing), onednn_weights=bool(train.onednn_weights),
        cpu_speed_path=on_cpu, cpu_pieces=cpu_pieces(precision, native) if on_cpu else None,
        liger_kernels=train.liger_kernels, torch_compile=train.torch_compile,
    )
