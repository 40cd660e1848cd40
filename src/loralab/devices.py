"""What this process's device is: its kind, name, memory, compute capability and native bf16 (torch imported lazily).

loralab.decisions turns these facts into choices; loralab.planning.profiles turns them into a speed profile. Tests
simulate devices by monkeypatching what torch.cuda / torch.backends.mps report and cpu_has_native_bf16.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError

MPS_MEMORY_SHARE = 0.67  # macOS lets Metal wire about two thirds of unified memory


@dataclass(frozen=True)
class DeviceFacts:
    """One device as loralab's decisions see it."""

    kind: str
    """"cuda", "mps" or "cpu"."""
    name: str
    """Marketing name ("NVIDIA GeForce RTX 4090"), "Apple MPS", or the CPU model."""
    memory_bytes: int
    """GPU memory; the share of unified memory Metal may use; RAM available now on a CPU."""
    native_bf16: bool
    """Whether bf16 matmuls run in hardware (CUDA compute capability 8.0+, AVX512-BF16/AMX, MPS on macOS 14+)."""
    compute_capability: tuple[int, int] | None = None
    """CUDA only."""
    sm_count: int | None = None
    """CUDA only: streaming multiprocessors."""


def detect_device(requested: str = "auto") -> str:
    """The device kind to train on: ``requested`` (checked), or the best one this process sees."""
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise LoralabError("train.device is 'cuda' but no CUDA GPU is visible; set train.device: auto or cpu")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise LoralabError("train.device is 'mps' but MPS is not available; set train.device: auto or cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name" on Linux), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    if device == "mps":
        return "Apple MPS"
    return cpu_model_name()


ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def isa_limits() -> str:
    """The environment settings that hold oneDNN/MKL/ATen below the CPU's own instruction set (how an AVX2 CPU is
    approximated on an AVX-512 one), as text; empty when there are none."""
    import os

    return ", ".join(f"{k}={os.environ[k]}" for k in ISA_LIMITS if os.environ.get(k))


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as oneDNN reports it: oneDNN runs every
    bf16 matmul, so when it says no (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU, say) bf16 is emulated, and slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mps_supports_bf16() -> bool:
    import torch

    try:
        (torch.ones(2, dtype=torch.bfloat16, device="mps") * 2).cpu()
        return True
    except (RuntimeError, TypeError):
        return False


def probe(kind: str) -> DeviceFacts:
    """The facts of device ``kind`` as this process sees it (device 0 for CUDA)."""
    import psutil

    if kind == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        cc = (int(props.major), int(props.minor))
        # torch.cuda.is_bf16_supported() can say yes on a T4 (bf16 emulated, slow); native bf16 arrived with
        # Ampere, compute capability 8.0.
        return DeviceFacts("cuda", props.name, int(props.total_memory), cc >= (8, 0), cc,
                           int(props.multi_processor_count))
    if kind == "mps":
        memory = int(MPS_MEMORY_SHARE * psutil.virtual_memory().total)
        return DeviceFacts("mps", "Apple MPS", memory, mps_supports_bf16())
    return DeviceFacts("cpu", cpu_model_name(), int(psutil.virtual_memory().available), cpu_has_native_bf16())

