"""Intervals on a metric's change, base -> LoRA: a paired bootstrap over the held-out prompts.

Each resample draws the prompts with replacement, the same draw for base and LoRA, and recomputes every metric
on it; the 95% interval of a change is the 2.5th to 97.5th percentile of its resampled changes. Corpus BLEU is
recomputed from per-prompt n-gram statistics pooled per resample (one matrix product), ROUGE as the mean of
per-prompt F1s, the held-out loss as the token-weighted mean of the drawn examples' loss sums (perplexity its exp).
Pure functions, numpy only: scipy.stats.bootstrap would add scipy, not otherwise a dependency,
for a percentile interval this short, and it would recompute corpus BLEU one resample at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loralab.metrics import ROUGE_TYPES, bleu_statistics, example_scores

RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Change:
    """A metric's change from base to LoRA over the held-out prompts, with its paired-bootstrap interval and how
    the prompts split: LoRA better, worse or tied (per prompt: sentence BLEU, or that prompt's ROUGE F1)."""

    delta: float
    low: float
    high: float
    better: float
    """Share of prompts where LoRA does better: a higher score, or (held-out loss, perplexity) a lower loss."""
    worse: float
    tied: float
    prompts: int

    @property
    def distinguishable(self) -> bool:
        """False when the interval holds 0: the change is not distinguishable from noise on this many prompts."""
        return not self.low <= 0.0 <= self.high


def corpus_bleu_from_statistics(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-1) of pooled sacrebleu statistics ``stats`` (..., 10): system length, reference length,
    matches and totals of 1- to 4-grams; the arithmetic of sacrebleu's BLEU.compute_bleu with its default
    "exp" smoothing, vectorised over the leading axes."""
    stats = np.asarray(stats, dtype=np.float64)
    sys_len, ref_len = stats[..., 0], stats[..., 1]
    correct, total = stats[..., 2:6], stats[..., 6:10]
    shorter = np.exp(1.0 - ref_len / np.maximum(sys_len, 1.0))
    bp = np.where(sys_len < ref_len, np.where(sys_len > 0, shorter, 0.0), 1.0)
    counted = np.cumprod(total > 0, axis=-1).astype(bool)  # sacrebleu stops at the first order with no n-grams
    zero = (correct == 0) & counted
    smooth = 2.0 ** np.cumsum(zero, axis=-1)  # "exp": each order without a match halves the one before
    safe_total = np.maximum(total, 1.0)
    precision = np.where(correct > 0, correct / safe_total, 1.0 / (smooth * safe_total))
    precision = np.where(counted, precision, 0.0)
    log_p = np.where(precision > 0, np.log(np.where(precision > 0, precision, 1.0)), -9999999999.0)
    score = bp * np.exp(log_p.mean(axis=-1))
    return np.minimum(np.where(correct.sum(axis=-1) > 0, score, 0.0), 1.0)


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n): how often each of ``n`` prompts is drawn in each resample (with replacement, seeded)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    weights = np.zeros((resamples, n))
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    return weights


def _change(base_stat: np.ndarray, lora_stat: np.ndarray, full_delta: float, per_base: np.ndarray,
            per_lora: np.ndarray, confidence: float, lower_is_better: bool = False) -> Change:
    deltas = lora_stat - base_stat
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(deltas, [tail, 100.0 - tail])
    n = len(per_base)
    higher, lower = float(np.sum(per_lora > per_base) / n), float(np.sum(per_lora < per_base) / n)
    better, worse = (lower, higher) if lower_is_better else (higher, lower)
    return Change(float(full_delta), float(low), float(high), better, worse, float(np.sum(per_lora == per_base) / n), n)


def metric_changes(base: list[str], lora: list[str], references: list[str], resamples: int = RESAMPLES,
                   seed: int = 0, confidence: float = CONFIDENCE,
                   scores: dict[str, list[dict[str, float]]] | None = None) -> dict[str, Change]:
    """The change of BLEU and ROUGE-1/2/L from ``base`` to ``lora`` answers (paired with ``references``), each
    with its paired-bootstrap interval: the same resampled prompts for both sides, deterministic under ``seed``.
    ``scores``: each side's metrics.example_scores per prompt where the caller has them (else computed here)."""
    n = len(references)
    if not n or len(base) != n or len(lora) != n:
        raise ValueError("metric_changes needs one base and one LoRA answer per reference, and at least one")
    weights = resample_weights(n, resamples, seed)
    per = scores or {side: [example_scores(h, r) for h, r in zip(answers, references, strict=True)]
                     for side, answers in (("base", base), ("lora", lora))}
    changes = {}
    stats = {side: bleu_statistics(answers, references) for side, answers in (("base", base), ("lora", lora))}
    full = {side: float(corpus_bleu_from_statistics(s.sum(axis=0))) for side, s in stats.items()}
    sentence = {side: np.array([s["bleu"] for s in per[side]]) for side in per}
    changes["bleu"] = _change(corpus_bleu_from_statistics(weights @ stats["base"]),
                              corpus_bleu_from_statistics(weights @ stats["lora"]), full["lora"] - full["base"],
                              sentence["base"], sentence["lora"], confidence)
    for key in ROUGE_TYPES:
        b, lo = (np.array([s[key] for s in per[side]]) for side in ("base", "lora"))
        changes[key] = _change(weights @ b / n, weights @ lo / n, float(lo.mean() - b.mean()), b, lo, confidence)
    return changes


def loss_changes(base: list[tuple[float, int]], lora: list[tuple[float, int]], resamples: int = RESAMPLES,
                 seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, Change]:
    """The change of the held-out loss and perplexity from base to LoRA, each with its paired-bootstrap interval.
    ``base`` and ``lora``: each held-out example's (summed response loss, trained tokens), in the same order; a
    resample's loss is the token-weighted mean over the examples it draws, as the held-out loss itself is. Per
    example, LoRA is better where its mean loss on that example is lower. Deterministic under ``seed``."""
    n = len(base)
    if not n or len(lora) != n or any(b[1] != lo[1] for b, lo in zip(base, lora, strict=True)):
        raise ValueError("loss_changes needs the same examples, with the same token counts, on both sides")
    sums = {side: np.array([s for s, _ in pairs], dtype=np.float64) for side, pairs in (("base", base), ("lora", lora))}
    counts = np.array([c for _, c in base], dtype=np.float64)
    weights = resample_weights(n, resamples, seed)
    drawn = np.maximum(weights @ counts, 1.0)
    loss = {side: weights @ s / drawn for side, s in sums.items()}
    full = {side: float(s.sum() / max(counts.sum(), 1.0)) for side, s in sums.items()}
    per = {side: s / np.maximum(counts, 1.0) for side, s in sums.items()}
    return {
        "eval_loss": _change(loss["base"], loss["lora"], full["lora"] - full["base"], per["base"], per["lora"],
                             confidence, lower_is_better=True),
        "perplexity": _change(np.exp(loss["base"]), np.exp(loss["lora"]),
                              float(np.exp(full["lora"]) - np.exp(full["base"])), per["base"], per["lora"], confidence,
                              lower_is_better=True),
    }
