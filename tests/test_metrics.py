"""Metrics against their definitions: exact ends (identical 1, disjoint 0) and the libraries' own numbers."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from loralab.metrics import corpus_bleu, example_scores, rouge_f1, score_corpus

HYPOTHESES = [
    "The cat sat on the mat near the door.",
    "Paris is the capital city of France.",
    "Water boils at one hundred degrees.",
]
REFERENCES = [
    "A cat was sitting on the mat by the door.",
    "The capital of France is Paris.",
    "At sea level water boils at 100 degrees Celsius.",
]


def test_identical_strings_score_one():
    sentence = "the quick brown fox jumps over the lazy dog"
    assert corpus_bleu([sentence, sentence], [sentence, sentence]) == pytest.approx(1.0)
    assert score_corpus([sentence], [sentence]) == pytest.approx(
        {"bleu": 1.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    assert example_scores(sentence, sentence) == pytest.approx(
        {"bleu": 1.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_scores_stay_within_unit_interval():
    sentence = "the cat sat on the mat"
    assert corpus_bleu([sentence], [sentence]) <= 1.0
    assert example_scores(sentence, sentence)["bleu"] <= 1.0


def test_short_exact_answer_scores_one_per_example():
    # Effective order: a two-word answer has no 3- or 4-grams, and must not be punished for it.
    assert example_scores("Paris.", "Paris.")["bleu"] == pytest.approx(1.0)


def test_disjoint_strings_score_zero():
    hypothesis, reference = "alpha beta gamma delta epsilon", "one two three four five"
    assert score_corpus([hypothesis], [reference]) == {"bleu": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert example_scores(hypothesis, reference) == {"bleu": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_corpus_bleu_equals_sacrebleu():
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], tokenize="13a").score / 100
    assert 0.0 < expected < 1.0
    assert corpus_bleu(HYPOTHESES, REFERENCES) == pytest.approx(expected)


def test_rouge_equals_rouge_score_mean():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(ref, hyp) for hyp, ref in zip(HYPOTHESES, REFERENCES, strict=False)]
    expected = {key: sum(s[key].fmeasure for s in per_pair) / len(per_pair) for key in ("rouge1", "rouge2", "rougeL")}
    assert rouge_f1(HYPOTHESES, REFERENCES) == pytest.approx(expected)
    assert score_corpus(HYPOTHESES, REFERENCES) == pytest.approx(
        {"bleu": sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score / 100, **expected}
    )


def test_example_scores_equal_libraries():
    hyp, ref = HYPOTHESES[0], REFERENCES[0]
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, hyp)
    assert example_scores(hyp, ref) == pytest.approx(
        {
            "bleu": sacrebleu.sentence_bleu(hyp, [ref]).score / 100,
            "rouge1": rouge["rouge1"].fmeasure,
            "rouge2": rouge["rouge2"].fmeasure,
            "rougeL": rouge["rougeL"].fmeasure,
        }
    )


def test_rouge_stems_words():
    # "running" and "runs" share the stem "run": a match only with stemming on.
    scores = rouge_f1(["the dog running"], ["the dog runs"])
    assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_empty_hypothesis_scores_zero():
    assert example_scores("", "a full reference answer here") == {"bleu": 0.0, "rouge1": 0.0, "rouge2": 0.0,
                                                                 "rougeL": 0.0}
    assert score_corpus([""], ["a full reference answer here"]) == {"bleu": 0.0, "rouge1": 0.0, "rouge2": 0.0,
                                                                   "rougeL": 0.0}
    # One empty answer in a corpus lowers the scores without breaking them.
    mixed = score_corpus(["the cat sat on the mat", ""], ["the cat sat on the mat", "a dog"])
    assert 0.0 < mixed["bleu"] < 1.0
    assert mixed["rouge1"] == pytest.approx(0.5)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        score_corpus(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])
    with pytest.raises(ValueError):
        rouge_f1([], ["a"])


def test_empty_corpus_raises():
    with pytest.raises(ValueError, match="nothing to score"):
        score_corpus([], [])
