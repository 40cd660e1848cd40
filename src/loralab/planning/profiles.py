"""Device profiles: what a device can do, as data (memory, matmul peaks per precision, bandwidth, efficiencies,
host overheads). Add an entry for another device; bench/plan_validation.py checks the CPU entry against real
steps and fits it (--calibrate) on shapes other than the ones it validates. Its figures are in the docs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from loralab.devices import DeviceFacts, isa_limits
from loralab.precision import choose_precision, supported_precisions

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str
    """The device kind: "cuda", "mps" or "cpu"."""
    memory_bytes: int
    """Memory training can use (GPU memory; RAM available to the process on CPU)."""
    peak_flops: dict[str, float]
    """Dense matmul peak in FLOP/s per compute precision; the keys are the precisions the device supports."""
    bandwidth: float
    """Memory bandwidth in bytes/s (elementwise work and weight reads are bound by it)."""
    default_precision: str
    """What train.precision: auto picks on this device (loralab.choose_precision)."""
    efficiency: float
    """Fraction of the matmul peak a LoRA training step's linear layers reach."""
    attention_efficiency: dict[int, float]
    """Fraction of the matmul peak the fused attention kernel reaches, by head_dim (interpolated in log2)."""
    attention_block: int
    """Key block of the causal attention kernel: blocks on the diagonal are computed whole, so an
    example shorter than this costs all of its tokens x tokens pairs, not half."""
    framework_bytes: int
    """Memory in use before the first weight: CUDA context and kernels, or interpreter and libraries on CPU."""
    op_overhead_s: float
    """Host time per decoder layer per micro-batch: dispatching ~100 forward+backward ops, AdamW's share."""
    step_overhead_s: float
    """Host time per micro-batch outside the layers: collation, loss, bookkeeping."""
    async_dispatch: bool
    """GPUs run kernels while the host queues the next ones (time = max); a CPU does one then the other (sum)."""
    dropout_mask_bytes: int
    """Bytes per element of the dropout mask autograd keeps: a bool on CUDA, the scaled fp32 mask elsewhere."""
    dropout_s_per_element: float = 0.0
    """Time to draw one dropout mask element: a CPU's random-number generator is far slower than a copy."""
    score_s_per_element: float = 0.0
    """On a CPU, per-example attention's cost per (head, query, key) score beyond its matmuls at the matmul
    efficiency (masking, softmax and its backward, small-matrix inefficiency), forward and backward."""
    basis: str = "vendor peaks x typical efficiencies, not measured by loralab"
    """Where the time constants come from, printed under the plan."""
    onednn_speedup: dict[str, float] = field(default_factory=dict)
    """Per precision: how much faster a step runs with the frozen weights in oneDNN's layout (train.onednn_weights)."""
    allocator_factor: float = 1.0
    """Memory held per byte of live activations. glibc's heap keeps freed activation memory mapped (its
    mmap threshold rises to the largest freed block), so on CPU peak RSS is about twice the live bytes;
    CUDA's caching allocator reuses blocks and loses only fragmentation."""



def _cuda(name, description, memory, flops, bandwidth, precision, efficiency, basis) -> DeviceProfile:
    return DeviceProfile(
        name=name, description=description, kind="cuda", memory_bytes=memory, peak_flops=flops, bandwidth=bandwidth,
        default_precision=precision, efficiency=efficiency,
        attention_efficiency={64: 0.3, 128: 0.4}, attention_block=128,  # SDPA flash / memory-efficient kernels
        framework_bytes=int(0.6 * GiB),  # CUDA context, cuBLAS workspace, allocator slack
        op_overhead_s=2.0e-3, step_overhead_s=5e-3, async_dispatch=True, dropout_mask_bytes=1,
        allocator_factor=1.1, basis=basis,
    )


@dataclass(frozen=True)
class GpuCard:
    """A known NVIDIA card: vendor dense (no sparsity) peaks; the efficiency is typical for LoRA-sized matmuls
    (a few thousand tokens x a few thousand features), not validated on the card by loralab."""

    description: str
    pattern: str
    """Regular expression matched against torch.cuda's device name."""
    memory_gib: float
    compute_capability: tuple[int, int]
    sm_count: int
    tensor_flops: float
    """Dense fp16/bf16 tensor-core peak with fp32 accumulation."""
    fp32_flops: float
    bandwidth: float
    efficiency: float


GPU_CARDS: dict[str, GpuCard] = {
    "t4": GpuCard("NVIDIA T4 16 GB (Colab free tier)", r"\bT4\b", 15, (7, 5), 40, 65e12, 8.1e12, 320e9, 0.30),
    "v100": GpuCard("NVIDIA V100 SXM2 16 GB", r"V100", 16, (7, 0), 80, 125e12, 15.7e12, 900e9, 0.35),
    "a10g": GpuCard("NVIDIA A10G 24 GB", r"A10G", 24, (8, 6), 80, 70e12, 31.2e12, 600e9, 0.40),
    "l4": GpuCard("NVIDIA L4 24 GB", r"\bL4\b", 24, (8, 9), 58, 121e12, 30.3e12, 300e9, 0.40),
    "rtx3090": GpuCard("NVIDIA GeForce RTX 3090 24 GB", r"3090", 24, (8, 6), 82, 71e12, 35.6e12, 936e9, 0.40),
    "rtx4090": GpuCard("NVIDIA GeForce RTX 4090 24 GB", r"4090", 24, (8, 9), 128, 165e12, 82.6e12, 1008e9, 0.40),
    "a100": GpuCard("NVIDIA A100 40 GB", r"A100(?!.*80)", 40, (8, 0), 108, 312e12, 19.5e12, 1555e9, 0.45),
    "a100-80gb": GpuCard("NVIDIA A100 80 GB", r"A100.*80", 80, (8, 0), 108, 312e12, 19.5e12, 2039e9, 0.45),
    "h100": GpuCard("NVIDIA H100 SXM 80 GB", r"H100", 80, (9, 0), 132, 989e12, 67e12, 3350e9, 0.40),
    "h200": GpuCard("NVIDIA H200 141 GB", r"H200", 141, (9, 0), 132, 989e12, 67e12, 4800e9, 0.40),
}

# An unknown card by compute capability: (tensor FLOP/s per SM, fp32 FLOP/s per SM, bandwidth, efficiency), from
# the known cards of that generation (Volta/Turing; A100; consumer Ampere/Ada; Hopper and newer).
GENERIC_GPU = {
    (7, 0): (1.55e12, 0.2e12, 600e9, 0.30),
    (8, 0): (2.9e12, 0.18e12, 1500e9, 0.40),
    (8, 6): (1.0e12, 0.4e12, 600e9, 0.35),
    (9, 0): (7.5e12, 0.5e12, 3000e9, 0.35),
}
GPU_BASIS = "vendor peaks x typical efficiencies, not measured by loralab"


def gpu_card(facts: DeviceFacts) -> str | None:
    """The GPU_CARDS key of the card ``facts`` name (an A100 by its memory), or None for a card not in the table."""
    for key, card in GPU_CARDS.items():
        if re.search(card.pattern, facts.name, re.IGNORECASE):
            if key.startswith("a100"):
                return "a100-80gb" if facts.memory_bytes > 50 * GiB else "a100"
            return key
    return None


def card_facts(key: str) -> DeviceFacts:
    """The facts of a known card, as torch.cuda would report them."""
    card = GPU_CARDS[key]
    return DeviceFacts("cuda", card.description, int(card.memory_gib * GiB), card.compute_capability >= (8, 0),
                       card.compute_capability, card.sm_count)


def gpu_profile(facts: DeviceFacts) -> DeviceProfile:
    """A CUDA device's profile: its card's figures when the card is known, else a generic profile for its compute
    capability and SM count (the description says so); precisions and memory from ``facts``."""
    precisions = supported_precisions(facts)
    key = gpu_card(facts)
    if key is not None:
        card = GPU_CARDS[key]
        tensor, fp32, bandwidth, efficiency = card.tensor_flops, card.fp32_flops, card.bandwidth, card.efficiency
        name, description, basis = key, facts.name, GPU_BASIS
    else:
        cc = facts.compute_capability or (7, 0)
        generation = max(g for g in GENERIC_GPU if g <= cc) if cc >= (7, 0) else (7, 0)
        per_sm, fp32_per_sm, bandwidth, efficiency = GENERIC_GPU[generation]
        sms = facts.sm_count or 40
        tensor, fp32 = per_sm * sms, fp32_per_sm * sms
        name = "cuda"
        description = (f"{facts.name} (not in loralab's table: generic compute capability {cc[0]}.{cc[1]} profile "
                       f"for {sms} SMs)")
        basis = f"generic for compute capability {cc[0]}.{cc[1]} x {sms} SMs: rough, " + GPU_BASIS
    flops = {p: fp32 if p == "fp32" else tensor for p in precisions}
    return _cuda(name, description, facts.memory_bytes, flops, bandwidth,
                 choose_precision(facts), efficiency, basis)



PROFILES: dict[str, DeviceProfile] = {
    **{key: replace(gpu_profile(card_facts(key)), description=card.description) for key, card in GPU_CARDS.items()},
    "m2-16gb": DeviceProfile(
        name="m2-16gb", description="Apple M2, 16 GB unified memory (MPS)", kind="mps",
        memory_bytes=int(0.67 * 16 * GiB),  # macOS lets Metal wire about two thirds of RAM
        peak_flops={"bf16": 3.6e12, "fp32": 3.6e12}, bandwidth=100e9, default_precision="bf16",
        efficiency=0.5, attention_efficiency={64: 0.2, 128: 0.3}, attention_block=128,
        framework_bytes=int(0.8 * GiB), op_overhead_s=3.0e-3, step_overhead_s=10e-3,
        async_dispatch=True, dropout_mask_bytes=4, allocator_factor=1.1,
    ),
    # Measured on a 2-core AMD EPYC with AVX-512-BF16 (torch 2.13, oneDNN): matmul peaks with 2 threads;
    # bandwidth (torch.add on 64 MB tensors), attention efficiency (SDPA causal forward+backward) and the
    # dropout mask cost by micro-benchmarks on one core; efficiency, host overheads and framework memory
    # fitted by `bench/plan_validation.py --calibrate` on shapes the validation does not use.
    # memory_bytes is replaced by this machine's available RAM at plan time (cpu_profile).
    "cpu": DeviceProfile(
        name="cpu", description="this machine's CPU", kind="cpu", memory_bytes=16 * GiB,
        peak_flops={"bf16": 316e9, "fp32": 172e9}, bandwidth=23e9, default_precision="bf16",
        efficiency=0.84, attention_efficiency={16: 0.18, 32: 0.27, 64: 0.38, 128: 0.46}, attention_block=512,
        framework_bytes=int(0.45 * GiB), op_overhead_s=3.2e-3, step_overhead_s=3.8e-3,
        async_dispatch=False, dropout_mask_bytes=4, dropout_s_per_element=6.2e-9, allocator_factor=2.0,
        # bench/train_throughput.py, loralab vs train.onednn_weights=false, TinyLlama shape: bf16 on this CPU; fp32 with
        # oneDNN/MKL held to AVX2 (MKL's fp32 matmul re-packs its weight at every call, oneDNN's prepacked one does not)
        onednn_speedup={"bf16": 1.12, "fp32": 1.18},
        # loralab.cpu.attention.CausalAttention, one core: 2.9-4.8 ns at 8-16 heads, L 384-512
        score_s_per_element=4e-9,
        basis="measured on a 2-core AVX-512-BF16 EPYC: memory within 5%, time within 3% of loralab train's "
        "CPU path there; bench/plan_validation.py checks another CPU",
    ),
}


def attention_efficiency(profile: DeviceProfile, head_dim: int) -> float:
    """The profile's attention efficiency at ``head_dim``, interpolated in log2(head_dim), clamped at the ends."""
    points = sorted(profile.attention_efficiency.items())
    x = math.log2(head_dim)
    if x <= math.log2(points[0][0]):
        return points[0][1]
    for (d0, e0), (d1, e1) in zip(points, points[1:], strict=False):
        x0, x1 = math.log2(d0), math.log2(d1)
        if x <= x1:
            return e0 + (e1 - e0) * (x - x0) / (x1 - x0)
    return points[-1][1]


# Model shape --------------------------------------------------------------------------------------


def native_bf16(profile: DeviceProfile) -> bool:
    """Whether the profile's device multiplies bf16 natively: a CPU profile lists bf16 only where it does."""
    return "bf16" in profile.peak_flops


REFERENCE_CPU_NAME = "AMD EPYC"  # /proc/cpuinfo's model name of the CPU PROFILES["cpu"] was measured on


def is_reference_cpu(facts: DeviceFacts) -> bool:
    """Whether the plan's CPU constants were measured on a CPU like this one (same model, native bf16, full ISA)."""
    return facts.name == REFERENCE_CPU_NAME and facts.native_bf16 and not isa_limits()


def mps_profile(facts: DeviceFacts) -> DeviceProfile:
    """A Mac's profile: the M2's speed, this Mac's memory, the precisions loralab.decisions allows on it."""
    base = PROFILES["m2-16gb"]
    peaks = {p: base.peak_flops["fp32" if p == "fp32" else "bf16"] for p in supported_precisions(facts)}
    return replace(base, name="mps", description="this Mac (MPS; speed assumed M2-like)",
                   memory_bytes=facts.memory_bytes, peak_flops=peaks, default_precision=choose_precision(facts))



def cpu_profile_for(facts: DeviceFacts, total_ram_bytes: int, peaks: dict[str, float] | None = None,
                    measured: str = "") -> DeviceProfile:
    """The cpu profile for the CPU ``facts`` describe: its available memory, the precisions loralab allows on it, and
    the reference CPU's matmul peaks, or ``peaks`` measured on this one (``measured`` says where from)."""
    base = PROFILES["cpu"]
    calibrated = peaks is not None
    peaks = peaks if calibrated else {p: base.peak_flops[p] for p in supported_precisions(facts)}
    bf16 = "with" if facts.native_bf16 else "without"
    limits = f", ISA limited by {isa_limits()}" if isa_limits() else ""
    basis = base.basis
    if calibrated and not is_reference_cpu(facts):
        basis = (f"matmul peaks of this CPU ({facts.name}, {bf16} native bf16{limits}); efficiencies and overheads "
                 f"from the reference CPU ({REFERENCE_CPU_NAME} with native bf16)")
    if not calibrated and not is_reference_cpu(facts):
        basis = (f"NOT this CPU: the time constants were measured on the reference CPU ({REFERENCE_CPU_NAME} with "
                 f"native bf16) and this one ({facts.name}, {bf16} native bf16{limits}) may be much slower or faster; "
                 f"`loralab plan CONFIG --calibrate` measures its matmul peaks first")
    described = f", matmul peaks {measured})" if calibrated else ", matmul peaks of the reference CPU)"
    return replace(
        base, memory_bytes=facts.memory_bytes, peak_flops=peaks, default_precision=choose_precision(facts),
        description=f"this CPU ({total_ram_bytes / GB:.1f} GB RAM, {facts.memory_bytes / GB:.1f} GB available now"
        + described, basis=basis,
    )
