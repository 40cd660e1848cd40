"""Batched greedy generation for evaluation, and a disk cache for base-model generations.

Evaluation decodes hundreds of prompts greedily. Doing it one prompt at a time (the usual notebook loop)
leaves the hardware idle: a single decode step is a matrix-vector product bound by reading the weights.
Here prompts are sorted by length and decoded in batches, so each weight read serves many sequences and
little compute goes to padding. Greedy decoding is deterministic, so the base model's generations for a
fixed prompt set can be cached on disk and reused across runs (`cache_key`), and so can its held-out loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

# Share of the currently available memory the KV cache and logits may take; the rest covers prefill
# activations (attention scores, MLP intermediates) and whatever else runs on the machine.
MEMORY_FRACTION = 0.4

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")


def generate_greedy(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy-decode token-id ``prompts`` in length-sorted batches; return new ids per prompt, input order.

    Each output stops before its first EOS (the EOS itself is dropped); with no ``eos_token_ids`` every
    output is ``max_new_tokens`` long. Works for a plain Hugging Face causal LM and for a PEFT model. With ``batch_size=None`` each batch is sized by `choose_batch_size`
    from its own longest prompt and the memory free when the call starts.
    """
    if not prompts:
        return []
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    embedding = model.get_input_embeddings().weight
    device, dtype = embedding.device, embedding.dtype
    config = greedy_generation_config(max_new_tokens, eos_token_ids, pad_token_id)
    # Memory is measured once: later readings would count the allocator's cached blocks as taken.
    available = available_memory_bytes(device) if batch_size is None else 0

    # Longest first, so a batch that does not fit in memory fails at the start rather than at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[list[int] | None] = [None] * len(prompts)
    eos = set(eos_token_ids)
    was_training = model.training
    model.eval()
    # At prefill transformers feeds the head hidden_states[:, -1:, :], a strided view; torch.matmul cannot
    # fold a strided 3-D input into one matrix product, so it broadcasts the (vocab x hidden) head weight to
    # every row of the batch and runs bmm: on a CPU, copying a 32k-vocab head 64 times took longer than the
    # whole rest of the prefill. A contiguous input makes it one mm (bench/eval_throughput.py).
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            start = 0
            while start < len(order):
                size = batch_size or choose_batch_size(
                    model.config, len(prompts[order[start]]) + max_new_tokens, dtype, available
                )
                indices = order[start : start + size]
                input_ids, attention_mask = left_pad([prompts[i] for i in indices], pad_token_id, device)
                # (batch, prompt_len + generated), generated part right-filled with pad once a row has stopped
                sequences = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
                for i, row in zip(indices, sequences[:, input_ids.shape[1] :].tolist()):
                    outputs[i] = cut_at_eos(row, eos)
                bar.update(len(indices))
                start += size
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    return outputs


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


def greedy_generation_config(max_new_tokens: int, eos_token_ids: list[int], pad_token_id: int) -> GenerationConfig:
    """A GenerationConfig for plain greedy decoding.

    ``generate`` fills every unset field from the checkpoint's own generation_config.json, so the knobs
    that would change greedy outputs (repetition penalty, minimum length, ...) are set to their neutral
    values explicitly instead of left unset.
    """
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        # Also overrides any min_length from the checkpoint (generate derives min_length from it).
        min_new_tokens=0,
        # Unused when do_sample=False; neutral so a chat checkpoint's sampling defaults raise no warnings.
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        use_cache=True,
    )


# Over token ids, where tokenizer.pad(padding_side="left") would need the tokenizer and python lists back.
def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``prompts`` into (batch, longest) input ids and the matching 0/1 attention mask.

    Left padding keeps every prompt's last token in the last column, so each row's next token is read
    from the same position and new tokens are appended to all rows at once.
    """
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_eos(ids: list[int], eos_token_ids: set[int]) -> list[int]:
    """``ids`` up to, not including, the first EOS token."""
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            return ids[:position]
    return ids


def choose_batch_size(
    model_config, max_total_length: int, dtype: torch.dtype, available_bytes: int, cap: int = 64
) -> int:
    """The largest batch (1..cap) whose KV cache and last-step logits fit in MEMORY_FRACTION of memory.

    Per sequence: KV = 2 (keys and values) x layers x kv_heads x head_dim x bytes x ``max_total_length``;
    logits = vocab x (model dtype bytes + 4), the model's own output plus generate's float32 copy.
    """
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    value_bytes = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * value_bytes * max_total_length
    logits_bytes = config.vocab_size * (value_bytes + 4)
    fitting = int(MEMORY_FRACTION * available_bytes) // (kv_bytes + logits_bytes)
    return max(1, min(cap, fitting))


def available_memory_bytes(device: torch.device | str) -> int:
    """Free memory usable for generation: free GPU memory on CUDA, available system RAM otherwise.

    MPS shares system RAM, so psutil's figure applies there too.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def cache_key(model_fingerprint: str, inputs: list, settings: dict) -> str:
    """sha256 hex digest identifying one model's results (greedy generations, held-out loss) for ``inputs``.

    ``inputs`` are the prompts' token ids (or the examples a loss is taken over); ``settings`` should hold
    everything else that can change the result: what is computed, max_new_tokens, EOS ids, dtype, device.
    Both must be JSON-serialisable.
    """
    canonical = json.dumps(
        {"model": model_fingerprint, "prompts": inputs, "settings": settings},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def model_fingerprint(name_or_path: str) -> str:
    """A string that changes when the model behind ``name_or_path`` changes.

    For a local directory: a digest of config.json plus the name, size and mtime of each weight file
    (cheap: weights are not read). For a hub id: the id and, when it is in the local HF cache, the
    snapshot commit it resolves to.
    """
    path = Path(name_or_path)
    if path.is_file():  # a GGUF file: its size and mtime (hashing it would cost seconds on every eval)
        return f"file:{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if path.is_dir():
        config_file = path / "config.json"
        weights = sorted({file for pattern in WEIGHT_FILE_PATTERNS for file in path.glob(pattern)})
        parts = {
            "config": config_file.read_text(encoding="utf-8") if config_file.exists() else None,
            "weights": [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in weights],
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()
        return f"local:{digest}"
    commit = cached_snapshot_commit(name_or_path)
    return f"hub:{name_or_path}@{commit}" if commit else f"hub:{name_or_path}"


def cached_snapshot_commit(repo_id: str) -> str | None:
    """The commit of the locally cached snapshot that ``repo_id``'s config.json resolves to, if any."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    # A real hit is a str path .../snapshots/<commit>/config.json; misses are None or a sentinel object.
    if not isinstance(cached, str):
        return None
    return Path(cached).parent.name


def cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.json"


def load_cached(cache_dir: Path, key: str):
    """The value saved under ``key``, or None when there is none."""
    path = cache_file(cache_dir, key)
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["outputs"]


def save_cached(cache_dir: Path, key: str, value) -> Path:
    """Save the JSON-serialisable ``value`` under ``key`` atomically (temp file, then rename); return the path.

    A crash mid-write, or two runs writing the same key, never leave a truncated file behind.
    """
    path = cache_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        json.dump({"key": key, "outputs": value}, tmp)
    os.replace(tmp.name, path)
    return path
