"""Peak memory and training time on a device, predicted before loading any weights (`loralab plan` prints it;
loralab.decisions asks it whether a run fits without checkpointing).

The estimate is arithmetic on the model's config.json, the LoRA and train sections and the prepared
example lengths, for loralab's own training loop (see loralab.train):

* base weights frozen and stored in the compute dtype; LoRA weights, their gradients and AdamW's two
  moments in fp32 (4 + 4 + 8 bytes per trainable parameter);
* one micro-batch = one row: an optimizer step's ``per_device_train_batch_size x
  gradient_accumulation_steps`` examples are packed padding-free, best fit, into rows of at most
  ``train.row_tokens`` tokens (resolve_row_tokens); the fullest possible row (the longest examples that
  fit together) sets the peak, rows laid out from the examples in order set the time;
* activations: what autograd saves for each decoder layer's backward (frozen linears save nothing;
  LoRA saves an fp32 copy of its input, and dropout its mask; RMSNorm an fp32 copy of its input; the
  MLP its three intermediates; attention q, k, v, its output), or with gradient checkpointing only
  each layer's boundary tensors plus one layer recomputed during the backward pass; times what the
  allocator holds per live byte (glibc on CPU: about 2x);
* logits only at trained positions, upcast to fp32 for the loss (loralab.loss), never tokens x vocab;
* time per micro-batch: matmul FLOPs (forward 2 x params per token, backward 2 x params for the input
  gradient only: the frozen base needs no weight gradient; one more forward with checkpointing) over
  peak x efficiency; attention FLOPs over its own (lower, head_dim-dependent) efficiency; activation
  traffic over memory bandwidth; dropout masks; per-layer host overhead. Whole run = max_steps x
  rows per step x micro-batch.

Device profiles are data (PROFILES); add an entry for another device. The CPU numbers were
measured on a 2-core AVX-512-BF16 EPYC; bench/plan_validation.py checks them against real steps and
fits them (--calibrate) on shapes other than the ones it validates.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from loralab import LEAN_ALLOCATOR_ROW_TOKENS, PLAIN_HEAD_MODELS, decisions
from loralab import LOSS_CHUNK_ROWS as CHUNK_ROWS
from loralab.config import LoraSection, TrainConfig
from loralab.cpu import allocator
from loralab.decisions import can_use_onednn_weights, fullest_row_tokens, peak_row, resolve_row_tokens
from loralab.devices import DeviceFacts, isa_limits
from loralab.errors import LoralabError

GB = 1e9
GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LORA_STATE_BYTES = 4 + 4 + 8  # fp32 weight + fp32 gradient + AdamW exp_avg and exp_avg_sq
LOGITS_PEAK_BYTES = 12  # per kept logit at the loss backward: fp32 log-probs + incoming grad + outgoing grad


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_bytes: int
    """Memory training can use (GPU memory; RAM available to the process on CPU)."""
    peak_flops: dict[str, float]
    """Dense matmul peak in FLOP/s per compute precision; the keys are the precisions the device supports."""
    bandwidth: float
    """Memory bandwidth in bytes/s (elementwise work and weight reads are bound by it)."""
    default_precision: str
    """What train.precision: auto picks on this device (loralab.decisions.choose_precision)."""
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
        name=name, description=description, memory_bytes=memory, peak_flops=flops, bandwidth=bandwidth,
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
    precisions = decisions.supported_precisions(facts)
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
                 decisions.choose_precision(facts), efficiency, basis)


PROFILES: dict[str, DeviceProfile] = {
    **{key: replace(gpu_profile(card_facts(key)), description=card.description) for key, card in GPU_CARDS.items()},
    "m2-16gb": DeviceProfile(
        name="m2-16gb", description="Apple M2, 16 GB unified memory (MPS)",
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
        name="cpu", description="this machine's CPU", memory_bytes=16 * GiB,
        peak_flops={"bf16": 316e9, "fp32": 172e9}, bandwidth=23e9, default_precision="bf16",
        efficiency=0.84, attention_efficiency={16: 0.18, 32: 0.27, 64: 0.38, 128: 0.46}, attention_block=512,
        framework_bytes=int(0.45 * GiB), op_overhead_s=3.2e-3, step_overhead_s=3.8e-3,
        async_dispatch=False, dropout_mask_bytes=4, dropout_s_per_element=6.2e-9, allocator_factor=2.0,
        # bench/train_throughput.py, loralab vs train.onednn_weights=false, TinyLlama shape: bf16 on this CPU; fp32 with
        # oneDNN/MKL held to AVX2 (MKL's fp32 matmul re-packs its weight at every call, oneDNN's prepacked one does not)
        onednn_speedup={"bf16": 1.12, "fp32": 1.18},
        score_s_per_element=4e-9,  # loralab.cpu.attention.CausalAttention, one core: 2.9-4.8 ns at 8-16 heads, L 384-512
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
    for (d0, e0), (d1, e1) in zip(points, points[1:]):
        x0, x1 = math.log2(d0), math.log2(d1)
        if x <= x1:
            return e0 + (e1 - e0) * (x - x0) / (x1 - x0)
    return points[-1][1]


# Model shape --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder (Llama, Mistral, Qwen2/3, Gemma, TinyLlama) that size a run."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    biased: tuple[str, ...] = ()
    """Linears that carry a bias (Llama's attention_bias: q/k/v/o; Qwen2: q/k/v; mlp_bias: the MLP's)."""

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in a decoder layer, by its module name."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        dims = self.module_dims()
        return sum(a * b for a, b in dims.values()) + sum(dims[m][1] for m in self.biased)

    @property
    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tied_embeddings else embed
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return embed + head + self.num_layers * self.layer_linear_params + norms


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Read a Llama-style shape from config.json fields (a multimodal config's ``text_config`` is used)."""
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in needed if not isinstance(config.get(k), int)]
    if missing:
        kind = config.get("model_type", "unknown")
        raise LoralabError(
            f"plan understands Llama-style decoder configs (Llama, Mistral, Qwen2, Gemma); this config "
            f"(model_type {kind}) lacks {', '.join(missing)}"
        )
    heads = config["num_attention_heads"]
    biased: tuple[str, ...] = ()
    if config.get("attention_bias"):
        biased += ("q_proj", "k_proj", "v_proj", "o_proj")
    elif config.get("model_type") == "qwen2":
        biased += ("q_proj", "k_proj", "v_proj")  # Qwen2 always has q/k/v biases and no config key for them
    if config.get("mlp_bias"):
        biased += ("gate_proj", "up_proj", "down_proj")
    return ModelShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        # transformers' own default is tied; Llama-family configs say so explicitly.
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        biased=biased,
    )


def target_names(lora: LoraSection) -> list[str]:
    """The adapted linears' names in a decoder layer ("all-linear": each of them; PEFT leaves the LM head out)."""
    if lora.target_modules == "all-linear":
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return list(lora.target_modules)


def lora_modules(shape: ModelShape, lora: LoraSection) -> list[tuple[int, int]]:
    """(in, out) of every adapted linear across all layers."""
    dims = shape.module_dims()
    unknown = [m for m in target_names(lora) if m not in dims]
    if unknown:
        raise LoralabError(f"plan does not know lora.target_modules {unknown}; it knows {', '.join(dims)}")
    return [dims[m] for m in target_names(lora)] * shape.num_layers


def saved_module_params(shape: ModelShape, lora: LoraSection) -> int:
    """Parameters of lora.modules_to_save, trained in full (PEFT keeps a trainable copy of each)."""
    sizes = {"lm_head": shape.vocab_size * shape.hidden_size, "embed_tokens": shape.vocab_size * shape.hidden_size}
    unknown = [m for m in lora.modules_to_save if m not in sizes]
    if unknown:
        raise LoralabError(f"plan does not know lora.modules_to_save {unknown}; it knows {', '.join(sizes)}")
    return sum(sizes[m] for m in lora.modules_to_save)


def lora_trainable_params(shape: ModelShape, lora: LoraSection) -> int:
    """LoRA's A and B (r x (in + out) per module), DoRA's magnitude (out per module), modules_to_save in full;
    rsLoRA changes only the scale."""
    adapters = sum(lora.r * (a + b) + (b if lora.use_dora else 0) for a, b in lora_modules(shape, lora))
    return adapters + saved_module_params(shape, lora)


NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8  # 4 bits + double-quantised absmax constants (QLoRA paper: 0.127 bits)
OPTIMIZER_8BIT_STATE_BYTES = 4 + 4 + 2  # fp32 weight + gradient + two 8-bit AdamW states (block constants ignored)


def base_weights_item(shape: ModelShape, precision: str, load_in_4bit: bool) -> "MemoryItem":
    """The frozen base: every weight in the compute dtype, or (QLoRA) the decoder's linears in NF4."""
    b = DTYPE_BYTES[precision]
    total = shape.total_params
    if not load_in_4bit:
        return MemoryItem("base weights", total * b, f"{total:,} params x {b} bytes ({precision}), frozen")
    linear = shape.num_layers * sum(a * o for a, o in shape.module_dims().values())
    return MemoryItem("base weights", linear * NF4_BYTES_PER_PARAM + (total - linear) * b,
                      f"{linear:,} linear weights in 4-bit NF4 (QLoRA), {total - linear:,} others x {b} bytes ({precision})")


def trainable_state_item(trainable: int, lora: LoraSection, optim: str) -> "MemoryItem":
    per = OPTIMIZER_8BIT_STATE_BYTES if optim == "adamw_bnb_8bit" else LORA_STATE_BYTES
    what = "8-bit AdamW" if optim == "adamw_bnb_8bit" else "AdamW"
    extra = "; DoRA magnitudes" if lora.use_dora else ""
    extra += f"; {', '.join(lora.modules_to_save)} in full" if lora.modules_to_save else ""
    return MemoryItem(f"LoRA params + grads + {what}", trainable * per,
                      f"{trainable:,} trainable x {per} bytes{extra}")


# The estimate -------------------------------------------------------------------------------------

@dataclass
class MemoryItem:
    label: str
    bytes: float
    note: str = ""


@dataclass
class Suggestion:
    settings: list[str]
    """The config change as ``section.key=value`` overrides (``--set`` arguments)."""
    note: str
    peak_bytes: float
    fits: bool
    microbatch_seconds: float


@dataclass
class Plan:
    device: DeviceProfile
    precision: str
    total_params: int
    trainable_params: int
    peak_tokens: int
    """Tokens in the fullest row (the longest examples that fit in train.row_tokens), which sets peak memory."""
    mean_tokens: float
    memory: list[MemoryItem]
    flops_per_microbatch: float
    microbatch_seconds: float
    step_seconds: float
    run_seconds: float
    tokens_per_second: float
    max_steps: int
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    onednn_weights: bool = False
    """Whether the frozen weights are in oneDNN's layout (train.onednn_weights, "auto" decided)."""

    @property
    def peak_bytes(self) -> float:
        return sum(item.bytes for item in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device.memory_bytes


# Inputs that adapted linears of one layer share: q/k/v read the same normed hidden state, gate/up another.
_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}
PER_EXAMPLE_MAX_TOKENS = 1024  # loralab.cpu.attention.MATERIALISED_MAX_TOKENS: longer examples use SDPA's kernel


HEAP_HELD_FACTOR = 1.3  # memory glibc's heap holds per live activation byte on the CPU path, rows up to that
def typical_rows(lengths: list[int], per_step: int, row_tokens: int, steps: int = 64) -> list[list[int]]:
    """The rows of the first ``steps`` optimizer steps, taking the examples in order (each row a list of lengths)."""
    rows = []
    for start in range(0, min(len(lengths), steps * per_step), per_step):
        step = lengths[start : start + per_step]
        rows += [[step[i] for i in group] for group in decisions.plan_rows(step, row_tokens)]
    return rows


def activation_bytes_per_token(shape: ModelShape, lora: LoraSection, act_bytes: int, mask_bytes: int,
                               fused: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer's backward (no checkpointing).

    ``fused``: LoRA layers run through loralab.cpu.fused_lora, which keeps each distinct input once in the
    compute dtype and the rank-r product (the dropout mask is drawn again in the backward), instead of PEFT's
    fp32 input copies and masks.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norms = 2 * h * 4  # RMSNorm computes in fp32 and keeps its fp32 input
    mlp = 3 * i * act_bytes  # gate, silu(gate), up: the frozen down_proj keeps nothing
    attention = (2 * q + 2 * kv) * act_bytes + shape.num_heads * 4  # q, output, k, v; log-sum-exp
    dims = shape.module_dims()
    if fused:
        inputs = {_SHARED_INPUT.get(m, m): dims[m][0] for m in target_names(lora)}
        adapters = sum(inputs.values()) * act_bytes + len(target_names(lora)) * lora.r * act_bytes
        return norms + mlp + attention + adapters
    # PEFT upcasts each adapted linear's input to the fp32 LoRA dtype; lora_A keeps it (and dropout its mask).
    per_input = 4 + (mask_bytes if lora.lora_dropout > 0 else 0)
    adapters = sum(dims[m][0] * per_input + lora.r * 4 for m in target_names(lora))
    return norms + mlp + attention + adapters


def backward_transient_per_token(shape: ModelShape, act_bytes: int) -> float:
    """Gradients alive at once inside one layer's backward (the MLP's, the widest, plus the norms')."""
    return 4 * shape.intermediate_size * act_bytes + 4 * shape.hidden_size * 4


class Rows(NamedTuple):
    """How a run's examples fall into rows: the fullest row sets the memory, the first steps' rows the time."""

    row_tokens: int
    peak_examples: list[int]
    """Lengths of the examples in the fullest row."""
    peak_trained: int
    rows: list[list[int]]
    rows_per_step: float
    mean_tokens: float
    mean_trained: float
    packed: bool
    """Whether any row holds more than one example."""

    @property
    def peak_tokens(self) -> int:
        return sum(self.peak_examples)


def native_bf16(profile: DeviceProfile) -> bool:
    """Whether the profile's device multiplies bf16 natively: a CPU profile lists bf16 only where it does (cpu_profile)."""
    return "bf16" in profile.peak_flops


def row_layout(train: TrainConfig, profile: DeviceProfile, precision: str, lengths: list[int],
               trained_counts: list[int]) -> Rows:
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    row_tokens = resolve_row_tokens(train, profile.name, lengths, precision, native_bf16(profile))
    peak = peak_row(lengths, per_step, row_tokens)
    rows = typical_rows(lengths, per_step, row_tokens)
    mean_tokens = statistics.fmean(sum(r) for r in rows)
    return Rows(
        row_tokens=row_tokens, peak_examples=[lengths[i] for i in peak],
        peak_trained=sum(sorted(trained_counts, reverse=True)[: len(peak)]), rows=rows,
        rows_per_step=len(rows) / math.ceil(sum(len(r) for r in rows) / per_step), mean_tokens=mean_tokens,
        mean_trained=mean_tokens * sum(trained_counts) / sum(lengths), packed=max(len(r) for r in rows) > 1 or len(peak) > 1,
    )


class SpeedPath(NamedTuple):
    """Which of loralab.cpu's pieces a run uses (loralab.decisions decides)."""

    fused: bool
    """Fused LoRA layers."""
    per_example: bool
    """Per-example attention."""
    fused_head: bool
    """The frozen-head loss."""
    tuned_allocator: bool
    """glibc's allocator set for the row length."""
    lean_when_checkpointing: bool = False
    """The lean allocator setting under gradient checkpointing."""


def speed_path(profile: DeviceProfile, precision: str, attn_implementation: str, model_config: dict[str, Any]) -> SpeedPath:
    if not decisions.cpu_speed_path(profile.name):
        return SpeedPath(False, False, False, False)
    on = decisions.cpu_pieces(precision, native_bf16(profile))
    return SpeedPath(on.fused_lora, decisions.per_example_attention_on(profile.name, attn_implementation, precision,
                                                                    native_bf16(profile)),
                     on.head_loss and model_config.get("model_type") in PLAIN_HEAD_MODELS, on.tuned_allocator,
                     on.lean_when_checkpointing)


def saved_activation_bytes(shape: ModelShape, train: TrainConfig, rows: Rows, per_token: float, b: int, path: SpeedPath,
                           attn_implementation: str) -> tuple[float, str]:
    """Bytes autograd keeps for the fullest row's backward, and what they are."""
    n_layers, peak_tokens = shape.num_layers, rows.peak_tokens
    # A checkpointed layer keeps about two hidden-size tensors per token (its input and the residual it
    # returns, measured on CPU); the backward pass recomputes one layer at a time.
    kept_per_layer = 2 * shape.hidden_size * b
    if train.gradient_checkpointing:
        saved = peak_tokens * (n_layers * kept_per_layer + per_token)
        note = f"{n_layers} checkpointed layer inputs + 1 recomputed layer, {peak_tokens:,} tokens"
    else:
        saved = peak_tokens * n_layers * per_token
        note = f"{n_layers} layers x {peak_tokens:,} tokens x {per_token / 1e3:.0f} kB"
    saved += peak_tokens * shape.hidden_size * (b + 4)  # embeddings out, final norm's fp32 input
    if rows.packed and attn_implementation != "flash_attention_2" and not path.per_example:
        saved += peak_tokens**2  # the packed row's block-causal mask (bool, tokens x tokens)
    layers_kept = 1 if train.gradient_checkpointing else n_layers
    if path.per_example:
        # per-example attention keeps each example's (heads x L x L) probabilities in the compute dtype
        short = sum(n * n for n in rows.peak_examples if n <= PER_EXAMPLE_MAX_TOKENS)
        saved += layers_kept * shape.num_heads * short * b
    if attn_implementation == "eager":
        # eager attention materialises (heads, tokens, tokens) probabilities and keeps them per layer
        saved += layers_kept * shape.num_heads * peak_tokens**2 * (b + 4)
    return saved, note


def memory_model(shape: ModelShape, lora: LoraSection, train: TrainConfig, profile: DeviceProfile, precision: str,
                 rows: Rows, path: SpeedPath, attn_implementation: str) -> tuple[list[MemoryItem], float]:
    """The peak's parts for the fullest row, and the activation bytes per token of one layer (the time model's too)."""
    b = DTYPE_BYTES[precision]
    trainable = lora_trainable_params(shape, lora)
    per_token = activation_bytes_per_token(shape, lora, b, profile.dropout_mask_bytes, fused=path.fused)
    saved, act_note = saved_activation_bytes(shape, train, rows, per_token, b, path, attn_implementation)
    peak_tokens, peak_trained = rows.peak_tokens, rows.peak_trained
    if path.fused_head:  # loralab.cpu.head_loss: one chunk of fp32 logits, and the hidden states' gradient
        logits = CHUNK_ROWS * shape.vocab_size * (4 + b) + peak_trained * shape.hidden_size * b
        logits_note = (f"{CHUNK_ROWS} positions x {shape.vocab_size:,} vocab at a time (of the {peak_trained:,} "
                       f"trained), fp32 for the loss")
    else:
        logits = peak_trained * shape.vocab_size * LOGITS_PEAK_BYTES
        logits_note = f"only the {peak_trained:,} trained positions x {shape.vocab_size:,} vocab, fp32 for the loss"
    # loralab.cpu.allocator.tune_allocator: rows up to LEAN_ALLOCATOR_ROW_TOKENS keep glibc's heap, which holds
    # more than the live activations (HEAP_HELD_FACTOR, from bench/plan_validation.py); longer rows, and checkpointed
    # runs where the CPU pieces say so, give freed memory back at once (the rule: allocator.lean, as speed_path asks it).
    if path.tuned_allocator:
        gives_back = allocator.lean(peak_tokens, train.gradient_checkpointing and path.lean_when_checkpointing)
        held = 1.0 if gives_back else HEAP_HELD_FACTOR
    else:
        held = profile.allocator_factor
    transient = peak_tokens * backward_transient_per_token(shape, b) * held
    if train.gradient_checkpointing:
        buffers_note = "gradients inside one layer's backward, on top of its recomputed activations"
    elif path.fused_head:
        buffers_note = "gradients inside one layer's backward"
    else:
        # Each layer's backward reuses the memory its freed activations leave, so only the part larger
        # than the logits (freed just before) adds to the peak. Both rules match CPU measurements.
        transient = max(0.0, transient - logits)
        buffers_note = "gradients inside one layer's backward, beyond the memory the logits freed"
    if held != 1.0:
        act_note += f", x{held:g} held by the allocator"
    memory = [
        base_weights_item(shape, precision, train.load_in_4bit),
        trainable_state_item(trainable, lora, train.optim),
        MemoryItem("activations", saved * held, act_note),
        MemoryItem("logits (fp32)", logits, logits_note),
        MemoryItem("backward buffers", transient, buffers_note),
        MemoryItem("framework", profile.framework_bytes, "runtime before any weight: CUDA context on GPUs, Python + libraries on CPU"),
    ]
    if lora.use_dora:
        # PEFT's DoRA builds each adapted weight (W + scale B A) in fp32 to take its norm, one module at a time
        largest = max(a * o for a, o in lora_modules(shape, lora))
        memory.append(MemoryItem("DoRA weight norm", largest * 4, "the largest adapted weight rebuilt in fp32 for its norm"))
    if train.onednn_weights:
        # loralab.cpu.onednn_weights: each frozen linear weight reordered both ways, its plain copy released
        onednn_params = shape.num_layers * sum(a * o for a, o in shape.module_dims().values())
        onednn_params += 0 if shape.tied_embeddings else shape.vocab_size * shape.hidden_size
        memory.append(MemoryItem("oneDNN weights", onednn_params * b,
                                 f"{onednn_params:,} linear weights in oneDNN's layout both ways, plain copy released"))
    return memory, per_token


class Times(NamedTuple):
    flops: float
    """Per micro-batch."""
    microbatch_seconds: float


def attention_seconds(shape: ModelShape, profile: DeviceProfile, peak: float, rows: Rows, lengths: list[int],
                      recompute: float, path: SpeedPath, attn_implementation: str, act_bytes: int = 2) -> tuple[float, float]:
    """(FLOPs, seconds) of attention per micro-batch. QK^T and AV are 4 x q_dim FLOPs per (query, key) pair
    forward, backward ~2.5x that. One example per row runs the causal kernel (about half the pairs, whole blocks on
    the diagonal); a packed row with a block mask pays every pair of the row."""
    n_layers, q_dim = shape.num_layers, shape.num_heads * shape.head_dim
    if not rows.packed or attn_implementation == "flash_attention_2":
        block = profile.attention_block
        pairs = statistics.fmean(sum(min(n * n, n * n / 2 + n * block / 2) for n in r) for r in rows.rows)
    else:
        pairs = statistics.fmean(sum(r) ** 2 for r in rows.rows)
    attention = n_layers * 4 * q_dim * pairs * (3.5 + recompute)
    seconds = attention / (peak * attention_efficiency(profile, shape.head_dim))
    if path.per_example:
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


def time_model(shape: ModelShape, lora: LoraSection, train: TrainConfig, profile: DeviceProfile, precision: str,
               rows: Rows, per_token: float, lengths: list[int], path: SpeedPath, attn_implementation: str) -> Times:
    """FLOPs and seconds of one micro-batch (an average row of the first steps)."""
    b, n_layers = DTYPE_BYTES[precision], shape.num_layers
    total, trainable = shape.total_params, lora_trainable_params(shape, lora)
    dense, head = n_layers * shape.layer_linear_params, shape.vocab_size * shape.hidden_size
    mean_tokens, mean_trained = rows.mean_tokens, rows.mean_trained
    # Frozen base: forward 2 x params per token, backward 2 x params (input gradient only). The head runs
    # only at trained positions. LoRA: forward 2x, backward 4x (input and weight gradients) its params.
    # Checkpointing runs the layers' forward once more.
    layers_forward = 2 * (dense + trainable) * mean_tokens
    recompute = 1.0 if train.gradient_checkpointing else 0.0
    matmul = 2 * layers_forward + 4 * head * mean_trained + 2 * trainable * mean_tokens + recompute * layers_forward
    peak = profile.peak_flops[precision]
    attention, attention_s = attention_seconds(shape, profile, peak, rows, lengths, recompute, path, attn_implementation, b)
    weight_reads_s = (2 + recompute) * total * b / profile.bandwidth  # small micro-batches only read weights
    efficiency = profile.efficiency * (profile.onednn_speedup.get(precision, 1.0) if train.onednn_weights else 1.0)
    matmul_s = max(matmul / (peak * efficiency), weight_reads_s)
    # Elementwise work (norms, casts, SiLU, RoPE, the loss) streams the activations: each saved byte is
    # written, read back by the backward pass, and its gradient written and read; the loss ~30 bytes per logit.
    elementwise_s = (4 * mean_tokens * n_layers * per_token + 30 * mean_trained * shape.vocab_size) / profile.bandwidth
    dropout_inputs = sum(shape.module_dims()[m][0] for m in target_names(lora)) if lora.lora_dropout > 0 else 0
    dropout_s = (1 + recompute) * mean_tokens * n_layers * dropout_inputs * profile.dropout_s_per_element  # a mask per forward
    if path.fused:
        # loralab.cpu.fused_lora.drop_positions draws p x N numbers, in forward and backward, instead of N masks
        dropout_s *= 2 * lora.lora_dropout
    device_s = matmul_s + attention_s + elementwise_s + dropout_s
    host_s = n_layers * profile.op_overhead_s * (1 + recompute / 2) + profile.step_overhead_s
    return Times(matmul + attention, max(device_s, host_s) if profile.async_dispatch else device_s + host_s)


def switch_notes(requested: TrainConfig, resolved: TrainConfig) -> list[str]:
    """What the plan says about the switches "auto" decided."""
    notes = []
    if requested.gradient_checkpointing == "auto":
        notes.append("gradient_checkpointing auto: " + ("on, the run does not fit without it"
                                                        if resolved.gradient_checkpointing else "off, the run fits without it"))
    if requested.onednn_weights == "auto":
        notes.append("onednn_weights auto: " + ("on, frozen weights in oneDNN's layout for the matmuls" if resolved.onednn_weights
                                                else "off (needs bf16 or fp32 on a CPU, rows of up to "
                                                f"{LEAN_ALLOCATOR_ROW_TOKENS:,} tokens, no checkpointing, and the memory)"))
    return notes


def estimate(
    model_config: dict[str, Any],
    lora: LoraSection,
    train: TrainConfig,
    lengths: list[int],
    profile: DeviceProfile,
    precision: str,
    *,
    trained_counts: list[int] | None = None,
    attn_implementation: str = "sdpa",
    with_suggestions: bool = True,
) -> Plan:
    """Predict peak memory and time for training on ``profile``: switches resolved, then the memory model, then
    the time model.

    ``lengths`` are the training examples' token counts; ``trained_counts`` their trained (response)
    token counts (default: every token trained, the worst case for the logits).
    """
    if not lengths:
        raise LoralabError("plan needs at least one training example length")
    requested = train
    if train.gradient_checkpointing == "auto" or train.onednn_weights == "auto":
        train = resolve_switches(model_config, lora, train, lengths, profile, precision,
                                 trained_counts=trained_counts, attn_implementation=attn_implementation)
    if precision not in profile.peak_flops:
        raise LoralabError(
            f"{profile.description} cannot train in {precision}; set train.precision to one of {', '.join(profile.peak_flops)}"
        )
    trained_counts = list(lengths) if trained_counts is None else list(trained_counts)
    shape = model_shape(model_config)
    notes = switch_notes(requested, train)
    rows = row_layout(train, profile, precision, lengths, trained_counts)
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    notes.append(f"rows of up to {rows.row_tokens:,} tokens (train.row_tokens): {rows.rows_per_step:.1f} per optimizer "
                 f"step of {per_step} examples on average")
    if lora.use_dora:
        notes.append("DoRA runs PEFT's own forward (not loralab's fused CPU LoRA layers), rebuilding each adapted weight")
    if attn_implementation == "eager":
        notes.append("attn_implementation eager keeps heads x tokens^2 attention probabilities per layer; sdpa does not")
    path = speed_path(profile, precision, attn_implementation, model_config)
    memory, per_token = memory_model(shape, lora, train, profile, precision, rows, path, attn_implementation)
    times = time_model(shape, lora, train, profile, precision, rows, per_token, lengths, path, attn_implementation)
    step_s = rows.rows_per_step * times.microbatch_seconds
    plan = Plan(
        device=profile, precision=precision, total_params=shape.total_params,
        trainable_params=lora_trainable_params(shape, lora), peak_tokens=rows.peak_tokens, mean_tokens=rows.mean_tokens,
        memory=memory, flops_per_microbatch=times.flops, microbatch_seconds=times.microbatch_seconds,
        step_seconds=step_s, run_seconds=train.max_steps * step_s, tokens_per_second=rows.mean_tokens / times.microbatch_seconds,
        max_steps=train.max_steps, notes=notes, onednn_weights=bool(train.onednn_weights),
    )
    if with_suggestions and not plan.fits:
        plan.suggestions = suggest(model_config, lora, train, lengths, trained_counts, profile, precision, attn_implementation)
    return plan


def resolve_switches(
    model_config: dict[str, Any],
    lora: LoraSection,
    train: TrainConfig,
    lengths: list[int],
    profile: DeviceProfile,
    precision: str,
    *,
    trained_counts: list[int] | None = None,
    attn_implementation: str = "sdpa",
) -> TrainConfig:
    """``train`` with gradient_checkpointing and onednn_weights decided where they are "auto": the fastest
    setting that fits, in this order: oneDNN weights without checkpointing (where can_use_onednn_weights), plain
    weights without checkpointing, checkpointing with plain weights; the last when none fits."""
    peak_tokens = fullest_row_tokens(train, profile.name, lengths, precision, native_bf16(profile))
    candidates = []
    for checkpointing in ([False, True] if train.gradient_checkpointing == "auto" else [train.gradient_checkpointing]):
        for onednn in ([True, False] if train.onednn_weights == "auto" else [train.onednn_weights]):
            if onednn and train.onednn_weights == "auto" and not can_use_onednn_weights(
                profile.name, precision, peak_tokens, checkpointing
            ):
                continue
            candidates.append(replace(train, gradient_checkpointing=checkpointing, onednn_weights=onednn))
    for candidate in candidates[:-1]:
        if estimate(model_config, lora, candidate, lengths, profile, precision, trained_counts=trained_counts,
                    attn_implementation=attn_implementation, with_suggestions=False).fits:
            return candidate
    return candidates[-1]


def truncate_lengths(lengths: list[int], trained: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Lengths and trained counts after cutting examples to ``max_length`` (prepare cuts from the response end)."""
    cut = [min(n, max_length) for n in lengths]
    kept = [max(0, t - (n - c)) for n, t, c in zip(lengths, trained, cut)]
    return cut, kept


def suggest(
    model_config: dict, lora: LoraSection, train: TrainConfig, lengths: list[int], trained: list[int],
    profile: DeviceProfile, precision: str, attn_implementation: str = "sdpa",
) -> list[Suggestion]:
    """Single changes that make the run fit, each with its predicted peak; all of them at once if none does alone."""

    def trial(settings: list[str], note: str, train_: TrainConfig, lengths_=lengths, trained_=trained,
              precision_=precision) -> Suggestion:
        p = estimate(model_config, lora, train_, lengths_, profile, precision_, trained_counts=trained_,
                     attn_implementation=attn_implementation, with_suggestions=False)
        return Suggestion(settings, note, p.peak_bytes, p.fits, p.microbatch_seconds)

    def first_fit(trials: list[Suggestion]) -> Suggestion | None:
        """The first (mildest) change that fits, else the strongest one tried."""
        return next((t for t in trials if t.fits), trials[-1] if trials else None)

    def shorter(settings: list[str], note: str, train_: TrainConfig, precision_: str) -> list[Suggestion]:
        trials = []
        for new_max in (2**k for k in range(15, 5, -1)):  # powers of two below the longest example
            if new_max < max(lengths):
                cut, kept = truncate_lengths(lengths, trained, new_max)
                n_cut = sum(n > new_max for n in lengths)
                trials.append(trial(settings + [f"data.max_length={new_max}"],
                                    f"{note}cuts {n_cut} of {len(lengths)} examples; run prepare again", train_, cut, kept, precision_))
        return trials

    out: list[Suggestion | None] = []
    row_tokens = resolve_row_tokens(train, profile.name, lengths, precision, native_bf16(profile))
    fewer = [2**k for k in range(14, 6, -1) if 2**k < row_tokens and 2**k >= min(lengths)]
    out.append(first_fit([
        trial([f"train.row_tokens={n}"], "same examples per optimizer step, in more, shorter rows", replace(train, row_tokens=n))
        for n in fewer
    ]))
    if train.onednn_weights is True:
        out.append(trial(["train.onednn_weights=false"], "one copy of the linear weights less, somewhat slower",
                         replace(train, onednn_weights=False)))
    if not train.gradient_checkpointing:
        out.append(trial(["train.gradient_checkpointing=true"], "more compute: each layer's forward runs twice", replace(train, gradient_checkpointing=True)))
    lower = next((p for p in ("bf16", "fp16") if p in profile.peak_flops), None)
    if DTYPE_BYTES[precision] > 2 and lower:
        out.append(trial([f"train.precision={lower}"], "16-bit base weights and activations", train, precision_=lower))
    out.append(first_fit(shorter([], "", train, precision)))
    found = [s for s in out if s is not None]
    if not any(s.fits for s in found):
        shortest = min(lengths)
        combo = replace(train, row_tokens=shortest, gradient_checkpointing=True)  # one example per row
        settings = [f"train.row_tokens={shortest}", "train.gradient_checkpointing=true"]
        combo_precision = lower if DTYPE_BYTES[precision] > 2 and lower else precision
        if combo_precision != precision:
            settings.append(f"train.precision={combo_precision}")
        trials = [trial(settings, "all together", combo, precision_=combo_precision)]
        trials += shorter(settings, "all together; ", combo, combo_precision)
        found.append(first_fit(trials))
    return found


# Devices ------------------------------------------------------------------------------------------

def measure_matmul_peak(precision: str, size: int = 2048, seconds: float = 1.0, cpu_time: bool = False) -> float:
    """FLOP/s of a square torch.matmul on this CPU (a second or so per precision).

    ``cpu_time`` divides by the process's CPU time instead of wall time: with one thread, that is the
    speed of a core even while other jobs share the machine.
    """
    import time

    import torch

    from loralab.modeling import DTYPES

    clock = time.process_time if cpu_time else time.perf_counter
    a = torch.randn(size, size, dtype=DTYPES[precision])
    bm = torch.randn(size, size, dtype=DTYPES[precision])
    torch.matmul(a, bm)  # warm-up: thread pool, oneDNN kernel selection
    runs, start = 0, clock()
    while clock() - start < seconds or runs < 2:
        torch.matmul(a, bm)
        runs += 1
    return 2 * size**3 * runs / (clock() - start)


def idle_matmul_peak(precision: str, size: int = 2048, seconds: float = 1.0) -> float:
    """measure_matmul_peak as this CPU reaches it alone: FLOP/s by the wall clock, or by CPU time per thread where
    that is faster (on a busy machine the process gets only part of its threads' time, and the wall clock would
    count the other jobs' share against the CPU)."""
    import time

    import torch

    from loralab.modeling import DTYPES

    a = torch.randn(size, size, dtype=DTYPES[precision])
    bm = torch.randn(size, size, dtype=DTYPES[precision])
    torch.matmul(a, bm)  # warm-up: thread pool, oneDNN kernel selection
    runs, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds or runs < 2:
        torch.matmul(a, bm)
        runs += 1
    wall, cpu = time.perf_counter() - wall, (time.process_time() - cpu) / torch.get_num_threads()
    return 2 * size**3 * runs / min(wall, cpu)


def cpu_profile(calibrate: bool = False, facts: DeviceFacts | None = None) -> DeviceProfile:
    """The cpu profile with this machine's available RAM, and the precisions loralab.decisions allows on this CPU."""
    import psutil

    from loralab import devices

    facts = facts or devices.probe("cpu")
    base = PROFILES["cpu"]
    peaks = {p: base.peak_flops[p] for p in decisions.supported_precisions(facts)}
    measured = ""
    if calibrate:
        peaks, measured = calibrated_peaks(facts, list(peaks))
    ram = psutil.virtual_memory()
    basis = base.basis
    if calibrate and not is_reference_cpu(facts):
        basis = (f"matmul peaks of this CPU ({facts.name}, {'with' if facts.native_bf16 else 'without'} native bf16"
                 f"{', ISA limited by ' + isa_limits() if isa_limits() else ''}); efficiencies and overheads from the "
                 f"reference CPU ({REFERENCE_CPU_NAME} with native bf16)")
    if not calibrate and not is_reference_cpu(facts):
        basis = (f"NOT this CPU: the time constants were measured on the reference CPU ({REFERENCE_CPU_NAME} with "
                 f"native bf16) and this one ({facts.name}, {'with' if facts.native_bf16 else 'without'} native bf16"
                 f"{', ISA limited by ' + isa_limits() if isa_limits() else ''}) may be much slower or faster; "
                 f"`loralab plan CONFIG --calibrate` measures its matmul peaks first")
    return replace(
        base, memory_bytes=facts.memory_bytes, peak_flops=peaks, default_precision=decisions.choose_precision(facts),
        description=f"this CPU ({ram.total / GB:.1f} GB RAM, {facts.memory_bytes / GB:.1f} GB available now"
        + (f", matmul peaks {measured})" if calibrate else ", matmul peaks of the reference CPU)"), basis=basis,
    )


def peaks_cache_file() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loralab" / "cpu_matmul_peaks.json"


def calibrated_peaks(facts: DeviceFacts, precisions: list[str]) -> tuple[dict[str, float], str]:
    """This CPU's matmul peaks for ``precisions`` and where they come from: measured once per CPU model, ISA limits
    and thread count (a second or so each), then read from peaks_cache_file() (a second plan is instant)."""
    import time

    import torch

    from loralab.rundir import atomic_write_text

    key = f"{facts.name} | {isa_limits() or 'full ISA'} | {torch.get_num_threads()} threads"
    path = peaks_cache_file()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        entry = dict(cache[key]) if isinstance(cache.get(key), dict) else {}
    except (OSError, ValueError):
        cache, entry = {}, {}
    missing = [p for p in precisions if not isinstance(entry.get(p), (int, float))]
    if not missing:
        return {p: float(entry[p]) for p in precisions}, f"measured {entry.get('measured', 'earlier')}, cached in {path}"
    entry.update({p: idle_matmul_peak(p) for p in missing}, measured=time.strftime("%Y-%m-%d"))
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass  # an unwritable cache only means measuring again next time
    return {p: float(entry[p]) for p in precisions}, "measured just now"


REFERENCE_CPU_NAME = "AMD EPYC"  # /proc/cpuinfo's model name of the CPU PROFILES["cpu"] was measured on


def is_reference_cpu(facts: DeviceFacts) -> bool:
    """Whether the plan's CPU constants were measured on a CPU like this one (same model, native bf16, full ISA)."""
    return facts.name == REFERENCE_CPU_NAME and facts.native_bf16 and not isa_limits()


def mps_profile(facts: DeviceFacts) -> DeviceProfile:
    """A Mac's profile: the M2's speed, this Mac's memory, the precisions loralab.decisions allows on it."""
    base = PROFILES["m2-16gb"]
    peaks = {p: base.peak_flops["fp32" if p == "fp32" else "bf16"] for p in decisions.supported_precisions(facts)}
    return replace(base, name="mps", description="this Mac (MPS; speed assumed M2-like)", memory_bytes=facts.memory_bytes,
                   peak_flops=peaks, default_precision=decisions.choose_precision(facts))


def profile_for(facts: DeviceFacts, calibrate: bool = False) -> DeviceProfile:
    """The profile of the device ``facts`` describe (loralab.devices.probe)."""
    if facts.kind == "cuda":
        return gpu_profile(facts)
    if facts.kind == "mps":
        return mps_profile(facts)
    return cpu_profile(calibrate, facts)


def resolve_profile(device: str, calibrate: bool = False) -> DeviceProfile:
    """A named profile, or ``auto``: the GPU/Mac/CPU this process sees."""
    from loralab import devices

    device = device.lower()
    if device == "cpu":
        return cpu_profile(calibrate)
    if device in PROFILES:
        return PROFILES[device]
    if device != "auto":
        raise LoralabError(f"unknown device '{device}' for plan; choose one of {', '.join(PROFILES)} or auto")
    return profile_for(devices.probe(devices.detect_device("auto")), calibrate)
