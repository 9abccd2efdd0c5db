"""One pretraining run end to end: process group, seeds, data, model, engine, resume, loop.

Order matters for exact resume and for clean failure:

1. the process group starts (config and launch checks already passed in ``pretrain.main``);
2. python/numpy/torch are seeded with ``train.seed`` on every rank; the model's weights come
   from per-parameter generators (``megatron_glm.model``) and do not consume these RNGs;
3. torch's RNG is re-seeded per data-parallel rank (``seed + 1 + dp_rank``) so ranks draw
   different dropout masks (TP peers share it; the model's own TP stream differs per TP rank and
   pipeline stage); the model's weights come from per-parameter generators and draw none of it.
   Then the step runner builds the model and its engine (``training.step.build_runner``: with
   ``parallel.pp > 1`` each rank builds only its stage's layers, inside DeepSpeed's
   PipelineModule, ``training.pipeline``);
4. a checkpoint, if any, is loaded last: it overwrites weights, optimizer, schedule and every
   RNG, so a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_glm.compat.deepspeed import known_warnings_silenced
from megatron_glm.config import RunConfig
from megatron_glm.model import flops_per_token, num_parameters
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training import checkpoint as ckpt
from megatron_glm.training.batches import Batch, BatchSource
from megatron_glm.training.distributed import DistEnv, destroy_distributed, init_distributed
from megatron_glm.training.evaluation import BestMetric
from megatron_glm.training.loop import Trainer, TrainResult
from megatron_glm.training.losses import BatchLoss
from megatron_glm.training.signals import LauncherWatch, StopConditions
from megatron_glm.training.step import InitWeights, StepRunner, build_runner
from megatron_glm.training.watchdog import Watchdog

SourceFactory = Callable[[int, int], tuple[BatchSource, int]]


@dataclass
class RunTask:
    """What a kind of training brings to :func:`train_in_group` (defaults: pretraining)."""

    loss: BatchLoss | None = None
    """The objective (``None``: :class:`~megatron_glm.training.losses.PretrainLoss`)."""
    init_weights: InitWeights | None = None
    """Sets the fresh model's weights before the engine is built (finetuning's ``init``);
    skipped when the run resumes a checkpoint."""
    best: BestMetric | None = None
    """Validation figure that picks ``<checkpoint.save>/best``."""
    eval_metrics: Callable[[StepRunner], dict[str, float]] | None = None
    """Collective, at every validation: figures the loss cannot give, added to the validation
    line, TensorBoard and the best-checkpoint choice (finetuning seq2seq: ROUGE of greedy
    decodes of the validation split)."""
    after: Callable[[StepRunner, Trainer], None] | None = None
    """Collective, after a completed run: e.g. finetuning's test-split evaluation."""


"""(dp_rank, dp_size) -> (this rank's batch source, padded vocabulary size)."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) identically."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _real_data(cfg: RunConfig, local_rank: int) -> SourceFactory:
    def make(dp_rank: int, dp_size: int) -> tuple[BatchSource, int]:
        from megatron_glm.training.data_source import PretrainData
        from megatron_glm.training.preflight import load_tokenizer

        tok = load_tokenizer(cfg)
        source = PretrainData(cfg, tok, dp_rank=dp_rank, dp_size=dp_size, local_rank=local_rank)
        return source, tok.padded_vocab_size

    return make


class _ReportingSource:
    """A :class:`BatchSource` that tells the watchdog each time a micro-batch has arrived (a
    read stuck on a file system then shows as "last: data")."""

    def __init__(self, inner: BatchSource, watchdog: Watchdog) -> None:
        self.inner, self.watchdog = inner, watchdog

    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        return self.watchdog.watch_batches(self.inner.train_batches(consumed_samples), "data")

    def valid_batches(self) -> Iterable[Batch] | None:
        batches = self.inner.valid_batches()
        return None if batches is None else self.watchdog.watch_batches(batches, "valid data")


@known_warnings_silenced()
def train_in_group(
    cfg: RunConfig,
    env: DistEnv,
    device: torch.device,
    make_source: SourceFactory,
    *,
    log: Callable[[str], None] | None = None,
    watchdog: Watchdog | None = None,
    task: RunTask | None = None,
) -> TrainResult:
    """Steps 2-4 plus the loop, inside an existing process group (tests reuse one group).

    ``task`` is what differs for finetuning: the loss, the weights to start from, the metric
    that picks the best checkpoint, and a last evaluation after the loop.

    ``watchdog`` (optional) is told of every micro-batch read, forward and optimizer step. Three
    torch warnings DeepSpeed causes are ignored for the duration of the call only
    (:func:`megatron_glm.compat.deepspeed.known_warnings_silenced`).
    ``log`` receives the run's console lines (rank 0's); by default they are logged at INFO by
    ``megatron_glm.training.loop``, and the logging set-up decides which ranks show them.
    """
    dims = ParallelDims.build(
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, sequence_parallel=cfg.parallel.sequence_parallel
    )
    dp_size, dp_rank = dims.dp_size, dims.dp_rank  # TP peers share a DP rank: same data, seed
    seed_everything(cfg.train.seed)
    source, vocab = make_source(dp_rank, dp_size)
    if watchdog is not None:
        source = _ReportingSource(source, watchdog)
    torch.manual_seed(cfg.train.seed + 1 + dp_rank)  # model init draws no global RNG
    task = task or RunTask()
    load_dir = ckpt.resolve_load_dir(cfg.checkpoint.load, cfg.checkpoint.save)
    field = "checkpoint.load" if cfg.checkpoint.load is not None else "checkpoint.save"
    ckpt.agree_on_checkpoint(load_dir or cfg.checkpoint.save, field, device)  # one filesystem
    init = task.init_weights if load_dir is None else None  # a resume brings its own weights
    runner = build_runner(
        cfg, vocab_size=vocab, dims=dims, device=device, loss=task.loss, init_weights=init
    )
    eng = runner.eng
    if watchdog is not None:  # the hooks live as long as this engine; harmless once stopped
        watchdog.attach(eng.module, eng.optimizer)
    trainer = Trainer(
        cfg,
        runner,
        source,
        flops_per_token=flops_per_token(cfg.model, vocab, cfg.data.seq_length),
        world_size=env.world_size,
        rank=env.rank,
        log=log,
        best=task.best,
        eval_metrics=task.eval_metrics,
    )
    _log_run_header(trainer, cfg, dims, env, runner, vocab, device)
    start = None
    if load_dir is not None:
        start = ckpt.load(eng, load_dir, allow_missing_rng=cfg.checkpoint.allow_missing_rng)
        trainer.log(
            f"resumed from {load_dir} at step {start.iteration} "
            f"({start.consumed_samples} samples consumed)"
        )
    stop_conditions = StopConditions(
        cfg.train.exit_duration_mins, launcher=LauncherWatch.detect(), announce=env.rank == 0
    )
    with stop_conditions as stop:
        result = trainer.train(
            start,
            stop=stop,
            start_is_saved=load_dir is not None and load_dir == cfg.checkpoint.save,
        )
    if task.after is not None and result.exit_reason == "completed":
        task.after(runner, trainer)
    return result


def _log_run_header(
    trainer: Trainer,
    cfg: RunConfig,
    dims: ParallelDims,
    env: DistEnv,
    runner: StepRunner,
    vocab: int,
    device: torch.device,
) -> None:
    """The run's first lines: the parallel layout, the model and batch, the pipeline schedule."""
    trainer.log(dims.describe())
    trainer.log(
        f"model {cfg.model.name}: {num_parameters(cfg.model, vocab) / 1e6:.2f}M parameters, "
        f"vocab {vocab}, seq {cfg.data.seq_length} | world {env.world_size}, dp {dims.dp_size}, "
        f"grad accumulation {runner.eng.grad_accum}, ZeRO-{cfg.train.zero_stage}"
        f"{_offload(runner)}, {cfg.train.precision} | device {device}"
    )
    schedule = runner.describe()
    if schedule is not None:
        trainer.log(schedule)


def _offload(runner: StepRunner) -> str:
    """What the engine offloads (from DeepSpeed's engine, not the config): '' or the optimizer."""
    if not runner.eng.engine.zero_cpu_offload():
        return ""
    return f" + optimizer offloaded to CPU ({type(runner.eng.optimizer).__name__})"


def run_pretraining(
    cfg: RunConfig,
    env: DistEnv,
    *,
    make_source: SourceFactory | None = None,
    log: Callable[[str], None] | None = None,
    task: RunTask | None = None,
) -> TrainResult:
    """Start the process group, train under the progress watchdog, and tear the group down
    (also on errors). Every collective and the watchdog are bounded by
    ``train.distributed_timeout_minutes``.

    ``make_source`` defaults to the preprocessed corpora and tokenizer of ``cfg.data``.
    """
    timeout = cfg.train.distributed_timeout_minutes
    device = init_distributed(env, timeout_minutes=timeout)
    try:
        factory = make_source or _real_data(cfg, env.local_rank)
        with Watchdog.for_process_group(env.rank, env.world_size, timeout) as watchdog:
            return train_in_group(cfg, env, device, factory, log=log, watchdog=watchdog, task=task)
    finally:
        destroy_distributed()
