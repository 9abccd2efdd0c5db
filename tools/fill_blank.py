"""Fill blanks in held-out sentences with a trained GLM, and score single-token blanks.

Usage:
    python tools/fill_blank.py --config configs/demo.yaml [--load DIR] [--tag TAG]
        [--text "A [MASK] b."]

``--load`` defaults to the config's ``checkpoint.save`` and ``--tag`` to the one its ``latest``
names (e.g. ``--tag global_step200`` picks an earlier checkpoint, as in ``tools/generate.py``).

Without ``--text`` (the end of ``make pretrain``) it takes held-out sentences: sentences of at
least 8 tokens from the run's *test* split, then its validation split (documents the model never
trained on). It fills blanks in three of them with the cached decoder and the strategy of
``tools/generate.py`` (the same loading and fill functions, :mod:`megatron_glm.inference`):
greedy with :data:`DEMO` (no repeated bigram, a repetition penalty, which keep a small model out
of ``the the the``), the third sentence with two blanks, each also by beam search. Then it
scores the model on single-token blanks: one random token of each of ``--eval-sentences``
held-out sentences is masked, and the model's top-1 first token (``[eop]`` and the special
tokens excluded: the blank is known to hold one token) is compared with the original, against
the unigram baseline that always answers the most frequent token of the training split.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from megatron_glm.config import RunConfig, load_config, parse_split
from megatron_glm.data.dataset_builder import split_documents
from megatron_glm.data.indexed import IndexedDataset
from megatron_glm.data.tokenizer import Tokenizer
from megatron_glm.generation import GenerationConfig, generate
from megatron_glm.inference import LoadedModel, fill_texts, load_for_inference
from megatron_glm.logs import setup_logging
from megatron_glm.model import GLMModel

DEMO = GenerationConfig(max_new_tokens=8, no_repeat_ngram_size=2, repetition_penalty=1.3)
"""The demo's decoding strategy (also a sensible start for ``tools/generate.py``'s flags)."""
BEAMS = 4
BLANKS_PER_SENTENCE = (1, 1, 2)


def held_out_sentences(
    cfg: RunConfig, tok: Tokenizer, *, min_tokens: int = 8, raw: bool = False
) -> Iterator[np.ndarray]:
    """Token ids of the test split's sentences with ``min_tokens``+ tokens, then validation's.

    A sentence of a split dataset keeps the whitespace before it (so documents decode back
    exactly). ``raw``: the ids as stored (end-of-document removed), the layout the model was
    trained on; otherwise the sentence alone, stripped and re-encoded, for display.
    """
    indexed = IndexedDataset(cfg.data.data_path[0])
    splits = split_documents(indexed.num_documents, parse_split(cfg.data.split))
    for start, end in (splits[2], splits[1]):
        for i in range(int(indexed.doc_idx[start]), int(indexed.doc_idx[end])):
            ids = np.asarray(indexed[i], dtype=np.int64)
            ids = ids[ids != tok.eos_id]
            if not raw:
                ids = np.asarray(tok.encode(tok.decode(ids.tolist()).strip()), dtype=np.int64)
            if len(ids) >= min_tokens:
                yield ids


def take_sentences(
    cfg: RunConfig, tok: Tokenizer, n: int, *, raw: bool = False
) -> list[np.ndarray]:
    """The first ``n`` held-out sentences; ValueError if the splits hold none."""
    found = held_out_sentences(cfg, tok, raw=raw)
    sentences = [s for s, _ in zip(found, range(n), strict=False)]
    if not sentences:
        raise ValueError(
            f"{cfg.data.data_path[0]}: test and validation splits have no sentence of 8+ tokens"
        )
    return sentences


def mask_spans(tok: Tokenizer, ids: np.ndarray, blanks: int) -> tuple[str, list[str]]:
    """(text with ``blanks`` [MASK]s, the original spans): the sentence is cut into ``blanks``
    equal parts and the middle 1-3 tokens of each are masked."""
    bounds = np.linspace(0, len(ids), blanks + 1).astype(int)
    pieces: list[int] = []
    originals = []
    for lo, hi in itertools.pairwise(bounds):
        length = min(3, max(1, (hi - lo) // 6))
        start = (lo + hi) // 2 - length // 2
        pieces += [*ids[lo:start].tolist(), tok.mask_id, *ids[start + length : hi].tolist()]
        originals.append(tok.decode(ids[start : start + length].tolist()))
    return tok.decode(pieces), originals


def not_words(tok: Tokenizer) -> set[int]:
    """Ids a word blank never holds: the special tokens and pieces that decode to whitespace
    only (newlines, indentation: frequent in the layout-keeping corpus, but not a word)."""
    blank = {i for i in range(tok.vocab_size) if not tok.decode([i]).strip()}
    return blank | set(tok.special_ids().values())


def unigram_argmax(cfg: RunConfig, tok: Tokenizer, excluded: set[int]) -> int:
    """The most frequent token of the training split, ``excluded`` ids left out."""
    indexed = IndexedDataset(cfg.data.data_path[0])
    start, end = split_documents(indexed.num_documents, parse_split(cfg.data.split))[0]
    first, last = int(indexed.doc_idx[start]), int(indexed.doc_idx[end])
    counts = np.zeros(tok.padded_vocab_size, dtype=np.int64)
    for i in range(first, last):
        counts += np.bincount(np.asarray(indexed[i], dtype=np.int64), minlength=counts.size)
    counts[sorted(excluded)] = 0
    return int(counts.argmax())


@dataclass(frozen=True)
class Blanks:
    """Single-token blanks: part A of each row, its mask's index, the token it hides."""

    rows: list[list[int]]
    positions: list[int]
    truth: list[int]


def single_token_blanks(
    tok: Tokenizer, sentences: list[np.ndarray], excluded: set[int], seed: int = 0
) -> Blanks:
    """In each sentence one random token that is a word piece (not ``excluded``) is masked."""
    rng = np.random.default_rng(seed)
    blanks = Blanks([], [], [])
    for s in sentences:
        words = [i for i, t in enumerate(s.tolist()) if t not in excluded]
        if words:
            p = words[int(rng.integers(len(words)))]
            blanks.rows.append([*s[:p].tolist(), tok.mask_id, *s[p + 1 :].tolist()])
            blanks.positions.append(p)
            blanks.truth.append(int(s[p]))
    return blanks


def top1(model: GLMModel, tok: Tokenizer, blanks: Blanks, excluded: set[int]) -> list[int]:
    """The model's first part-B token per blank, ``excluded`` ids and [eop] banned (the blank
    is known to hold one word piece, as the baseline knows)."""
    config = GenerationConfig(max_new_tokens=1, min_new_tokens=1)
    guesses: list[int] = []
    for lo in range(0, len(blanks.rows), 32):
        out = generate(
            model,
            blanks.rows[lo : lo + 32],
            blanks.positions[lo : lo + 32],
            config,
            eos_ids=[tok.eop_id],
            sop_id=tok.sop_id,
            vocab_size=tok.vocab_size,
            banned_ids=excluded - {tok.eop_id},
        )
        guesses += [row[0] for row in out]
    return guesses


def single_token_accuracy(
    model: GLMModel, tok: Tokenizer, sentences: list[np.ndarray], excluded: set[int], baseline: int
) -> tuple[float, float, int]:
    """(model, unigram baseline) top-1 accuracy, and the number of blanks."""
    blanks = single_token_blanks(tok, sentences, excluded)
    guesses = top1(model, tok, blanks, excluded)
    n = max(len(blanks.truth), 1)
    hits = sum(g == t for g, t in zip(guesses, blanks.truth, strict=True))
    base = sum(t == baseline for t in blanks.truth)
    return hits / n, base / n, len(blanks.truth)


def demo_fills(loaded: LoadedModel, sentences: list[np.ndarray], config: GenerationConfig) -> None:
    """Print three held-out sentences, their blanks and the greedy and beam fills."""
    tok = loaded.tokenizer
    cases = [mask_spans(tok, s, n) for s, n in zip(sentences, BLANKS_PER_SENTENCE, strict=False)]
    texts = [text for text, _ in cases]
    greedy = fill_texts(loaded.model, tok, texts, config)
    beam = fill_texts(loaded.model, tok, texts, replace(config, num_beams=BEAMS))
    for ids, (text, originals), g, b in zip(sentences, cases, greedy, beam, strict=False):
        print(f"held-out sentence: {tok.decode(ids.tolist())!r}")
        print(f"input:  {text!r}")
        print(f"blank:  {' | '.join(repr(o) for o in originals)}")
        print(f"fill:   {' | '.join(repr(f) for f in g.fills)}")
        print(f"beam {BEAMS}: {' | '.join(repr(f) for f in b.fills)}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the run config the checkpoint came from")
    parser.add_argument("--load", help="checkpoint directory (default: checkpoint.save)")
    parser.add_argument("--tag", help="checkpoint tag, e.g. global_step200 (default: 'latest')")
    parser.add_argument("--text", help="text with blanks; default: held-out sentences")
    parser.add_argument("--max-new-tokens", type=int, default=DEMO.max_new_tokens)
    parser.add_argument(
        "--eval-sentences", type=int, default=500, help="held-out sentences for the accuracy"
    )
    parser.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    return parser


def _load(cfg: RunConfig, load_dir: str | None, tag: str | None = None) -> LoadedModel:
    load_dir = load_dir or cfg.checkpoint.save
    if load_dir is None:
        raise ValueError("no checkpoint: pass --load or set checkpoint.save")
    return load_for_inference(
        load=load_dir, tag=tag, tokenizer=cfg.data.tokenizer_model, model=cfg.model
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        config = replace(DEMO, max_new_tokens=args.max_new_tokens)
        loaded = _load(cfg, args.load, args.tag)
        tok = loaded.tokenizer
        if args.text is not None:
            [result] = fill_texts(loaded.model, tok, [args.text], config, labels=["--text"])
            print(f"input:  {args.text!r}")
            print(f"fill:   {' | '.join(repr(f) for f in result.fills)}")
            print(f"filled: {result.text!r}")
            return 0
        demo_fills(loaded, take_sentences(cfg, tok, len(BLANKS_PER_SENTENCE)), config)
        sentences = take_sentences(cfg, tok, args.eval_sentences, raw=True)
        excluded = not_words(tok)
        baseline = unigram_argmax(cfg, tok, excluded)
        ours, base, n = single_token_accuracy(loaded.model, tok, sentences, excluded, baseline)
    except ValueError as exc:
        print(f"fill_blank: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"single-token blanks in {n} held-out sentences: model top-1 {ours:.1%}, "
        f"unigram baseline {base:.1%} (always {tok.id_to_piece(baseline)!r})"
    )
    return 0


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    sys.exit(main())
