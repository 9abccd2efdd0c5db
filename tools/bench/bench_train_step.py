"""One full training step on one GPU: our GLM against Hugging Face ``BertForMaskedLM``.

A step is forward, backward and a torch fused AdamW update. Both models are timed in the same run
on the same device, on the same tokens, at the same number of loss positions:

- **ours**: :func:`megatron_glm.model.build_model` (``model.kernels`` = ``auto``: the Triton
  kernels on CUDA) with the loss of :func:`megatron_glm.model.glm_loss` -- the tied head and the
  cross entropy applied at loss positions only. Batches are real GLM rows: synthetic packed
  windows (uniform random tokens, a document boundary every ~400 tokens, a sentence start every
  ~24) turned into rows by :class:`megatron_glm.data.blank_infilling.BlankInfilling` with the
  objective of the model's pretraining recipe (``configs/pretrain_<name>.yaml``: span only for
  glm-large, span/sentence/document 0.5/0.25/0.25 for glm-410m), so ``sep``, ``valid_len``,
  padding and the loss-token fraction are what pretraining sees (the fraction is printed).
- **HF**: ``BertForMaskedLM`` of the same depth, width, heads, vocabulary, 4h MLP and 512
  positions, ``attn_implementation="sdpa"``, fed the same ``tokens`` with MLM ``labels`` equal to
  our targets at our loss positions and -100 elsewhere, and *no* attention mask: SDPA then runs
  FlashAttention without mask arithmetic and padding costs it nothing extra. That is the
  baseline's best case (GLM's prefix mask is more work), so the ratio is conservative. HF computes
  its MLM head and cross entropy over every position, as ``BertForMaskedLM`` does.

Precision: parameters, activations and optimizer state in ``--dtype`` (bf16) for both models --
what DeepSpeed's bf16 mode runs forward and backward in; the fp32 master copy of DeepSpeed's
optimizer is left out of both. Dropout: attention dropout 0 in both (our fused attention does not
implement it, and SDPA's flash path is only taken without it either); hidden dropout
``--hidden-dropout`` (default 0.1, the configs' value) in both. No gradient clipping in either.

Metrics (:mod:`megatron_glm.training.metrics`): tokens/s counts all ``B * S`` positions, padding
included; TFLOP/s uses model FLOPs per token ``6 N_matmul + 12 L h S``
(:func:`megatron_glm.model.flops_per_token`; for BERT the same formula with its N_matmul, which
adds the ``h x h`` MLM transform). The head term ``6 V h`` is credited for every token in both
models, although ours evaluates the head at loss positions only. MFU is against the dense peak of
:func:`megatron_glm.training.metrics.peak_tflops` ("n/a" on CPU and unknown devices). Each number
is the mean over ``--iters`` steps timed with CUDA events after ``--warmup`` untimed steps (the
first ones compile the Triton kernels), cycling over a few pre-built batches held on the device.

Targets for glm-410m: ours >= 1.7x HF tokens/s and MFU >= 50%. ``--profile`` adds, per batch
size, a torch.profiler table of our step's top ops by self CUDA time and the GPU-busy share of the
step, to say which kernel or overhead holds a missed target back. The table is printed last.

Without CUDA the script refuses, unless ``--smoke``: a tiny model through the same code (2
layers, h 64, vocab 512, S 64, batch 2, fp32, 1 warm-up and 2 timed steps; on the CPU, or on the
GPU when there is one), so that the script cannot rot; its numbers are not performance numbers.
On CPU ``auto`` resolves every op to its torch reference.

    python tools/bench/bench_train_step.py [--models glm-large,glm-410m] [--batches 16,32]
        [--warmup 10] [--iters 30] [--profile] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from megatron_glm.config import ModelConfig, ObjectiveConfig, RunConfig, load_config
from megatron_glm.data.blank_infilling import BlankInfilling, SpecialIds
from megatron_glm.data.packed_dataset import Window
from megatron_glm.logs import setup_logging
from megatron_glm.model import build_model, flops_per_token, glm_loss
from megatron_glm.training.metrics import Throughput, matmul_dtype, peak_tflops, throughput

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGET_MODEL = "glm-410m"
TARGET_RATIO = 1.7
TARGET_MFU = 0.5
NUM_BATCHES = 4
"""Distinct pre-built batches cycled through (different sep / valid_len / loss positions)."""
DOC_MEAN, SENTENCE_MEAN = 400, 24
"""Mean document and sentence lengths (tokens) of the synthetic windows."""

Batch = dict[str, Tensor]
Step = Callable[[Batch], Tensor]


@dataclass(frozen=True)
class Workload:
    """One model shape and the objective its batches are built with."""

    model: ModelConfig
    objective: ObjectiveConfig
    objective_label: str
    seq_length: int


@dataclass(frozen=True)
class Measurement:
    """One model at one batch size; ``speed`` is None when it ran out of memory."""

    speed: Throughput | None
    peak_gib: float | None
    loss: float | None


@dataclass(frozen=True)
class Row:
    model: str
    batch: int
    loss_fraction: float
    ours: Measurement
    hf: Measurement


# ----------------------------------------------------------------------------- set-up


def require_device(smoke: bool) -> torch.device:
    """CUDA, or (with ``--smoke``) the CPU; else exit with a message."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        sys.exit(
            "bench_train_step: needs a CUDA GPU and found none; run with --smoke for a CPU check "
            "of a tiny model (timings are then meaningless)"
        )
    return torch.device("cpu")


def _objective_label(cfg: ObjectiveConfig) -> str:
    probs = (cfg.span_prob, cfg.sentence_prob, cfg.document_prob)
    parts = zip(("span", "sentence", "document"), probs, strict=True)
    return "/".join(f"{name} {p:g}" for name, p in parts if p > 0)


def load_workload(name: str, seq_length: int, hidden_dropout: float, kernels: str) -> Workload:
    """``configs/model/<name>.yaml`` and the objective of ``configs/pretrain_<name>.yaml``.

    A model without a recipe gets the default objective mix. Attention dropout is forced to 0:
    our fused attention requires it (else the dispatcher falls back to the torch reference).
    """
    path = REPO / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"--models: no model config {path} (known: {', '.join(known)})")
    model = load_config(path, cls=ModelConfig)
    model = replace(model, hidden_dropout=hidden_dropout, attention_dropout=0.0, kernels=kernels)
    if model.vocab_size == 0:
        raise ValueError(f"{path}: vocab_size is 0 (from the tokenizer); the benchmark needs it")
    recipe = REPO / "configs" / f"pretrain_{name.replace('-', '_')}.yaml"
    if recipe.is_file():
        objective = load_config(recipe, cls=RunConfig).objective
        label = f"{_objective_label(objective)} ({recipe.name})"
    else:
        objective = ObjectiveConfig()
        label = f"{_objective_label(objective)} (default mix)"
    return Workload(model, objective, label, seq_length)


def smoke_workload() -> Workload:
    """The tiny CPU shape of ``--smoke``: 2 layers, h 64, 2 heads, vocab 512, S 64."""
    model = ModelConfig(
        name="smoke-tiny",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
        hidden_dropout=0.1,
        attention_dropout=0.0,
    )
    objective = ObjectiveConfig()
    return Workload(model, objective, _objective_label(objective), 64)


# ----------------------------------------------------------------------------- batches


def special_ids(vocab: int) -> SpecialIds:
    """GLM's special tokens on the last ids of the vocabulary (eos = pad)."""
    return SpecialIds(
        mask=vocab - 7, smask=vocab - 6, gmask=vocab - 5, sop=vocab - 4, eop=vocab - 3,
        pad=vocab - 2, eos=vocab - 2,
    )  # fmt: skip


def synthetic_window(
    rng: np.random.Generator, length: int, num_text_ids: int, eos: int, index: int
) -> Window:
    """A packed window of random text: eos between documents, sorted sentence starts."""
    tokens = rng.integers(0, num_text_ids, size=length, dtype=np.int64)  # [L]
    tokens[rng.random(length) < 1.0 / DOC_MEAN] = eos
    starts = np.flatnonzero(rng.random(length) < 1.0 / SENTENCE_MEAN)
    starts = np.union1d(starts, [0]).astype(np.int64)  # [K], sorted, unique, has 0
    return Window(tokens=tokens, sentence_starts=starts, epoch=0, index=index)


def make_batches(
    work: Workload, batch: int, seed: int, device: torch.device
) -> tuple[list[Batch], float]:
    """``NUM_BATCHES`` GLM micro-batches on ``device`` and their loss-token fraction.

    Each batch also carries ``labels`` (our targets at loss positions, -100 elsewhere) for the
    HF model's MLM loss.
    """
    vocab = work.model.vocab_size
    ids = special_ids(vocab)
    infill = BlankInfilling(work.objective, seq_length=work.seq_length, ids=ids, seed=seed)
    rng = np.random.default_rng(seed)
    out: list[Batch] = []
    for i in range(NUM_BATCHES):
        windows = [
            synthetic_window(rng, infill.window_length, vocab - 8, ids.eos, i * batch + j)
            for j in range(batch)
        ]
        rows = {k: torch.from_numpy(v).to(device) for k, v in infill.batch(windows).items()}
        rows["labels"] = torch.where(rows["loss_mask"] > 0, rows["targets"], -100)  # [B, S]
        out.append(rows)
    fraction = sum(float(b["loss_mask"].mean()) for b in out) / len(out)
    return out, fraction


# ----------------------------------------------------------------------------- models and steps


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)


def ours_step(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> Step:
    """Our model and a closure doing one training step on a batch; returns the loss."""
    torch.manual_seed(seed)  # the dropout stream
    model = build_model(cfg, device=device, seed=seed).to(dtype)
    optimizer = _optimizer(model)

    def step(b: Batch) -> Tensor:
        hidden = model(b["tokens"], b["position_ids"], b["sep"], b["valid_len"])  # [b, s, h]
        out = glm_loss(model, hidden, b["targets"], b["loss_mask"], b["objective"])
        loss = out.sum_loss / out.num_tokens.clamp(min=1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bert_config(cfg: ModelConfig) -> Any:
    """``BertConfig`` of the same shape; dropouts as ours (attention 0), SDPA attention."""
    from transformers import BertConfig

    assert cfg.ffn_hidden_size is not None  # filled by ModelConfig.__post_init__
    fields: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_hidden_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        attn_implementation="sdpa",
    )
    return BertConfig(**fields)


def hf_step(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> Step:
    """HF ``BertForMaskedLM`` and a closure doing one training step (MLM labels, no mask)."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = BertForMaskedLM(bert_config(cfg))
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF model uses {model.config._attn_implementation!r}, not sdpa")
    model = model.to(dtype).train()
    optimizer = _optimizer(model)

    def step(b: Batch) -> Tensor:
        loss = model(input_ids=b["tokens"], labels=b["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bert_flops_per_token(cfg: ModelConfig, seq_length: int) -> int:
    """``6 N_matmul + 12 L h S`` for BERT: ours plus the MLM head's ``h x h`` transform."""
    return flops_per_token(cfg, None, seq_length) + 6 * cfg.hidden_size**2


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(
    step: Step, batches: list[Batch], warmup: int, iters: int, device: torch.device
) -> tuple[float, float]:
    """Mean seconds per step over ``iters`` timed steps after ``warmup``; and the last loss."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            loss = step(batches[i % len(batches)])
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for i in range(iters):
            loss = step(batches[i % len(batches)])
        seconds = time.perf_counter() - t0
    return seconds / iters, float(loss)


def measure(
    step: Step, batches: list[Batch], args: argparse.Namespace, fpt: int, device: torch.device
) -> Measurement:
    """Throughput of ``step``; an out-of-memory error becomes an empty measurement."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds, loss = seconds_per_step(step, batches, args.warmup, args.iters, device)
    except torch.cuda.OutOfMemoryError:
        return Measurement(None, None, None)
    if not np.isfinite(loss):
        raise RuntimeError(
            f"non-finite training loss {loss}: the benchmark is not measuring a step"
        )
    b, s = batches[0]["tokens"].shape
    speed = throughput(
        tokens=b * s, seconds=seconds, flops_per_token=fpt, world_size=1, peak=args.peak
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return Measurement(speed, peak, loss)


def profile_table(
    step: Step, batches: list[Batch], device: torch.device, step_ms: float, steps: int = 3
) -> str:
    """Top ops of ``steps`` steps by self device (CPU: self CPU) time, and the GPU-busy share.

    The busy time is compared with ``step_ms``, the step time measured without the profiler
    (whose own overhead inflates the wall time of the profiled steps).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    _sync(device)
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        _sync(device)
    events = prof.key_averages()
    if device.type != "cuda":
        return events.table(sort_by="self_cpu_time_total", row_limit=15)
    # Kernel (device-type) events only, as torch's own table footer counts them: the CPU op that
    # launched a kernel also reports its time, and summing both would count it twice.
    busy_us = sum(
        e.self_device_time_total
        for e in events
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )
    busy_ms = busy_us / 1e3 / steps
    summary = (
        f"GPU busy {busy_ms:.2f} ms per step (profiled) against {step_ms:.2f} ms per step "
        f"(timed without the profiler): {busy_ms / step_ms:.0%}; the rest is launch / host "
        "overhead and syncs"
    )
    return events.table(sort_by="self_device_time_total", row_limit=20) + "\n" + summary


# ----------------------------------------------------------------------------- driver


def run_workload(
    work: Workload, args: argparse.Namespace, device: torch.device
) -> tuple[list[Row], list[str]]:
    """Ours at every batch size, then HF at every batch size (one model resident at a time)."""
    cfg, dtype = work.model, DTYPES[args.dtype]
    data = {b: make_batches(work, b, args.seed + b, device) for b in args.batches}
    ours: dict[int, Measurement] = {}
    profiles: list[str] = []
    step = ours_step(cfg, dtype, device, args.seed)
    for b, (batches, _) in data.items():
        ours[b] = measure(step, batches, args, flops_per_token(cfg, None, work.seq_length), device)
        _progress("ours", cfg.name, b, ours[b])
        speed = ours[b].speed
        if args.profile and speed is not None:
            step_ms = b * work.seq_length / speed.tokens_per_s * 1e3
            title = f"== profile: ours, {cfg.name} b{b} S{work.seq_length} {args.dtype}"
            profiles.append(f"{title}\n{profile_table(step, batches, device, step_ms)}")
    del step
    _free(device)
    rows = []
    step = hf_step(cfg, dtype, device, args.seed)
    for b, (batches, fraction) in data.items():
        hf = measure(step, batches, args, bert_flops_per_token(cfg, work.seq_length), device)
        _progress("HF", cfg.name, b, hf)
        rows.append(Row(cfg.name, b, fraction, ours[b], hf))
    del step
    _free(device)
    return rows, profiles


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(who: str, model: str, batch: int, m: Measurement) -> None:
    if m.speed is None:
        print(f"  {model} b{batch} {who}: out of memory", file=sys.stderr)
        return
    mem = f", peak {m.peak_gib:.1f} GiB" if m.peak_gib is not None else ""
    print(
        f"  {model} b{batch} {who}: {m.speed.tokens_per_s:,.0f} tok/s, loss {m.loss:.3f}{mem}",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------- printing


def _mfu(m: Measurement) -> str:
    if m.speed is None:
        return "OOM"
    return "n/a" if m.speed.mfu is None else f"{m.speed.mfu:.1%}"


def _target(row: Row) -> str:
    if row.model != TARGET_MODEL:
        return "-"
    o, h = row.ours.speed, row.hf.speed
    if o is None or h is None or o.mfu is None:
        return "n/a"
    met = o.tokens_per_s / h.tokens_per_s >= TARGET_RATIO and o.mfu >= TARGET_MFU
    return "met" if met else "MISSED"


def _cells(row: Row) -> list[str]:
    o, h = row.ours.speed, row.hf.speed
    ratio = f"{o.tokens_per_s / h.tokens_per_s:.2f}x" if o and h else "n/a"
    return [
        row.model,
        str(row.batch),
        f"{row.loss_fraction:.1%}",
        f"{o.tokens_per_s:,.0f}" if o else "OOM",
        f"{h.tokens_per_s:,.0f}" if h else "OOM",
        ratio,
        f"{o.tflops_per_device:.3g}" if o else "OOM",
        _mfu(row.ours),
        _mfu(row.hf),
        _target(row),
    ]


HEADER = (
    "model", "batch", "loss tok", "ours tok/s", "HF tok/s", "ratio", "ours TFLOP/s", "MFU",
    "HF MFU", "target",
)  # fmt: skip
WIDTHS = (12, 6, 9, 12, 12, 7, 13, 7, 7, 7)


def print_table(
    rows: list[Row], works: list[Workload], args: argparse.Namespace, where: str
) -> None:
    s = works[0].seq_length
    print(
        f"\n== training step (forward + backward + fused AdamW), {args.dtype}, S {s}, on {where}"
        f"\n   mean of {args.iters} steps after {args.warmup} warm-up; hidden dropout "
        f"{works[0].model.hidden_dropout:g} and attention dropout 0 in both models"
    )
    for w in works:
        print(
            f"   {w.model.name}: GLM rows (BlankInfilling, synthetic windows), {w.objective_label}"
        )
    print(
        "   HF = BertForMaskedLM, sdpa, no attention mask, MLM labels at the same loss positions"
        f"\n   targets ({TARGET_MODEL}): ours/HF >= {TARGET_RATIO:.2f}x and MFU >= "
        f"{TARGET_MFU:.0%} (both, per row)"
    )
    fmt = " ".join(f"{{:>{w}}}" for w in WIDTHS)
    print(fmt.format(*HEADER))
    for row in rows:
        print(fmt.format(*_cells(row)))
    if args.smoke:
        print("(smoke run: tiny model on CPU; the timings are not performance numbers)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="glm-large,glm-410m", help="configs/model/<name>.yaml")
    ap.add_argument("--batches", default="16,32", help="micro-batch sizes, comma separated")
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--hidden-dropout", type=float, default=0.1, help="both models")
    ap.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps (kernel compilation)")
    ap.add_argument("--iters", type=int, default=30, help="timed steps")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--profile", action="store_true", help="profile our step per batch size")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run through the same code")
    args = ap.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        ap.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.warmup < 0 or args.iters < 1:
        ap.error("--batches must be positive integers, --warmup >= 0 and --iters >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = require_device(args.smoke)
    if args.smoke:
        args.batches, args.dtype, args.warmup, args.iters = [2], "fp32", 1, 2
        works = [smoke_workload()]
    else:
        names = [n for n in args.models.split(",") if n]
        works = [
            load_workload(n, args.seq_length, args.hidden_dropout, args.kernels) for n in names
        ]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    args.peak = peak_tflops(
        where if device.type == "cuda" else None,
        matmul_dtype(args.dtype, torch.backends.cuda.matmul.allow_tf32),
    )
    rows: list[Row] = []
    profiles: list[str] = []
    for work in works:
        r, p = run_workload(work, args, device)
        rows += r
        profiles += p
    for text in profiles:
        print(f"\n{text}")
    print_table(rows, works, args, where)


if __name__ == "__main__":
    # stdout is the table; the dispatcher's choice of each op's backend (and any fallback to the
    # reference) goes to stderr, so a run says which kernels it timed.
    setup_logging(info_stream="stderr")
    main()
