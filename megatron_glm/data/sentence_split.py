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

What is dropped, exactly: the whitespace (``str.isspace``) *between* sentences, including line
breaks, and leading/trailing whitespace of the text. Nothing else: every other character, and
whitespace inside a sentence, is kept. No sentence is empty; a text that is only whitespace has
no sentences; a text without terminators is one sentence.

Two implementations, kept equal by the tests: a C one in :mod:`megatron_glm.data.native` (one
pass per text; used when it was built), and the vectorised numpy one below. Why not a regex: in
the preprocessor the splitter competes with SentencePiece for the same CPU, and a one-regex
splitter of these rules (``re`` tries its alternatives at every word) costs more CPU than
SentencePiece's encode of the sentences (``tools/bench/bench_preprocess.py --stages`` prints
all three; the numpy one costs about a sixth of the encode, the C one about 6%). Here the batch
is joined into one string, each character is classified by a table lookup (one byte per character
for ASCII batches, ``str.isascii`` is O(1); UTF-32 code points otherwise), the few candidate
positions (terminators and closers) are examined as sparse index arrays, each boundary becomes a
line break, and ``str.splitlines``/``str.strip`` cut the sentences in C: Python does no
per-character and almost no per-sentence work.
"""

from __future__ import annotations

import itertools
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


def _classify(big: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Code units of ``big`` (uint8 for ASCII, else UTF-32 uint32), their class bits as uint8
    [len(big) + 1] with a whitespace/line-break sentinel at the end, and the codec of the units.
    """
    if big.isascii():
        codes: np.ndarray = np.frombuffer(big.encode("ascii"), dtype=np.uint8)
        lookup, codec = codes, "ascii"
    else:
        codes = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        lookup, codec = np.minimum(codes, _TABLE_SIZE - 1), "utf-32-le"
    cls = np.empty(len(codes) + 1, dtype=np.uint8)
    np.take(_CLASS, lookup, out=cls[:-1])
    cls[-1] = _WS | _LB
    return codes, cls, codec


_WALK_STEPS = 8
"""Closers walked back one step at a time before switching to a dense pass (long runs only)."""


def _anchors(cls: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int64 [m]: for each position, the first character before its run of closers (the
    position itself if it is no closer); -1 reads the sentinel, which is no terminator.

    Closer runs are short in real text, so a few sparse steps settle almost every position; any
    longer run is resolved by one dense "last non-closer so far" scan, so adversarial input
    (a million ``)``) stays linear.
    """
    at = pos.copy()
    active = np.flatnonzero((cls[at] & _CL) != 0)
    for _ in range(_WALK_STEPS):
        if not len(active):
            return at
        at[active] -= 1
        active = active[(cls[at[active]] & _CL) != 0]
    if len(active):
        body = cls[:-1]
        last_non_closer = np.maximum.accumulate(
            np.where((body & _CL) != 0, -1, np.arange(len(body)))
        )
        at[active] = last_non_closer[at[active]]
    return at


def _boundaries(cls: np.ndarray, cjk: bool) -> tuple[np.ndarray, np.ndarray]:
    """Where the terminator rules end a sentence, as int64 arrays ``(replace, insert)``.

    ``replace``: whitespace characters right after a boundary (they become a line break);
    ``insert``: indices before which a line break is inserted (a CJK boundary with no whitespace
    after it). Line breaks already in the text need nothing. Only candidates (terminators and
    closers, a few percent of the text) are examined, as sparse index arrays.
    """
    pos = np.flatnonzero((cls[:-1] & (_AT | _CT | _CL if cjk else _AT | _CL)) != 0)  # [m]
    own, nxt = cls[pos], cls[pos + 1]
    # A terminator run + closers can end at p only if the next char continues neither.
    can_end = (nxt & _WS) != 0
    if cjk:
        can_end |= ((nxt & _CL) == 0) & (((own & _CT) == 0) | ((nxt & _CT) == 0))
    pos, nxt = pos[can_end], nxt[can_end]
    anchor = cls[_anchors(cls, pos)]
    next_ws = (nxt & _WS) != 0
    cut = ((anchor & _AT) != 0) & next_ws
    if cjk:
        cut |= (
            ((anchor & _CT) != 0)
            & ((nxt & _CL) == 0)
            & (((cls[pos] & _CT) == 0) | ((nxt & _CT) == 0))
        )
    replace = pos[cut & next_ws] + 1
    if len(replace) and replace[-1] == len(cls) - 1:  # the sentinel: boundary at the very end
        replace = replace[:-1]
    return replace, pos[cut & ~next_ws] + 1


def _split_joined(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Split texts that are all ASCII or all not (one code-unit width for the whole batch).

    The texts are joined by line breaks (a line break never occurs inside a sentence, so texts
    stay apart), every boundary found by the terminator rules is turned into a line break (the
    whitespace after it replaced, or a break inserted), and each text's part of the marked
    string is cut by ``str.splitlines``, stripped and filtered, all in C but for one loop step
    per text. Code units are characters in both encodings, so text offsets stay valid.
    """
    big = "\n".join(texts)
    codes, cls, codec = _classify(big)
    replace, insert = _boundaries(cls, cjk=codec != "ascii")
    starts = np.zeros(len(texts) + 1, dtype=np.int64)  # [T + 1] text offsets, one past the end
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    np.cumsum(lengths + 1, out=starts[1:])
    marked = big
    if len(replace) or len(insert):
        units = codes.copy()
        units[replace] = ord("\n")
        if len(insert):
            units = np.insert(units, insert, ord("\n"))
            starts += np.searchsorted(insert, starts, side="right")
        marked = units.tobytes().decode(codec, "surrogatepass")
    per_text = [
        list(filter(None, map(str.strip, marked[a : b - 1].splitlines())))
        for a, b in itertools.pairwise(starts.tolist())
    ]
    counts = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
    return list(itertools.chain.from_iterable(per_text)), counts


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
