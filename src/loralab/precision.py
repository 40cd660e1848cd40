"""The precisions each device kind can train in, and what train.precision "auto" picks there.

One rule, read by decisions (a run's precision) and planning (the precisions a device profile lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loralab.errors import LoralabError

if TYPE_CHECKING:
    from loralab.devices import DeviceFacts


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
        raise LoralabError("fp16 training needs a GPU; on CPU set train.precision: bf16 (if the CPU supports it) "
                           "or fp32")
    if requested not in allowed:
        bf16_missing = requested == "bf16" and "bf16" in support.with_bf16
        why = support.no_bf16_hint if bf16_missing else f"cannot train in {requested}"
        raise LoralabError(f"{facts.name} {why}; set train.precision to one of {', '.join(allowed)} (or auto)")
    return requested


def loss_scaling(precision: str) -> bool:
    """fp16 needs the Trainer's dynamic loss scaler (its range underflows small gradients); bf16 and fp32 do not."""
    return precision == "fp16"
