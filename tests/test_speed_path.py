"""cpu.speed_path: the catalogue's pieces switched on for a model and off again, for training and for inference;
inference on a GPU switches nothing on (per-example attention is a CPU piece)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loralab.cpu import attention, catalogue
from loralab.cpu import speed_path as sp
from loralab.cpu.onednn_weights import onednn_weights_available
from loralab.generation import generate_greedy
from loralab.models.tiny import build_tiny_llama

TEXTS = ["Give three tips for staying healthy.", "Eat a balanced diet with plenty of fruits and vegetables."]


@pytest.fixture(scope="module")
def model():
    import tempfile
    from pathlib import Path

    folder = build_tiny_llama(Path(tempfile.mkdtemp()), TEXTS, vocab_size=200, seed=0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _prompts(model, lengths=(3, 9, 5)):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def test_inference_on_a_cpu_attends_per_example_and_prepacks_then_puts_everything_back(model):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with sp.inference_path(model, rows_hint=16) as switched:
        assert switched.per_example_attention
        assert model.config._attn_implementation == attention.PER_EXAMPLE_ATTENTION
        assert (switched.onednn_weights > 0) is onednn_weights_available(torch.float32)  # every linear, prepacked
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_inference_on_a_simulated_gpu_switches_nothing_on(model, monkeypatch):
    monkeypatch.setattr(sp, "model_device_type", lambda m: "cuda")
    calls = []
    monkeypatch.setattr(attention, "use_per_example_attention", lambda m: calls.append(m) or True)
    with sp.inference_path(model, rows_hint=16) as switched:
        assert switched == sp.Switched(False, 0, 0, None, 0)
        assert model.config._attn_implementation == "sdpa"
    assert calls == []


def test_generation_on_a_simulated_gpu_never_turns_per_example_attention_on(model, monkeypatch):
    prompts = _prompts(model)
    settings = dict(max_new_tokens=6, eos_token_ids=[], progress=False)
    on_cpu = generate_greedy(model, prompts, **settings)
    monkeypatch.setattr(sp, "model_device_type", lambda m: "cuda")
    calls = []
    real = attention.use_per_example_attention
    monkeypatch.setattr(attention, "use_per_example_attention", lambda m: calls.append(m) or real(m))
    assert generate_greedy(model, prompts, **settings) == on_cpu  # each prompt prefilled alone, same answers
    assert calls == []


def test_the_catalogue_has_no_inference_pieces_off_a_cpu():
    assert catalogue.inference_pieces("cpu") == catalogue.INFERENCE
    assert catalogue.inference_pieces("cuda") is None and catalogue.inference_pieces("mps") is None


def test_training_pieces_fall_back_to_the_measured_entry_of_the_same_precision():
    assert catalogue.training_pieces("bf16", True) is catalogue.TRAINING[(True, "bf16")]
    assert catalogue.training_pieces("fp32", True) is catalogue.TRAINING[(False, "fp32")]
    assert catalogue.training_pieces("fp16", True) is catalogue.ALL_PIECES
