"""Every rank must see the same checkpoint directory: on several nodes, a shared filesystem.

Each rank reads ``latest`` and the checkpoint's files itself (its RNG file, its ZeRO partition,
its pipeline stage's layers). With a checkpoint directory on node-local disks (a relative path
resolved on each node, ``/tmp`` or ``/scratch``) rank 0 publishes ``latest`` where the ranks of
other nodes never look: they resume an older checkpoint or start fresh while rank 0 resumes,
and the job hangs in its first mismatched collective or trains a mixture. So, collectively, at
resume (:func:`agree_on_checkpoint`) and after every save, every rank compares what it sees --
the ``latest`` tag and the name and size of every file under it, as a SHA-256 digest -- with
rank 0's. A difference raises :class:`CheckpointDirectoryError` on every rank, naming each rank
that sees something else, its host and what it sees, before anything is loaded.

The digests and one line per rank travel as fixed-size byte tensors (one all-gather), never as
pickles.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_glm.serialization import LATEST, CheckpointFileError
from megatron_glm.training.checkpoint.latest import read_latest

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


def agree_on_checkpoint(directory: str | None, field: str, device: torch.device) -> None:
    """Collective (world): raise :class:`CheckpointDirectoryError` on every rank unless every
    rank sees what rank 0 sees in ``directory`` (its resolved checkpoint, None for none).

    ``field`` is the config field the directory comes from, named in the error.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    me = _encode(view_of(directory, field), dist.get_rank()).to(device)
    rows = [torch.empty_like(me) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, me)
    seen = [_decode(row) for row in rows]
    differ = [line for digest, line in seen[1:] if digest != seen[0][0]]
    if differ:
        more = f"; and {len(differ) - MAX_NAMED} more ranks" if len(differ) > MAX_NAMED else ""
        raise CheckpointDirectoryError(
            f"the ranks see different checkpoints: {'; '.join(differ[:MAX_NAMED])}{more}; but "
            f"{seen[0][1]}. "
            f"{field} must be a directory every rank sees alike: on several nodes, a shared "
            "filesystem (not a node-local or relative path)"
        )
