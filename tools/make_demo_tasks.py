#!/usr/bin/env python
"""Make the two demo finetuning tasks from the demo corpus and print their sizes and baselines.

pkgcls (which of 8 stdlib packages a docstring paragraph comes from) and summ (a document's
first sentence from the rest of it), as described in megatron_glm.data.demo_tasks (its
docstring also states what the test splits share with the pretraining data). Writes
OUTPUT/{pkgcls,summ}/{train,validation,test}.jsonl; the same corpus and seed give the same bytes.
Baselines on test: the majority training label (accuracy, macro F1) and the lead sentence of the
source (ROUGE-1/2/L F-measure x 100, rouge-score via megatron_glm.finetune.metrics); they are
printed and written to OUTPUT/baselines.json (figures x 100) for `make finetune` to compare with.
OUTPUT/heldout.jsonl gets the documents that the demo pretraining (data.split --pretrain-split)
never trains on, for zero-shot evaluation (tools/evaluate.py --input OUTPUT/heldout.jsonl).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_glm.data.demo_corpus import json_line
from megatron_glm.data.demo_tasks import (
    DEFAULT_PACKAGES,
    CorpusDocument,
    build_pkgcls,
    build_summ,
    label_counts,
    lead_sentence,
    majority_baseline,
    pretraining_held_out,
    read_corpus,
    write_task,
)
from megatron_glm.logs import setup_logging


def _sizes(counts: dict[str, int]) -> str:
    return ", ".join(f"{split} {n}" for split, n in counts.items())


def make_pkgcls(args: argparse.Namespace, docs: list[CorpusDocument]) -> dict[str, float]:
    """Write pkgcls and print its sizes and the majority baseline on test."""
    from megatron_glm.finetune.metrics import accuracy, macro_f1

    packages = sorted(args.packages.split(","))
    splits = build_pkgcls(docs, packages, seed=args.seed)
    sizes = write_task(args.output / "pkgcls", splits)
    per_label = label_counts(splits["test"])
    print(
        f"pkgcls: {_sizes(sizes)} rows; {len(packages)} labels, per label: "
        f"train {sizes['train'] // len(packages)}, test {next(iter(per_label.values()))}"
    )
    gold = [row["label"] for row in splits["test"]]
    label, pred = majority_baseline([row["label"] for row in splits["train"]], gold)
    scores = {
        "accuracy": 100 * accuracy(pred, gold),
        "macro_f1": 100 * macro_f1(pred, gold, packages),
    }
    print(
        f"  majority baseline on test ({label!r} for every row): accuracy "
        f"{scores['accuracy']:.2f}, macro F1 {scores['macro_f1']:.2f}"
    )
    return scores


def make_summ(args: argparse.Namespace, docs: list[CorpusDocument]) -> dict[str, float]:
    """Write summ and print its sizes and the lead-sentence baseline on test."""
    from megatron_glm.finetune.metrics import rouge

    splits = build_summ(docs, seed=args.seed)
    sizes = write_task(args.output / "summ", splits)
    print(f"summ: {_sizes(sizes)} rows")
    test = splits["test"]
    scores = rouge([lead_sentence(r["source"]) for r in test], [r["target"] for r in test])
    print(
        "  lead baseline on test (first sentence of the source): "
        + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
    )
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default="data/demo/corpus.jsonl", help="demo corpus JSONL")
    parser.add_argument("--output", type=Path, default=Path("data/demo/tasks"))
    parser.add_argument(
        "--packages", default=",".join(DEFAULT_PACKAGES), help="pkgcls labels, comma-separated"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--pretrain-split", default="949,50,1", help="data.split of the pretraining (demo.yaml)"
    )
    args = parser.parse_args(argv)
    try:
        docs = read_corpus(args.corpus)
        baselines = {"pkgcls": make_pkgcls(args, docs), "summ": make_summ(args, docs)}
        held_out = pretraining_held_out(docs, args.pretrain_split)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    with open(args.output / "heldout.jsonl", "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json_line({"text": text}) for text in held_out)
    print(f"heldout: {len(held_out)} documents pretraining never trained on (zero-shot evaluation)")
    path = args.output / "baselines.json"
    path.write_text(json.dumps(baselines, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
