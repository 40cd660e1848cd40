"""Text-overlap metrics for generated answers: BLEU (sacrebleu) and ROUGE F1 (rouge-score).

Pure functions: strings in, numbers out, every score on a 0-1 scale. The evaluate stage scores a
corpus with :func:`score_corpus` and each example with :func:`example_scores`.

Both metrics count n-gram overlap with a single reference answer. They reward wording close to that
reference; they do not measure correctness or helpfulness, and a correct paraphrase scores low.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    # One scorer (and stemmer) for the process: it keeps no state between calls.
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


@cache
def _bleu(tokenize: str, effective_order: bool) -> BLEU:
    # Stateless when references are passed with each call, so one instance per setting is safe to share.
    return BLEU(tokenize=tokenize, effective_order=effective_order)


def _check_pairs(hypotheses: list[str], references: list[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up")
    if not hypotheses:
        raise ValueError("nothing to score: no hypotheses and no references")


def _unit(score: float) -> float:
    # sacrebleu reports 0-100 and can land a hair above 100 (exp of a log sum); BLEU is at most 1.
    return min(score / 100.0, 1.0)


def corpus_bleu(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> float:
    """Corpus BLEU of ``hypotheses`` against one reference each, in [0, 1].

    Corpus BLEU pools n-gram counts over all pairs, so a corpus whose references are all shorter than
    four tokens scores 0 even when every hypothesis is exact (no 4-grams to match).
    """
    _check_pairs(hypotheses, references)
    return _unit(_bleu(tokenize, False).corpus_score(hypotheses, [references]).score)


def bleu_statistics(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> np.ndarray:
    """Per-pair BLEU statistics, (pairs, 10): system length, reference length, matched and total 1- to 4-grams,
    as corpus_bleu pools them (loralab.intervals recomputes corpus BLEU from resampled sums of these rows)."""
    _check_pairs(hypotheses, references)
    # sacrebleu's own extraction (a private method of its BLEU, stable through 2.x), so the n-grams are its own
    return np.array(_bleu(tokenize, False)._extract_corpus_statistics(hypotheses, [references]), dtype=np.float64)


def rouge_f1(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the pairs (Porter stemming on), keys ``rouge1``, ``rouge2``, ``rougeL``."""
    _check_pairs(hypotheses, references)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references, strict=False):
        # rouge-score's argument order is (target, prediction).
        scores = _rouge().score(reference, hypothesis)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(hypotheses) for key, total in totals.items()}


def example_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """Scores of one answer: sentence BLEU and ROUGE-1/2/L F1, keys ``bleu``, ``rouge1``, ``rouge2``, ``rougeL``.

    Sentence BLEU uses the effective order (n-gram orders the sentence is long enough to have), so a
    short exact answer still scores 1.
    """
    bleu = _unit(_bleu("13a", True).sentence_score(hypothesis, [reference]).score)
    rouge = _rouge().score(reference, hypothesis)
    return {"bleu": bleu, **{key: rouge[key].fmeasure for key in ROUGE_TYPES}}


def score_corpus(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and mean ROUGE F1 of paired answers, keys ``bleu``, ``rouge1``, ``rouge2``, ``rougeL``.

    BLEU here is corpus BLEU, not the mean of :func:`example_scores`' sentence BLEU; the two differ.
    """
    return {"bleu": corpus_bleu(hypotheses, references), **rouge_f1(hypotheses, references)}
