"""The ``latest`` pointer: read validated, written atomically (one writer for the package).

``latest`` is written last, after every file of the checkpoint it names is complete, through a
temporary file, ``fsync`` and ``os.replace``: a crash leaves either the old or the new pointer,
never a truncated one. Reading accepts only a plain directory name inside the checkpoint
directory (:func:`megatron_glm.serialization.read_latest_tag`).
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_glm.serialization import LATEST, read_latest_tag


def read_latest(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag in ``load_dir/latest``, or None when there is no complete checkpoint.

    A ``latest`` that is not UTF-8, not a plain directory name inside ``load_dir`` or that names
    a missing checkpoint is an error naming the file
    (:func:`megatron_glm.serialization.read_latest_tag`).
    """
    return read_latest_tag(load_dir)


def write_latest(save_dir: str | os.PathLike[str], tag: str) -> None:
    """Point ``save_dir/latest`` at ``tag``: temporary file, fsync, atomic rename."""
    root = Path(save_dir)
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as fh:
        fh.write(tag)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)


def resolve_tag(load_dir: str | os.PathLike[str], tag: str | None = None) -> str:
    """``tag``, or the one named by ``load_dir/latest`` (validated: a directory inside it)."""
    if tag is not None:
        return tag
    latest = read_latest(load_dir)
    if latest is None:
        raise ValueError(f"{load_dir}: no '{LATEST}' file; pass the checkpoint tag explicitly")
    return latest
