"""Per-token pure-Python reference for GLM blank infilling: the test oracle and bench baseline.

Three parts, all written for obviousness, not speed:

* :func:`build_row` lays out a row from explicit decisions (spans in text order, part-B order).
* :func:`parse_row` reads a row back token by token, asserts every structural rule of the batch
  contract, reconstructs the original window and returns the decisions it found. Tests check
  ``row == build_row(parse_row(row))`` and that the recovered decisions obey each task's rules.
* :func:`reference_infill` is a complete per-token sampler in the style of GLM's original
  collator (``random.Random``, per-token scans for documents and sentences); it is the baseline
  the benchmark measures ``BlankInfilling`` against, and is itself checked by ``parse_row``.

Also synthetic windows (:func:`make_window`, :func:`random_windows`) shared by tests and bench.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_glm.data.packed_dataset import Window

OBJECTIVES = ("span", "sentence", "document")


@dataclass
class Parsed:
    """Decisions recovered from a row."""

    objective: str
    spans: list[tuple[int, int]]  # (start, length) in the original window, text order
    order: list[int]  # part-B block k holds spans[order[k]]
    mask_ids: list[int]  # mask token of each span, text order
    window: list[int]  # the reconstructed original window


def build_row(
    tokens: list[int],
    spans: list[tuple[int, int]],
    order: list[int],
    mask_id: int,
    ids: Any,
    seq_length: int,
    objective: int,
) -> dict[str, Any]:
    """Lay out one row token by token from explicit decisions."""
    starts = {start: k for k, (start, _) in enumerate(spans)}
    part_a: list[int] = []
    mask_pos: dict[int, int] = {}
    i = 0
    while i < len(tokens):
        if i in starts:
            k = starts[i]
            mask_pos[k] = len(part_a)
            part_a.append(mask_id)
            i += spans[k][1]
        else:
            part_a.append(tokens[i])
            i += 1
    tok = list(part_a)
    tgt = list(part_a)
    loss = [0.0] * len(part_a)
    pos = list(range(len(part_a)))
    block = [0] * len(part_a)
    for k in order:
        start, length = spans[k]
        body = tokens[start : start + length]
        tok += [ids.sop, *body]
        tgt += [*body, ids.eop]
        loss += [1.0] * (length + 1)
        pos += [mask_pos[k]] * (length + 1)
        block += list(range(1, length + 2))
    valid = len(tok)
    assert valid <= seq_length, (valid, seq_length)
    pad = seq_length - valid
    return {
        "tokens": tok + [ids.pad] * pad,
        "targets": tgt + [ids.pad] * pad,
        "loss_mask": loss + [0.0] * pad,
        "position_ids": [pos + [0] * pad, block + [0] * pad],
        "sep": len(part_a),
        "valid_len": valid,
        "objective": objective,
    }


def rows_equal(fast: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Exact equality of a numpy row and a list row, key by key."""
    return all(np.array_equal(np.asarray(fast[k]), np.asarray(ref[k])) for k in ref)


def parse_row(row: dict[str, Any], ids: Any, seq_length: int) -> Parsed:
    """Read a row back per token, asserting the batch contract; return its decisions."""
    tok = [int(x) for x in row["tokens"]]
    tgt = [int(x) for x in row["targets"]]
    loss = [float(x) for x in row["loss_mask"]]
    pos = [int(x) for x in row["position_ids"][0]]
    block = [int(x) for x in row["position_ids"][1]]
    sep, valid = int(row["sep"]), int(row["valid_len"])
    objective = OBJECTIVES[int(row["objective"])]
    assert len(tok) == len(tgt) == len(loss) == len(pos) == len(block) == seq_length
    assert 1 <= sep <= valid <= seq_length
    masks = {ids.mask, ids.smask, ids.gmask}
    # Part A.
    mask_at = [j for j in range(sep) if tok[j] in masks]
    for j in range(sep):
        assert tgt[j] == tok[j] and loss[j] == 0.0, j
        assert pos[j] == j and block[j] == 0, j
        assert tok[j] not in (ids.sop, ids.eop), j
    # Part B: blocks start at [sop].
    blocks: list[tuple[int, int]] = []  # (offset, length incl. sop)
    j = sep
    while j < valid:
        assert tok[j] == ids.sop, (j, tok[j])
        k = j + 1
        while k < valid and tok[k] != ids.sop:
            k += 1
        blocks.append((j, k - j))
        j = k
    assert len(blocks) == len(mask_at)
    body_of: dict[int, list[int]] = {}
    order_pos: list[int] = []
    for off, n in blocks:
        mpos = pos[off]
        assert mpos in mask_at and mpos not in body_of, mpos
        body = tgt[off : off + n - 1]
        assert len(body) >= 1 and tgt[off + n - 1] == ids.eop
        assert tok[off + 1 : off + n] == body  # inputs are targets shifted right
        for t in range(n):
            assert pos[off + t] == mpos and block[off + t] == t + 1
            assert loss[off + t] == 1.0
        body_of[mpos] = body
        order_pos.append(mpos)
    # Padding is inert.
    for j in range(valid, seq_length):
        assert tok[j] == ids.pad and tgt[j] == ids.pad and loss[j] == 0.0
        assert pos[j] == 0 and block[j] == 0
    # Reconstruct the window and the spans.
    window: list[int] = []
    spans: list[tuple[int, int]] = []
    for j in range(sep):
        if tok[j] in masks:
            spans.append((len(window), len(body_of[j])))
            window += body_of[j]
        else:
            window.append(tok[j])
    order = [mask_at.index(p) for p in order_pos]
    return Parsed(objective, spans, order, [tok[p] for p in mask_at], window)


def sentence_units(tokens: list[int], sentence_starts: list[int], eos: int) -> set[tuple[int, int]]:
    """Whole-sentence units (start, length): sentences cut around eos, eos-free."""
    starts = set(sentence_starts)
    units: set[tuple[int, int]] = set()
    cur = None
    for i, t in enumerate(tokens):
        if t == eos:
            if cur is not None:
                units.add((cur, i - cur))
            cur = None
            continue
        if cur is not None and i in starts:
            units.add((cur, i - cur))
            cur = None
        if cur is None:
            cur = i
    if cur is not None:
        units.add((cur, len(tokens) - cur))
    return units


def check_task_rules(p: Parsed, window: Any, ids: Any, cfg: Any) -> None:
    """Assert the rules of the row's task on the recovered decisions."""
    tokens = [int(x) for x in window.tokens]
    assert p.window == tokens
    if p.objective == "span":
        assert all(m == ids.mask for m in p.mask_ids)
        for start, length in p.spans:
            assert ids.eos not in tokens[start : start + length]
        for (s0, l0), (s1, _) in zip(p.spans, p.spans[1:], strict=False):
            assert s1 >= s0 + l0 + 1, "adjacent spans"
        if any(t != ids.eos for t in tokens):
            assert len(p.spans) >= 1
    elif p.objective == "sentence":
        assert all(m == ids.smask for m in p.mask_ids)
        units = sentence_units(tokens, [int(x) for x in window.sentence_starts], ids.eos)
        assert all(s in units for s in p.spans), (p.spans, sorted(units))
        if units:
            assert len(p.spans) >= 1
    else:
        assert p.mask_ids == [ids.gmask] and len(p.spans) == 1
        start, length = p.spans[0]
        n = len(tokens)
        assert start + length == n
        lo = max(1, math.floor(cfg.document_min_ratio * n - 0.5))
        hi = min(n, math.ceil(cfg.document_max_ratio * n + 0.5))
        assert lo <= length <= hi, (length, lo, hi)


# ---------------------------------------------------------------------- full reference sampler


def _poisson_weights(lam: float, max_len: int) -> list[float]:
    return [math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in range(1, max_len + 1)]


def reference_infill(
    window: Any, cfg: Any, ids: Any, seq_length: int, max_spans: int, seed: int
) -> dict[str, Any]:
    """Per-token sampler in the style of GLM's original collator (the benchmark baseline)."""
    rng = random.Random(f"{seed}-{window.epoch}-{window.index}")
    tokens = [int(x) for x in window.tokens]
    n = len(tokens)
    u = rng.random()
    probs = [cfg.span_prob, cfg.sentence_prob, cfg.document_prob]
    code = 0 if u < probs[0] else 1 if u < probs[0] + probs[1] else 2
    if code == 0:
        weights = _poisson_weights(cfg.poisson_lambda, cfg.max_span_length)
        lengths: list[int] = []
        masked = 0
        while masked < cfg.mask_ratio * n and len(lengths) < max_spans:
            length = rng.choices(range(1, cfg.max_span_length + 1), weights=weights)[0]
            lengths.append(length)
            masked += length
        spans = _reference_place(tokens, lengths, ids.eos, rng)
        mask_id = ids.mask
    elif code == 1:
        units = sorted(sentence_units(tokens, [int(x) for x in window.sentence_starts], ids.eos))
        rng.shuffle(units)
        spans, masked = [], 0
        for unit in units:
            if masked >= cfg.sentence_ratio * n or len(spans) >= max_spans:
                break
            spans.append(unit)
            masked += unit[1]
        spans.sort()
        mask_id = ids.smask
    else:
        ratio = rng.uniform(cfg.document_min_ratio, cfg.document_max_ratio)
        gen = min(max(round(ratio * n), 1), n)
        spans, mask_id = [(n - gen, gen)], ids.gmask
    order = list(range(len(spans)))
    rng.shuffle(order)
    return build_row(tokens, spans, order, mask_id, ids, seq_length, code)


def _reference_place(
    tokens: list[int], lengths: list[int], eos: int, rng: random.Random
) -> list[tuple[int, int]]:
    """Assign each span to the document of a random non-eos token (or any with room), then
    place each document's spans with GLM's ``sample_spans`` (sorted uniform places)."""
    doc_of: list[int] = []  # per token: its document, -1 for eos
    docs: list[list[int]] = []  # [offset, size]
    for i, t in enumerate(tokens):
        if t == eos:
            doc_of.append(-1)
        else:
            if i == 0 or tokens[i - 1] == eos:
                docs.append([i, 0])
            docs[-1][1] += 1
            doc_of.append(len(docs) - 1)
    text = [i for i, d in enumerate(doc_of) if d >= 0]
    if not text:
        return []
    room = [size + 1 for _, size in docs]
    chosen: list[list[int]] = [[] for _ in docs]
    for length in lengths:
        d = doc_of[text[rng.randrange(len(text))]]
        if room[d] < length + 1:
            fits = [e for e in range(len(docs)) if room[e] >= length + 1]
            if not fits:
                continue
            d = rng.choice(fits)
        chosen[d].append(length)
        room[d] -= length + 1
    if not any(chosen):
        d = max(range(len(docs)), key=lambda e: docs[e][1])
        chosen[d] = [min(lengths[0], docs[d][1])]
    spans: list[tuple[int, int]] = []
    for (offset, size), lens in zip(docs, chosen, strict=True):
        free = size - sum(lens) - (len(lens) - 1)
        places = sorted(rng.randrange(free + 1) for _ in lens)
        for place, length in zip(places, lens, strict=True):
            spans.append((offset + place, length))
            offset += length + 1
    return sorted(spans)


# ---------------------------------------------------------------------- synthetic windows


def make_window(
    doc_lengths: list[int],
    *,
    sentence_length: int = 12,
    trailing_eos: bool = True,
    epoch: int = 0,
    index: int = 0,
    vocab: tuple[int, int] = (100, 1000),
    eos: int = 2,
    seed: int = 0,
) -> Window:
    """Window of documents (random token ids, each followed by eos) cut into sentences."""
    r = random.Random(seed)
    ids = np.random.default_rng(seed).integers(vocab[0], vocab[1], sum(doc_lengths))
    parts: list[np.ndarray] = []
    starts: list[int] = []
    used = 0  # token ids consumed
    length = 0  # window length so far
    for k, n in enumerate(doc_lengths):
        pos = 0
        while pos < n:
            starts.append(length + pos)
            pos += min(n - pos, max(1, int(r.expovariate(1 / sentence_length)) + 1))
        parts.append(ids[used : used + n])
        used += n
        length += n
        if trailing_eos or k < len(doc_lengths) - 1:
            parts.append(np.array([eos]))
            length += 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return Window(
        tokens=tokens.astype(np.int64),
        sentence_starts=np.asarray(starts, dtype=np.int64),
        epoch=epoch,
        index=index,
    )


def random_window(length: int, index: int, *, mean_doc: int = 200, eos: int = 2) -> Window:
    """A packed window of exactly ``length`` tokens: documents of ~mean_doc tokens + eos."""
    r = random.Random(index * 7919 + length)
    docs: list[int] = []
    total = 0
    while total < length:
        n = max(1, int(r.expovariate(1 / mean_doc)))
        docs.append(n)
        total += n + 1
    w = make_window(docs, index=index, eos=eos, seed=index, trailing_eos=True)
    tokens = w.tokens[:length]
    starts = w.sentence_starts[w.sentence_starts < length]
    return Window(tokens=tokens, sentence_starts=starts, epoch=0, index=index)
