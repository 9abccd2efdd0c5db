"""Every rank must see the same checkpoint directory: on several nodes, a shared filesystem.

Each rank reads ``latest`` and the checkpoint's files itself (its RNG file, its ZeRO partition,
its pipeline stage's layers). With a checkpoint directory on node-local disks (a relative path
resolved on each node, ``/tmp`` or ``/scratch``) rank 0 publishes ``latest`` where the ranks of
other nodes never look: they resume an older checkpoint or start fresh while rank 0 resumes,
and the job hangs in its first mismatched collective or trains a mixture. So, collectively, at
resume (:func:`agree_on_checkpoint`) every rank compares what it sees -- the ``latest`` tag and
the name and size of every file under it, as a SHA-256 digest -- with rank 0's. A difference
raises :class:`CheckpointDirectoryError` on every rank, naming each rank that sees something
else, its host and what it sees, before anything is loaded. After every save the same
comparison only warns (:func:`warn_unless_shared`), so the mistake shows at the first save
rather than at the resume that needs the checkpoint.

The digests and one line per rank travel as fixed-size byte tensors (one all-gather), never as
pickles.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_glm.serialization import LATEST, CheckpointFileError
from megatron_glm.training.checkpoint.latest import read_latest

logger = logging.getLogger(__name__)

DIGEST_BYTES = 32
SUMMARY_BYTES = 480
"""Room for one rank's line (host, path, tag, file count); longer lines are cut."""
MAX_NAMED = 4
"""Ranks named in the error; the others are counted."""


class CheckpointDirectoryError(CheckpointFileError):
    """The ranks see different checkpoints in the same configured directory (raised on every
    rank alike, so an entry point can report it once)."""


@dataclass(frozen=True)
class DirectoryView:
    """What one rank sees of a checkpoint directory: a digest to compare and a line to show."""

    digest: bytes
    summary: str


def view_of(directory: str | None, field: str) -> DirectoryView:
    """This rank's view of ``directory`` (None: it found no checkpoint to resume from)."""
    if directory is None:
        return DirectoryView(hashlib.sha256(b"none").digest(), f"sees no checkpoint ({field})")
    where = f"{directory} ({os.path.abspath(directory)})" if not os.path.isabs(directory) else ""
    where = where or directory
    try:
        tag = read_latest(directory)
    except (OSError, ValueError) as exc:
        return _view(f"error {exc}", f"sees {where}: {exc}")
    if tag is None:
        return _view("no latest", f"sees no '{LATEST}' in {where}")
    files = _listing(Path(directory) / tag)
    size = sum(s for _, s in files)
    return _view(
        f"{tag}\n" + "\n".join(f"{name}\t{s}" for name, s in files),
        f"sees {where}: {LATEST} = {tag}, {len(files)} files, {size:,} bytes",
    )


def _view(content: str, summary: str) -> DirectoryView:
    return DirectoryView(hashlib.sha256(content.encode()).digest(), summary)


def _listing(tag_dir: Path) -> list[tuple[str, int]]:
    """(path relative to the tag directory, size) of every file under it, sorted."""
    out = []
    for path in sorted(tag_dir.rglob("*")):
        if path.is_file():
            out.append((path.relative_to(tag_dir).as_posix(), path.stat().st_size))
    return out


def _encode(view: DirectoryView, rank: int) -> torch.Tensor:
    line = f"rank {rank} on {socket.gethostname()} {view.summary}".encode()[:SUMMARY_BYTES]
    data = view.digest + line + b"\0" * (SUMMARY_BYTES - len(line))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode(row: torch.Tensor) -> tuple[bytes, str]:
    data = bytes(row.cpu().tolist())
    return data[:DIGEST_BYTES], data[DIGEST_BYTES:].rstrip(b"\0").decode(errors="replace")


def _disagreements(directory: str | None, field: str, device: torch.device) -> list[str]:
    """Collective (world): the lines of the ranks that see otherwise than rank 0, then rank
    0's line; empty when every rank agrees. The same list on every rank."""
    me = _encode(view_of(directory, field), dist.get_rank()).to(device)
    rows = [torch.empty_like(me) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, me)
    seen = [_decode(row) for row in rows]
    differ = [line for digest, line in seen[1:] if digest != seen[0][0]]
    return [*differ, seen[0][1]] if differ else []


def _message(lines: list[str], field: str) -> str:
    *differ, first = lines
    more = f"; and {len(differ) - MAX_NAMED} more ranks" if len(differ) > MAX_NAMED else ""
    return (
        f"the ranks see different checkpoints: {'; '.join(differ[:MAX_NAMED])}{more}; but "
        f"{first}. {field} must be a directory every rank sees alike: on several nodes, a "
        "shared filesystem (not a node-local or relative path)"
    )


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def agree_on_checkpoint(
    directory: str | None, field: str, device: torch.device, *, recheck_after_s: float = 3.0
) -> None:
    """Collective (world): raise :class:`CheckpointDirectoryError` on every rank unless every
    rank sees what rank 0 sees in ``directory`` (its resolved checkpoint, None for none).

    ``field`` is the config field the directory comes from, named in the error. A difference
    is looked at again after ``recheck_after_s`` (every rank alike), so that a ``latest``
    written a moment ago by another node, not yet visible through a network filesystem's
    attribute cache, is not taken for a node-local directory.
    """
    if not _several_ranks():
        return
    lines = _disagreements(directory, field, device)
    if lines and recheck_after_s > 0:
        time.sleep(recheck_after_s)
        lines = _disagreements(directory, field, device)
    if lines:
        raise CheckpointDirectoryError(_message(lines, field))


def warn_unless_shared(directory: str, field: str, device: torch.device) -> None:
    """Collective (world): after a save, rank 0 warns if some rank does not see the checkpoint
    as it does; a resume from it would be refused (:func:`agree_on_checkpoint`).

    A warning, not an error: a network filesystem may show another node's files only some
    seconds later, and a false alarm must not end a healthy run.
    """
    if not _several_ranks():
        return
    lines = _disagreements(directory, field, device)
    if lines and dist.get_rank() == 0:
        logger.warning("warning: %s; a resume from it will be refused", _message(lines, field))
