"""Reading checkpoint files safely: no pickle code runs, every error names the file.

A checkpoint directory is something users copy around, download and share, so it is untrusted
input. ``torch.load(weights_only=False)`` runs arbitrary code from a crafted pickle; every load in
this project goes through :func:`load_file`, which uses torch's restricted unpickler
(``weights_only=True``: tensors, containers, numbers, strings and an explicit allow-list of
classes). Our own files hold only those types (RNG states are stored as tensors and plain values,
metadata as JSON). DeepSpeed's files hold three small classes of DeepSpeed's own; their allow-list
lives with the rest of the DeepSpeed seam (``megatron_glm.compat.deepspeed``).

Corrupt files surface as torch's zip-reader messages (``failed finding central directory``,
``OSError: Invalid argument``) that do not say which file; :func:`load_file` re-raises them as
:class:`CheckpointFileError` naming the path and what is wrong. ``mmap=True`` reads only the
pickled structure (tensor bytes stay on disk until touched), which is how the pre-launch checks
open every file of a checkpoint cheaply.

The ``latest`` pointer is also input: :func:`read_latest_tag` accepts only a plain directory name
inside the checkpoint directory, so a ``latest`` holding ``../../elsewhere`` or ``/abs/path``
cannot redirect a resume outside it.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
"""Name of the pointer file holding the newest complete checkpoint's tag."""
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt or holds disallowed objects."""


def load_file(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    mmap: bool = False,
    safe_globals: Iterable[Any] = (),
) -> Any:
    """``torch.load`` with ``weights_only=True``; errors name ``path``.

    ``safe_globals`` extends torch's allow-list for this call only (not process-wide).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointFileError(f"{path}: empty file (truncated checkpoint?)")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not (mmap and "mmap can only be used" in str(exc)):
                    raise
                # torch's legacy (pre-zip) format cannot be memory-mapped: read it whole
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointFileError(_refusal(path, exc)) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointFileError(
            f"{path}: not a readable checkpoint file (truncated or corrupt): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _refusal(path: Path, exc: pickle.UnpicklingError) -> str:
    """Message for a file the restricted unpickler rejected: a named class or function (a
    planted or foreign object), or a pickle stream it cannot read (corrupt or not torch's)."""
    text = str(exc)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:
        return (
            f"{path}: refused to load: it contains a pickled object of type {found.group(1)}, "
            "which is not a tensor or plain value (megatron_glm never loads pickled objects: "
            "the file was planted or not written by this trainer)"
        )
    details = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")]
    detail = details[0] if details else "restricted unpickler error"
    return (
        f"{path}: not a readable checkpoint file (corrupt, or a pickle stream the restricted "
        f"loader refuses): {detail}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else repr(exc)


def read_latest_tag(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag in ``load_dir/latest`` (a directory inside ``load_dir``), or None without one.

    Raises :class:`CheckpointFileError` naming the file for a ``latest`` that is not UTF-8, is
    not a plain directory name (``..``, ``/``, absolute paths, control characters) or names a
    checkpoint that does not exist.
    """
    root = Path(load_dir)
    path = root / LATEST
    if not path.is_file():
        return None
    try:
        tag = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CheckpointFileError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    if not _TAG.fullmatch(tag) or tag in (".", ".."):
        raise CheckpointFileError(
            f"{path}: {tag[:80]!r} is not a checkpoint tag (a plain directory name inside "
            f"{root}, e.g. global_step100)"
        )
    if not (root / tag).is_dir():
        raise CheckpointFileError(
            f"{path} names checkpoint {tag!r}, which does not exist in {root}; "
            "point 'checkpoint.load' at a valid checkpoint directory"
        )
    return tag
