"""The JSONL reader of the preprocessor and the tokenizer trainer: one reader, one policy.

One line is one document; its text is the string under a key (``--json-keys`` /
``--json-key``). Read in chunks of whole lines, ``.gz`` decompressed on the fly.

Bad lines are never dropped silently: each is counted by reason with its ``file:line``
(:class:`BadLines`, the closing report of both tools names the first few of each reason), and
under ``strict`` the first one is an error (:class:`BadLineError`) instead. Bad lines are the only
thing ever dropped:

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

A ``.gz`` input that stops being readable (cut short, corrupt, or not gzip at all) is reported
like a bad line, naming the file and the last complete line read: every line before the fault is
used as usual, the partial line at the fault is dropped, and the report says the file was cut
short after line N (under ``strict`` it is an error, :class:`BadInputError`).

Why count rather than stop by default: one malformed line in a multi-GB crawl should not cost a
rerun, and both tools must agree on which documents exist (a tokenizer trained on lines the
preprocessor drops, or the reverse, would be a silent mismatch); ``strict`` is for corpora that
are supposed to be clean.

Parsing uses orjson, several times faster than ``json`` on the lines it accepts; a line it
rejects goes to ``json.loads``, which decides and words the error (:func:`parse_line`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "BAD_LINE_REASONS",
    "DEFAULT_CHUNK_BYTES",
    "BadInputError",
    "BadLineError",
    "BadLines",
    "Chunk",
    "check_text",
    "iter_chunks",
    "parse_chunk",
    "parse_line",
    "read_texts",
]

BAD_LINE_REASONS: dict[str, str] = {
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "invalid JSON",
    "missing_key": "missing key",
    "non_string": "non-string value",
    "empty_text": "empty text",
}
"""Reason code -> words used in reports and errors."""

DEFAULT_CHUNK_BYTES = 1 << 18
"""Input bytes per chunk: big enough to amortise per-chunk costs (a SentencePiece call, two
pickled messages), small enough that the Python objects of a chunk (an int per token) fit the
allocator's reused arenas instead of being mapped and unmapped each time (1 MiB measurably did
not: docs/benchmarks.md), and that the last chunk, encoded alone while the other encoders idle,
is short."""
REPORTED_LOCATIONS = 5
"""``file:line`` locations kept per bad-line reason for the report."""


class BadInputError(ValueError):
    """Bad input under ``strict``: a bad line, or a ``.gz`` file cut short; names file and line."""


class BadLineError(BadInputError):
    """A bad input line under ``strict``; the message is ``file:line: reason: detail``."""


@dataclass
class BadLines:
    """Bad-line counts per reason with the first ``REPORTED_LOCATIONS`` locations of each."""

    strict: bool = False
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_LINE_REASONS, 0))
    locations: dict[str, list[str]] = field(
        default_factory=lambda: {r: [] for r in BAD_LINE_REASONS}
    )
    cut_short: list[str] = field(default_factory=list)
    """One message per input file whose reading stopped early (see :class:`_Source`)."""

    def add(self, reason: str, path: str, lineno: int, detail: str) -> None:
        where = f"{path}:{lineno}"
        if self.strict:
            raise BadLineError(f"{where}: {BAD_LINE_REASONS[reason]}: {detail}")
        self.counts[reason] += 1
        if len(self.locations[reason]) < REPORTED_LOCATIONS:
            self.locations[reason].append(where)

    def add_cut_short(self, message: str) -> None:
        """An input file stopped early; its lines before were used (``message`` says where)."""
        if self.strict:
            raise BadInputError(message)
        self.cut_short.append(message)

    def merge(self, other: BadLines) -> None:
        """Add the bad lines of a later part of the input (an encoder process's chunk)."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            room = REPORTED_LOCATIONS - len(self.locations[reason])
            self.locations[reason] += other.locations[reason][:room]
        self.cut_short += other.cut_short

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> list[str]:
        """The lines of the closing report: the total, each reason's count with its first
        locations, and every input cut short."""
        lines = [f"bad lines: {self.total}"]
        for reason, words in BAD_LINE_REASONS.items():
            n = self.counts[reason]
            if n:
                more = ", ..." if n > len(self.locations[reason]) else ""
                lines.append(f"  {words}: {n} ({', '.join(self.locations[reason])}{more})")
        if self.cut_short:
            lines.append(f"inputs cut short: {len(self.cut_short)}")
            lines += [f"  {message}" for message in self.cut_short]
        return lines


@dataclass
class Chunk:
    """Whole consecutive lines of one file, as the raw bytes read (newlines included)."""

    path: str
    first_lineno: int
    data: bytes
    disk_pos: int  # bytes of the (possibly compressed) input files consumed so far
    cut_short: str | None = None  # set on the last chunk of a file whose reading stopped early

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def lines(self) -> list[bytes]:
        """The lines, without their ``\n`` (a final line may lack one). Split here, in C, by
        the process that parses them: the reading process only finds the last newline."""
        lines = self.data.split(b"\n")
        if not lines[-1]:
            lines.pop()
        return lines


_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
"""What reading a damaged ``.gz`` raises: EOFError (cut short), BadGzipFile (not gzip, bad CRC or
length), zlib.error (corrupt deflate data)."""


class _Source:
    """The bytes of one input file, decompressed if it is named ``.gz``.

    A gzip stream that cannot be read on (cut short, corrupt, not gzip) ends the file instead of
    raising: ``error`` then says why, and every byte decompressed before the fault has been
    returned. That is why gzip data is taken with ``read1`` (one bounded decompression step at a
    time) and gathered here: ``GzipFile.read(n)`` loses the bytes it had gathered when a later
    step of the same call raises.
    """

    def __init__(self, path: Path) -> None:
        self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.gz = gzip.GzipFile(fileobj=self.raw, mode="rb") if path.name.endswith(".gz") else None
        self.error: str | None = None

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the data (or at a fault)."""
        if self.gz is None:
            return b"" if self.error else self.raw.read(size)
        parts: list[bytes] = []
        got = 0
        try:
            while got < size and (part := self.gz.read1(size - got)):
                parts.append(part)
                got += len(part)
        except _GZIP_ERRORS as e:
            self.error = str(e) or type(e).__name__
            self.gz.close()
            self.gz = None
        return b"".join(parts)

    def close(self) -> None:
        if self.gz is not None:
            self.gz.close()
        self.raw.close()


def _cut_short_message(path: Path, last_line: int, partial: int, error: str) -> str:
    """``path: cut short after line N: ...``, N the last complete line read, 0 if none."""
    dropped = f"; the {partial} bytes read of line {last_line + 1} are dropped" if partial else ""
    return f"{path}: cut short after line {last_line}: unreadable gzip data ({error}){dropped}"


def iter_chunks(paths: Sequence[Path], chunk_bytes: int) -> Iterator[Chunk]:
    """Chunks of whole lines, about ``chunk_bytes`` each (more for a longer line), never
    spanning files; ``disk_pos`` counts all files. Read in blocks, cut after the last newline:
    no per-line Python work here, and a line of any length is read in linear time.

    A file whose reading stops early (:class:`_Source`) ends with an empty chunk that carries the
    message; the partial line at the fault is dropped, not parsed as a bad line.
    """
    done = 0
    for path in paths:
        src = _Source(path)
        try:
            lineno = 1
            parts: list[bytes] = []  # a started line, until a block holds its newline
            while block := src.read(chunk_bytes):
                cut = block.rfind(b"\n") + 1
                if not cut:
                    parts.append(block)
                    continue
                data = b"".join([*parts, block[:cut]])
                parts = [block[cut:]]
                yield Chunk(str(path), lineno, data, done + src.raw.tell())
                lineno += data.count(b"\n")
            rest = b"".join(parts)
            if src.error:
                message = _cut_short_message(path, lineno - 1, len(rest), src.error)
                yield Chunk(str(path), lineno, b"", done + src.raw.tell(), message)
            elif rest:
                yield Chunk(str(path), lineno, rest, done + src.raw.tell())
        finally:
            src.close()
        done += path.stat().st_size


def check_text(obj: Any, key: str) -> tuple[str, str] | str:
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


def parse_line(raw: bytes) -> Any:
    """The JSON value of one line, with ``json.loads`` semantics.

    orjson parses the lines it accepts several times faster than ``json`` (bench_preprocess
    ``--stages``); a line it rejects goes to ``json.loads``, which decides and words the error.
    orjson refuses more (NaN, 1e400, a lone surrogate escape) and never accepts a line ``json``
    refuses, so every verdict and error message is ``json``'s; the one value that differs, an
    integer past 64 bits (a float for orjson), is a non-string either way (its bad-line detail
    then says float; tests compare the two on the edge cases). Raises UnicodeDecodeError,
    ValueError or RecursionError.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8"))


def parse_chunk(chunk: Chunk, keys: Sequence[str], bad: BadLines) -> list[list[str]]:
    """Texts per key of the good lines of ``chunk`` (bad lines reported to ``bad``).

    With several keys a line is used only if every key is good, so the texts of every key come
    from the same lines in the same order (document ``i`` of ``title`` belongs to document ``i``
    of ``text``); the first failing key decides the reason.
    """
    texts: list[list[str]] = [[] for _ in keys]
    for i, raw in enumerate(chunk.lines()):
        try:
            obj = parse_line(raw)
        except UnicodeDecodeError as e:
            reason = f"byte {e.start}: {e.reason}"
            bad.add("invalid_utf8", chunk.path, chunk.first_lineno + i, reason)
            continue
        except (ValueError, RecursionError) as e:
            bad.add("invalid_json", chunk.path, chunk.first_lineno + i, str(e))
            continue
        checked = [check_text(obj, key) for key in keys]
        for result in checked:
            if isinstance(result, tuple):
                bad.add(result[0], chunk.path, chunk.first_lineno + i, result[1])
                break
        else:
            for bucket, text in zip(texts, checked, strict=True):
                bucket.append(text)  # type: ignore[arg-type]
    return texts


def read_texts(
    path: Path, json_key: str | None, bad: BadLines, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[str]:
    """The texts of one file, in order: the string under ``json_key`` of each good JSONL line,
    or with ``json_key=None`` each line of a plain-text file (without its line break).

    Every bad line and a ``.gz`` cut short go to ``bad`` (which raises under ``strict``). In
    plain text only bytes that are not UTF-8 make a line bad: a blank line is an empty text.
    """
    for chunk in iter_chunks([path], chunk_bytes):
        if json_key is None:
            yield from _plain_lines(chunk, bad)
        else:
            yield from parse_chunk(chunk, [json_key], bad)[0]
        if chunk.cut_short:
            bad.add_cut_short(chunk.cut_short)


def _plain_lines(chunk: Chunk, bad: BadLines) -> Iterator[str]:
    for i, raw in enumerate(chunk.lines()):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(
                "invalid_utf8", chunk.path, chunk.first_lineno + i, f"byte {e.start}: {e.reason}"
            )
            continue
        yield line.rstrip("\r")
