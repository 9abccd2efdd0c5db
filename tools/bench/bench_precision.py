"""bf16 against fp32, and ZeRO-Offload against ZeRO, on the CPU: loss curves of glm-tiny.

Every run trains ``configs/model/glm-tiny.yaml`` (vocabulary 512, S 64, micro-batch 4, no
accumulation, AdamW lr 3e-3 with 10 warm-up steps then cosine decay, dropout 0.1) in one process
through the CLI's session and loop (``training.session.train_in_group``), from the same weights,
on the same synthetic rows: random tokens whose targets are a fixed map of the input token (a
learnable rule), a prefix-LM row with the loss on part B, each row a pure function of its index.

- **precision**: fp32 and bf16 (DeepSpeed's bf16 mode: bf16 weights, forward and backward;
  fp32 master weights and Adam state in the ZeRO-1 optimizer), ``--steps`` each (200). Printed:
  both curves at a few steps, the mean of the last 10 losses, and the largest relative
  difference ``|bf16 - fp32| / fp32`` over all steps against ``--tolerance`` (5e-3; measured
  2.4e-3 over 200 steps on 2 cores): exit status 1 when it is exceeded.
- **offload** (``--offload-steps``, 50; 0 skips): ZeRO-2 and ZeRO-3, each without and with
  ``train.cpu_offload`` (DeepSpeed's C++ CPU Adam on the CPU partitions; its first use compiles
  it, see ``megatron_glm.training.cpu_adam``). Printed: the largest absolute loss difference of
  each pair and the wall seconds of each run, engine start-up included (on a CPU the "offload"
  moves nothing; what differs is the optimizer, C++ CPU Adam vs torch's AdamW, and DeepSpeed's
  offload code path).

The runs share one process (bf16 matmuls on CPU are then not bitwise reproducible from run to
run, only from a fresh process; the curves compared here are not affected beyond rounding).

    python tools/bench/bench_precision.py [--steps 200] [--offload-steps 50] [--tolerance 5e-3]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_glm.config import RunConfig, apply_overrides, from_dict
from megatron_glm.logs import setup_logging
from megatron_glm.training.distributed import destroy_distributed, init_distributed, read_dist_env
from megatron_glm.training.session import train_in_group

REPO = Path(__file__).resolve().parents[2]
VOCAB, SEQ, MICRO = 512, 64, 4
SHOW = (1, 10, 25, 50, 100, 150, 200)


def _row(index: int) -> dict[str, torch.Tensor]:
    """One row of the batch contract: part A = [0, sep), loss on part B = [sep, SEQ)."""
    g = torch.Generator().manual_seed(7_000_003 + index)
    sep = int(torch.randint(SEQ // 4, SEQ // 2, (1,), generator=g))
    tokens = torch.randint(8, VOCAB, (SEQ,), generator=g)
    positions = torch.zeros(2, SEQ, dtype=torch.long)
    positions[0] = torch.arange(SEQ).clamp(max=sep - 1)
    positions[1, sep:] = torch.arange(1, SEQ - sep + 1)
    mask = torch.zeros(SEQ)
    mask[sep:] = 1.0
    return {
        "tokens": tokens,
        "targets": (tokens * 7 + 3) % VOCAB,
        "loss_mask": mask,
        "position_ids": positions,
        "sep": torch.tensor(sep),
        "valid_len": torch.tensor(SEQ),
        "objective": torch.tensor(index % 3),
    }


class SyntheticRows:
    """A one-rank batch source over :func:`_row` (no validation set)."""

    def train_batches(self, consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            rows = [_row(i) for i in range(consumed, consumed + MICRO)]
            yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
            consumed += MICRO

    def valid_batches(self) -> None:
        return None


def run_config(steps: int, overrides: list[str]) -> RunConfig:
    """glm-tiny at vocabulary 512, S 64, batch 4, lr 3e-3 (cosine), plus ``overrides``."""
    raw: dict[str, Any] = {
        "model": yaml.safe_load((REPO / "configs/model/glm-tiny.yaml").read_text()),
        "data": {"seq_length": SEQ},
        "optimizer": {"lr": 3e-3, "warmup_iters": 10, "decay_style": "cosine"},
        "train": {"micro_batch_size": MICRO, "global_batch_size": MICRO, "train_iters": steps},
        "logging": {"log_interval": 1, "progress_bar": False},
    }
    raw["model"]["vocab_size"] = VOCAB
    apply_overrides(raw, ["train.eval_interval=0", *overrides])
    result: RunConfig = from_dict(RunConfig, raw)
    return result


def train(steps: int, overrides: list[str], device: torch.device) -> tuple[dict[int, float], float]:
    """(step -> loss, wall seconds) of one run."""
    cfg = run_config(steps, overrides)
    start = time.perf_counter()
    result = train_in_group(
        cfg, read_dist_env({}), device, lambda _r, _d: (SyntheticRows(), VOCAB), log=_quiet
    )
    return dict(result.step_losses), time.perf_counter() - start


def _quiet(_line: str) -> None:
    """The loop's console lines are not printed: the tool prints its result only."""


def max_relative(curve: dict[int, float], reference: dict[int, float]) -> float:
    """``max |curve - reference| / |reference|`` over the steps of ``reference``."""
    return max(abs(curve[s] - reference[s]) / abs(reference[s]) for s in reference)


def compare_precisions(steps: int, device: torch.device, tolerance: float) -> bool:
    """Train fp32 and bf16, print the comparison; True if bf16 stays within ``tolerance``."""
    fp32, _ = train(steps, ["train.zero_stage=1"], device)
    bf16, _ = train(steps, ["train.zero_stage=1", "train.precision=bf16"], device)
    print(f"glm-tiny, {steps} steps, ZeRO-1, 1 CPU process: fp32 vs bf16 (fp32 master weights)")
    print(f"{'step':>6} {'fp32':>9} {'bf16':>9} {'rel diff':>9}")
    for step in [s for s in SHOW if s <= steps]:
        rel = abs(bf16[step] - fp32[step]) / fp32[step]
        print(f"{step:>6} {fp32[step]:9.5f} {bf16[step]:9.5f} {rel:9.2e}")
    last = range(max(1, steps - 9), steps + 1)
    mean32, mean16 = (sum(c[s] for s in last) / len(last) for c in (fp32, bf16))
    print(f"mean of the last {len(last)}: fp32 {mean32:.5f}, bf16 {mean16:.5f}")
    worst = max_relative(bf16, fp32)
    print(f"max relative difference over {steps} steps: {worst:.2e}")
    finite = all(math.isfinite(v) for v in (*fp32.values(), *bf16.values()))
    within = finite and worst <= tolerance
    print(f"bf16 within {tolerance:.1e} of fp32: {'yes' if within else 'NO'}")
    return within


def compare_offload(steps: int, device: torch.device) -> None:
    print(f"\nZeRO-Offload, {steps} steps, fp32, 1 CPU process (DeepSpeed CPU Adam vs torch AdamW)")
    print(f"{'stage':>6} {'max |loss diff|':>16} {'s ZeRO':>8} {'s offload':>10}")
    for stage in (2, 3):
        plain, t_plain = train(steps, [f"train.zero_stage={stage}"], device)
        offload, t_off = train(
            steps, [f"train.zero_stage={stage}", "train.cpu_offload=true"], device
        )
        diff = max(abs(offload[s] - plain[s]) for s in plain)
        print(f"{stage:>6} {diff:16.2e} {t_plain:8.1f} {t_off:10.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps of each precision run")
    parser.add_argument("--offload-steps", type=int, default=50, help="0: no offload runs")
    parser.add_argument(
        "--tolerance", type=float, default=5e-3, help="bound on bf16's max rel diff"
    )
    args = parser.parse_args(argv)
    setup_logging(info_stream="stderr")  # stdout is the result
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # its own handler writes to stdout
    device = init_distributed(read_dist_env({}))
    try:
        within = compare_precisions(args.steps, device, args.tolerance)
        if args.offload_steps:
            compare_offload(args.offload_steps, device)
    finally:
        destroy_distributed()
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
