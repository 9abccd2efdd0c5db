"""The embedded demo corpus: docstrings of the running interpreter's standard library.

Why this corpus: the demo, the tests and CI need real natural-language text (sentences,
paragraphs, documents of varied length) without a download. Every CPython installation ships
about 1.6 MB of carefully written English prose in its docstrings, and the same Python version
gives the same corpus on every machine.

How it is built (deterministic, no side effects):

* The stdlib directory (``sysconfig.get_paths()["stdlib"]``) is walked and its ``.py`` files are
  visited in sorted order of their relative path. Modules are **never imported** (``this``,
  ``antigravity`` and ``tkinter`` have import-time side effects); each file is parsed with
  :mod:`ast`. Files that fail to decode or parse are skipped and counted.
* ``site-packages``/``dist-packages`` (third-party code, differs per machine), ``__pycache__`` and
  test directories (``test``, ``tests``, ``idle_test``; this covers ``lib2to3/tests``,
  ``ctypes/test``, ``distutils/tests``...) are skipped: test docstrings are short and repetitive.
* One **document per top-level unit** of a module: the module docstring is one document, and each
  top-level class or function is one document holding its own docstring followed by the
  docstrings of everything nested in it (methods, inner classes), in source order, separated by
  blank lines. A class with its methods is one topic, which suits GLM's document-level objective,
  and this granularity gives ~1600 documents (per-module documents would give only ~450, too few
  for a train/valid/test split by document).
* Docstrings are cleaned (``ast.get_docstring(clean=True)``) and prose paragraphs are re-flowed
  onto one line, so that a newline in the corpus means a paragraph, list item or code-line
  boundary, not the 72-column wrap of the source (sentence splitters split on newlines).
  Paragraphs with indentation, doctest prompts, list items or reST underlines keep their layout.
* Documents shorter than ``min_chars`` (200) are skipped, exact duplicates keep their first
  occurrence, and documents that cannot be encoded as UTF-8 (lone surrogates written as escapes in
  a docstring) are skipped; every skip is counted in the statistics.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_MIN_CHARS = 200
"""Documents shorter than this (in characters) are too small to be useful GLM documents."""

_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_DEF_NODES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# A paragraph whose lines match one of these keeps its line breaks (code, lists, headings).
_LAYOUT_LINE = re.compile(r"^(\s|>>>|\.\.\.|[-*+\u2022]\s|\d+[.)]\s|:\w|[-=~^*#`'\"]{3,}\s*$)")
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t]*\n")
# Characters that are valid inside JSON strings but that some readers treat as line breaks.
_LINE_BREAK_ESCAPES = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """All ``.py`` files of the stdlib outside skipped directories, sorted by relative path.

    Sorting by the tuple of path parts (not ``os.walk`` order, which depends on the file system)
    is what makes the corpus identical on every machine with the same Python.
    """
    base = stdlib_root() if root is None else Path(root)
    found: list[tuple[str, ...]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(base).parts
        found.extend((*rel, name) for name in filenames if name.endswith(".py"))
    return [base.joinpath(*parts) for parts in sorted(found)]


def reflow_docstring(doc: str) -> str:
    """Join the wrapped lines of prose paragraphs; keep code, lists and headings as written."""
    paragraphs = []
    for para in _PARAGRAPH_SPLIT.split(doc.strip()):
        lines = para.rstrip().split("\n")
        if any(_LAYOUT_LINE.match(line) for line in lines):
            paragraphs.append("\n".join(line.rstrip() for line in lines))
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(p for p in paragraphs if p.strip())


def _top_level_units(tree: ast.Module) -> Iterator[ast.AST]:
    """The module itself, then every class/function not nested in another def, in source order.

    Definitions inside module-level ``if``/``try``/``with`` blocks (platform-specific
    implementations) count as top level.
    """
    yield tree
    stack: list[ast.AST] = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, _DEF_NODES):
            yield node
        elif isinstance(node, ast.stmt):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _docstrings_of_unit(unit: ast.AST) -> list[str]:
    """Cleaned docstrings of a unit: its own, then (for a def) those nested in it, depth first."""
    docs: list[str] = []
    own = ast.get_docstring(unit, clean=True)  # type: ignore[arg-type]
    if own:
        docs.append(own)
    if isinstance(unit, ast.Module):
        return docs
    stack: list[ast.AST] = list(reversed(list(ast.iter_child_nodes(unit))))
    while stack:
        node = stack.pop()
        if isinstance(node, _DEF_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
        if isinstance(node, (*_DEF_NODES, ast.stmt)):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return docs


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a stdlib file: ``email/mime/text.py`` -> ``email.mime.text``.

    A package's ``__init__.py`` is the package itself (``json/__init__.py`` -> ``json``).
    """
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _iter_documents_counted(
    counts: Counter[str], max_docs: int | None, min_chars: int, root: Path | None
) -> Iterator[tuple[str, str]]:
    """Yield (document, module name) and record every file visited and skip in ``counts``."""
    seen: set[bytes] = set()
    produced = 0
    base = stdlib_root() if root is None else root
    for path in stdlib_source_files(root):
        if max_docs is not None and produced >= max_docs:
            return
        counts["files_scanned"] += 1
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            counts["files_unparsable"] += 1
            continue
        for unit in _top_level_units(tree):
            text = "\n\n".join(reflow_docstring(d) for d in _docstrings_of_unit(unit)).strip()
            if not text:
                continue
            if len(text) < min_chars:
                counts["short_skipped"] += 1
                continue
            try:
                digest = hashlib.sha1(text.encode("utf-8")).digest()
            except UnicodeEncodeError:
                counts["unencodable_skipped"] += 1
                continue
            if digest in seen:
                counts["duplicate_skipped"] += 1
                continue
            seen.add(digest)
            produced += 1
            yield text, module_name(path, base)
            if max_docs is not None and produced >= max_docs:
                return


def _check_args(max_docs: int | None, min_chars: int) -> None:
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be None or >= 1, got {max_docs}")
    if min_chars < 1:
        raise ValueError(f"min_chars must be >= 1, got {min_chars}")


def iter_documents(
    max_docs: int | None = None,
    *,
    min_chars: int = DEFAULT_MIN_CHARS,
    root: str | os.PathLike[str] | None = None,
) -> Iterator[str]:
    """Documents of the demo corpus in their fixed order (the first ``max_docs`` if given).

    Arguments are checked on the call. Stopping early only parses the files needed, so small
    test corpora are cheap.
    ``root`` overrides the stdlib directory (tests point it at a fixture tree).
    """
    return (
        text for text, _ in iter_documents_with_modules(max_docs, min_chars=min_chars, root=root)
    )


def iter_documents_with_modules(
    max_docs: int | None = None,
    *,
    min_chars: int = DEFAULT_MIN_CHARS,
    root: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[str, str]]:
    """:func:`iter_documents` with each document's dotted module name (``email.mime.text``).

    The module is what labels the demo classification task (tools/make_demo_tasks.py).
    """
    _check_args(max_docs, min_chars)  # here, not lazily at the first next()
    counts: Counter[str] = Counter()
    return _iter_documents_counted(
        counts, max_docs, min_chars, None if root is None else Path(root)
    )


def jsonl_line(text: str, module: str | None = None) -> str:
    """``{"text": ...}`` (then ``"module": ...`` if given) as one JSONL line, UTF-8 readable.

    U+0085, U+2028 and U+2029 are escaped although JSON allows them raw, because
    ``str.splitlines`` (and some JSONL readers) would break the line on them.
    """
    return json_line({"text": text} if module is None else {"text": text, "module": module})


def json_line(record: dict[str, str]) -> str:
    """One JSON object as a JSONL line (with its ``\\n``), escaped as :func:`jsonl_line` says."""
    line = json.dumps(record, ensure_ascii=False)
    for raw, escaped in _LINE_BREAK_ESCAPES.items():
        if raw in line:
            line = line.replace(raw, escaped)
    return line + "\n"


def write_demo_corpus(
    path: str | os.PathLike[str],
    max_docs: int | None = None,
    *,
    min_chars: int = DEFAULT_MIN_CHARS,
    root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the corpus as JSONL to ``path`` (atomically) and return its statistics.

    Each line is ``{"text": document, "module": dotted module name}``; readers of the pretraining
    data use ``text`` only (``--json-keys text``), the demo tasks label documents by ``module``.

    The file is written under a temporary name and renamed into place, so an interrupted run
    never leaves a truncated corpus that looks complete.
    """
    _check_args(max_docs, min_chars)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    counts: Counter[str] = Counter()
    start = time.perf_counter()
    n_docs = n_chars = n_bytes = 0
    docs = _iter_documents_counted(
        counts, max_docs, min_chars, None if root is None else Path(root)
    )
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for text, module in docs:
            line = jsonl_line(text, module)
            f.write(line)
            n_docs += 1
            n_chars += len(text)
            n_bytes += len(line.encode("utf-8"))
    os.replace(tmp, out)
    return {
        "path": str(out),
        "documents": n_docs,
        "characters": n_chars,
        "bytes": n_bytes,
        "mb": n_bytes / 1e6,
        "files_scanned": counts["files_scanned"],
        "files_unparsable": counts["files_unparsable"],
        "short_skipped": counts["short_skipped"],
        "duplicate_skipped": counts["duplicate_skipped"],
        "unencodable_skipped": counts["unencodable_skipped"],
        "stdlib": str(stdlib_root() if root is None else root),
        "python": sys.version.split()[0],
        "seconds": time.perf_counter() - start,
    }
