#!/usr/bin/env python
"""Test figures of the two demo finetuning runs next to their baselines (`make finetune`).

    python tools/demo_finetune_report.py --pkgcls configs/finetune/pkgcls.yaml \\
        --summ configs/finetune/summ.yaml --baselines data/demo/tasks/baselines.json

Each run is read back from its config's ``checkpoint.save`` (the last checkpoint; ``--best``
takes ``<save>/best``, the best validation metric's) and scored on its task's test split here,
with the plain model in one process:

- pkgcls: every label's verbalizer scored at the [MASK] of the run's pattern exactly as
  finetuning scores it (:class:`megatron_glm.finetune.losses.ClozeLoss` on
  :mod:`megatron_glm.finetune.tasks`' batches); the best-scoring label is the prediction.
  Accuracy and macro F1 vs the majority-label baseline.
- summ: the target generated greedily after ``source [gMASK]``
  (:func:`megatron_glm.finetune.evaluate.seq2seq_predictions`, a no-repeat-bigram rule);
  ROUGE-1/2/L (rouge-score) and exact match vs the lead-sentence baseline.

Figures are x 100. The result table goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_glm.config import RunConfig, load_config
from megatron_glm.finetune import tasks
from megatron_glm.finetune.evaluate import seq2seq_predictions
from megatron_glm.finetune.losses import ClozeLoss
from megatron_glm.finetune.metrics import accuracy, exact_match, macro_f1, rouge
from megatron_glm.generation import GenerationConfig
from megatron_glm.inference import LoadedModel, load_for_inference
from megatron_glm.logs import setup_logging


def _load(cfg: RunConfig, best: bool) -> LoadedModel:
    if not cfg.checkpoint.save:
        raise SystemExit("the run config has no checkpoint.save: nothing to read back")
    where = Path(cfg.checkpoint.save) / "best" if best else Path(cfg.checkpoint.save)
    return load_for_inference(load=where, tokenizer=cfg.data.tokenizer_model)


@torch.no_grad()
def cloze_predictions(cfg: RunConfig, loaded: LoadedModel, batch_size: int = 8) -> list[str]:
    """The predicted label of every test row of a cloze task."""
    f = cfg.finetune
    labels = list(f.verbalizers)
    examples = tasks.read_classification(tasks.split_path(f.task_dir, "test"), labels)
    pattern = tasks.Pattern.parse(f.patterns[f.pattern_id])
    candidates = tasks.verbalizer_ids(loaded.tokenizer, f.verbalizers)
    loss = ClozeLoss.build(candidates, f.score)
    preds: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        seq = cfg.data.seq_length
        if loss.single_token:
            batch = tasks.cloze_single_batch(loaded.tokenizer, pattern, chunk, seq)
        else:
            batch = tasks.cloze_multi_batch(loaded.tokenizer, pattern, candidates, chunk, seq)
        keys = ("tokens", "position_ids", "sep", "valid_len")
        hidden = loaded.model(*(batch[k] for k in keys))
        scores = loss.scores(loaded.model, hidden, batch)
        preds.extend(labels[int(k)] for k in scores.argmax(dim=1))
    return preds


def pkgcls_figures(cfg: RunConfig, loaded: LoadedModel) -> dict[str, float]:
    """Test accuracy and macro F1 (x 100) of a finetuned cloze model."""
    labels = list(cfg.finetune.verbalizers)
    rows = _read(Path(cfg.finetune.task_dir) / "test.jsonl")
    gold = [row["label"] for row in rows]
    pred = cloze_predictions(cfg, loaded)
    return {"accuracy": 100 * accuracy(pred, gold), "macro_f1": 100 * macro_f1(pred, gold, labels)}


def summ_figures(cfg: RunConfig, loaded: LoadedModel) -> dict[str, float]:
    """Test ROUGE-1/2/L and exact match (x 100) of a finetuned seq2seq model, greedy."""
    rows = _read(Path(cfg.finetune.task_dir) / "test.jsonl")
    gen = GenerationConfig(max_new_tokens=cfg.finetune.max_target_length, no_repeat_ngram_size=2)
    sources = [row["source"] for row in rows]
    preds = seq2seq_predictions(
        loaded.model, loaded.tokenizer, sources, gen, mask=cfg.finetune.mask
    )
    gold = [row["target"] for row in rows]
    return {**rouge(preds, gold), "exact_match": 100 * exact_match(preds, gold)}


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _line(name: str, figures: dict[str, float], keys: Sequence[str]) -> str:
    return f"  {name:<22}" + "".join(f"{figures[k]:>10.2f}" for k in keys)


def report(task: str, finetuned: dict[str, float], baseline: dict[str, float], what: str) -> None:
    """One task's table: the finetuned model's figures over the baseline's, same columns."""
    keys = list(baseline)
    print(f"{task} (test):" + " " * 9 + "".join(f"{k:>10}" for k in keys))
    print(_line("finetuned", finetuned, keys))
    print(_line(what, baseline, keys))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pkgcls", default="configs/finetune/pkgcls.yaml", help="run config")
    parser.add_argument("--summ", default="configs/finetune/summ.yaml", help="run config")
    parser.add_argument("--baselines", default="data/demo/tasks/baselines.json")
    parser.add_argument("--best", action="store_true", help="read <save>/best, not the last")
    for task in ("pkgcls", "summ"):
        parser.add_argument(
            f"--{task}-set",
            nargs="*",
            default=[],
            metavar="KEY=VALUE",
            help=f"overrides of the {task} config, as given to its finetuning run",
        )
    args = parser.parse_args(argv)
    baselines = json.loads(Path(args.baselines).read_text(encoding="utf-8"))
    cfg = load_config(args.pkgcls, args.pkgcls_set)
    report("pkgcls", pkgcls_figures(cfg, _load(cfg, args.best)), baselines["pkgcls"], "majority")
    cfg = load_config(args.summ, args.summ_set)
    summ = summ_figures(cfg, _load(cfg, args.best))
    print(f"summ exact match (test): {summ.pop('exact_match'):.2f}")
    report("summ", summ, baselines["summ"], "lead sentence")


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
