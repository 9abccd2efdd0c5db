"""Demo finetuning tasks: disjoint, balanced, deterministic splits; baselines recomputed here."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from megatron_glm.data.demo_corpus import write_demo_corpus
from megatron_glm.data.demo_tasks import (
    SPLITS,
    build_pkgcls,
    build_summ,
    lead_sentence,
    majority_baseline,
    read_corpus,
    summary_pair,
    write_task,
)
from megatron_glm.data.sentence_split import split_sentences

REPO = Path(__file__).resolve().parents[2]

# The 8 packages with the most prose paragraphs among the fixture's 400 documents
# (the first 400 of the stdlib walk: the default packages are not all in it).
FIXTURE_PACKAGES = (
    "_pydecimal",
    "_pyio",
    "asyncio",
    "codecs",
    "datetime",
    "difflib",
    "distutils",
    "doctest",
)


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _first_documents(rows: list[dict[str, str]], docs: list[str]) -> set[int]:
    """Index of the first corpus document holding each row's text as one of its paragraphs."""
    found = set()
    for row in rows:
        holders = [i for i, d in enumerate(docs) if row["text"] in d.split("\n\n")]
        assert holders, row
        found.add(holders[0])
    return found


def test_pkgcls_disjoint_balanced_deterministic(demo_corpus_path: Path, tmp_path: Path) -> None:
    docs = read_corpus(demo_corpus_path)
    splits = build_pkgcls(docs, FIXTURE_PACKAGES, seed=7)
    sizes = write_task(tmp_path / "a", splits)
    write_task(
        tmp_path / "b", build_pkgcls(read_corpus(demo_corpus_path), FIXTURE_PACKAGES, seed=7)
    )
    print("pkgcls sizes on the fixture:", sizes)
    for split in SPLITS:
        a, b = (tmp_path / d / f"{split}.jsonl" for d in "ab")
        assert a.read_bytes() == b.read_bytes()
        assert _read(a) == splits[split]
    texts = [d.text for d in docs]
    rows = {s: {row["text"] for row in splits[s]} for s in SPLITS}
    assert sum(map(len, rows.values())) == sum(map(len, splits.values()))  # all distinct
    holders = {s: _first_documents(splits[s], texts) for s in SPLITS}
    assert not holders["train"] & holders["validation"]
    assert not holders["train"] & holders["test"]
    assert not holders["validation"] & holders["test"]
    for split in SPLITS:
        counts = Counter(row["label"] for row in splits[split])
        assert sorted(counts) == sorted(FIXTURE_PACKAGES)
        assert len(set(counts.values())) == 1, counts
        # every row's label is the package of a document that holds its text
        for row in splits[split][:20]:
            assert any(row["text"] in d.text and d.package == row["label"] for d in docs)
    assert sizes["validation"] == sizes["test"] >= 8 * 5
    assert sizes["train"] >= 2 * sizes["test"]
    other_seed = build_pkgcls(docs, FIXTURE_PACKAGES, seed=8)
    assert other_seed["test"] != splits["test"]


def test_majority_baseline_recomputed(demo_corpus_path: Path) -> None:
    splits = build_pkgcls(read_corpus(demo_corpus_path), FIXTURE_PACKAGES, seed=7)
    gold = [row["label"] for row in splits["test"]]
    label, pred = majority_baseline([row["label"] for row in splits["train"]], gold)
    # Balanced train: every label ties, and the tie goes to the first label in sorted order.
    assert label == "_pydecimal" and pred == [label] * len(gold)
    accuracy = sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    assert accuracy == pytest.approx(1 / 8)


def test_summ_pairs_come_from_one_document_each(demo_corpus_path: Path, tmp_path: Path) -> None:
    docs = read_corpus(demo_corpus_path)
    splits = build_summ(docs, seed=3, num_validation=20, num_test=30)
    sizes = write_task(tmp_path / "s", splits)
    print("summ sizes on the fixture:", sizes)
    assert sizes["test"] == 30 and sizes["validation"] == 20 and sizes["train"] > 200
    texts = [d.text for d in docs]
    owners = {}
    for split in SPLITS:
        owners[split] = set()
        for row in splits[split]:
            # the target opens a document and the source follows it in that same document
            holders = [i for i, t in enumerate(texts) if t.startswith(row["target"])]
            holders = [i for i in holders if row["source"] in texts[i][len(row["target"]) :]]
            assert holders, row
            owners[split].update(holders)
    assert not owners["train"] & owners["test"]
    assert not owners["validation"] & owners["test"]
    assert not owners["train"] & owners["validation"]


def test_summary_pair_rules() -> None:
    text = "Return the sum of the values. It may overflow; use fsum.\n\nSee also math."
    assert summary_pair(text) == {
        "source": "It may overflow; use fsum.\n\nSee also math.",
        "target": "Return the sum of the values.",
    }
    assert summary_pair(text, max_source_chars=20) == {
        "source": "It may overflow;",
        "target": "Return the sum of the values.",
    }
    assert summary_pair("Only one sentence here.") is None
    assert summary_pair("Usage of the thing:\n    thing()") is None  # target ends in ':'
    assert summary_pair("Too short. The rest of it is here.") is None  # 2-word target
    assert lead_sentence("It may overflow; use fsum.\n\nSee also math.") == "It may overflow;"


def test_corpus_without_modules(tmp_path: Path) -> None:
    """A corpus of texts only gets its modules from the stdlib walk; a foreign text is refused."""
    root = tmp_path / "lib"
    for rel, word in (("amod.py", "alpha"), ("pkg/__init__.py", "beta"), ("pkg/sub.py", "gamma")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f'"""{" ".join([word] * 50)}."""\n', encoding="utf-8")
    write_demo_corpus(tmp_path / "new.jsonl", root=root)
    records = _read(tmp_path / "new.jsonl")
    assert [r["module"] for r in records] == ["amod", "pkg", "pkg.sub"]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records), "utf-8")
    assert read_corpus(old, root=root) == read_corpus(tmp_path / "new.jsonl")
    with old.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "Not a docstring of the standard library."}) + "\n")
    with pytest.raises(ValueError, match=rf"^{old}:4: no 'module', and the text is no doc"):
        read_corpus(old, root=root)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "module": "x"}\n{"module": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{bad}:2: no string 'text'$"):
        read_corpus(bad)


def test_cli_deterministic_with_baselines(demo_corpus_path: Path, tmp_path: Path) -> None:
    """The tool twice: same bytes; its printed baselines equal ones recomputed here."""
    from rouge_score import rouge_scorer

    runs = []
    for out in ("x", "y"):
        cmd = [
            sys.executable,
            "tools/make_demo_tasks.py",
            "--corpus",
            str(demo_corpus_path),
            "--output",
            str(tmp_path / out),
            "--packages",
            ",".join(FIXTURE_PACKAGES),
        ]
        runs.append(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True))
    print(runs[0].stdout)
    assert runs[0].stdout == runs[1].stdout
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*.*"))
    assert len(files) == 8  # 2 tasks x 3 splits, baselines.json, heldout.jsonl
    for rel in files:
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes()

    train = _read(tmp_path / "x" / "pkgcls" / "train.jsonl")
    test = _read(tmp_path / "x" / "pkgcls" / "test.jsonl")
    counts = Counter(row["label"] for row in train)
    majority = sorted(counts, key=lambda lab: (-counts[lab], lab))[0]
    hits = sum(row["label"] == majority for row in test)
    acc = 100 * hits / len(test)
    # F1 of the majority label (precision hits/n, recall 1); every other label has F1 0
    f1 = 100 * (2 * hits / (2 * hits + len(test) - hits)) / len(FIXTURE_PACKAGES)
    pkgcls_line = f"accuracy {acc:.2f}, macro F1 {f1:.2f}"
    assert (
        f"majority baseline on test ({majority!r} for every row): {pkgcls_line}" in runs[0].stdout
    )

    pairs = _read(tmp_path / "x" / "summ" / "test.jsonl")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter[str]()
    for row in pairs:
        lead = next(s for s in split_sentences(row["source"]) if s.strip()).strip()
        for name, score in scorer.score(row["target"], lead).items():
            totals[name] += score.fmeasure
    expect = {name: 100 * totals[name] / len(pairs) for name in ("rouge1", "rouge2", "rougeL")}
    assert ", ".join(f"{k} {v:.2f}" for k, v in expect.items()) in runs[0].stdout
    # pretraining's 949,50,1 split of 400 documents trains on round(0.949 * 400) = 380
    corpus = _read(demo_corpus_path)
    held_out = [row["text"] for row in _read(tmp_path / "x" / "heldout.jsonl")]
    assert held_out == [row["text"] for row in corpus[380:]]
    assert "heldout: 20 documents pretraining never trained on" in runs[0].stdout
    saved = json.loads((tmp_path / "x" / "baselines.json").read_text(encoding="utf-8"))
    assert saved["pkgcls"] == pytest.approx({"accuracy": acc, "macro_f1": f1})
    assert saved["summ"] == pytest.approx(expect)
