"""Throughput/MFU arithmetic, the peak table, the log line and TensorBoard output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_glm.config import ModelConfig
from megatron_glm.model import flops_per_token
from megatron_glm.training.metrics import (
    ScalarWriter,
    StepStats,
    Throughput,
    format_log_line,
    matmul_dtype,
    memory_mib,
    peak_tflops,
    perplexity,
    step_scalars,
    throughput,
)


def test_flops_per_token_by_hand() -> None:
    """6 * N_matmul + 12 L h S for a 2-layer h=64 model, vocab 1024, S=128, written out."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=2, vocab_size=1024)
    h, f, L, V, S = 64, 256, 2, 1024, 128
    n_matmul = L * (3 * h * h + h * h + h * f + f * h) + V * h
    assert n_matmul == 2 * (12288 + 4096 + 16384 + 16384) + 65536
    assert flops_per_token(cfg, None, S) == 6 * n_matmul + 12 * L * h * S


def test_throughput_and_mfu() -> None:
    # 8 devices, 4 steps of global batch 64 x S 2048 in 10 s, 1.2e9 FLOPs per token
    tokens = 4 * 64 * 2048
    t = throughput(tokens=tokens, seconds=10.0, flops_per_token=1.2e9, world_size=8, peak=989.4)
    assert t.tokens_per_s == pytest.approx(52428.8)
    assert t.tflops_per_device == pytest.approx(1.2e9 * 52428.8 / 8 / 1e12)
    assert t.mfu == pytest.approx(t.tflops_per_device / 989.4)
    cpu = throughput(tokens=100, seconds=2.0, flops_per_token=10.0, world_size=2, peak=None)
    assert cpu.mfu is None and cpu.tokens_per_s == 50.0
    with pytest.raises(ValueError, match="seconds > 0"):
        throughput(tokens=1, seconds=0.0, flops_per_token=1.0, world_size=1, peak=None)


@pytest.mark.parametrize(
    ("name", "dtype", "want"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "fp16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
        ("Tesla V100-SXM2-32GB", "bf16", None),  # no bf16 tensor cores
        ("NVIDIA GeForce GTX 1080", "fp16", None),  # not in the table: no guess
        (None, "fp32", None),  # CPU
    ],
)
def test_peak_table(name: str | None, dtype: str, want: float | None) -> None:
    assert peak_tflops(name, dtype) == want


def test_matmul_dtype() -> None:
    assert matmul_dtype("bf16", allow_tf32=False) == "bf16"
    assert matmul_dtype("fp32", allow_tf32=True) == "tf32"
    assert matmul_dtype("fp32", allow_tf32=False) == "fp32"
    with pytest.raises(ValueError, match=r"train\.precision"):
        matmul_dtype("int8", allow_tf32=False)


def _stats(mfu: float | None, grad: float | None) -> StepStats:
    return StepStats(
        iteration=20,
        train_iters=100,
        consumed_samples=640,
        loss=5.25,
        objective_loss={"span": 5.0, "sentence": None, "document": 5.5},
        lr=1.5e-4,
        grad_norm=grad,
        loss_scale=1.0,
        speed=Throughput(tokens_per_s=12345.6, tflops_per_device=0.0123, mfu=mfu),
        memory_mib=512.4,
        seconds_per_step=0.25,
    )


def test_log_line_exact() -> None:
    line = format_log_line(_stats(mfu=0.4567, grad=1.23456))
    assert line == (
        "step 20/100 | samples 640 | loss 5.2500 (span 5.0000 sentence n/a document 5.5000) | "
        "lr 1.500e-04 | grad norm 1.235 | loss scale 1 | 12,346 tok/s | 0.0123 TFLOP/s/dev | "
        "MFU 45.7% | mem 512 MiB | 0.250 s/step"
    )
    assert "MFU n/a" in format_log_line(_stats(mfu=None, grad=None))
    assert "grad norm n/a" in format_log_line(_stats(mfu=None, grad=None))


def test_scalars_leave_out_missing_values() -> None:
    tags = step_scalars(_stats(mfu=None, grad=None))
    assert tags["train/loss_span"] == 5.0 and "train/loss_sentence" not in tags
    assert "perf/mfu" not in tags and "train/grad_norm" not in tags
    assert step_scalars(_stats(mfu=0.5, grad=2.0))["perf/mfu"] == 0.5


def test_tensorboard_events_written(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = ScalarWriter(str(tmp_path))
    writer.write({"train/loss": 3.5, "perf/mfu": 0.25}, step=7)
    writer.write({"train/loss": 3.0}, step=8)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(7, 3.5), (8, 3.0)]
    assert [e.value for e in acc.Scalars("perf/mfu")] == [0.25]
    ScalarWriter(None).write({"x": 1.0}, step=1)  # disabled: no error, no file


def test_memory_and_perplexity() -> None:
    before = memory_mib(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    block.add_(1.0)
    assert memory_mib(torch.device("cpu")) >= max(before, 64.0)
    assert perplexity(0.0) == 1.0 and perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf
