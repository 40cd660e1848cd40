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
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer

from loralab.cpu.speed_path import inference_path

# Share of the currently available memory the KV cache and logits may take; the rest covers prefill
# activations (attention scores, MLP intermediates) and whatever else runs on the machine.
MEMORY_FRACTION = 0.4
# Prompts prefilled together in one packed row, at most this many tokens.
PREFILL_ROW_TOKENS = 2048



def generate_greedy(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy-decode token-id ``prompts`` in length-sorted batches; return new ids per prompt, input order.

    Each output stops before its first EOS (the EOS itself is dropped); with no ``eos_token_ids`` every
    output is ``max_new_tokens`` long. Works for a plain Hugging Face causal LM and for a PEFT model. With
    ``batch_size=None`` each batch is sized by `choose_batch_size` from its own longest prompt and the memory
    free when the call starts. No row is padded.
    """
    if not prompts:
        return []
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    embedding = model.get_input_embeddings().weight
    device, dtype = embedding.device, embedding.dtype
    # Memory is measured once: later readings would count the allocator's cached blocks as taken.
    available = available_memory_bytes(device) if batch_size is None else 0

    # Longest first, so a batch that does not fit in memory fails at the start rather than at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[list[int] | None] = [None] * len(prompts)
    eos = set(eos_token_ids)
    was_training = model.training
    model.eval()
    # On a CPU the packed prefill attends each prompt alone and the linear weights are prepacked for oneDNN once (put
    # back bit for bit at the end): MKL's fp32 matmul re-packs the whole weight at every call, which a decode
    # step's few rows do not pay for (cpu.speed_path.inference_path; nothing changes on a GPU).
    try:
        with inference_path(model, rows_hint=batch_size or 64) as switched, torch.inference_mode(), \
                tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            start = 0
            while start < len(order):
                size = batch_size or choose_batch_size(
                    model.config, len(prompts[order[start]]) + max_new_tokens, dtype, available
                )
                indices = order[start : start + size]
                batch = greedy_batch(model, [prompts[i] for i in indices], max_new_tokens, eos,
                                     packed_prefill=switched.per_example_attention)
                for i, row in zip(indices, batch, strict=False):
                    outputs[i] = row
                bar.update(len(indices))
                start += size
    finally:
        model.train(was_training)
    return outputs


# transformers' generate is not used for the batch: it prefills the left-padded batch (a batch of Alpaca
# prompts is mostly padding: 2.8x the real tokens at 64 prompts) and grows its KV cache by concatenation,
# copying the whole cache at every step; here the prompts are prefilled packed, without padding, and
# the cache is written in place into buffers sized for the whole answer.
def greedy_batch(
    model, prompts: list[list[int]], max_new_tokens: int, eos: set[int], packed_prefill: bool
) -> list[list[int]]:
    """Greedy answers (cut before the first EOS) to one batch of ``prompts``; rows that stopped are dropped.

    ``packed_prefill``: the model attends each example of a packed row alone (use_per_example_attention),
    so the prompts are prefilled end to end in rows; otherwise one prompt at a time.
    """
    device = model.get_input_embeddings().weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = max(len(p) for p in prompts)
    cache, first = prefill(model, prompts, longest + max_new_tokens, packed_prefill)
    tokens = first.unsqueeze(1)  # (batch, 1) the last token chosen for each live row
    columns = torch.arange(longest + max_new_tokens, device=device)
    # (batch, longest + max_new_tokens): 1 on each row's prompt (right-aligned at `longest`) and answer so far
    mask = ((columns >= longest - lengths[:, None]) & (columns < longest)).long()
    rows = torch.arange(len(prompts), device=device)  # the prompt each live row answers
    answers: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        chosen = tokens[:, 0].tolist()
        stopped = [j for j, token in enumerate(chosen) if token in eos]
        for j, token in enumerate(chosen):
            if token not in eos:
                answers[int(rows[j])].append(token)
        if stopped:
            keep = torch.tensor([j for j in range(len(chosen)) if chosen[j] not in eos], device=device)
            if keep.numel() == 0:
                break
            rows, tokens, mask, lengths = rows[keep], tokens[keep], mask[keep], lengths[keep]
            cache.keep_rows(keep)
        if step == max_new_tokens - 1:
            break
        mask[:, longest + step] = 1
        out = model(input_ids=tokens, attention_mask=mask[:, : longest + step + 1],
                    position_ids=(lengths + step)[:, None], cache=cache, use_cache=True)
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)  # (live rows, 1)
    return answers


def prefill(model, prompts: list[list[int]], capacity: int, packed: bool):
    """The KV cache of ``prompts`` (a PreallocatedCache, each prompt right-aligned at the longest) and the
    first greedy token of each, (batch,)."""
    longest = max(len(p) for p in prompts)
    device = model.get_input_embeddings().weight.device
    rows = _prefill_rows([len(p) for p in prompts], PREFILL_ROW_TOKENS if packed else 1)
    cache, first = None, []
    for row in rows:
        ids = torch.tensor([[t for i in row for t in prompts[i]]], device=device)  # (1, tokens)
        positions = torch.cat([torch.arange(len(prompts[i]), device=device) for i in row])[None]
        ends = torch.tensor([len(prompts[i]) for i in row], device=device).cumsum(0)
        row_cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, position_ids=positions, cache=row_cache, use_cache=True,
                    logits_to_keep=ends - 1)
        first.append(out.logits[0].argmax(-1))  # (len(row),) each prompt's next token
        if cache is None:
            cache = PreallocatedCache.like(row_cache, len(prompts), capacity, longest)
        for i, end in zip(row, ends.tolist(), strict=False):
            cache.put(i, row_cache, end - len(prompts[i]), end)
    order = torch.tensor([i for row in rows for i in row], device=device)
    tokens = torch.empty(len(prompts), dtype=torch.long, device=device)
    tokens[order] = torch.cat(first)
    return cache, tokens


def _prefill_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Consecutive prompts grouped into rows of at most ``row_tokens`` tokens (a longer prompt gets a row alone)."""
    rows: list[list[int]] = []
    used = row_tokens
    for i, length in enumerate(lengths):
        if used + length > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    return rows


class _BufferLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers sized for the whole answer, written in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.device, self.is_initialized = keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._views()
        return self.keys, self.values

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[keep], self.value_buffer[keep]
        self._views()


class PreallocatedCache(DynamicCache):
    """A KV cache for batched decoding: per layer, (batch, kv_heads, capacity, head_dim) buffers written in place."""

    @classmethod
    def like(cls, row_cache: DynamicCache, batch: int, capacity: int, length: int) -> PreallocatedCache:
        cache = cls()
        cache.layers = [
            _BufferLayer(layer.keys.new_zeros(batch, layer.keys.shape[1], capacity, layer.keys.shape[3]),
                         layer.values.new_zeros(batch, layer.values.shape[1], capacity, layer.values.shape[3]), length)
            for layer in row_cache.layers
        ]
        return cache

    def put(self, row: int, row_cache: DynamicCache, start: int, end: int) -> None:
        """Copy positions start..end of a (1-row) prefill cache into ``row``, right-aligned at the prefill length."""
        for layer, source in zip(self.layers, row_cache.layers, strict=False):
            width = end - start
            layer.key_buffer[row, :, layer.length - width : layer.length] = source.keys[0, :, start:end]
            layer.value_buffer[row, :, layer.length - width : layer.length] = source.values[0, :, start:end]

    def keep_rows(self, keep: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_rows(keep)


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


def cut_at_eos(ids: list[int], eos_token_ids: set[int]) -> list[int]:
    """``ids`` up to, not including, the first EOS token."""
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            return ids[:position]
    return ids


def choose_batch_size(
    model_config, max_total_length: int, dtype: torch.dtype, available_bytes: int, cap: int = 128
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
