"""Two downstream tasks made offline from the demo corpus (tools/make_demo_tasks.py).

The demo pretrains on the docstrings of the standard library (:mod:`megatron_glm.data.demo_corpus`),
so its finetuning demo uses the same text, labelled by where it comes from, with no download:

* ``pkgcls`` (cloze classification): which of 8 stdlib packages a docstring paragraph comes from.
  Rows are prose paragraphs (one line, no code, lists or headings; ``min_chars``..``max_chars``
  long; at most ``per_document`` of them per corpus document, the first ones), labelled by the
  first component of the corpus line's ``module`` field (``email.mime.text`` -> ``email``). The
  labels are the verbalizers, and the default packages include names that the demo tokenizer
  splits into several pieces (``lib2to3``, ``urllib``, ``xml``).
* ``summ`` (seq2seq): the first sentence of a corpus document (the summary line of its first
  docstring) is the target, the sentences after it (whole sentences, at most ``max_source_chars``
  characters) the source. Documents with fewer than 2 sentences, or whose first sentence does
  not end in ``.``, ``?`` or ``!`` or has fewer than 3 or more than 40 words, are skipped.
  Sentences come from the project's splitter
  (:func:`megatron_glm.data.sentence_split.split_sentences`).

Splits (train / validation / test) are made **by corpus document**: every row of a document goes
to one split, so no docstring is in two splits (a paragraph repeated verbatim in several documents
is a row of the first one only). ``pkgcls`` is balanced: each split has the same
number of rows for every label. Everything is deterministic for a ``seed`` (``random.Random``
with string seeds, sorted inputs), so the same corpus gives the same bytes.

Leakage, stated plainly: the pretraining split of the demo (``split: 949,50,1``, contiguous by
document in corpus order, :func:`megatron_glm.data.dataset_builder.split_documents`) holds out
only the last ~5% of the corpus, i.e. packages late in the alphabet, so a balanced test split of
8 packages cannot come from held-out documents alone. The test paragraphs and sentences were
therefore seen as unlabelled text in pretraining (the labels never were: pretraining is
unsupervised). Test figures measure finetuning on pretrained-on text, not generalisation to
unseen text; compare them to the baselines printed next to them, not to published numbers.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_glm.config import parse_split
from megatron_glm.data.dataset_builder import split_documents
from megatron_glm.data.demo_corpus import _LAYOUT_LINE, iter_documents_with_modules, json_line
from megatron_glm.data.sentence_split import split_sentences

__all__ = [
    "DEFAULT_PACKAGES",
    "SPLITS",
    "CorpusDocument",
    "build_pkgcls",
    "build_summ",
    "classification_paragraphs",
    "label_counts",
    "lead_sentence",
    "majority_baseline",
    "pretraining_held_out",
    "read_corpus",
    "summary_pair",
    "write_task",
]

DEFAULT_PACKAGES = ("asyncio", "email", "http", "lib2to3", "logging", "unittest", "urllib", "xml")
"""8 packages with >= 85 usable prose paragraphs each in the Python 3.11 demo corpus."""
SPLITS = ("train", "validation", "test")
_SENTENCE_END = tuple(".?!")
_CLOSERS = "\"')]}"


@dataclass(frozen=True)
class CorpusDocument:
    """One line of the demo corpus: its text, dotted module name and 1-based line number."""

    text: str
    module: str
    line: int

    @property
    def package(self) -> str:
        """Top-level package or module: ``email.mime.text`` -> ``email``."""
        return self.module.split(".", 1)[0]


def read_corpus(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> list[CorpusDocument]:
    """The documents of a demo corpus JSONL, each with its module; bad lines name ``file:line``.

    A corpus written before the ``module`` field existed (``{"text"}`` only) still works: the
    modules of its lines are found by walking the stdlib as the corpus was made
    (:func:`megatron_glm.data.demo_corpus.iter_documents_with_modules`), and a text that walk
    does not produce is an error, since its label cannot be known. ``root`` replaces the stdlib
    directory of that walk (tests).
    """
    records: list[tuple[int, str, str | None]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n}: no string 'text'")
            module = record.get("module")
            if module is not None and not isinstance(module, str):
                raise ValueError(f"{path}:{n}: 'module' is not a string")
            records.append((n, record["text"], module))
    modules = _stdlib_modules(root) if any(m is None for _, _, m in records) else {}
    docs = []
    for n, text, module in records:
        if module is None:
            module = modules.get(text)
            if module is None:
                raise ValueError(
                    f"{path}:{n}: no 'module', and the text is no document of this Python's "
                    "stdlib: rebuild the corpus with tools/make_demo_corpus.py"
                )
        docs.append(CorpusDocument(text, module, n))
    return docs


def _stdlib_modules(root: str | os.PathLike[str] | None) -> dict[str, str]:
    """Document text -> module for every demo-corpus document of the running stdlib."""
    modules: dict[str, str] = {}
    for text, module in iter_documents_with_modules(min_chars=1, root=root):
        modules.setdefault(text, module)
    return modules


def classification_paragraphs(
    text: str, min_chars: int = 60, max_chars: int = 600, per_document: int = 10
) -> list[str]:
    """The first ``per_document`` prose paragraphs of ``text`` within the length bounds.

    Prose means one line that does not look like code, a list item or a heading (the corpus
    keeps those multi-line, see :func:`megatron_glm.data.demo_corpus.reflow_docstring`).
    """
    found = []
    for para in text.split("\n\n"):
        if "\n" in para or _LAYOUT_LINE.match(para) or not min_chars <= len(para) <= max_chars:
            continue
        found.append(para)
        if len(found) == per_document:
            break
    return found


def _assign_documents(groups: list[list[str]], targets: dict[str, int]) -> dict[str, list[str]]:
    """Fill test, then validation, then train with whole groups until each has its target.

    A group that overshoots a split keeps all its rows there (trimmed later), never spills
    into the next split: that is what keeps every document in one split.
    """
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    order = ["test", "validation", "train"]
    k = 0
    for group in groups:
        while k < len(order) and len(out[order[k]]) >= targets[order[k]]:
            k += 1
        if k == len(order):
            break
        out[order[k]].extend(group)
    return out


def build_pkgcls(
    docs: Sequence[CorpusDocument],
    packages: Sequence[str] = DEFAULT_PACKAGES,
    *,
    seed: int = 1234,
    eval_fraction: float = 0.2,
    **paragraph_args: int,
) -> dict[str, list[dict[str, str]]]:
    """Balanced ``{"text", "label"}`` rows per split (see the module docstring).

    Per label, ``n`` is the fewest paragraphs any package has; validation and test get
    ``round(eval_fraction * n)`` per label each, train the rest, and each split is cut to the
    same count for every label (the fewest any label reached in that split).
    """
    by_label: dict[str, list[list[str]]] = {p: [] for p in sorted(packages)}
    seen: set[str] = set()  # a paragraph repeated in several documents counts in the first
    for doc in docs:
        if doc.package in by_label:
            paras = []
            for para in classification_paragraphs(doc.text, **paragraph_args):
                if para not in seen:
                    seen.add(para)
                    paras.append(para)
            if paras:
                by_label[doc.package].append(paras)
    counts = {p: sum(len(g) for g in groups) for p, groups in by_label.items()}
    n = min(counts.values())
    n_eval = round(eval_fraction * n)
    if n_eval < 1 or n - 2 * n_eval < 1:
        raise ValueError(f"too few paragraphs for a split of every package: {counts}")
    targets = {"train": n - 2 * n_eval, "validation": n_eval, "test": n_eval}
    assigned = {}
    for label, groups in by_label.items():
        random.Random(f"{seed}:pkgcls:{label}").shuffle(groups)
        assigned[label] = _assign_documents(groups, targets)
    splits = {}
    for split in SPLITS:
        per_label = min(min(len(a[split]), targets[split]) for a in assigned.values())
        rows = [
            {"text": text, "label": label}
            for label, a in assigned.items()
            for text in a[split][:per_label]
        ]
        random.Random(f"{seed}:pkgcls:{split}").shuffle(rows)
        splits[split] = rows
    return splits


def summary_pair(text: str, max_source_chars: int = 600) -> dict[str, str] | None:
    """``{"source", "target"}`` from one document, or None when it is not a usable pair."""
    sentences = [s for s in split_sentences(text) if s.strip()]
    if len(sentences) < 2:
        return None
    target = sentences[0].strip()
    if not target.rstrip(_CLOSERS).endswith(_SENTENCE_END) or not 3 <= len(target.split()) <= 40:
        return None
    kept = [sentences[1]]
    for s in sentences[2:]:
        if sum(map(len, kept)) + len(s) > max_source_chars:
            break
        kept.append(s)
    source = "".join(kept).strip()
    return {"source": source, "target": target}


def build_summ(
    docs: Sequence[CorpusDocument],
    *,
    seed: int = 1234,
    num_validation: int = 50,
    num_test: int = 100,
    max_source_chars: int = 600,
) -> dict[str, list[dict[str, str]]]:
    """Shuffled documents' pairs: the first ``num_test`` to test, the next to validation."""
    pairs = [p for d in docs if (p := summary_pair(d.text, max_source_chars)) is not None]
    random.Random(f"{seed}:summ").shuffle(pairs)
    if len(pairs) <= num_validation + num_test:
        raise ValueError(
            f"{len(pairs)} summarisation pairs leave no training rows after "
            f"{num_test} test and {num_validation} validation rows"
        )
    return {
        "test": pairs[:num_test],
        "validation": pairs[num_test : num_test + num_validation],
        "train": pairs[num_test + num_validation :],
    }


def pretraining_held_out(docs: Sequence[CorpusDocument], split: str) -> list[str]:
    """Texts of the documents a pretraining run with ``data.split = split`` never trains on.

    The demo's ``data/demo/demo_text_sentence`` holds one document per corpus line in corpus
    order, and pretraining splits it by contiguous document ranges
    (:func:`megatron_glm.data.dataset_builder.split_documents`): its validation and test
    documents are the corpus's last ones. Zero-shot figures (tools/evaluate.py) are honest on
    these only.
    """
    (_, train_end), _, _ = split_documents(len(docs), parse_split(split))
    return [d.text for d in docs[train_end:]]


def write_task(
    out_dir: str | os.PathLike[str], splits: dict[str, list[dict[str, str]]]
) -> dict[str, int]:
    """Write ``{split}.jsonl`` under ``out_dir`` (each atomically); return the row counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json_line(row) for row in splits[split])
        os.replace(tmp, path)
    return {split: len(splits[split]) for split in SPLITS}


def majority_baseline(train_labels: Sequence[str], labels: Sequence[str]) -> tuple[str, list[str]]:
    """The most frequent training label (ties: the first in sorted order) and its predictions.

    Returns the label and one prediction per entry of ``labels`` (the rows to be scored).
    """
    counts = Counter(train_labels)
    best = max(sorted(counts), key=lambda lab: counts[lab])
    return best, [best] * len(labels)


def lead_sentence(source: str) -> str:
    """The lead baseline's summary: the first sentence of the source."""
    sentences = [s for s in split_sentences(source) if s.strip()]
    return sentences[0].strip() if sentences else ""


def label_counts(rows: Sequence[dict[str, str]]) -> dict[str, int]:
    """Rows per label, sorted by label."""
    counts: defaultdict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["label"]] += 1
    return dict(sorted(counts.items()))
