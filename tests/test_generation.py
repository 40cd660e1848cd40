"""Batched greedy generation equals one-prompt-at-a-time greedy decoding; cache keys and batch sizing."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from loralab.generation import (
    available_memory_bytes,
    cache_key,
    choose_batch_size,
    generate_greedy,
    load_cached,
    save_cached,
)
from loralab.models.tiny import TINYLLAMA_CONFIG, build_tiny_llama
from loralab.runs.fingerprints import model_fingerprint

TEXTS = [
    "Give three tips for staying healthy.",
    "Eat a balanced diet and make sure to include plenty of fruits and vegetables.",
    "Exercise regularly to keep your body active and strong.",
    "Get enough sleep and maintain a consistent sleep schedule.",
    "What are the three primary colors? The three primary colors are red, blue and yellow.",
    "Describe the structure of an atom. An atom is made up of a nucleus and electrons.",
]
# Mixed lengths, so every batch below needs left padding.
PROMPT_LENGTHS = [2, 11, 5, 23, 8, 1, 16]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On models this small, syncing threads costs more than the matmuls: with 2 threads on 2 busy shared
    # cores this module ran ~10x slower than on 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), TEXTS, vocab_size=300, seed=0)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(model):
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    # Ids from 3 up skip <unk>, <s>, </s>.
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def argmax_continuation(model, prompt: list[int], steps: int) -> list[int]:
    """Reference greedy decoding: one unpadded sequence, the full forward pass at every step, no cache."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits  # (1, len(ids), vocab)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def references(model, prompts):
    return [argmax_continuation(model, prompt, MAX_NEW_TOKENS) for prompt in prompts]


def greedy(model, prompts, **kwargs):
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, eos_token_ids=[], progress=False)
    return generate_greedy(model, prompts, **(settings | kwargs))


@pytest.mark.parametrize("batch_size", [3, None])
def test_batched_greedy_equals_unpadded_argmax_loop(model, prompts, references, batch_size):
    outputs = greedy(model, prompts, batch_size=batch_size)
    assert outputs == references
    assert all(len(output) == MAX_NEW_TOKENS for output in outputs)


def test_prompts_prefilled_in_several_packed_rows_give_the_same_answers(model, prompts, references, monkeypatch):
    import loralab.generation

    monkeypatch.setattr(loralab.generation, "PREFILL_ROW_TOKENS", 20)  # the 7 prompts (66 tokens) take 5 rows
    assert loralab.generation._prefill_rows(PROMPT_LENGTHS, 20) == [[0, 1, 2], [3], [4, 5], [6]]
    assert greedy(model, prompts) == references


def test_a_model_without_per_example_attention_prefills_each_prompt_alone(model_dir, prompts, references):
    eager = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert greedy(eager, prompts, batch_size=4) == references
    assert eager.config._attn_implementation == "eager"


def test_cpu_linears_run_on_prepacked_onednn_weights_and_come_back_bit_identical(model_dir, prompts, references):
    from loralab.cpu.onednn_weights import onednn_of

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    linears = [m for m in fresh.modules() if type(m) is torch.nn.Linear]
    before = [m.weight.detach().clone() for m in linears]
    seen = []
    hook = linears[0].register_forward_pre_hook(lambda module, args: seen.append(onednn_of(module) is not None))
    try:
        assert greedy(fresh, prompts) == references
    finally:
        hook.remove()
    assert seen and all(seen)
    assert all(torch.equal(m.weight, w) and not m.weight.is_inference() for m, w in zip(linears, before, strict=False))
    fresh.model.layers[0].self_attn.q_proj.weight.data.add_(1.0)  # still a plain tensor, merges work on it


def test_the_model_is_back_on_sdpa_after_generating(model, prompts):
    greedy(model, prompts[:2])
    assert model.config._attn_implementation == "sdpa"


def test_each_sequence_stops_at_its_own_eos(model, prompts, references):
    # Stop token: what prompt A greedily produces at step k, absent from A's earlier steps and from
    # B's whole continuation, so only A stops (at k) and B, in the same batch, runs to the end.
    a, b = 3, 1
    step, stop = next(
        (k, token)
        for k, token in enumerate(references[a])
        if k >= 2 and token not in references[a][:k] and token not in references[b]
    )
    outputs = greedy(model, [prompts[a], prompts[b]], eos_token_ids=[stop], batch_size=2)
    assert outputs[0] == references[a][:step]
    assert outputs[1] == references[b]


def test_rejects_empty_prompts_and_bad_batch_size(model):
    assert greedy(model, []) == []
    with pytest.raises(ValueError, match="at least one token"):
        greedy(model, [[5, 6], []])
    with pytest.raises(ValueError, match="batch_size"):
        greedy(model, [[5, 6]], batch_size=0)


def test_progress_bar_counts_prompts(model, prompts, capsys):
    greedy(model, prompts, batch_size=4, progress=True, desc="base model")
    err = capsys.readouterr().err
    assert "base model" in err and f"{len(prompts)}/{len(prompts)}" in err


def test_training_mode_is_restored(model, prompts):
    model.train()
    try:
        greedy(model, prompts[:2], batch_size=2)
        assert model.training
    finally:
        model.eval()


def _perturbed_lora(model_dir, seed: int):
    """The tiny model in fp32 with LoRA on q/k/v/o whose B matrices are drawn with ``seed``: LoRA B starts at zero,
    which would make a merge trivially exact and the adapter a no-op."""
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return peft_model


def test_merged_lora_gives_the_same_greedy_outputs_as_the_peft_model(model_dir, prompts, references):
    peft_model = _perturbed_lora(model_dir, seed=1)
    unmerged = greedy(peft_model, prompts, batch_size=3)
    merged = greedy(peft_model.merge_and_unload().eval(), prompts, batch_size=3)
    assert merged == unmerged
    assert unmerged != references  # the perturbed adapter really changes the generations


def test_cache_key_changes_with_each_input_and_is_stable_otherwise():
    prompts, settings = [[1, 5, 9], [1, 7]], {"max_new_tokens": 64, "eos_token_ids": [2], "dtype": "bf16"}
    key = cache_key("local:abc", prompts, settings)
    assert key == cache_key("local:abc", [list(p) for p in prompts], dict(reversed(settings.items())))
    assert len(key) == 64 and int(key, 16) >= 0
    variants = [
        cache_key("local:abd", prompts, settings),
        cache_key("local:abc", [[1, 5, 9], [1, 8]], settings),
        cache_key("local:abc", [[1, 7], [1, 5, 9]], settings),
        cache_key("local:abc", prompts, settings | {"max_new_tokens": 65}),
        cache_key("local:abc", prompts, settings | {"eos_token_ids": [2, 3]}),
        cache_key("local:abc", prompts, settings | {"dtype": "fp32"}),
        cache_key("local:abc", prompts, settings | {"batch_size": 8}),
    ]
    assert len({key, *variants}) == len(variants) + 1


def test_cached_generations_round_trip(tmp_path):
    cache_dir = tmp_path / "cache" / "generations"
    outputs = [[4, 5, 6], [], [7]]
    assert load_cached(cache_dir, "a" * 64) is None
    path = save_cached(cache_dir, "a" * 64, outputs)
    assert path.parent == cache_dir and path.exists()
    assert load_cached(cache_dir, "a" * 64) == outputs
    assert load_cached(cache_dir, "b" * 64) is None
    save_cached(cache_dir, "a" * 64, [[1]])  # overwriting replaces the file whole
    assert load_cached(cache_dir, "a" * 64) == [[1]]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["a" * 64 + ".json"]  # no temp files left


def test_model_fingerprint_tracks_weight_files_and_config(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"0" * 100)
    first = model_fingerprint(str(tmp_path))
    assert model_fingerprint(str(tmp_path)) == first

    weights.write_bytes(b"1" * 101)  # new size
    second = model_fingerprint(str(tmp_path))
    assert second != first
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # same size, newer
    third = model_fingerprint(str(tmp_path))
    assert third != second
    (tmp_path / "adapter_model.bin").write_bytes(b"2")  # another weight file
    fourth = model_fingerprint(str(tmp_path))
    assert fourth != third
    (tmp_path / "config.json").write_text('{"hidden_size": 32}')
    assert model_fingerprint(str(tmp_path)) != fourth
    (tmp_path / "notes.txt").write_text("not a weight file")
    assert model_fingerprint(str(tmp_path)) == model_fingerprint(str(tmp_path))


def test_model_fingerprint_of_an_uncached_hub_id_is_the_id():
    assert model_fingerprint("loralab-tests/not-a-cached-model") == "hub:loralab-tests/not-a-cached-model"


def test_choose_batch_size_arithmetic_on_tinyllama_shape():
    config = LlamaConfig(**TINYLLAMA_CONFIG)
    kv_per_token = 2 * 22 * 4 * 64 * 2  # keys+values x layers x kv heads x head dim x bf16 bytes
    assert kv_per_token == 22_528
    per_sequence = kv_per_token * 512 + 32_000 * (2 + 4)  # KV for 512 tokens + bf16 and fp32 logits
    available = 2**30
    expected = int(0.4 * available) // per_sequence
    assert expected == 36
    assert choose_batch_size(config, 512, torch.bfloat16, available) == expected
    # fp32 doubles the KV cache.
    assert choose_batch_size(config, 512, torch.float32, available) == int(0.4 * available) // (
        2 * kv_per_token * 512 + 32_000 * 8
    )


def test_choose_batch_size_is_monotone_capped_and_at_least_one():
    config = LlamaConfig(**TINYLLAMA_CONFIG)
    sizes = [choose_batch_size(config, 1024, torch.bfloat16, gib * 2**30) for gib in (0, 0.01, 1, 2, 4, 8, 16, 64)]
    assert sizes == sorted(sizes)
    assert sizes[0] == sizes[1] == 1
    assert sizes[-1] == 128  # the cap: 64 held-out prompts and the 5 fixed ones decode as one batch
    assert choose_batch_size(config, 1024, torch.bfloat16, 2**40, cap=16) == 16


def test_available_memory_on_cpu_is_positive():
    assert available_memory_bytes("cpu") > 0


def test_head_sees_contiguous_inputs_and_no_hook_is_left_behind(model, prompts):
    head = model.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda module, args, output: seen.append(args[0].is_contiguous()))
    try:
        generate_greedy(model, prompts, max_new_tokens=3, eos_token_ids=[], batch_size=4, progress=False)
    finally:
        probe.remove()
    assert seen and all(seen)
    assert not head._forward_pre_hooks


def test_batched_merged_lora_equals_the_per_example_generate_loop_in_fp32(model_dir, prompts):
    """The notebook way (one `generate` call per prompt on the unmerged PeftModel) and loralab's batched,
    merged decoding give the same greedy tokens, every one (fp32)."""
    peft_model = _perturbed_lora(model_dir, seed=2)
    peft_model.eval()
    loop = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        loop.append(out[0, len(prompt):].tolist())
    batched = greedy(peft_model.merge_and_unload().eval(), prompts, batch_size=len(prompts))
    assert batched == loop
