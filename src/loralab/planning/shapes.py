"""The shape of a Llama-style decoder read from its config.json, and the parameter arithmetic of LoRA on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loralab.config import LoraSection
from loralab.errors import LoralabError


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
        h, i, q, kv = (self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim,
                       self.num_kv_heads * self.head_dim)
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

