"""Rule-based sentence splitter (no NLTK, no downloads), vectorised over a batch of texts.

GLM's sentence objective needs reasonable sentence boundaries, and a corpus must split the same
way on every machine, so this is a fixed rule rather than a trained model.

Rules (the test module restates them as a plain character loop and checks this code against it):

* **ASCII terminators** ``. ? ! ; :``: a run of them, followed by any closing quotes/brackets
  (``" ' ’ ” ) ] } » 」 』 ） 】 》``), ends a sentence **when whitespace or the end of the text
  follows**. Requiring the whitespace keeps ``3.14``, ``a:b``, ``http://x.y`` and ``...and``
  whole; abbreviations such as ``e.g. this`` do split (the price of having no language model).
* **CJK terminators** ``。 ？ ！ ； ：``: a run of them, with the closers right after, ends a
  sentence whether or not whitespace follows (CJK text has no spaces).
* **Line breaks** end a sentence: every character at which ``str.splitlines`` breaks
  (``\\n \\r \\v \\f \\x1c \\x1d \\x1e \\x85 \\u2028 \\u2029``).

Nothing is dropped: a sentence is its content (from its first to its last non-whitespace
character) and the whitespace (``str.isspace``) before it. The whitespace between two sentences,
line breaks and indentation included, begins the later one; the text's leading whitespace begins
its first sentence and its trailing whitespace ends its last. So ``"".join(sentences) == text``
for every text with a non-whitespace character; a text of whitespace only has no sentences, and
a text without terminators or line breaks is one sentence. Whitespace goes *before* a sentence,
not after the one it follows, because SentencePiece marks a word's start with the space before
it (``▁word``): a sentence that begins with its space encodes to the pieces the whole document
has there, where a trailing space would become a lone ``▁`` piece and the next word a rarer one
without its ``▁`` (token counts of both choices: docs/benchmarks.md; see
:meth:`megatron_glm.data.tokenizer.GLMTokenizer.encode_pieces`).

Two implementations, kept equal by the tests: a C one in :mod:`megatron_glm.data.native` (one
pass per text; used when it was built), and the vectorised numpy one below. Why not a regex: in
the preprocessor the splitter competes with SentencePiece for the same CPU, and a one-regex
splitter of these rules (``re`` tries its alternatives at every word) costs more CPU than
SentencePiece's encode of the sentences (``tools/bench/bench_preprocess.py --stages`` prints
all three against the encode; figures in docs/benchmarks.md). Here the batch
is joined into one string, each character is classified by a table lookup (one byte per character
for ASCII batches, ``str.isascii`` is O(1); UTF-32 code points otherwise), the few candidate
positions (terminators, closers, line breaks) are examined as sparse index arrays to find where
each sentence's content ends, and the sentences are sliced from the joined string: Python does
no per-character work and one slice per sentence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_glm.data.native import NATIVE

__all__ = [
    "ASCII_TERMINATORS",
    "CJK_TERMINATORS",
    "CLOSERS",
    "LINE_BREAKS",
    "split_sentences",
    "split_sentences_batch",
]

ASCII_TERMINATORS = ".?!;:"
CJK_TERMINATORS = "。？！；："
CLOSERS = "\"')]}\u2019\u201d\u00bb\u300d\u300f\uff09\u3011\u300b"
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # exactly where str.splitlines breaks

# Character class bits.
_WS, _LB, _AT, _CT, _CL = 1, 2, 4, 8, 16
# Past the BMP there is no whitespace, terminator or closer: clip code points to this table size.
_TABLE_SIZE = 0x10000


def _class_table() -> np.ndarray:
    """uint8 [65536]: the class bits of every BMP code point (read-only constant)."""
    table = np.zeros(_TABLE_SIZE, dtype=np.uint8)
    table[[c for c in range(0x3001) if chr(c).isspace()]] |= _WS  # no whitespace above U+3000
    for chars, bit in (
        (LINE_BREAKS, _LB),
        (ASCII_TERMINATORS, _AT),
        (CJK_TERMINATORS, _CT),
        (CLOSERS, _CL),
    ):
        table[[ord(c) for c in chars]] |= bit
    table.flags.writeable = False
    return table


_CLASS = _class_table()


_BATCH_CHARS = 1 << 17
"""Characters per internal sub-batch: large enough to amortise numpy call overheads, small
enough for the working arrays to stay in cache."""


def _classify(big: str) -> np.ndarray:
    """The class bits of the characters of ``big`` as uint8 [len(big) + 1], with a whitespace and
    line-break sentinel at the end. Looked up by code unit: one byte per character for ASCII,
    else UTF-32 code points (clipped to the table: nothing above it has a class)."""
    if big.isascii():
        lookup: np.ndarray = np.frombuffer(big.encode("ascii"), dtype=np.uint8)
    else:
        codes = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        lookup = np.minimum(codes, _TABLE_SIZE - 1)
    cls = np.empty(len(lookup) + 1, dtype=np.uint8)
    np.take(_CLASS, lookup, out=cls[:-1])
    cls[-1] = _WS | _LB
    return cls


_WALK_STEPS = 8
"""Characters walked back one step at a time before switching to a dense pass (long runs only)."""


def _skip_back(cls: np.ndarray, pos: np.ndarray, bits: int) -> np.ndarray:
    """int64 [m]: for each position (>= 0), the last one at or before it whose class has none of
    ``bits``; -1 if there is none (reading ``cls[-1]``, the sentinel, which is no terminator).

    Runs of closers, and of whitespace before a line break, are short in real text, so a few
    sparse steps settle almost every position; any longer run is resolved by one dense "last
    position without the bits so far" scan, so adversarial input (a million ``)``) stays linear.
    """
    at = pos.copy()
    active = np.flatnonzero((cls[at] & bits) != 0)
    for _ in range(_WALK_STEPS):
        if not len(active):
            return at
        at[active] -= 1
        active = active[(at[active] >= 0) & ((cls[at[active]] & bits) != 0)]
    if len(active):
        body = cls[:-1]
        last_without = np.maximum.accumulate(np.where((body & bits) != 0, -1, np.arange(len(body))))
        at[active] = last_without[at[active]]
    return at


def _terminator_ends(cls: np.ndarray, cjk: bool) -> np.ndarray:
    """int64 [k]: where the terminator rules end a sentence's content (one past its last
    character, a terminator or closer). Only candidates (terminators and closers, a few percent
    of the text) are examined, as sparse index arrays."""
    pos = np.flatnonzero((cls[:-1] & (_AT | _CT | _CL if cjk else _AT | _CL)) != 0)  # [m]
    own, nxt = cls[pos], cls[pos + 1]
    # A terminator run + closers can end at p only if the next char continues neither.
    can_end = (nxt & _WS) != 0
    if cjk:
        can_end |= ((nxt & _CL) == 0) & (((own & _CT) == 0) | ((nxt & _CT) == 0))
    pos, nxt = pos[can_end], nxt[can_end]
    anchor = cls[_skip_back(cls, pos, _CL)]
    cut = ((anchor & _AT) != 0) & ((nxt & _WS) != 0)
    if cjk:
        cut |= (
            ((anchor & _CT) != 0)
            & ((nxt & _CL) == 0)
            & (((cls[pos] & _CT) == 0) | ((nxt & _CT) == 0))
        )
    return pos[cut] + 1


def _content_ends(cls: np.ndarray, cjk: bool) -> np.ndarray:
    """int64 [k]: one past the last character of each sentence's content, sorted.

    A content ends where a terminator rule ends a sentence, and at the last non-whitespace
    character before each line break (the sentinel, a line break, ends the last one); several
    line breaks in one run of whitespace end the same content. Sparse: only terminators,
    closers and line breaks are looked at.
    """
    breaks = np.flatnonzero((cls & _LB) != 0)  # [b], the sentinel included
    before = _skip_back(cls, breaks[breaks > 0] - 1, _WS)
    ends = np.sort(np.concatenate([before[before >= 0] + 1, _terminator_ends(cls, cjk)]))
    new = np.ones(len(ends), dtype=bool)  # sort + this mask: several times np.unique's speed
    np.not_equal(ends[1:], ends[:-1], out=new[1:])
    return ends[new]


def _split_joined(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Split texts that are all ASCII or all not (one code-unit width for the whole batch).

    The texts are joined by line breaks (a line break ends a sentence's content, so texts stay
    apart) and the content ends of all sentences found at once. Each sentence runs from the
    previous content end of its text (or the text's start) to its own content end (or, the last
    one, to the text's end), and is one slice of the joined string.
    """
    big = "\n".join(texts)
    ends = _content_ends(_classify(big), cjk=not big.isascii())  # [k]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    starts = np.zeros(len(texts), dtype=np.int64)  # [T] text offsets in big
    np.cumsum(lengths[:-1] + 1, out=starts[1:])
    text_of = np.searchsorted(starts, ends, side="right") - 1  # [k]
    new_text = np.ones(len(ends) + 1, dtype=bool)  # [k + 1]: sentence i starts a text
    np.not_equal(text_of[1:], text_of[:-1], out=new_text[1:-1])
    first, last = new_text[:-1], new_text[1:]
    begin = np.empty_like(ends)  # [k]
    begin[1:] = ends[:-1]
    begin[first] = starts[text_of[first]]
    end = np.where(last, (starts + lengths)[text_of], ends)
    sentences = [big[a:b] for a, b in zip(begin.tolist(), end.tolist(), strict=True)]
    return sentences, np.bincount(text_of, minlength=len(texts)).astype(np.int64)


def split_sentences_batch(
    texts: Sequence[str], *, use_native: bool = True
) -> tuple[list[str], np.ndarray]:
    """Split every text; return all sentences in order and int64 [len(texts)] counts per text.

    With the compiled helpers built (:mod:`megatron_glm.data.native`) and ``use_native``, the
    C twin of these rules does it in one pass per text. Otherwise texts are processed here in
    consecutive sub-batches of about ``_BATCH_CHARS`` characters, a new one also starting
    wherever the texts switch between ASCII (one byte per character) and not (UTF-32), so a few
    non-ASCII texts do not drag their ASCII neighbours onto the 4x wider path. Worst case
    (ASCII and non-ASCII texts alternating) is one sub-batch per text: slower, same result.
    """
    if use_native and NATIVE is not None:
        texts = texts if isinstance(texts, list) else list(texts)
        found = np.empty(len(texts), dtype=np.int64)
        return NATIVE.split_sentences(texts, found), found
    sentences: list[str] = []
    counts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    begin, size = 0, 0
    kinds = list(map(str.isascii, texts))
    for i, t in enumerate(texts):
        size += len(t) + 1
        if i + 1 == len(texts) or size >= _BATCH_CHARS or kinds[i + 1] != kinds[i]:
            s, c = _split_joined(texts[begin : i + 1])
            sentences += s
            counts.append(c)
            begin, size = i + 1, 0
    return sentences, np.concatenate(counts)


def split_sentences(text: str) -> list[str]:
    """Split one text into sentences by the rules of the module docstring."""
    return split_sentences_batch([text])[0]
