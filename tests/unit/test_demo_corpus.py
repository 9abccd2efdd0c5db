"""Demo corpus: deterministic, valid JSONL, no imports of stdlib modules, exact extraction."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_glm.data.demo_corpus import (
    iter_documents,
    jsonl_line,
    reflow_docstring,
    stdlib_source_files,
    write_demo_corpus,
)

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")


def _long(word: str, n: int = 40) -> str:
    """A one-line docstring body of ``n`` words (over the 200-character minimum)."""
    return " ".join([word] * n) + "."


@pytest.fixture()
def fake_stdlib(tmp_path: Path) -> Path:
    """A small tree shaped like a stdlib, covering every rule of the extractor."""
    root = tmp_path / "lib"
    a, b, c, d, e = (_long(w) for w in ("alpha", "beta", "gamma", "delta", "epsilon"))
    _write(
        root / "amod.py",
        f'''
        """{a}"""
        import sys
        if sys.platform:
            def plat():
                """{b}"""
        class K:
            """{c}"""
            def m(self):
                """Method doc."""
                def inner():
                    """Inner doc."""
        def short():
            """Too short."""
        ''',
    )
    # Importing this module would create a file: the extractor must only parse it.
    _write(
        root / "bside.py",
        f'''
        """{d}"""
        open(__file__ + ".imported", "w").close()
        ''',
    )
    _write(root / "cdup.py", f'"""{a}"""\n')  # duplicate of amod's module docstring
    _write(root / "broken.py", "def f(:\n")
    _write(root / "pkg" / "__init__.py", f'"""{e}"""\n')
    for skipped in ("test", "tests", "site-packages", "__pycache__", "idlelib/idle_test"):
        _write(root / skipped / "zz.py", f'"""{_long("skipped")}"""\n')
    (root / "notes.txt").write_text(_long("text"), encoding="utf-8")
    return root


def test_fake_tree_exact_documents(fake_stdlib: Path) -> None:
    a, b, c, d, e = (_long(w) for w in ("alpha", "beta", "gamma", "delta", "epsilon"))
    expected = [a, b, f"{c}\n\nMethod doc.\n\nInner doc.", d, e]
    assert list(iter_documents(root=fake_stdlib)) == expected
    assert not (fake_stdlib / "bside.py.imported").exists()
    assert list(iter_documents(2, root=fake_stdlib)) == expected[:2]


def test_fake_tree_stats_count_every_skip(fake_stdlib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "c.jsonl"
    stats = write_demo_corpus(out, root=fake_stdlib)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == list(iter_documents(root=fake_stdlib))
    # the module each document comes from (a package's __init__ is the package itself)
    assert [json.loads(line)["module"] for line in lines] == ["amod"] * 3 + ["bside", "pkg"]
    assert stats["documents"] == 5
    assert stats["bytes"] == out.stat().st_size
    assert stats["characters"] == sum(len(json.loads(line)["text"]) for line in lines)
    # amod, bside, broken, cdup, pkg/__init__; skipped directories are not even listed
    assert stats["files_scanned"] == 5
    assert stats["files_unparsable"] == 1
    assert stats["duplicate_skipped"] == 1
    assert stats["short_skipped"] == 1  # short(); m/inner are part of K's document
    assert not out.with_name("c.jsonl.tmp").exists()


def test_source_files_skip_tests_and_third_party() -> None:
    files = stdlib_source_files()
    assert files == sorted(files, key=lambda p: p.parts)
    assert len(files) > 300
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    assert not [f for f in files if skipped & set(f.parts[-4:-1])]
    names = {f.name for f in files}
    assert {"argparse.py", "__init__.py"} <= names


def test_reflow_keeps_code_lists_and_headings() -> None:
    doc = (
        "First line of a\nwrapped paragraph.\n\n"
        ">>> f(1)\n2\n\n"
        "Args:\n    x: a value\n\n"
        "- item one\n- item two\n\n"
        "Parameters\n----------\n\n"
        "Last\nparagraph."
    )
    assert reflow_docstring(doc) == (
        "First line of a wrapped paragraph.\n\n"
        ">>> f(1)\n2\n\n"
        "Args:\n    x: a value\n\n"
        "- item one\n- item two\n\n"
        "Parameters\n----------\n\n"
        "Last paragraph."
    )


def test_jsonl_line_escapes_unicode_line_breaks() -> None:
    line = jsonl_line("a\u2028b\u2029c\x85d\ne é")
    assert line == '{"text": "a\\u2028b\\u2029c\\u0085d\\ne é"}\n'
    assert len(line.splitlines()) == 1
    assert json.loads(line)["text"] == "a\u2028b\u2029c\x85d\ne é"
    assert jsonl_line("x\u2028", "email.mime") == '{"text": "x\\u2028", "module": "email.mime"}\n'


def test_fixture_corpus_is_valid_and_deterministic(demo_corpus_path: Path) -> None:
    lines = demo_corpus_path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # every record ends with a newline
    texts = [json.loads(line)["text"] for line in lines[:-1]]
    assert len(texts) == 400
    assert all(isinstance(t, str) and len(t) >= 200 for t in texts)
    assert len(set(texts)) == len(texts)
    # A second, independent extraction gives the same documents in the same order.
    assert list(iter_documents(60)) == texts[:60]


def test_bad_max_docs() -> None:
    with pytest.raises(ValueError, match=r"^max_docs must be None or >= 1, got 0$"):
        iter_documents(0)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "tools/make_demo_corpus.py", "--output", str(out), "--max-docs", "7"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.startswith(f"wrote {out}: 7 documents, ")
    texts = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert texts == list(iter_documents(7))
    bad = subprocess.run([*cmd[:-1], "0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "max_docs must be None or >= 1, got 0" in bad.stderr
