"""Sentence splitter: exact cases, and both implementations (the compiled one and the vectorised
numpy one, every test runs on each) against a plain character loop."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

import megatron_glm.data.sentence_split as module
from megatron_glm.data.sentence_split import split_sentences, split_sentences_batch


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test on the compiled splitter and on the numpy one (NATIVE unset)."""
    if request.param == "compiled":
        assert module.NATIVE is not None, "megatron_glm.data._native was not built"
    else:
        monkeypatch.setattr(module, "NATIVE", None)
    return request.param


ASCII_T = set(".?!;:")
CJK_T = set("。？！；：")
CLOSE = set("\"')]}’”»」』）】》")
BREAKS = set("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def reference_split(text: str) -> list[str]:
    """The module docstring's rules, one character at a time (independent of the library): where
    each sentence's content ends, then the text cut there (the last piece runs to its end)."""
    ends: list[int] = []

    def segment(a: int, b: int) -> None:  # text[a:b] lies between two boundaries
        content = text[a:b].rstrip()
        if content.strip():
            ends.append(a + len(content))

    seg, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in BREAKS:
            segment(seg, i)
            seg = i = i + 1
        elif c in CJK_T:
            j = i
            while j < n and text[j] in CJK_T:
                j += 1
            while j < n and text[j] in CLOSE:
                j += 1
            segment(seg, j)
            seg = i = j
        elif c in ASCII_T:
            j = i
            while j < n and text[j] in ASCII_T:
                j += 1
            k = j
            while k < n and text[k] in CLOSE:
                k += 1
            if k == n or text[k].isspace():
                segment(seg, k)
                seg = i = k
            else:  # not a boundary: the terminators are ordinary characters
                i = j
        else:
            i += 1
    segment(seg, n)
    cuts = [0, *ends[:-1], n]
    return [text[a:b] for a, b in itertools.pairwise(cuts)] if ends else []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. This is it", ["Hello world.", " This is it"]),
        ("Pi is 3.14, e.g. this: yes", ["Pi is 3.14, e.g.", " this:", " yes"]),
        ('He said "Stop!" Then left.', ['He said "Stop!"', " Then left."]),
        ("Really?!  (Yes.) No", ["Really?!", "  (Yes.)", " No"]),
        ("Wait... what? ok", ["Wait...", " what?", " ok"]),
        ("http://a.b/c?x=1 ok", ["http://a.b/c?x=1 ok"]),
        (
            "line one\nline two\r\n\n  line three  ",
            ["line one", "\nline two", "\r\n\n  line three  "],
        ),
        ("First one.\n\n    Second.", ["First one.", "\n\n    Second."]),
        ("  lead. trail  ", ["  lead.", " trail  "]),
        ("a   \nb", ["a", "   \nb"]),
        ("你好。世界！「好」。结束", ["你好。", "世界！", "「好」。", "结束"]),
        ("他说：「走。」然后", ["他说：", "「走。」", "然后"]),
        ("a。. b", ["a。", ".", " b"]),
        ("a.。b", ["a.。", "b"]),
        ("tab\tinside. x\u3000y\u2028z", ["tab\tinside.", " x\u3000y", "\u2028z"]),
        ("   \n\t ", []),
        ("", []),
        ("no terminator", ["no terminator"]),
        ("end.", ["end."]),
        ("a.)x b", ["a.)x b"]),
        ("a.)) b", ["a.))", " b"]),
    ],
)
def test_cases(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected
    assert reference_split(text) == expected


ALPHABET = "ab Z1." + ".?!;:" + "。？！；：" + "\"')」）”" + " \t\n\r\u3000\u2028\x85" + "中é😀"


def _random_text(rng: random.Random, alphabet: str = ALPHABET) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


@pytest.mark.parametrize("alphabet", [ALPHABET, ALPHABET + "\x00"], ids=["plain", "with-NUL"])
def test_matches_reference_on_random_texts(alphabet: str) -> None:
    """Random texts over the characters that matter (NUL too: it is an ordinary character)."""
    rng = random.Random(1234)
    texts = [_random_text(rng, alphabet) for _ in range(3000)]
    sentences, counts = split_sentences_batch(texts)
    expected = [reference_split(t) for t in texts]
    assert counts.tolist() == [len(e) for e in expected]
    assert sentences == [s for e in expected for s in e]


def test_ascii_batch_matches_reference() -> None:
    """Pure-ASCII batches take the one-byte path; same results."""
    rng = random.Random(99)
    alphabet = "ab Z1.?!;:\"')] \t\n\r\x0b\x0c\x1c"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    assert all(t.isascii() for t in texts)
    sentences, counts = split_sentences_batch(texts)
    expected = [reference_split(t) for t in texts]
    assert counts.tolist() == [len(e) for e in expected]
    assert sentences == [s for e in expected for s in e]


def test_sentences_concatenate_to_the_text() -> None:
    """Nothing is dropped: the sentences are the text; each has content, ends with it (but the
    last), and only whitespace comes before its content."""
    rng = random.Random(7)
    for _ in range(500):
        text = _random_text(rng)
        sentences = split_sentences(text)
        if not text.strip():
            assert sentences == []
            continue
        assert "".join(sentences) == text
        assert all(s.strip() for s in sentences)
        assert all(not s[-1].isspace() for s in sentences[:-1])


def test_batch_edge_cases() -> None:
    s, c = split_sentences_batch([])
    assert s == [] and c.dtype == np.int64 and c.tolist() == []
    s, c = split_sentences_batch(["", " ", "a. b", ""])
    assert s == ["a.", " b"] and c.tolist() == [0, 0, 2, 0]
    # lone surrogates (possible from JSON escapes) pass through unchanged
    assert split_sentences("x\ud800. y") == ["x\ud800.", " y"]


def test_sub_batches_and_mixed_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny internal sub-batches (many of them) and mixed ASCII/non-ASCII batches agree."""
    rng = random.Random(5)
    texts = [_random_text(rng) for _ in range(400)] + ["plain ascii. two"] * 50
    rng.shuffle(texts)
    expected = [reference_split(t) for t in texts]
    monkeypatch.setattr(module, "_BATCH_CHARS", 64)
    sentences, counts = split_sentences_batch(texts)
    assert counts.tolist() == [len(e) for e in expected]
    assert sentences == [s for e in expected for s in e]


@pytest.mark.parametrize(
    "text",
    [
        "a." + ")" * 20 + " b",
        "a" + ")" * 20 + " b",
        ")" * 20 + " b. c",
        "好。" + "」" * 20 + "下",
        "x " + "'" * 200_000 + ". y",
        "x." + '"' * 200_000 + " y",
        "x" + " " * 200_000 + "\n y",
        "\n" * 20 + "a\n" + "\n \t" * 20 + "\nb" + "\u2028" * 30,
    ],
    ids=[
        "ascii",
        "no-terminator",
        "at-start",
        "cjk",
        "long-run-plain",
        "long-run-boundary",
        "long-space-before-break",
        "blank-lines",
    ],
)
def test_long_runs(text: str) -> None:
    """Runs of closers, or of whitespace before a line break, longer than the sparse walk take
    the dense path; same rules."""
    assert split_sentences(text) == reference_split(text)
