"""JSONL corpus -> Megatron-compatible indexed datasets (library logic of tools/preprocess_data.py).

One JSONL line is one document. For each ``--json-keys`` key the text is (optionally) split into
sentences, encoded with the GLM SentencePiece tokenizer and written to
``{output_prefix}_{key}_{document|sentence}.bin/.idx``: level ``sentence`` with
``split_sentences`` (each sentence one sequence, a document = its sentences), else ``document``
(each document one sequence). With ``append_eod`` the eos id ends the last sequence of every
document, as in Megatron-LM. Tokens are stored as :func:`best_fitting_dtype` of the vocabulary.

Bad lines are counted, never fatal (unless ``strict``), and are the only thing ever dropped:

==================  ==================================================================
reason              line
==================  ==================================================================
``invalid_utf8``    bytes that are not UTF-8, or a text holding a lone surrogate
                    (a ``\\ud800``-style escape: valid JSON, but not encodable text)
``invalid_json``    not one JSON value (including a blank line)
``missing_key``     a key is absent, or the line is a JSON value other than an object
``non_string``      a key's value is not a string (Megatron's pre-split lists included)
``empty_text``      a key's text is empty or only whitespace (``str.isspace``)
==================  ==================================================================

With several keys a line is used only if every key is good, so all output datasets hold the same
documents in the same order (document ``i`` of ``_title_`` belongs to document ``i`` of
``_text_``); the first failing key decides the reason.

Pipeline and why. The work per chunk of ~1 MiB of lines is: read, UTF-8 decode + JSON + checks,
sentence split, SentencePiece encode, flatten ids into a numpy array, write.
``tools/bench/bench_preprocess.py --stages`` prints each stage's CPU time against
SentencePiece's own encode: encode dominates; the vectorised splitter costs about a fifth of
it, flattening about an eighth, parsing under a tenth. SentencePiece's batch
``encode(list, num_threads=N)`` releases the GIL and runs a C++ thread pool. So:

* the **main thread** reads, parses and splits chunk ``i+1`` (vectorised splitter, see
  :mod:`megatron_glm.data.sentence_split`), and flattens and writes chunk ``i-1``;
* **one encoder thread** runs ``encode_batch(texts, num_threads=workers)`` on chunk ``i``;
* at most ``MAX_IN_FLIGHT`` chunks are submitted and not yet written, results are consumed in
  submission order: output is the same bytes for any ``workers`` (chunking depends only on the
  input), and memory is a few chunks plus the builder's fixed buffers, whatever the corpus size.

``workers`` is therefore the number of SentencePiece threads; parsing runs beside them in the
main thread. The alternative, Megatron's ``multiprocessing`` pool of ``workers`` processes each
parsing and encoding whole chunks, pays for pickling lines and id lists between processes and
for a per-process model, and cannot overlap parsing with encoding at ``workers=1``; the bench's
``--with-pool`` column measured it slower at 1 and 2 workers on the 2-core development machine.
Its advantage, parsing on many cores, matters once SentencePiece threads outrun the single
parsing thread (it does the other stages at several times the encoder's per-thread speed, so
beyond several workers); there, shard the input and merge with ``tools/merge_datasets.py``.
"""

from __future__ import annotations

import gc
import glob
import gzip
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from megatron_glm.data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from megatron_glm.data.sentence_split import split_sentences_batch
from megatron_glm.data.tokenizer import GLMTokenizer

__all__ = [
    "BAD_LINE_REASONS",
    "DEFAULT_CHUNK_BYTES",
    "BadLineError",
    "BadLines",
    "PreprocessSummary",
    "output_prefix_for",
    "preprocess_data",
    "resolve_inputs",
]

BAD_LINE_REASONS: dict[str, str] = {
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "invalid JSON",
    "missing_key": "missing key",
    "non_string": "non-string value",
    "empty_text": "empty text",
}
"""Reason code -> words used in reports and errors."""

DEFAULT_CHUNK_BYTES = 1 << 20
"""Input bytes per chunk: big enough to amortise per-call costs (SentencePiece's thread pool is
created per call), small enough that a few chunks in flight cost a few MB."""
MAX_IN_FLIGHT = 2
"""Chunks submitted to the encoder and not yet written: one encoding, one queued behind it."""
REPORTED_LOCATIONS = 5
"""``file:line`` locations kept per bad-line reason for the report."""


class BadLineError(ValueError):
    """A bad input line under ``strict``; the message is ``file:line: reason: detail``."""


@dataclass
class BadLines:
    """Bad-line counts per reason with the first ``REPORTED_LOCATIONS`` locations of each."""

    strict: bool = False
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_LINE_REASONS, 0))
    locations: dict[str, list[str]] = field(
        default_factory=lambda: {r: [] for r in BAD_LINE_REASONS}
    )

    def add(self, reason: str, path: str, lineno: int, detail: str) -> None:
        where = f"{path}:{lineno}"
        if self.strict:
            raise BadLineError(f"{where}: {BAD_LINE_REASONS[reason]}: {detail}")
        self.counts[reason] += 1
        if len(self.locations[reason]) < REPORTED_LOCATIONS:
            self.locations[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


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
    cpu_seconds: float = 0.0  # CPU time of all threads of the process during the run
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
            f"bad lines: {self.bad.total}",
        ]
        for reason, words in BAD_LINE_REASONS.items():
            n = self.bad.counts[reason]
            if n:
                more = ", ..." if n > len(self.bad.locations[reason]) else ""
                lines.append(f"  {words}: {n} ({', '.join(self.bad.locations[reason])}{more})")
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


# -- reading --------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Consecutive raw lines of one file."""

    path: str
    first_lineno: int
    lines: list[bytes]
    nbytes: int
    disk_pos: int  # bytes of the (possibly compressed) input files consumed so far


def _open_lines(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    """(line source, raw file whose position measures progress on disk)."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
    return raw, raw


def _iter_chunks(paths: Sequence[Path], chunk_bytes: int) -> Iterator[_Chunk]:
    """Chunks of about ``chunk_bytes`` (never spanning files); ``disk_pos`` counts all files."""
    done = 0
    for path in paths:
        src, raw = _open_lines(path)
        with raw, src:
            lineno = 1
            lines: list[bytes] = []
            nbytes = 0
            for line in src:
                lines.append(line)
                nbytes += len(line)
                if nbytes >= chunk_bytes:
                    yield _Chunk(str(path), lineno, lines, nbytes, done + raw.tell())
                    lineno += len(lines)
                    lines, nbytes = [], 0
            if lines:
                yield _Chunk(str(path), lineno, lines, nbytes, done + raw.tell())
        done += path.stat().st_size


# -- parsing --------------------------------------------------------------------------------


def _check_text(obj: Any, key: str) -> tuple[str, str] | str:
    """The text under ``key``, or ``(reason, detail)`` of why the line is bad."""
    if not isinstance(obj, dict):
        return "missing_key", f"line is a JSON {type(obj).__name__}, not an object"
    if key not in obj:
        return "missing_key", f"no key {key!r}"
    text = obj[key]
    if not isinstance(text, str):
        return "non_string", f"{key!r} is {type(text).__name__}, not a string"
    if not text or text.isspace():
        return "empty_text", f"{key!r} is empty or only whitespace"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return "invalid_utf8", f"{key!r} holds a lone surrogate at character {e.start}"
    return text


_SCAN_ONCE = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
"""The C scanner behind ``json.loads``. Calling it directly skips two Python frames and two
regex matches per line; any line it does not accept whole goes through ``json.loads`` itself,
which then decides and words the error (tests check both paths agree)."""


def _loads(line: str) -> Any:
    """``json.loads(line)``, fast path for a value that starts at column 0."""
    try:
        obj, end = _SCAN_ONCE(line, 0)
    except (StopIteration, ValueError, RecursionError):
        return json.loads(line)
    if end != len(line) and not line[end:].isspace():
        return json.loads(line)  # raises "Extra data"
    return obj


def _parse_chunk(chunk: _Chunk, keys: Sequence[str], bad: BadLines) -> list[list[str]]:
    """Texts per key of the good lines of ``chunk`` (bad lines reported to ``bad``)."""
    texts: list[list[str]] = [[] for _ in keys]
    for i, raw in enumerate(chunk.lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(
                "invalid_utf8", chunk.path, chunk.first_lineno + i, f"byte {e.start}: {e.reason}"
            )
            continue
        try:
            obj = _loads(line)
        except (ValueError, RecursionError) as e:
            bad.add("invalid_json", chunk.path, chunk.first_lineno + i, str(e))
            continue
        checked = [_check_text(obj, key) for key in keys]
        for result in checked:
            if isinstance(result, tuple):
                bad.add(result[0], chunk.path, chunk.first_lineno + i, result[1])
                break
        else:
            for bucket, text in zip(texts, checked, strict=True):
                bucket.append(text)  # type: ignore[arg-type]
    return texts


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


def _flatten(
    ids: list[list[int]], per_doc: np.ndarray, eod: int | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [T] (``dtype``) and sequence lengths int64 [S] of encoded sequences; ``eod`` (if
    given) is appended to the last sequence of each document (the lists are ours, fresh from
    the encoder). numpy range-checks every Python int it converts (OverflowError on a token id
    that does not fit ``dtype``)."""
    if eod is not None:
        for last in (np.cumsum(per_doc) - 1).tolist():
            ids[last].append(eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # [S]
    tokens = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum())
    )  # [T]
    return tokens, lengths


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, restoring its previous state afterwards.

    The pipeline allocates millions of short-lived containers (a dict per JSON line, a list per
    encoded sentence) and creates no reference cycles, so collections find nothing to free; but
    chunks in flight survive into the old generation, and each full collection traverses all of
    them (bench_preprocess --stages: SentencePiece's own list building runs ~1.8x slower with the
    collector on). Reference counting still frees everything promptly.
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


_Encoded = list[list[list[int]]]  # per json key, per sequence: token ids


class _Writer:
    """Consumes encoded chunks in order: flattens, appends to the builders, counts, reports."""

    def __init__(
        self,
        builders: list[IndexedDatasetBuilder],
        summary: PreprocessSummary,
        eod: int | None,
        bar: Any,
        log_interval: int,
    ) -> None:
        self.builders, self.summary, self.eod = builders, summary, eod
        self.dtype = builders[0].dtype
        self.bar, self.log_interval = bar, log_interval
        self.start = time.perf_counter()
        self._shown_docs = 0

    def write(self, chunk: _Chunk, prepared: list[_Prepared], encoded: _Encoded) -> None:
        for builder, prep, ids in zip(self.builders, prepared, encoded, strict=True):
            tokens, lengths = _flatten(ids, prep.per_doc, self.eod, self.dtype)
            builder.add_items(tokens, lengths)
            builder.end_documents(prep.per_doc)
        s = self.summary
        s.documents += len(prepared[0].per_doc)
        s.sequences += sum(len(p.sequences) for p in prepared)
        s.tokens = sum(b.num_tokens for b in self.builders)
        s.input_bytes += chunk.nbytes
        if s.documents - self._shown_docs >= self.log_interval:
            self.show(chunk.disk_pos)

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
    chunks: Iterator[_Chunk],
    prepare: Callable[[_Chunk], list[_Prepared]],
    encode: Callable[[list[_Prepared]], _Encoded],
    writer: _Writer,
) -> None:
    """Prepare chunks here, encode them on one background thread, write them here, in order.

    At most ``MAX_IN_FLIGHT`` chunks are submitted and not yet written, so the encoder always
    has the next chunk queued while this thread parses the one after and writes the one before.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="sp-encode") as encoder:
        pending: deque[tuple[_Chunk, list[_Prepared], Future[_Encoded]]] = deque()
        try:
            for chunk in chunks:
                prepared = prepare(chunk)
                pending.append((chunk, prepared, encoder.submit(encode, prepared)))
                while len(pending) > MAX_IN_FLIGHT:
                    chunk, prepared, future = pending.popleft()
                    writer.write(chunk, prepared, future.result())
            while pending:
                chunk, prepared, future = pending.popleft()
                writer.write(chunk, prepared, future.result())
        except BaseException:
            encoder.shutdown(cancel_futures=True)
            raise


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

    See the module docstring for outputs, bad lines and the pipeline. ``workers``: SentencePiece
    encode threads. ``log_interval``: documents between progress-bar (stderr) refreshes.
    Raises :class:`BadLineError` on the first bad line when ``strict`` (no output is published),
    ValueError for unusable arguments.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must be distinct and non-empty, got {list(json_keys)}")
    if chunk_bytes < 1 or log_interval < 1:
        raise ValueError("chunk_bytes and log_interval must be >= 1")
    paths = resolve_inputs(list(inputs))
    tok = GLMTokenizer(tokenizer_model)
    outputs = {k: output_prefix_for(output_prefix, k, split_sentences) for k in json_keys}
    Path(os.fspath(output_prefix)).parent.mkdir(parents=True, exist_ok=True)
    summary = PreprocessSummary(
        inputs=[str(p) for p in paths],
        outputs=outputs,
        level="sentence" if split_sentences else "document",
        workers=workers,
        bad=BadLines(strict=strict),
    )

    def prepare(chunk: _Chunk) -> list[_Prepared]:
        return [_prepare(t, split_sentences) for t in _parse_chunk(chunk, json_keys, summary.bad)]

    def encode(prepared: list[_Prepared]) -> _Encoded:
        return [tok.encode_batch(p.sequences, num_threads=workers) for p in prepared]

    start, cpu_start = time.perf_counter(), time.process_time()
    dtype = best_fitting_dtype(tok.vocab_size)
    with ExitStack() as stack:
        stack.enter_context(_gc_paused())
        builders = [
            stack.enter_context(IndexedDatasetBuilder(outputs[k], dtype)) for k in json_keys
        ]
        bar = stack.enter_context(_progress(sum(p.stat().st_size for p in paths), progress))
        eod = tok.eos_id if append_eod else None
        writer = _Writer(builders, summary, eod, bar, log_interval)
        _run_pipeline(_iter_chunks(paths, chunk_bytes), prepare, encode, writer)
        writer.show(bar.total)
    summary.seconds = time.perf_counter() - start
    summary.cpu_seconds = time.process_time() - cpu_start
    return summary
