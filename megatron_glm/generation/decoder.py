"""Batched GLM decoding: part A with a mask in, part-B tokens out (greedy, sampling, beam).

:func:`generate` is the low-level entry point: token lists in, generated token lists out. A row
is part A (the context holding its mask token) and the index of the mask being filled; part B
starts with ``[sop]`` at (mask index, block position 1) and grows one token per step, each new
token at (mask index, next block position), until a stop token or ``max_new_tokens``. Rows decode
together in lock step; a row that stops leaves the batch (and the KV cache) at once, so it costs
no more compute. Beam search lives in :mod:`megatron_glm.generation.beam`.

Under tensor parallelism every TP rank calls this with the same inputs: the model's logits are
all-gathered (identical on every rank) and sampling draws from per-row generators seeded from
``config.seed``, so every rank picks the same tokens without communication.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_glm.generation.config import GenerationConfig
from megatron_glm.generation.logits import choose_tokens, process_logits
from megatron_glm.generation.steppers import CachedStepper, Stepper, UncachedStepper
from megatron_glm.model.glm import GLMModel


@dataclass
class DecodeRow:
    """One row to decode: part A, the mask index, its stop ids and its sampling-stream key."""

    part_a: list[int]
    mask_position: int
    stop_ids: frozenset[int]
    key: int = 0
    tokens: list[int] = field(default_factory=list)  # generated so far (no sop, no stop id)


@contextlib.contextmanager
def eval_mode(model: GLMModel) -> Iterator[None]:
    """Run in eval mode without autograd, then restore the model's train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def check_rows(model: GLMModel, rows: Sequence[DecodeRow], config: GenerationConfig) -> None:
    """ValueError naming the row for inputs the model cannot decode (nothing truncated)."""
    limit = model.cfg.max_position_embeddings
    for i, row in enumerate(rows):
        n = len(row.part_a)
        if not 0 <= row.mask_position < n:
            raise ValueError(
                f"row {i}: mask position {row.mask_position} is outside its part A of {n} tokens"
            )
        bad = [t for t in row.part_a if not 0 <= t < model.vocab_size]
        if bad:
            raise ValueError(f"row {i}: token id {bad[0]} outside [0, {model.vocab_size})")
        if n + config.max_new_tokens > limit:
            raise ValueError(
                f"row {i}: prompt of {n} tokens + max_new_tokens {config.max_new_tokens} = "
                f"{n + config.max_new_tokens} exceeds the model's max_position_embeddings "
                f"({limit}); shorten the prompt or lower max_new_tokens"
            )


def make_stepper(
    model: GLMModel,
    rows: Sequence[DecodeRow],
    vocab_size: int,
    config: GenerationConfig,
    *,
    use_cache: bool,
) -> Stepper:
    part_a = [r.part_a for r in rows]
    masks = [r.mask_position for r in rows]
    if use_cache:
        return CachedStepper(model, part_a, masks, vocab_size, config.max_new_tokens)
    return UncachedStepper(model, part_a, masks, vocab_size)


def make_generators(
    rows: Sequence[DecodeRow], config: GenerationConfig, model: GLMModel
) -> list[torch.Generator] | None:
    """One generator per row, seeded from (seed, row key); None when not sampling.

    Without a seed a fresh one is drawn (non-deterministic), which TP ranks would not share,
    so sampling under tp > 1 needs an explicit seed.
    """
    if not config.do_sample:
        return None
    seed = config.seed
    if seed is None:
        if model.tp > 1:
            raise ValueError(
                "sampling under tensor parallelism needs GenerationConfig.seed (every TP rank "
                "must draw the same tokens)"
            )
        seed = int(torch.Generator().seed()) & ((1 << 62) - 1)
    device = model.head_weight.device
    return [torch.Generator(device=device).manual_seed(_stream_seed(seed, row.key)) for row in rows]


def _stream_seed(seed: int, key: int) -> int:
    """A 63-bit seed from (seed, key), distinct streams for distinct pairs of any size (numpy's
    SeedSequence hashes its entropy; ``seed * C + key`` collides once keys reach C)."""
    state = np.random.SeedSequence([seed, key]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def sample_rows(
    stepper: Stepper,
    rows: Sequence[DecodeRow],
    config: GenerationConfig,
    *,
    sop_id: int,
    banned: Collection[int],
    generators: list[torch.Generator] | None,
) -> None:
    """Greedy or sampled decoding of ``rows`` in lock step; fills each ``row.tokens``."""
    active = list(range(len(rows)))
    feed = [sop_id] * len(rows)
    for step in range(config.max_new_tokens):
        logits = stepper.step(feed, step + 1)  # [len(active), V]
        current = [rows[i] for i in active]
        logits = process_logits(
            logits, [r.tokens for r in current], [r.stop_ids for r in current], config, banned
        )
        chosen = choose_tokens(
            logits, config, None if generators is None else [generators[i] for i in active]
        )
        keep = []
        for j, (row, token) in enumerate(zip(current, chosen, strict=True)):
            if token in row.stop_ids:
                continue
            row.tokens.append(token)
            if len(row.tokens) < config.max_new_tokens:
                keep.append(j)
        if not keep:
            return
        if len(keep) < len(active):
            stepper.select(keep)  # finished rows leave the batch and the cache
        active = [active[j] for j in keep]
        feed = [chosen[j] for j in keep]


def decode_rows(
    model: GLMModel,
    rows: Sequence[DecodeRow],
    config: GenerationConfig,
    *,
    sop_id: int,
    vocab_size: int,
    banned: Collection[int] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """Decode prepared rows (see :func:`generate`); returns each row's generated tokens."""
    if not rows:
        return []
    check_rows(model, rows, config)
    for row in rows:
        row.tokens = []
    with eval_mode(model):
        stepper = make_stepper(model, rows, vocab_size, config, use_cache=use_cache)
        if config.num_beams > 1:
            from megatron_glm.generation.beam import beam_search

            beam_search(stepper, rows, config, sop_id=sop_id, banned=banned)
        else:
            generators = make_generators(rows, config, model)
            sample_rows(stepper, rows, config, sop_id=sop_id, banned=banned, generators=generators)
    return [list(r.tokens) for r in rows]


def generate(
    model: GLMModel,
    batch: Sequence[Sequence[int]],
    mask_positions: Sequence[int],
    config: GenerationConfig,
    *,
    eos_ids: Iterable[int],
    sop_id: int,
    vocab_size: int | None = None,
    row_eos_ids: Sequence[Iterable[int]] | None = None,
    banned_ids: Collection[int] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """Generated part-B token ids per row (without [sop] and without the stop token).

    Args:
        model: a :class:`GLMModel` (any tp; pp 1), put in eval mode for the call.
        batch: part-A token lists (rows may differ in length).
        mask_positions: per row, the index in its part A of the mask token being filled.
        config: the decoding strategy.
        eos_ids: stop tokens of every row ([eop]; add [eos] for [gMASK] generation).
        sop_id: the ``<|startofpiece|>`` id that opens part B.
        vocab_size: the tokenizer's real vocabulary; logits of the padding rows beyond it are
            dropped so they never win (default: the model's padded vocabulary).
        row_eos_ids: per-row stop tokens, replacing ``eos_ids`` where given.
        banned_ids: ids never generated.
        use_cache: False runs the uncached reference decoder (tests, benchmark).

    A row whose prompt plus ``max_new_tokens`` exceeds ``max_position_embeddings`` is a
    ValueError naming the row (never silently truncated).
    """
    if len(mask_positions) != len(batch):
        raise ValueError(f"{len(batch)} rows but {len(mask_positions)} mask positions")
    stops = frozenset(eos_ids)
    rows = [
        DecodeRow(
            part_a=list(a),
            mask_position=int(m),
            stop_ids=stops if row_eos_ids is None else frozenset(row_eos_ids[i]),
            key=i,
        )
        for i, (a, m) in enumerate(zip(batch, mask_positions, strict=True))
    ]
    return decode_rows(
        model,
        rows,
        config,
        sop_id=sop_id,
        vocab_size=model.vocab_size if vocab_size is None else vocab_size,
        banned=banned_ids,
        use_cache=use_cache,
    )
