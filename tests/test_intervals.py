"""loralab.intervals: the paired bootstrap on each metric's change, base -> LoRA, and how the reports show it."""

from __future__ import annotations

import random

import pytest

from loralab.intervals import corpus_bleu_from_statistics, loss_changes, metric_changes
from loralab.metrics import bleu_statistics, corpus_bleu
from loralab.runs.readers import read_eval_results
from loralab.stages.evaluate import eval_results_csv
from loralab.stages.report import build_report

WORDS = "the a cat dog sat on mat ran fast slow red blue green house tree river stone light".split()


def _texts(n: int, seed: int, low: int = 1, high: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(low, high))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_bleu_from_pooled_statistics_is_sacrebleus(seed):
    refs = _texts(40, seed, 3)
    for hyps in (_texts(40, seed + 10), refs, ["x"] * 40, [r.split()[0] for r in refs]):
        assert float(corpus_bleu_from_statistics(bleu_statistics(hyps, refs).sum(axis=0))) == pytest.approx(
            corpus_bleu(hyps, refs), abs=1e-12)


def test_the_interval_covers_a_known_change_and_excludes_zero_when_it_is_large():
    refs = _texts(50, 0, 5)
    base = ["zzz"] * 50  # shares nothing with any reference: every score 0
    lora = [r if i < 30 else "zzz" for i, r in enumerate(refs)]  # exact on 30 of 50 prompts
    change = metric_changes(base, lora, refs)["rougeL"]
    assert change.delta == pytest.approx(30 / 50)
    assert change.low < 30 / 50 < change.high and change.low > 0 and change.distinguishable
    assert (change.better, change.worse, change.tied, change.prompts) == (0.6, 0.0, 0.4, 50)
    noisy = metric_changes(base, [r if i < 1 else "zzz" for i, r in enumerate(refs)], refs, seed=3)["rouge1"]
    assert noisy.low == 0.0 and not noisy.distinguishable  # one prompt in 50: resamples without it exist


def test_identical_answers_give_the_interval_zero_zero():
    refs, answers = _texts(20, 5, 3), _texts(20, 6)
    for change in metric_changes(answers, answers, refs).values():
        assert (change.delta, change.low, change.high, change.tied) == (0.0, 0.0, 0.0, 1.0)


def test_the_bootstrap_is_deterministic_under_its_seed():
    refs, base, lora = _texts(30, 7, 3), _texts(30, 8), _texts(30, 9)
    assert metric_changes(base, lora, refs, seed=4) == metric_changes(base, lora, refs, seed=4)
    assert metric_changes(base, lora, refs, seed=4)["bleu"] != metric_changes(base, lora, refs, seed=5)["bleu"]
    with pytest.raises(ValueError):
        metric_changes(base, lora[:-1], refs)


def test_eval_results_keep_their_columns_and_gain_the_interval(tmp_path):
    from test_report import write_run_dir

    refs, base, lora = _texts(30, 7, 3), _texts(30, 8), _texts(30, 9)
    changes = metric_changes(base, lora, refs)
    base_scores = {"bleu": 0.1, "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2, "eval_loss": 2.0}
    lora_scores = {"bleu": 0.1 + changes["bleu"].delta, "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2, "eval_loss": 1.5}
    text = eval_results_csv(base_scores, lora_scores, changes)
    assert text.splitlines()[0] == "metric,base,lora,change,change_low,change_high,lora_better,lora_worse,tied"
    run = write_run_dir(tmp_path / "run")
    (run / "eval_results.csv").write_text(text)
    results = read_eval_results(run / "eval_results.csv")
    assert results["rougeL"]["change_low"] == pytest.approx(changes["rougeL"].low, abs=1e-6)
    assert "change_low" not in results["eval_loss"] and results["eval_loss"]["change"] == pytest.approx(-0.5)
    report = build_report(run).read_text()
    assert "| Metric | Base | LoRA | Change | 95% interval |" in report
    assert "not distinguishable from noise on 8 held-out prompts" in report  # write_run_dir's 8 predictions
    assert "95% interval" in (run / "report.html").read_text()


def _example_losses(n: int, seed: int) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    counts = [rng.randint(5, 200) for _ in range(n)]
    return [(c * rng.uniform(1.0, 3.0), c) for c in counts]


def test_the_held_out_loss_interval_covers_a_known_change():
    """LoRA's loss 0.3 lower on every token: every resample's change is -0.3 (the interval is that point); on half
    the examples only, the interval holds the token-weighted change and not 0."""
    base = _example_losses(50, 0)
    lower = [(s - 0.3 * c, c) for s, c in base]
    change = loss_changes(base, lower)["eval_loss"]
    assert (change.delta, change.low, change.high) == pytest.approx((-0.3, -0.3, -0.3))
    assert (change.better, change.worse, change.tied) == (1.0, 0.0, 0.0)
    half = [(s - 0.3 * c, c) if i % 2 else (s, c) for i, (s, c) in enumerate(base)]
    expected = -0.3 * sum(c for i, (_, c) in enumerate(base) if i % 2) / sum(c for _, c in base)
    change = loss_changes(base, half, seed=5)["eval_loss"]
    assert change.delta == pytest.approx(expected)
    assert change.low < expected < change.high < 0 and change.distinguishable
    assert (change.better, change.worse, change.tied) == (0.5, 0.0, 0.5)
    perplexity = loss_changes(base, half, seed=5)["perplexity"]
    assert perplexity.high < 0 and perplexity.better == 0.5


def test_identical_losses_give_the_point_interval_zero_and_the_bootstrap_repeats_under_its_seed():
    base, other = _example_losses(30, 1), _example_losses(30, 2)
    other = [(s, c) for (s, _), (_, c) in zip(other, base, strict=True)]  # same token counts, other sums
    same = loss_changes(base, list(base))["eval_loss"]
    assert (same.delta, same.low, same.high, same.tied) == (0.0, 0.0, 0.0, 1.0) and not same.distinguishable
    assert loss_changes(base, other, seed=4) == loss_changes(base, other, seed=4)
    assert loss_changes(base, other, seed=4) != loss_changes(base, other, seed=5)


def test_the_held_out_loss_interval_refuses_examples_that_do_not_pair():
    base = _example_losses(5, 0)
    with pytest.raises(ValueError, match="same token counts"):
        loss_changes(base, [(s, c + 1) for s, c in base])
