"""The compiled helpers of the data pipeline, ``megatron_glm/data/_native.c``, if they were built.

setup.py builds them with the install (in place for ``pip install -e .``) where a C compiler
exists, and skips them without failing where none does. Every helper has a pure-Python twin,
used when :data:`NATIVE` is None, and the tests check each pair gives the same result.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["NATIVE"]


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("megatron_glm.data._native")
    except ImportError:
        return None


NATIVE: ModuleType | None = _load()
"""``megatron_glm.data._native``, or None when it was not built."""
