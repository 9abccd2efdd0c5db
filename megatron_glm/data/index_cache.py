"""Index cache: arrays built once, published atomically, memory-mapped by every rank.

A dataset's index arrays are cached as ``.npy`` next to the data (or under ``cache_dir``) in
files named by a sha256 of a canonical JSON of everything that determines them (the dataset's
cache key), built by exactly one process under an ``fcntl.flock`` and published by atomic
rename, then memory-mapped read-only by all ranks. A ``.json`` with the full key is written last:
it is the "complete" marker and guards against ever loading a cache built for other parameters.
Across nodes on a shared filesystem without working flock, two builders may race, but both write
identical files by atomic rename, so the result is still correct.

Megatron-core builds and caches inside each dataset class (``gpt_dataset.py``,
``blended_dataset.py``); here the packed and the blended dataset share this one mechanism.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "CacheEntry", "canonical_digest", "file_fingerprint", "load_or_build"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump whenever the meaning or layout of any cached array changes: old caches are then ignored."""

_FINGERPRINT_BYTES = 1 << 20  # head and tail of the .idx hashed into the cache key

BuildFn = Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]
"""Builds ``(arrays by name, JSON-able scalars)`` when no process has cached them yet."""


def canonical_digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_fingerprint(path: str) -> dict[str, Any]:
    """Identity of a data file: size, mtime and a hash of its head and tail.

    Hashing a multi-GB ``.idx`` on every start would cost seconds per rank; size + mtime catch
    rewrites, and the head/tail hash catches a same-size rewrite within one mtime tick.
    """
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if st.st_size > 2 * _FINGERPRINT_BYTES:
            f.seek(st.st_size - _FINGERPRINT_BYTES)
        h.update(f.read(_FINGERPRINT_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_head_tail": h.hexdigest()}


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class CacheEntry:
    arrays: dict[str, np.ndarray]  # read-only memmaps
    meta: dict[str, Any]  # scalars stored with the arrays
    built: bool  # whether this process built them
    paths: dict[str, str]  # array name -> .npy path, plus "meta" and "lock"


def _cache_paths(cache_dir: str, stem: str, names: Sequence[str]) -> dict[str, str]:
    paths = {n: os.path.join(cache_dir, f"{stem}_{n}.npy") for n in names}
    paths["meta"] = os.path.join(cache_dir, f"{stem}.json")
    paths["lock"] = os.path.join(cache_dir, f"{stem}.lock")
    return paths


def _try_load(paths: dict[str, str], key: dict[str, Any]) -> CacheEntry | None:
    """The cached arrays if complete and built for ``key``; None (with a warning if bad) if not."""
    if not os.path.exists(paths["meta"]):
        return None
    try:
        with open(paths["meta"]) as f:
            record = json.load(f)
        if record.get("key") != key:
            logger.warning("index cache %s was built for another key; rebuilding", paths["meta"])
            return None
        arrays = {}
        for name, spec in record["arrays"].items():
            arr = np.load(paths[name], mmap_mode="r")
            if list(arr.shape) != spec["shape"] or arr.dtype.str != spec["dtype"]:
                raise ValueError(f"{paths[name]}: shape {arr.shape} dtype {arr.dtype}, want {spec}")
            arrays[name] = arr
    except (OSError, ValueError, KeyError) as e:
        logger.warning("index cache %s unreadable (%s); rebuilding", paths["meta"], e)
        return None
    return CacheEntry(arrays, record["meta"], False, paths)


def load_or_build(
    cache_dir: str,
    stem: str,
    key: dict[str, Any],
    names: Sequence[str],
    build: BuildFn,
    what: str,
) -> CacheEntry:
    """Memory-map the cached arrays for ``key``, building them first if no process has yet.

    The fast path takes no lock. Otherwise an exclusive flock serialises builders; whoever gets it
    second finds the finished cache and only maps it. Arrays are published by atomic rename and
    the meta file last, so a reader never sees a half-written cache.
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"index cache directory {cache_dir!r} cannot be created ({e}); set data.cache_dir"
        ) from e
    if not os.access(cache_dir, os.W_OK):
        raise ValueError(f"index cache directory {cache_dir!r} is not writable; set data.cache_dir")
    paths = _cache_paths(cache_dir, stem, names)
    t0 = time.perf_counter()
    entry = _try_load(paths, key)
    if entry is None:
        with open(paths["lock"], "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entry = _try_load(paths, key)
                if entry is None:
                    _build_and_publish(paths, key, names, build, what)
                    entry = _try_load(paths, key)
                    assert entry is not None, f"{paths['meta']}: cache unreadable right after build"
                    entry = dataclasses.replace(entry, built=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if not entry.built:
        logger.info(
            "%s: reusing cached indices %s (%.3f s)", what, paths["meta"], time.perf_counter() - t0
        )
    return entry


def _build_and_publish(
    paths: dict[str, str],
    key: dict[str, Any],
    names: Sequence[str],
    build: BuildFn,
    what: str,
) -> None:
    logger.info("%s: building indices -> %s", what, paths["meta"])
    t0 = time.perf_counter()
    arrays, meta = build()
    assert sorted(arrays) == sorted(names), f"built {sorted(arrays)}, expected {sorted(names)}"
    for name in names:
        _atomic_save(paths[name], arrays[name])
    specs = {n: {"shape": list(a.shape), "dtype": a.dtype.str} for n, a in arrays.items()}
    record = {"key": key, "meta": meta, "arrays": specs}
    _atomic_write_text(paths["meta"], json.dumps(record, indent=1, sort_keys=True))
    logger.info("%s: built indices in %.3f s", what, time.perf_counter() - t0)
