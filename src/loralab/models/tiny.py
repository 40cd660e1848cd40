"""Offline stand-ins for hub models: a Llama-style tokenizer trained locally and Llama models from a config.

Used by the demo, the tests and the benchmarks, which must run with no model hub. The tokenizer mimics
Llama-2's sentencepiece conventions (``▁`` word boundaries, ``<s>``/``</s>``, no prefix space after a
special token) so the classic boundary-space traps show up here as they would on the real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# TinyLlama-1.1B-Chat-v1.0's own chat template (zephyr style), verbatim.
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json, the fields that shape the network.
TINYLLAMA_CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, chat_template: str | None = TINYLLAMA_CHAT_TEMPLATE):
    """Train a BPE vocabulary on ``texts`` and load it into transformers' own LlamaTokenizer.

    The tokenizer class is the one TinyLlama loads with (Metaspace ``▁`` boundaries, byte fallback, BOS
    added, no prefix space after a special token), so only the vocabulary differs from the real one.
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    texts = list(texts)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Learn merges within words and never across a newline (Llama's newline is the byte token <0x0A>).
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"),
         pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=sorted(set("".join(texts)) | set("\n<|>/▁")),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True, add_eos_token=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2, **overrides):
    """A small LlamaConfig with the same structure as TinyLlama (GQA, SwiGLU, untied head)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_llama(
    out_dir: str | Path, texts: Iterable[str], vocab_size: int = 1000, seed: int = 0, fan_in_head: bool = False,
    **config_overrides
) -> Path:
    """Train a tokenizer on ``texts``, build a random tiny Llama, save both to ``out_dir``; return it.

    ``fan_in_head`` draws the output head with std 1/sqrt(hidden) instead of transformers' 0.02: at
    hidden 128 the default caps every logit near 2.5, so no adapter could make a confident prediction.
    """
    import torch
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = tiny_llama_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if fan_in_head:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, config.hidden_size**-0.5)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tinyllama_shape(out_dir: str | Path, texts: Iterable[str], vocab_size: int) -> Path:
    """TinyLlama-1.1B's shape (TINYLLAMA_CONFIG) with random weights (seed 0, bf16 safetensors) and a tokenizer trained
    on ``texts``, saved to ``out_dir`` once: a ``complete`` marker says a previous call finished (the benches'
    model)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out_dir = Path(out_dir)
    if (out_dir / "complete").exists():
        return out_dir
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = LlamaConfig(**TINYLLAMA_CONFIG | dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                  eos_token_id=tokenizer.eos_token_id))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    (out_dir / "complete").write_text("")
    return out_dir
