"""docs/design.md is what the docstrings cite: every ``docs/design.md, "Section"`` pointer in the
code names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POINTER = re.compile(r'docs/design\.md,\s+"([^"]+)"')


def _sections() -> set[str]:
    text = (REPO / "docs" / "design.md").read_text()
    return {m.group(1).strip() for m in re.finditer(r"^## (.+)$", text, flags=re.MULTILINE)}


def test_every_docstring_pointer_names_a_section() -> None:
    sections = _sections()
    pointers = []
    for path in sorted([*REPO.glob("megatron_glm/**/*.py"), *REPO.glob("tools/**/*.py")]):
        for match in POINTER.finditer(path.read_text()):
            name = " ".join(match.group(1).split())  # a pointer may wrap across lines
            pointers.append((path.relative_to(REPO), name))
    assert len(pointers) >= 5, pointers
    missing = [(str(p), name) for p, name in pointers if name not in sections]
    assert not missing, f"no such section in docs/design.md: {missing}; sections: {sections}"
