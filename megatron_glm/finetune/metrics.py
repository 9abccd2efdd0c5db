"""Evaluation metrics of finetuned and zero-shot GLMs: classification, seq2seq, language model.

Scales: :func:`accuracy`, :func:`macro_f1` and :func:`exact_match` are fractions in [0, 1];
:func:`rouge` is x100 (the way summarisation papers report it); :func:`perplexity` is
``exp(mean loss)``. Every function refuses inputs that would make the figure mean nothing
(no rows, predictions and references of different lengths) rather than return 0 or NaN.

ROUGE is computed by Google's ``rouge-score`` package (the reference implementation the
summarisation literature uses), not re-implemented here: its tokenizer lowercases and keeps
only ASCII letters and digits, which suits English text (and is why a non-English text scores
0 against anything).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_pairs(what: str, predictions: Sequence[object], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError(f"{what}: no predictions to score")


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference label."""
    _check_pairs("accuracy", predictions, references)
    return sum(p == g for p, g in zip(predictions, references, strict=True)) / len(predictions)


def macro_f1(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean over ``labels`` of each label's F1 (sklearn's ``f1_score(...,
    average="macro", labels=labels, zero_division=0)``).

    A label never predicted, or never the reference, has F1 0 (it still counts in the mean:
    a classifier that ignores a class must not be rewarded for it). F1 is written
    ``2 tp / (2 tp + fp + fn)``, equal to the harmonic mean of precision and recall and defined
    (as 0) where either is 0/0. A prediction outside ``labels`` is a miss for its reference's
    label; a reference outside ``labels`` is an error (its class would silently drop out).
    """
    _check_pairs("macro_f1", predictions, references)
    if not labels:
        raise ValueError("macro_f1: empty label set")
    known = set(labels)
    unknown = sorted({g for g in references if g not in known})
    if unknown:
        raise ValueError(f"macro_f1: reference label(s) {unknown} not in the label set {labels}")
    scores = []
    for label in dict.fromkeys(labels):  # duplicates in ``labels`` count once
        tp = sum(p == label and g == label for p, g in zip(predictions, references, strict=True))
        fp = sum(p == label and g != label for p, g in zip(predictions, references, strict=True))
        fn = sum(p != label and g == label for p, g in zip(predictions, references, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def rouge(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True
) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of ``rouge-score``, averaged over the pairs, x100.

    ``use_stemmer`` (Porter, default on as in the summarisation papers' setting) makes
    ``"cats"`` match ``"cat"``. ROUGE-L is the sentence-level LCS (``rougeL``, not the
    newline-split ``rougeLsum``).
    """
    from rouge_score import rouge_scorer  # imports nltk: only when ROUGE is asked for

    _check_pairs("rouge", predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference once whitespace is normalised (runs of
    whitespace become one space, none at the ends); case and punctuation count."""
    _check_pairs("exact_match", predictions, references)
    hits = sum(
        " ".join(p.split()) == " ".join(g.split())
        for p, g in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def perplexity(sum_loss: float, num_tokens: int) -> float:
    """``exp(sum_loss / num_tokens)``: the perplexity of a per-token (natural log) loss sum.

    ``inf`` when the mean loss is beyond float range (an untrained model on long text can get
    there), never an OverflowError; ValueError for no tokens.
    """
    if num_tokens <= 0:
        raise ValueError(f"perplexity: needs at least one token, got {num_tokens}")
    try:
        return math.exp(sum_loss / num_tokens)
    except OverflowError:
        return math.inf
