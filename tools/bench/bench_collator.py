"""Rows/s of blank infilling per task at S = 512 and 1024 on one core, vs the per-token reference.

The baseline is ``tests/unit/infilling_reference.reference_infill``, a per-token Python sampler
in the style of GLM's original collator, measured in the same run on the same windows. Our
implementation is timed row by row (``BlankInfilling.__call__``) and in micro-batches
(``BlankInfilling.batch``, what ``GLMPretrainDataset.__getitems__`` uses in DataLoader workers).
Windows are synthetic packed windows (documents of ~``--mean-doc`` tokens separated by eos,
sentences of ~12 tokens), built before timing. Threads are pinned to 1 before numpy is
imported. Rates use process CPU time (``time.process_time``), less disturbed than wall time on
a shared machine; each figure is the best of ``--repeats`` rounds, and within a round the
reference, per-row and batched passes alternate so that load drift hits them alike.

    python tools/bench/bench_collator.py [--rows 2048] [--ref-rows 256] [--batch-sizes 8,32]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "unit"))

from infilling_reference import random_window, reference_infill  # noqa: E402

from megatron_glm.config import ObjectiveConfig  # noqa: E402
from megatron_glm.data.blank_infilling import OBJECTIVES, BlankInfilling, SpecialIds  # noqa: E402
from megatron_glm.logs import setup_logging  # noqa: E402

IDS = SpecialIds(mask=3, smask=4, gmask=5, sop=6, eop=7, pad=2, eos=2)
TASKS = (*OBJECTIVES, "mixed")


def _cpu_rate(fn: Callable[[Any], Any], items: list[Any], rows_per_item: int) -> float:
    """Rows per CPU second of one pass of ``fn`` over ``items``."""
    c0 = time.process_time()
    for item in items:
        fn(item)
    return len(items) * rows_per_item / max(time.process_time() - c0, 1e-9)


def _interleaved_best(
    passes: list[tuple[Callable[[Any], Any], list[Any], int]], repeats: int
) -> list[float]:
    """Best rate of each pass over ``repeats`` rounds, the passes interleaved within a round so
    that load drift on a shared machine hits them alike."""
    best = [0.0] * len(passes)
    for _ in range(repeats):
        for k, (fn, items, rows_per_item) in enumerate(passes):
            best[k] = max(best[k], _cpu_rate(fn, items, rows_per_item))
    return best


def _config_for(task: str) -> ObjectiveConfig:
    if task == "mixed":
        return ObjectiveConfig()
    probs = {name: float(name == task) for name in OBJECTIVES}
    return ObjectiveConfig(
        span_prob=probs["span"], sentence_prob=probs["sentence"], document_prob=probs["document"]
    )


def run(args: argparse.Namespace, batch_sizes: list[int]) -> list[list[Any]]:
    """One result line per (S, task): S, task, window, ref, row, then one rate per batch size."""
    results = []
    for seq_length in (512, 1024):
        for task in TASKS:
            cfg = _config_for(task)
            fast = BlankInfilling(cfg, seq_length=seq_length, ids=IDS, seed=1234)
            windows = [
                random_window(fast.window_length, i, mean_doc=args.mean_doc)
                for i in range(args.rows)
            ]

            def ref(w: Any, cfg: ObjectiveConfig = cfg, fast: BlankInfilling = fast) -> Any:
                return reference_infill(w, cfg, IDS, fast.seq_length, fast.max_spans, 1234)

            passes: list[tuple[Callable[[Any], Any], list[Any], int]] = [
                (ref, windows[: args.ref_rows], 1),
                (fast, windows, 1),
            ]
            for b in batch_sizes:
                chunks = [windows[i : i + b] for i in range(0, len(windows) - b + 1, b)]
                passes.append((fast.batch, chunks, b))
            line = [seq_length, task, fast.window_length, *_interleaved_best(passes, args.repeats)]
            results.append(line)
            print(f"  S={seq_length} {task}: done", file=sys.stderr)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048, help="rows timed per task (ours)")
    ap.add_argument("--ref-rows", type=int, default=256, help="rows timed per task (reference)")
    ap.add_argument("--batch-sizes", default="8,32", help="micro-batch sizes for batch()")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    ap.add_argument("--mean-doc", type=int, default=200, help="mean document length in tokens")
    args = ap.parse_args()
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    results = run(args, batch_sizes)
    print(f"blank infilling rows/s on one core (process CPU time, best of {args.repeats})")
    head = ["S", "task", "window", "ref", "row", *[f"batch{b}" for b in batch_sizes]]
    head += ["row/ref", *[f"b{b}/ref" for b in batch_sizes]]
    print(("{:>5} {:>9} {:>6}" + " {:>8}" * (len(head) - 3)).format(*head))
    for s, task, window, ref, row, *batched in results:
        rates = [ref, row, *batched]
        ratios = [f"{r / ref:.1f}x" for r in (row, *batched)]
        cells = [f"{x:.0f}" for x in rates] + ratios
        print(("{:>5} {:>9} {:>6}" + " {:>8}" * len(cells)).format(s, task, window, *cells))


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
