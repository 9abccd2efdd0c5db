"""Training a GLM tokenizer: SentencePiece with GLM's special tokens (tools/train_tokenizer.py).

The model it writes is what :class:`megatron_glm.data.tokenizer.GLMTokenizer` reads; the design
decisions both sides agree on (special ids 1..7, ``<|endoftext|>`` as SentencePiece's eos, exact
round trip, byte fallback) are in that module's docstring. This module adds how the input is
fed:

* **Input**: JSONL files (``.jsonl``, ``.json``, optionally ``.gz``) read by the preprocessor's
  reader (:mod:`megatron_glm.data.jsonl`, same bad-line policy: counted with ``file:line`` and
  reported, or under ``strict`` the first one is an error), so the tokenizer learns from exactly
  the documents the preprocessor will keep; or plain-text files, one sentence per line.
* **Sentences, not documents**: each text is split on line breaks and a line longer than
  :data:`MAX_SENTENCE_BYTES` is cut at spaces, because SentencePiece silently skips sentences
  over its maximum length. A newline inside a document therefore never reaches SentencePiece;
  it encodes as the byte piece ``<0x0A>``, still exactly one id.
* **Determinism**: SentencePiece's own sentence sampling (``input_sentence_size``) draws from
  ``std::random_device`` and differs between processes. We therefore sample ourselves: a
  counting pass over the input, then a seeded uniform choice of at most ``input_sentence_size``
  sentence indices, streamed to SentencePiece in a second pass. SentencePiece then sees fewer
  sentences than its limit, loads them all, and the model is a pure function of (inputs,
  parameters, ``seed``, ``threads``): the number of trainer threads changes floating-point
  reduction order and hence the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from megatron_glm.data.jsonl import BadLines, read_texts
from megatron_glm.data.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, GLMTokenizer, TokenizerError

__all__ = [
    "MAX_SENTENCE_BYTES",
    "MODEL_TYPES",
    "SAMPLE_SENTENCES",
    "sample_statistics",
    "train_tokenizer",
]

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
MODEL_TYPES = ("unigram", "bpe")
MAX_SENTENCE_BYTES = 4192
"""SentencePiece's ``max_sentence_length``: longer training sentences would be skipped by it,
so the trainer cuts longer lines into pieces below this size (counted in the summary)."""
SAMPLE_SENTENCES = 2000
"""Sentences (the first ones of the input) encoded after training for the summary statistics."""


@dataclass(frozen=True)
class _Options:
    """The arguments of :func:`train_tokenizer` that shape the model."""

    vocab_size: int
    model_type: str
    input_sentence_size: int
    threads: int
    json_key: str
    seed: int
    byte_fallback: bool
    strict: bool
    verbose: bool


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(_JSON_SUFFIXES)


def _chunk_line(line: str, max_bytes: int) -> list[str]:
    """Cut a line longer than ``max_bytes`` UTF-8 bytes at spaces (hard cut if none)."""
    if len(line) * 4 <= max_bytes or len(line.encode("utf-8")) <= max_bytes:
        return [line]
    step = max_bytes // 4  # a character is at most 4 bytes, so `step` characters always fit
    chunks: list[str] = []
    start = 0
    while start < len(line):
        end = min(start + step, len(line))
        if end < len(line):
            cut = line.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        chunks.append(line[start:end])
        start = end
    return chunks


class _SentenceStream:
    """Sentence-sized pieces of the inputs: each text split on line breaks, long lines cut.

    JSONL documents contain newlines and SentencePiece skips sentences over its maximum length,
    so documents are never fed whole. Each pass counts afresh: ``chunked_lines`` (long lines
    that were cut) and ``bad`` (the bad lines met, under ``strict`` the first raises).
    """

    def __init__(self, inputs: Sequence[Path], opts: _Options) -> None:
        self.inputs = inputs
        self.opts = opts
        self.chunked_lines = 0
        self.bad = BadLines(strict=opts.strict)

    def __iter__(self) -> Iterator[str]:
        self.chunked_lines = 0
        self.bad = BadLines(strict=self.opts.strict)
        for path in self.inputs:
            key = self.opts.json_key if _is_jsonl(path) else None
            for text in read_texts(path, key, self.bad):
                for line in text.splitlines():
                    if not line.strip():
                        continue
                    chunks = _chunk_line(line, MAX_SENTENCE_BYTES)
                    self.chunked_lines += len(chunks) > 1
                    yield from chunks


def _select(stream: Iterable[str], chosen: np.ndarray | None) -> Iterator[str]:
    """The sentences of ``stream`` whose running index is in sorted ``chosen`` (all if None)."""
    if chosen is None:
        yield from stream
        return
    k = 0
    for i, sentence in enumerate(stream):
        if k == len(chosen):
            return
        if i == chosen[k]:
            k += 1
            yield sentence


class _ErrorKeepingIterator:
    """Wraps the sentence iterator so an exception raised while SentencePiece consumes it
    surfaces as itself (SentencePiece would turn it into a RuntimeError with a text trace)."""

    def __init__(self, it: Iterator[str]) -> None:
        self._it = it
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise


def _validate(paths: list[Path], opts: _Options) -> None:
    if not paths:
        raise TokenizerError("train_tokenizer: no input files given")
    for p in paths:
        if not p.is_file():
            raise TokenizerError(f"train_tokenizer: input file {p} does not exist")
    if opts.model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type must be one of {MODEL_TYPES}, got {opts.model_type!r}")
    reserved = 1 + len(SPECIAL_TOKENS) + (256 if opts.byte_fallback else 0)
    if opts.vocab_size <= reserved:
        raise TokenizerError(
            f"vocab_size {opts.vocab_size} leaves no room for learned pieces: <unk>, "
            f"{len(SPECIAL_TOKENS)} special tokens"
            f"{' and 256 byte-fallback pieces' if opts.byte_fallback else ''} take {reserved} ids"
        )
    if opts.input_sentence_size < 1:
        raise TokenizerError(f"input_sentence_size must be >= 1, got {opts.input_sentence_size}")
    if opts.threads < 1:
        raise TokenizerError(f"threads must be >= 1, got {opts.threads}")


def sample_statistics(tokenizer: GLMTokenizer, sentences: Sequence[str]) -> dict[str, float]:
    """Compression on sample text: characters per token, tokens per whitespace word, and the
    fraction of tokens that are byte-fallback pieces or ``<unk>`` (both should be small)."""
    encoded = tokenizer.encode_batch(list(sentences))
    n_tokens = sum(len(ids) for ids in encoded)
    n_chars = sum(len(s) for s in sentences)
    n_words = sum(len(s.split()) for s in sentences)
    sp = tokenizer.sentencepiece
    n_byte = sum(sp.is_byte(i) for ids in encoded for i in ids)
    n_unk = sum(i == tokenizer.unk_id for ids in encoded for i in ids)
    return {
        "sample_sentences": float(len(sentences)),
        "chars_per_token": n_chars / max(n_tokens, 1),
        "tokens_per_word": n_tokens / max(n_words, 1),
        "byte_fallback_fraction": n_byte / max(n_tokens, 1),
        "unk_fraction": n_unk / max(n_tokens, 1),
    }


def _sample(n_sentences: int, opts: _Options) -> np.ndarray | None:
    """Sorted indices of the sentences to train on; None: all of them."""
    if n_sentences <= opts.input_sentence_size:
        return None
    rng = np.random.default_rng(opts.seed)
    return np.sort(rng.choice(n_sentences, size=opts.input_sentence_size, replace=False))


def _run_sentencepiece(sentences: Iterator[str], prefix: Path, opts: _Options) -> None:
    """Train on ``sentences``; an error raised while reading them surfaces as itself."""
    feed = _ErrorKeepingIterator(sentences)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=feed,
            model_prefix=str(prefix),
            vocab_size=opts.vocab_size,
            model_type=opts.model_type,
            user_defined_symbols=[t for t in SPECIAL_TOKENS if t != EOS_TOKEN],
            unk_id=0,
            bos_id=-1,
            eos_id=1 + SPECIAL_TOKENS.index(EOS_TOKEN),  # its place among ids 1..7
            eos_piece=EOS_TOKEN,
            pad_id=-1,
            byte_fallback=opts.byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=opts.input_sentence_size,
            shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            num_threads=opts.threads,
            minloglevel=0 if opts.verbose else 2,
        )
    except RuntimeError as e:
        if feed.error is not None:
            raise feed.error from None
        raise TokenizerError(f"SentencePiece training of {prefix}.model failed: {e}") from e


def train_tokenizer(
    inputs: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    input_sentence_size: int = 1_000_000,
    threads: int = 2,
    json_key: str = "text",
    seed: int = 1234,
    byte_fallback: bool = True,
    strict: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train a SentencePiece model for GLM; write ``{model_prefix}.model`` and ``.vocab``.

    ``inputs``: JSONL files (``.jsonl``, ``.json``, optionally ``.gz``; the string under
    ``json_key`` of each line is a document) or plain-text files (one sentence per line).
    Inputs are streamed twice (count, then feed a seeded uniform sample of at most
    ``input_sentence_size`` sentences); SentencePiece keeps at most that many sentences in
    memory. Bad input lines are counted (``bad_lines`` of the summary) or, with ``strict``, the
    first raises :class:`~megatron_glm.data.jsonl.BadInputError`. Returns a summary: sizes,
    special ids, sentence counts, bad lines, timings and :func:`sample_statistics` on the first
    :data:`SAMPLE_SENTENCES` sentences (in-sample).
    """
    start = time.perf_counter()
    opts = _Options(
        vocab_size, model_type, input_sentence_size, threads, json_key, seed, byte_fallback,
        strict, verbose,
    )  # fmt: skip
    paths = [Path(p) for p in inputs]
    _validate(paths, opts)
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    stream = _SentenceStream(paths, opts)
    n_sentences = sum(1 for _ in stream)
    lines_chunked, bad = stream.chunked_lines, stream.bad
    if n_sentences == 0:
        why = "\n".join(["", *bad.report()]) if bad.total or bad.cut_short else ""
        raise TokenizerError(f"train_tokenizer: inputs {[str(p) for p in paths]} hold no text{why}")
    chosen = _sample(n_sentences, opts)
    count_seconds = time.perf_counter() - start
    _run_sentencepiece(_select(stream, chosen), prefix, opts)
    train_seconds = time.perf_counter() - start - count_seconds
    sample = [s for s, _ in zip(stream, range(SAMPLE_SENTENCES), strict=False)]
    return {
        **_model_summary(prefix, opts),
        "inputs": [str(p) for p in paths],
        "sentences_total": n_sentences,
        "sentences_used": n_sentences if chosen is None else len(chosen),
        "lines_chunked": lines_chunked,
        "bad_lines": bad,
        "threads": threads,
        "seed": seed,
        "count_seconds": count_seconds,
        "train_seconds": train_seconds,
        **sample_statistics(GLMTokenizer(f"{prefix}.model"), sample),
        "seconds": time.perf_counter() - start,
    }


def _model_summary(prefix: Path, opts: _Options) -> dict[str, Any]:
    """What the written model holds, read back through GLMTokenizer (which validates it)."""
    tok = GLMTokenizer(f"{prefix}.model")
    return {
        "model": f"{prefix}.model",
        "vocab": f"{prefix}.vocab",
        "model_type": opts.model_type,
        "vocab_size": tok.vocab_size,
        "padded_vocab_size": tok.padded_vocab_size,
        "special_ids": tok.special_ids(),
        "unk_id": tok.unk_id,
        "byte_fallback": opts.byte_fallback,
    }
