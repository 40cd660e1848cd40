"""The held-out loss: one forward pass over every example, the same value however the examples are packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loralab import IGNORE_INDEX
from loralab.loss import heldout_example_losses, heldout_loss


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def examples(model):
    generator = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in [(40, 10), (7, 3), (90, 30), (25, 24), (60, 5)]:
        ids = torch.randint(3, model.config.vocab_size, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def reference_example_losses(model, examples) -> list[tuple[float, int]]:
    """Each example alone through the model's own forward and full logits: its summed CE and trained tokens."""
    out = []
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex["input_ids"]])).logits[0, :-1]  # (L-1, vocab)
            targets = torch.tensor(ex["labels"][1:])
            out.append((F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item(),
                        int((targets != IGNORE_INDEX).sum())))
    return out


def reference_loss(model, examples) -> float:
    """Token-weighted mean CE of reference_example_losses."""
    pairs = reference_example_losses(model, examples)
    return sum(s for s, _ in pairs) / sum(c for _, c in pairs)


@pytest.mark.parametrize("max_tokens", [1, 64, 100, 4096])
def test_heldout_loss_equals_the_per_example_full_logits_loss(model, examples, max_tokens):
    expected = reference_loss(model, examples)
    assert heldout_loss(model, examples, "cpu", max_tokens=max_tokens) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("max_tokens", [1, 64, 4096])
def test_per_example_losses_are_each_examples_own_however_they_are_packed(model, examples, max_tokens):
    """The sums the held-out loss's interval resamples: one per example, in order, packed or not."""
    got = heldout_example_losses(model, examples, "cpu", max_tokens=max_tokens)
    expected = reference_example_losses(model, examples)
    trained = [sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in examples]
    assert [c for _, c in got] == [c for _, c in expected] == trained
    assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], rel=1e-5)


def test_heldout_loss_progress_bar_counts_tokens_and_restores_training_mode(model, examples, capsys):
    model.train()
    try:
        heldout_loss(model, examples, "cpu", max_tokens=64, progress=True, desc="held-out check")
        assert model.training
    finally:
        model.eval()
    err = capsys.readouterr().err
    total = sum(len(ex["input_ids"]) for ex in examples)
    assert "held-out check" in err and f"{total}/{total}" in err


def test_eval_heldout_loss_runs_on_onednn_prepacked_weights_and_puts_them_back(model, examples, monkeypatch):
    """eval's held-out loss (fp32, CPU): the same value as the plain weights give, through oneDNN's layout, and every
    weight bit-identical afterwards."""
    from loralab import loss
    from loralab.cpu.onednn_weights import onednn_of, onednn_weights_available
    from loralab.stages import evaluate

    if not onednn_weights_available(torch.float32):
        pytest.skip("this PyTorch has no oneDNN linear ops")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layouts = []

    def recording(model_, *args, **kwargs):
        layouts.append(sum(onednn_of(m) is not None for m in model_.modules()))
        return loss.heldout_example_losses(model_, *args, **kwargs)

    monkeypatch.setattr(evaluate, "heldout_example_losses", recording)
    value = loss.mean_loss(evaluate._heldout_losses(model, examples, "cpu", "held-out check"))
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert not model.config.tie_word_embeddings and layouts == [linears]  # every linear, the head too
    assert value == pytest.approx(reference_loss(model, examples), rel=1e-5)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(onednn_of(m) is not None for m in model.modules())
