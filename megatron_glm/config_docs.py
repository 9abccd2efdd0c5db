"""The config's field reference, read from the dataclasses: what ``glm-pretrain --help`` prints.

Each config field is documented once, by the attribute docstring under it in ``config.py`` (the
string literal after the field, PEP 257's "attribute docstring"). Python keeps no such
docstrings at run time, so :func:`field_docs` reads them from the class source with ``ast``;
:func:`fields_help` renders every leaf field with its type, default and docstring, section by
section, so the help cannot drift from the code; :func:`undocumented_fields` lets a test refuse
a field added without one.

A separate module from ``config`` because only ``--help`` and the tests need it, and it reads
source files that a training run has no use for.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from megatron_glm.config import RunConfig


def _is_section(tp: Any) -> bool:
    """A field whose type is itself a config dataclass (``model``, ``train``, ...)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls``: the string literal after each field.

    Python keeps no attribute docstrings at run time, so they are read from the class source
    with ``ast`` (once per class). Fields inherited from dataclass bases are included. Without
    source (a frozen application) the result is empty and ``--help`` lists bare fields.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
        for stmt, after in itertools.pairwise(body):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


@dataclass(frozen=True)
class FieldHelp:
    """One leaf field of a config, as ``--help`` shows it."""

    name: str
    """Dotted name, e.g. ``train.zero_stage``: the YAML path and the override key."""
    type: str
    """The accepted values, e.g. ``int | null`` or ``{fp32,bf16,fp16}``."""
    default: str
    """The default as YAML text."""
    doc: str
    """The field's attribute docstring ('' when it has none)."""


def config_fields(cls: type = RunConfig, prefix: str = "") -> list[FieldHelp]:
    """Every leaf field of ``cls``, depth first in declaration order, sections flattened."""
    out: list[FieldHelp] = []
    types_, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        name, tp = f"{prefix}{f.name}", types_[f.name]
        if _is_section(tp):
            out += config_fields(tp, prefix=f"{name}.")
            continue
        default = _default_text(f)
        out.append(FieldHelp(name, _type_text(tp), default, docs.get(f.name, "")))
    return out


def undocumented_fields(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted names of the fields (sections included) that have no attribute docstring."""
    missing = []
    types_, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if not docs.get(f.name, "").strip():
            missing.append(f"{prefix}{f.name}")
        if _is_section(types_[f.name]):
            missing += undocumented_fields(types_[f.name], prefix=f"{prefix}{f.name}.")
    return missing


def fields_help(cls: type = RunConfig, width: int = 88) -> str:
    """The config reference ``glm-pretrain --help`` prints: each section, then its fields with
    type, default and docstring, so the help cannot drift from the code."""
    fields = config_fields(cls)
    lines = textwrap.wrap(
        f"config fields ({len(fields)}), by section: the keys of the --config YAML; each is also "
        "a dotted override, section.field=value (the value parsed as YAML)",
        width=width,
    )
    docs, section = field_docs(cls), None
    for fh in fields:
        head = fh.name.split(".")[0] if "." in fh.name else ""
        if head != section:  # fields come section by section (declaration order)
            section = head
            title = f"{head or '(top level)'}: {docs.get(head, '')}"
            lines += ["", *textwrap.wrap(title, width=width, subsequent_indent=" " * 4)]
        lines.append(f"  {fh.name}: {fh.type} = {fh.default}")
        for paragraph in fh.doc.split("\n\n"):
            lines += textwrap.wrap(
                " ".join(paragraph.split()),
                width=width,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
                break_on_hyphens=False,
            )
    return "\n".join(lines) + "\n"


def _type_text(tp: Any) -> str:
    """``int | null``, ``list[str]``, ``{fp32,bf16,fp16}``: what a YAML value may be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is list:
        return f"list[{_type_text(args[0])}]"
    return str(getattr(tp, "__name__", tp))


def _default_text(f: dataclasses.Field[Any]) -> str:
    """A field's default as YAML text; ``(required)`` when it has none."""
    if f.default is not dataclasses.MISSING:
        return _yaml_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _yaml_text(f.default_factory())
    return "(required)"


def _yaml_text(value: Any) -> str:
    """A default as the YAML one would write for it (``null``, ``true``, ``[]``, ``''``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value or "''"
    return repr(value)
