"""Finetuning metrics (megatron_glm.finetune.metrics) against hand-computed figures, and ROUGE
against the ``rouge-score`` package it wraps."""

from __future__ import annotations

import math

import pytest

from megatron_glm.finetune.metrics import accuracy, exact_match, macro_f1, perplexity, rouge

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

PAIRS = [  # (prediction, reference)
    ("the cat is on the mat", "the cat sat on the mat"),
    ("a b c d", "a c"),
    ("The Cat!", "the cat"),
    ("cats running", "cat runs"),
    ("Return the list of all open files, in the order they were opened.", "Return open files."),
    ("nothing in common", "entirely different words"),
]


def test_rouge_is_rouge_scores_mean_fmeasure_times_100() -> None:
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    for stem in (True, False):
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
        scores = [scorer.score(r, p) for p, r in PAIRS]
        want = {k: 100 * sum(s[k].fmeasure for s in scores) / len(PAIRS) for k in scores[0]}
        got = rouge(preds, refs, use_stemmer=stem)
        assert got.keys() == want.keys() == {"rouge1", "rouge2", "rougeL"}
        assert all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)


@pytest.mark.parametrize(
    ("pair", "stem", "want"),
    [
        # unigrams: the x2, cat, on, mat shared of 6 each -> 5/6; bigrams the-cat, on-the,
        # the-mat of 5 each -> 3/5; LCS "the cat on the mat" = 5 -> 5/6
        (PAIRS[0], True, (500 / 6, 60.0, 500 / 6)),
        # P = 2/4, R = 2/2 -> F = 2/3; no shared bigram; LCS "a c" = 2 -> 2/3
        (PAIRS[1], True, (200 / 3, 0.0, 200 / 3)),
        (PAIRS[2], True, (100.0, 100.0, 100.0)),  # lowercased, punctuation dropped
        (PAIRS[3], True, (100.0, 100.0, 100.0)),  # Porter: cats -> cat, running/runs -> run
        (PAIRS[3], False, (0.0, 0.0, 0.0)),
    ],
)
def test_rouge_hand_computed(pair: tuple[str, str], stem: bool, want: tuple[float, ...]) -> None:
    got = rouge([pair[0]], [pair[1]], use_stemmer=stem)
    assert (got["rouge1"], got["rouge2"], got["rougeL"]) == pytest.approx(want, rel=1e-12)


def test_rouge_averages_over_pairs() -> None:
    got = rouge([PAIRS[0][0], PAIRS[1][0]], [PAIRS[0][1], PAIRS[1][1]])
    assert got["rouge2"] == pytest.approx((60.0 + 0.0) / 2)
    assert got["rouge1"] == pytest.approx((500 / 6 + 200 / 3) / 2)


def test_macro_f1_and_accuracy_hand_built() -> None:
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    # a: tp 1 fp 1 fn 1 -> 2/4; b: tp 2 fp 1 fn 0 -> 4/5; c: never predicted -> 0
    assert macro_f1(pred, gold, ["a", "b", "c"]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # a label neither predicted nor gold counts 0 in the mean (sklearn, zero_division=0)
    assert macro_f1(pred, gold, ["a", "b", "c", "d"]) == pytest.approx((0.5 + 0.8) / 4)
    # a prediction outside the label set is a miss for its reference's class
    assert macro_f1(["a", "zzz"], ["a", "b"], ["a", "b"]) == pytest.approx((1.0 + 0.0) / 2)
    assert macro_f1(gold, gold, ["a", "b", "c"]) == 1.0
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    assert accuracy(["x"], ["y"]) == 0.0


def test_exact_match_normalises_whitespace_only() -> None:
    pred = ["a  b\n", "A b", " c ", "d."]
    gold = ["a b", "a b", "c", "d"]
    assert exact_match(pred, gold) == pytest.approx(2 / 4)


def test_perplexity_is_exp_of_the_mean() -> None:
    assert perplexity(12.0, 4) == pytest.approx(math.exp(3.0), rel=1e-15)
    assert perplexity(0.0, 7) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="at least one token, got 0"):
        perplexity(1.0, 0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="accuracy: 2 predictions but 1 references"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="rouge: no predictions"):
        rouge([], [])
    with pytest.raises(ValueError, match=r"reference label\(s\) \['z'\] not in the label set"):
        macro_f1(["a"], ["z"], ["a", "b"])
    with pytest.raises(ValueError, match="empty label set"):
        macro_f1(["a"], ["a"], [])
