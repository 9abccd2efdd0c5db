"""JSONL corpus -> Megatron-compatible indexed datasets (library logic of tools/preprocess_data.py).

One JSONL line is one document. For each ``--json-keys`` key the text is (optionally) split into
sentences, encoded with the GLM SentencePiece tokenizer and written to
``{output_prefix}_{key}_{document|sentence}.bin/.idx``: level ``sentence`` with
``split_sentences`` (each sentence one sequence, a document = its sentences, whose ids decode
back to it exactly), else ``document`` (each document one sequence). With ``append_eod`` the
eos id ends the last sequence of every document, as in Megatron-LM. Tokens are stored as
:func:`best_fitting_dtype` of the vocabulary.

Bad lines (and ``.gz`` inputs cut short) are counted with their ``file:line`` and reported, never
fatal unless ``strict``, and are the only thing ever dropped; the reader and its rules are
:mod:`megatron_glm.data.jsonl`, shared with the tokenizer trainer. With several keys a line
is used only if every key is good, so all output datasets hold the same documents in the same
order (document ``i`` of ``_title_`` belongs to document ``i`` of ``_text_``).

Pipeline and why. The work per chunk of ~256 KiB of lines is: read, JSON parse + checks,
sentence split, SentencePiece encode, flatten the id lists into a numpy array, write.
``tools/bench/bench_preprocess.py --stages`` prints each stage's CPU time against SentencePiece's
own one-thread encode of the same sentences. Encode dominates; each other stage was brought to
a few percent of it: orjson for parsing, and the splitter and the flattening compiled
(:mod:`megatron_glm.data.native`; their numpy twins are used when no C compiler was available
at install). Figures: docs/benchmarks.md. So:

* the **main process** only reads blocks of the input, cut after their last newline, and writes
  finished chunks;
* **``workers`` encoder processes** each take a whole chunk: split it into lines, parse, check,
  split sentences, encode with one SentencePiece thread and flatten, returning ``(tokens,
  lengths)`` arrays and the chunk's bad lines in one pickled message;
* at most ``MAX_IN_FLIGHT_PER_WORKER * workers`` chunks are submitted and not yet written;
  results are consumed in submission order, so the output is the same bytes for any ``workers``
  (chunking depends only on the input), bad lines are reported in input order (under ``strict``
  the first one raises), and memory is a few chunks plus the builder's fixed buffers, whatever
  the corpus size.

Why processes, not SentencePiece's own threads (``encode(list, num_threads=N)``, which releases
the GIL for the C++ segmentation only): building the Python id lists, parsing, splitting and
flattening all hold the GIL, so a threaded design serializes them against each other (this
module's threaded predecessor reached a clearly smaller share of SentencePiece's limit:
docs/benchmarks.md, "Preprocessing throughput"). The cost is one process per worker (forked:
the tokenizer is shared, not reloaded) and a little CPU in the main process. It is
Megatron-LM's layout; the differences are what is sent (one bytes block per chunk, not a pickled
line per task) and the garbage collector, paused (see :func:`_gc_paused`). With ``workers=1``
one core does all the work while the reader idles: give it as many workers as cores.
"""

from __future__ import annotations

import gc
import glob
import itertools
import multiprocessing
import os
import resource
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_glm.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from megatron_glm.data.jsonl import (
    BAD_LINE_REASONS,
    DEFAULT_CHUNK_BYTES,
    BadInputError,
    BadLineError,
    BadLines,
    Chunk,
    iter_chunks,
    parse_chunk,
)
from megatron_glm.data.native import NATIVE
from megatron_glm.data.sentence_split import split_sentences_batch
from megatron_glm.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BAD_LINE_REASONS",
    "DEFAULT_CHUNK_BYTES",
    "BadInputError",
    "BadLineError",
    "BadLines",
    "PreprocessSummary",
    "output_prefix_for",
    "preprocess_data",
    "resolve_inputs",
]

MAX_IN_FLIGHT_PER_WORKER = 2
"""Chunks submitted per encoder process and not yet written: one encoding, one queued behind it
(so a worker never waits for the main process to parse its next chunk)."""
_NATIVE_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32))
"""Token dtypes the compiled ``flatten_ids`` writes (those :func:`best_fitting_dtype` picks)."""


@dataclass
class PreprocessSummary:
    """What :func:`preprocess_data` did; ``format()`` is the closing report of the CLI."""

    inputs: list[str]
    outputs: dict[str, str]  # json key -> output prefix
    level: str
    workers: int
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    input_bytes: int = 0  # uncompressed bytes of all lines, bad ones included
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of this process and its encoder processes during the run
    bad: BadLines = field(default_factory=BadLines)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def format(self) -> str:
        unit = "sentences" if self.level == "sentence" else "sequences"
        lines = [
            f"documents: {self.documents}  {unit}: {self.sequences}  tokens: {self.tokens}",
            f"input: {self.input_bytes / 1e6:.2f} MB in {len(self.inputs)} file(s), "
            f"{self.seconds:.2f} s ({self.cpu_seconds:.2f} s CPU), {self.mb_per_s:.2f} MB/s "
            f"with {self.workers} worker(s)",
            *self.bad.report(),
        ]
        lines += [f"output [{key}]: {prefix}.bin/.idx" for key, prefix in self.outputs.items()]
        return "\n".join(lines)


def resolve_inputs(patterns: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Paths of the inputs: each pattern is a file or a glob (sorted); duplicates removed."""
    if not patterns:
        raise ValueError("no --input given")
    found: list[Path] = []
    for pattern in (os.fspath(p) for p in patterns):
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"--input {pattern!r} matches no file")
            found.extend(map(Path, matches))
        elif os.path.isfile(pattern):
            found.append(Path(pattern))
        else:
            raise ValueError(f"--input {pattern!r}: no such file")
    return list(dict.fromkeys(found))


def output_prefix_for(output_prefix: str | os.PathLike[str], key: str, split: bool) -> str:
    """``{output_prefix}_{key}_{sentence|document}`` (Megatron-LM's naming)."""
    return f"{os.fspath(output_prefix)}_{key}_{'sentence' if split else 'document'}"


# -- encoding and writing --------------------------------------------------------------------


@dataclass
class _Prepared:
    """One key of one chunk, ready for the encoder: sequences and sequences per document."""

    sequences: list[str]
    per_doc: np.ndarray  # int64 [documents]


def _prepare(texts: list[str], split: bool) -> _Prepared:
    if split:
        sentences, counts = split_sentences_batch(texts)
        assert (counts > 0).all(), "a non-blank text has at least one sentence"
        return _Prepared(sentences, counts)
    return _Prepared(texts, np.ones(len(texts), dtype=np.int64))


def _encode(tokenizer: Tokenizer, prepared: _Prepared, split: bool) -> list[list[int]]:
    """Ids of the sequences, with one SentencePiece thread: sentences as the pieces of their
    documents (they decode back to the documents exactly), whole documents each alone."""
    if split:
        return tokenizer.encode_pieces(prepared.sequences, prepared.per_doc, num_threads=1)
    return tokenizer.encode_batch(prepared.sequences, num_threads=1)


def _flatten(
    ids: list[list[int]],
    per_doc: np.ndarray,
    eod: int | None,
    dtype: np.dtype,
    *,
    use_native: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [T] (``dtype``) and sequence lengths int64 [S] of encoded sequences; ``eod`` (if
    given) is appended to the last sequence of each document (the lists are ours, fresh from
    the encoder). Every id is range-checked (OverflowError for one that does not fit ``dtype``).

    The copy runs in the compiled ``flatten_ids`` (:mod:`megatron_glm.data.native`) when built and
    ``use_native``, else in numpy's ``fromiter``: the same array, several times slower
    (bench_preprocess ``--stages`` prints both)."""
    if eod is not None:
        for last in (np.cumsum(per_doc) - 1).tolist():
            ids[last].append(eod)
    lengths = np.empty(len(ids), dtype=np.int64)  # [S]
    if use_native and NATIVE is not None and dtype in _NATIVE_DTYPES:
        tokens = np.empty(NATIVE.row_lengths(ids, lengths), dtype=dtype)  # [T]
        info = np.iinfo(dtype)
        NATIVE.flatten_ids(ids, tokens, int(info.min), int(info.max))
        return tokens, lengths
    lengths[:] = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total), lengths


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, restoring its previous state afterwards.

    The pipeline allocates millions of short-lived containers (a dict per JSON line, a list per
    encoded sentence) and creates no reference cycles, so collections find nothing to free; but
    chunks in flight survive into the old generation, and each full collection traverses all of
    them (bench_preprocess --stages measures the slowdown: docs/benchmarks.md). Reference
    counting still frees everything promptly.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="preprocess",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
    )


@dataclass
class _Encoded:
    """One chunk, processed: per json key the tokens [T] and sequence lengths int64 [S] of its
    good lines, and their sequences per document int64 [D]; its bad lines."""

    arrays: list[tuple[np.ndarray, np.ndarray]]
    per_doc: list[np.ndarray]
    bad: BadLines


@dataclass(frozen=True)
class _Job:
    """What an encoder process needs besides the chunk (sent once, to its initializer)."""

    model: str
    keys: tuple[str, ...]
    split: bool
    eod: int | None
    dtype: str
    strict: bool


class _EncoderProcess:
    """State and work of one encoder process; :meth:`start` is the pool's initializer."""

    job: _Job
    tokenizer: Tokenizer

    @classmethod
    def start(cls, job: _Job, tokenizer: Tokenizer | None) -> None:
        gc.disable()  # as _gc_paused, for the life of the process
        cls.job = job
        cls.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(job.model)

    @classmethod
    def process(cls, chunk: Chunk) -> _Encoded:
        """Parse, split, encode (one SentencePiece thread) and flatten one chunk.

        Under ``strict`` the first bad line raises :class:`BadLineError`, which reaches the main
        process when it collects this chunk, after every earlier chunk: still the first one.
        """
        job, dtype = cls.job, np.dtype(cls.job.dtype)
        bad = BadLines(strict=job.strict)
        texts = parse_chunk(chunk, job.keys, bad)
        if chunk.cut_short:
            bad.add_cut_short(chunk.cut_short)
        prepared = [_prepare(t, job.split) for t in texts]
        arrays = [
            _flatten(_encode(cls.tokenizer, p, job.split), p.per_doc, job.eod, dtype)
            for p in prepared
        ]
        return _Encoded(arrays, [p.per_doc for p in prepared], bad)


@contextmanager
def _encoder_pool(workers: int, job: _Job, tokenizer: Tokenizer) -> Iterator[ProcessPoolExecutor]:
    """``workers`` encoder processes, running when this returns.

    Forked where the platform can (Linux): no re-import, no fresh interpreter, and the parent's
    tokenizer is inherited (its model pages shared copy-on-write) instead of loaded again;
    started here, before the progress bar's monitor thread exists, so no thread of ours is
    forked. Elsewhere spawned, each process loading the model itself. On exit the processes are
    joined (their CPU time then shows in ``RUSAGE_CHILDREN``); after an error, queued chunks
    are cancelled first.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    forked = context.get_start_method() == "fork"
    initargs = (job, tokenizer if forked else None)  # forked: inherited, not pickled
    pool = ProcessPoolExecutor(
        workers, context, initializer=_EncoderProcess.start, initargs=initargs
    )
    try:
        pool.submit(int).result()  # launches every process now
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its joined child processes."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _Writer:
    """Consumes encoded chunks in order: appends to the builders, counts, reports."""

    def __init__(
        self,
        builders: list[IndexedDatasetBuilder],
        summary: PreprocessSummary,
        bar: Any,
        log_interval: int,
    ) -> None:
        self.builders, self.summary = builders, summary
        self.bar, self.log_interval = bar, log_interval
        self.start = time.perf_counter()
        self._shown_docs = 0

    def write(self, nbytes: int, disk_pos: int, encoded: _Encoded) -> None:
        for builder, per_doc, (tokens, lengths) in zip(
            self.builders, encoded.per_doc, encoded.arrays, strict=True
        ):
            builder.add_items(tokens, lengths)
            builder.end_documents(per_doc)
        s = self.summary
        s.bad.merge(encoded.bad)
        s.documents += len(encoded.per_doc[0])
        s.sequences += sum(len(lengths) for _, lengths in encoded.arrays)
        s.tokens = sum(b.num_tokens for b in self.builders)
        s.input_bytes += nbytes
        if s.documents - self._shown_docs >= self.log_interval:
            self.show(disk_pos)

    def show(self, disk_pos: int) -> None:
        self._shown_docs = self.summary.documents
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{self.summary.documents / elapsed:.0f} docs/s, "
            f"{self.summary.input_bytes / 1e6 / elapsed:.2f} MB/s",
            refresh=False,
        )
        self.bar.update(disk_pos - self.bar.n)


def _run_pipeline(
    chunks: Iterator[Chunk], pool: ProcessPoolExecutor, max_in_flight: int, writer: _Writer
) -> None:
    """Read chunks here, process them in the pool, write them here, in submission order.

    At most ``max_in_flight`` chunks are submitted and not yet written, so every encoder has
    its next chunk queued while this process reads ahead and writes the oldest.
    """
    pending: deque[tuple[int, int, Future[_Encoded]]] = deque()
    for chunk in chunks:
        pending.append((chunk.nbytes, chunk.disk_pos, pool.submit(_EncoderProcess.process, chunk)))
        while len(pending) > max_in_flight:
            nbytes, disk_pos, future = pending.popleft()
            writer.write(nbytes, disk_pos, future.result())
    while pending:
        nbytes, disk_pos, future = pending.popleft()
        writer.write(nbytes, disk_pos, future.result())


def preprocess_data(
    inputs: Sequence[str | os.PathLike[str]],
    output_prefix: str | os.PathLike[str],
    tokenizer_model: str | os.PathLike[str],
    *,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    split_sentences: bool = False,
    strict: bool = False,
    log_interval: int = 1000,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize JSONL ``inputs`` (files or globs, ``.gz`` allowed) into indexed datasets.

    See the module docstring for outputs, bad lines and the pipeline. ``workers``: encoder
    processes (the calling process reads, parses and splits beside them). ``log_interval``:
    documents between progress-bar (stderr) refreshes. Raises :class:`BadInputError` on the
    first bad line or cut-short ``.gz`` when ``strict`` (no output is published), ValueError for
    unusable arguments.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must be distinct and non-empty, got {list(json_keys)}")
    if chunk_bytes < 1 or log_interval < 1:
        raise ValueError("chunk_bytes and log_interval must be >= 1")
    paths = resolve_inputs(list(inputs))
    tok = load_tokenizer(tokenizer_model)
    outputs = {k: output_prefix_for(output_prefix, k, split_sentences) for k in json_keys}
    Path(os.fspath(output_prefix)).parent.mkdir(parents=True, exist_ok=True)
    summary = PreprocessSummary(
        inputs=[str(p) for p in paths],
        outputs=outputs,
        level="sentence" if split_sentences else "document",
        workers=workers,
        bad=BadLines(strict=strict),
    )

    dtype = best_fitting_dtype(tok.vocab_size)
    eod = tok.eos_id if append_eod else None
    job = _Job(str(tok.model_path), tuple(json_keys), split_sentences, eod, dtype.str, strict)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with ExitStack() as stack:
        stack.enter_context(_gc_paused())
        builders = [
            stack.enter_context(IndexedDatasetBuilder(outputs[k], dtype)) for k in json_keys
        ]
        # Entered after the builders, so the pool is shut down before they publish or abort.
        pool = stack.enter_context(_encoder_pool(workers, job, tok))
        bar = stack.enter_context(_progress(sum(p.stat().st_size for p in paths), progress))
        writer = _Writer(builders, summary, bar, log_interval)
        chunks = iter_chunks(paths, chunk_bytes)
        _run_pipeline(chunks, pool, MAX_IN_FLIGHT_PER_WORKER * workers, writer)
        writer.show(bar.total)
    summary.seconds = time.perf_counter() - start
    summary.cpu_seconds = _cpu_seconds() - cpu_start
    return summary
