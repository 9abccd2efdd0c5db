"""Throughput, MFU, memory, the console log line and TensorBoard scalars.

Definitions (docs/design.md, "Metrics"):

- tokens/s counts every position of every row, ``global_batch_size * seq_length`` per step, padding
  included: that is what the model computes on, and it matches ``flops_per_token``, which is
  defined over the static row length ``S``.
- TFLOP/s per device = ``flops_per_token * tokens/s / world_size / 1e12`` with model FLOPs per token
  ``6 * N_matmul + 12 * L * h * S`` (``megatron_glm.model.flops_per_token``; recomputation is not
  counted, as is conventional for MFU).
- MFU = achieved TFLOP/s per device / the device's dense peak for the matmul dtype of the run. The
  peak table lists NVIDIA's dense (no sparsity) tensor-core numbers. fp32 runs count as TF32 when
  torch lets matmuls use TF32, else as plain fp32. Devices not in the table (and CPUs) have no
  peak: MFU is reported as ``n/a`` rather than guessed.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_glm.config import ConfigError

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Device-name substring -> matmul dtype -> dense peak TFLOP/s. First match wins, so the more
    # specific names come first (an "H100 PCIe" must not match the SXM "H100" row).
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}
"""Dense peak TFLOP/s per device and matmul dtype (NVIDIA data sheets, SXM unless named)."""


def matmul_dtype(precision: str, allow_tf32: bool) -> str:
    """The dtype the run's matmuls execute in: bf16/fp16 as configured; fp32 as tf32 or fp32."""
    if precision in ("bf16", "fp16"):
        return precision
    if precision != "fp32":
        raise ConfigError("train.precision", f"unknown precision {precision!r}")
    return "tf32" if allow_tf32 else "fp32"


def peak_tflops(device_name: str | None, dtype: str) -> float | None:
    """Dense peak of ``device_name`` for ``dtype``; None for CPUs and unknown devices."""
    if not device_name:
        return None
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


def device_peak_tflops(precision: str) -> float | None:
    """Peak of the current CUDA device for the run's precision (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    return peak_tflops(name, matmul_dtype(precision, torch.backends.cuda.matmul.allow_tf32))


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a pipeline step under 1F1B (or GPipe): ``(pp - 1) / (m + pp - 1)``.

    Each of the ``pp`` stages is busy for ``m`` micro-batch slots out of ``m + pp - 1``: the
    first micro-batch needs ``pp - 1`` slots to reach the last stage, and the last one as many
    to drain back.
    """
    if pp < 1 or micro_batches < 1:
        raise ValueError(f"bubble_fraction: pp ({pp}) and micro_batches ({micro_batches}) >= 1")
    return (pp - 1) / (micro_batches + pp - 1)


@dataclass(frozen=True)
class Throughput:
    """Speed over a measured window of training steps."""

    tokens_per_s: float
    """All positions processed per second by the whole job."""
    tflops_per_device: float
    """Model TFLOP/s achieved per device."""
    mfu: float | None
    """tflops_per_device / peak, a fraction; None when the peak is unknown."""


def throughput(
    *,
    tokens: int,
    seconds: float,
    flops_per_token: float,
    world_size: int,
    peak: float | None,
) -> Throughput:
    """Tokens/s, TFLOP/s per device and MFU for ``tokens`` processed in ``seconds``."""
    if seconds <= 0 or world_size <= 0:
        raise ValueError(
            f"throughput: need seconds > 0 and world_size > 0 ({seconds}, {world_size})"
        )
    tokens_per_s = tokens / seconds
    tflops = flops_per_token * tokens_per_s / world_size / 1e12
    mfu = tflops / peak if peak else None
    return Throughput(tokens_per_s=tokens_per_s, tflops_per_device=tflops, mfu=mfu)


def memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on GPUs, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def perplexity(loss: float) -> float:
    """exp(loss), saturating to inf instead of raising on overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class StepStats:
    """Everything one training log line reports (averaged over the log window)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    loss: float
    objective_loss: dict[str, float | None]
    lr: float
    grad_norm: float | None
    loss_scale: float
    speed: Throughput
    memory_mib: float
    seconds_per_step: float
    skipped_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    layout: str | None = None
    """``tp T pp P dp D`` when the run uses model parallelism (None: pure data parallelism)."""
    pipeline_bubble: float | None = None
    """1F1B idle fraction ``(pp - 1) / (micro-batches + pp - 1)`` when ``pp > 1``."""


def _fmt_opt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_log_line(s: StepStats) -> str:
    """One console line, ``|``-separated, fixed field order (grep- and eye-friendly)."""
    per_obj = " ".join(f"{k} {_fmt_opt(v, '.4f')}" for k, v in s.objective_loss.items())
    mfu = "n/a" if s.speed.mfu is None else f"{100.0 * s.speed.mfu:.1f}%"
    parts = [
        f"step {s.iteration}/{s.train_iters}",
        f"samples {s.consumed_samples}",
        f"loss {s.loss:.4f} ({per_obj})",
        f"lr {s.lr:.3e}",
        f"grad norm {_fmt_opt(s.grad_norm, '.3f')}",
        f"loss scale {s.loss_scale:g}",
        f"{s.speed.tokens_per_s:,.0f} tok/s",
        f"{s.speed.tflops_per_device:.3g} TFLOP/s/dev",
        f"MFU {mfu}",
        f"mem {s.memory_mib:,.0f} MiB",
        f"{s.seconds_per_step:.3f} s/step",
    ]
    if s.layout is not None:
        bubble = "" if s.pipeline_bubble is None else f", bubble {100 * s.pipeline_bubble:.1f}%"
        parts.append(f"{s.layout}{bubble}")
    if s.skipped_steps:
        parts.append(f"skipped {s.skipped_steps}")
    return " | ".join(parts)


def step_scalars(s: StepStats) -> dict[str, float]:
    """The log line's numbers as TensorBoard tags (absent values are left out, not zeroed)."""
    out = {
        "train/loss": s.loss,
        "train/lr": s.lr,
        "train/loss_scale": s.loss_scale,
        "train/consumed_samples": float(s.consumed_samples),
        "train/skipped_steps": float(s.skipped_steps),
        "perf/tokens_per_s": s.speed.tokens_per_s,
        "perf/tflops_per_device": s.speed.tflops_per_device,
        "perf/seconds_per_step": s.seconds_per_step,
        "perf/memory_mib": s.memory_mib,
    }
    for name, value in s.objective_loss.items():
        if value is not None:
            out[f"train/loss_{name}"] = value
    if s.grad_norm is not None:
        out["train/grad_norm"] = s.grad_norm
    if s.speed.mfu is not None:
        out["perf/mfu"] = s.speed.mfu
    if s.pipeline_bubble is not None:
        out["perf/pipeline_bubble"] = s.pipeline_bubble
    out.update(s.extra)
    return out


class ScalarWriter:
    """TensorBoard ``SummaryWriter`` when a directory is given, else a no-op (rank 0 only).

    The import is lazy so that runs without TensorBoard never load it.
    """

    def __init__(self, log_dir: str | None) -> None:
        self._writer: Any = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir)

    def write(self, scalars: dict[str, float], step: int) -> None:
        """Add each scalar at ``step``."""
        if self._writer is None:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
