"""Step runners: one global batch's forward, backward and update, and evaluation, per layout.

The loop (``training.loop``) drives a :class:`StepRunner` and never asks which kind it holds.
:func:`build_runner` chooses once (as torchtitan's trainer branches once, in its
forward-backward step): :class:`DataParallelRunner` wraps the whole GLM in DeepSpeed's engine
(data and tensor parallelism, ZeRO 0-3); :class:`PipelineRunner` wraps this stage's layers in
DeepSpeed's ``PipelineEngine`` and runs its 1F1B schedule. What is minimised is a parameter, a
:class:`~megatron_glm.training.losses.BatchLoss`, so finetuning brings its loss (and objective
names) to the same runners, or adds a third runner, without touching the loop. Checkpoints need
no runner hook: DeepSpeed's engine saves and loads the pipeline's per-layer files itself
(``training.checkpoint`` takes the runner's :class:`~megatron_glm.training.engine.Engine`).

Loss normalisation (docs/design.md, "Loss normalisation": ``loss = sum(CE * mask) / sum(mask)``
over the *global* batch).
A step takes ``A = global / (micro * dp)`` micro-batches on each of ``D`` data-parallel ranks.
All ``A`` micro-batches of the step are fetched first and the loss-token count ``N`` is summed
locally and all-reduced over DP. Each micro-batch ``m`` then back-propagates

    L_m = S_m * A * D / N          (S_m = sum(CE * mask) of micro-batch m)

DeepSpeed divides every backward loss by ``A`` (``scale_wrt_gas``) and averages gradients over
the ``D`` ranks, so the applied gradient is ``(1/D) sum_ranks (1/A) sum_m grad(L_m) =
grad(sum_all S_m) / N``: exactly the gradient of the global-batch mean, independent of how rows
are split across micro-batches and ranks (the ZeRO-0..3 x {1, 2} process tests check this).
Micro-batches with many loss tokens weigh more, unlike averaging per-micro-batch means.

Tensor parallelism: the ``tp`` ranks of a TP group read the same rows and compute the same sums
(the loss is replicated over TP), so every count and statistic is reduced over ``dims.dp_group``
only; over the world it would be counted ``tp`` times and the gradient would come out ``tp``
times too small.

Non-finite losses: the step's loss sum is all-reduced *before* the optimizer step; if it is not
finite, every rank's optimizer (a :class:`~megatron_glm.training.skip.SkippableStep`) skips the
update (in every precision). DeepSpeed also skips, on its own, an update whose gradients are not
finite although the loss was (its ZeRO optimizers check the gradient norm in every precision;
under fp16 this is the dynamic loss scaler's overflow). The runner reports both
(:attr:`StepOutput.applied`); the loop counts them.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from megatron_glm.config import RunConfig
from megatron_glm.model import build_model
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.layers import grad_norm as model_grad_norm
from megatron_glm.training.batches import Batch, to_device
from megatron_glm.training.distributed import all_reduce
from megatron_glm.training.engine import (
    Engine,
    GLMPretrainModule,
    clips_itself,
    initialize,
    uses_manual_grad_norm,
)
from megatron_glm.training.loss_stats import LossAccumulator, LossStats
from megatron_glm.training.losses import BatchLoss, PretrainLoss
from megatron_glm.training.metrics import bubble_fraction

if TYPE_CHECKING:
    from megatron_glm.training.pipeline import PipelineLoss, StepHook

InitWeights = Callable[[nn.Module, bool], None]
"""Sets the weights of a freshly built module (the engine's module, or this stage's
``PipelineModule`` when the flag says pipelined) before DeepSpeed wraps it."""


@dataclass
class StepOutput:
    """Global (all-reduced) results of one optimizer step."""

    stats: LossStats
    """The step's loss sums; ``num_tokens`` is ``N``, the count the gradient was divided by."""
    applied: bool
    grad_norm: float | None
    loss_scale: float

    @property
    def finite(self) -> bool:
        return self.stats.finite

    @property
    def loss(self) -> float:
        return self.stats.loss


class StepRunner(ABC):
    """Trains one global batch per :meth:`train_step` and evaluates batches, on one layout."""

    def __init__(self, eng: Engine, loss: BatchLoss) -> None:
        self.eng = eng
        self.loss = loss

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.loss.objectives

    @abstractmethod
    def train_step(self, micro_batches: list[Batch]) -> StepOutput:
        """Collective: forward/backward over the step's ``grad_accum`` micro-batches and one
        (possibly skipped) update. See the module docstring for the loss scaling."""

    @abstractmethod
    def eval_step(self, batches: Iterable[Batch]) -> LossStats:
        """Collective: global loss sums over this rank's ``batches`` (dropout off, no update)."""

    def describe(self) -> str | None:
        """A line for the run's start-up log about the schedule, if there is one to tell."""
        return None

    def tied_weights_max_diff(self) -> float | None:
        """Collective: max |difference| between copies of tied weights (None: one copy)."""
        return None

    def loss_scale(self) -> float:
        """The fp16 loss scale now (1 in other precisions)."""
        opt = self.eng.engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(opt, attr, None)
            if isinstance(value, (int, float)) or (
                isinstance(value, Tensor) and value.numel() == 1
            ):
                return float(value)
        return 1.0

    # ------------------------------------------------------------------ shared by the runners

    def _global_token_count(self, micro_batches: list[Batch]) -> float:
        """``N``: loss tokens of the step over all micro-batches and DP ranks (known up front)."""
        eng = self.eng
        if len(micro_batches) != eng.grad_accum:
            raise ValueError(
                f"train_step: got {len(micro_batches)} micro-batches, need {eng.grad_accum}"
            )
        count = torch.zeros(1, dtype=torch.float64, device=eng.device)
        for mb in micro_batches:
            count += mb["loss_mask"].to(torch.float64).sum().to(eng.device)
        all_reduce(count, group=eng.dims.dp_group)
        num_tokens = float(count.item())
        if num_tokens <= 0:
            raise RuntimeError("the global batch has no loss tokens (loss_mask is all zero)")
        return num_tokens

    def _step_output(
        self, stats: LossStats, num_tokens: float, manual_norm: bool, grad_norm: float | None
    ) -> StepOutput:
        """The step's record, with DeepSpeed's grad norm where it computed one (non-manual norm).

        The token count is ``N`` (counted up front in float64, the gradient's divisor), not the
        loss's own per-micro-batch count.
        """
        ds, eng = self.eng.engine, self.eng
        # Skipped by DeepSpeed (its ZeRO/fp16 optimizers' gradient check) or by ours (non-finite
        # loss, or a non-finite gradient norm where the norm is ours): ``last_step_skipped`` is
        # only stale when DeepSpeed skipped the inner step, and then ``was_step_applied`` is False.
        applied = (
            stats.finite and bool(ds.was_step_applied()) and not eng.optimizer.last_step_skipped
        )
        if not applied:
            grad_norm = None
        elif not manual_norm:
            value = ds.get_global_grad_norm()
            grad_norm = None if value is None else float(value)
        return StepOutput(
            stats=replace(stats, num_tokens=num_tokens),
            applied=applied,
            grad_norm=grad_norm,
            loss_scale=self.loss_scale(),
        )


class DataParallelRunner(StepRunner):
    """The whole GLM (a TP shard of it) in DeepSpeed's engine; the loss runs in its forward."""

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        *,
        vocab_size: int,
        dims: ParallelDims,
        device: torch.device,
        loss: BatchLoss,
        init_weights: InitWeights | None = None,
    ) -> DataParallelRunner:
        """Build the GLM on ``device`` (float32, weights from ``train.seed``, then
        ``init_weights``) and its engine."""
        glm = build_model(
            cfg.model, vocab_size=vocab_size, device=device, seed=cfg.train.seed, dims=dims
        )
        module = GLMPretrainModule(glm, loss)
        if init_weights is not None:
            init_weights(module, False)
        return cls(initialize(module, cfg, dims=dims, device=device, model_rng=glm.rng), loss)

    def train_step(self, micro_batches: list[Batch]) -> StepOutput:
        eng, ds = self.eng, self.eng.engine
        num_tokens = self._global_token_count(micro_batches)
        factor = eng.grad_accum * eng.dp_size / num_tokens
        acc = LossAccumulator(self.objectives, eng.device)
        manual_norm = uses_manual_grad_norm(ds)
        grad_norm: float | None = None
        stats: LossStats | None = None
        for i, mb in enumerate(micro_batches):
            out = ds(to_device(mb, eng.device))
            ds.backward(out.sum_loss * factor)
            acc.add(out)
            if i == len(micro_batches) - 1:  # before the step that applies the update
                stats = acc.all_reduce(eng.dims.dp_group)
                eng.optimizer.skip_next_step = not stats.finite
                if manual_norm and stats.finite:
                    grad_norm = float(model_grad_norm(eng.module.parameters(), eng.dims))
                    # ZeRO-0 fp32: DeepSpeed checks no gradient; a non-finite one must not apply.
                    eng.optimizer.skip_next_step = not math.isfinite(grad_norm)
            ds.step()
        # DeepSpeed may skip the inner step itself (fp16 overflow) without consuming the flag.
        eng.optimizer.skip_next_step = False
        assert stats is not None
        return self._step_output(stats, num_tokens, manual_norm, grad_norm)

    @torch.no_grad()
    def eval_step(self, batches: Iterable[Batch]) -> LossStats:
        ds = self.eng.engine
        acc = LossAccumulator(self.objectives, self.eng.device)
        ds.eval()
        try:
            for mb in batches:
                acc.add(ds(to_device(mb, self.eng.device)))
        finally:
            ds.train()
        return acc.all_reduce(self.eng.dims.dp_group)


class PipelineRunner(StepRunner):
    """This stage's layers in DeepSpeed's ``PipelineEngine`` (``training.pipeline``).

    Every stage holds the step's micro-batches (the first stage feeds the inputs, the last the
    labels); ``N`` is counted from them before the schedule runs, so the last stage scales each
    micro-batch's loss sum by ``A * D / N`` exactly as the data-parallel runner does. The
    statistics, the skip decision and (ZeRO-0 fp32) the grad norm come from the optimizer-step
    hook, which runs inside ``train_batch``.
    """

    def __init__(
        self,
        eng: Engine,
        loss: BatchLoss,
        *,
        pipe_loss: PipelineLoss,
        hook: StepHook,
        parts: list[int],
    ) -> None:
        super().__init__(eng, loss)
        self.pipe_loss = pipe_loss
        """DeepSpeed's ``loss_fn`` on the last stage; the runner sets its scale per step."""
        self.hook = hook
        """The step's global loss statistics and grad norm, set inside ``train_batch``."""
        self.parts = parts
        """Stage boundaries over the layer indices: stage s runs ``[parts[s], parts[s + 1])``."""

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        *,
        vocab_size: int,
        dims: ParallelDims,
        device: torch.device,
        loss: BatchLoss,
        init_weights: InitWeights | None = None,
    ) -> PipelineRunner:
        """Build this stage of the GLM (``dims.pp > 1``), set ``init_weights``, and wrap it in
        the PipelineEngine."""
        from megatron_glm.compat.deepspeed import reduce_zero_grad_norm_once, wrap_optimizer_step
        from megatron_glm.training.pipeline import StepHook, build_pipeline

        pipe, rng = build_pipeline(
            cfg.model,
            vocab_size=vocab_size,
            dims=dims,
            device=device,
            seed=cfg.train.seed,
            partition_method=cfg.parallel.partition_method,
            loss=loss,
        )
        if init_weights is not None:
            init_weights(pipe, True)
        eng = initialize(pipe, cfg, dims=dims, device=device, model_rng=rng)
        reduce_zero_grad_norm_once(eng.engine)  # stages may hold different numbers of groups
        manual_norm = uses_manual_grad_norm(eng.engine)
        clip = cfg.optimizer.clip_grad if clips_itself(cfg) else 0.0
        hook = StepHook(pipe.loss_fn, eng.optimizer, manual_norm=manual_norm, clip_grad=clip)
        wrap_optimizer_step(eng.engine, hook)
        parts = [int(x) for x in pipe.parts]
        return cls(eng, loss, pipe_loss=pipe.loss_fn, hook=hook, parts=parts)

    def train_step(self, micro_batches: list[Batch]) -> StepOutput:
        from megatron_glm.training.pipeline import micro_batch_iterator

        eng, hook = self.eng, self.hook
        num_tokens = self._global_token_count(micro_batches)
        self.pipe_loss.begin(eng.grad_accum * eng.dp_size / num_tokens, eng.device)
        hook.stats = None
        batches = micro_batch_iterator(micro_batches, eng.device, self.loss.label_keys)
        eng.engine.train_batch(data_iter=batches)
        eng.optimizer.skip_next_step = False
        assert hook.stats is not None, "the pipeline ran no optimizer step"
        return self._step_output(hook.stats, num_tokens, hook.manual_norm, hook.grad_norm)

    @torch.no_grad()
    def eval_step(self, batches: Iterable[Batch]) -> LossStats:
        """Validation sums through DeepSpeed's inference schedule, on every rank."""
        from megatron_glm.training.pipeline import micro_batch_iterator

        ds, micro = self.eng.engine, list(batches)
        self.pipe_loss.begin(1.0, self.eng.device)
        ds.eval_batch(
            micro_batch_iterator(micro, self.eng.device, self.loss.label_keys),
            compute_loss=True,
            reduce_output=None,
            bcast_loss=False,
            num_micro_batches=len(micro),
        )
        return self.pipe_loss.reduce(ds.is_last_stage())

    def describe(self) -> str:
        pp, m = self.eng.dims.pp, self.eng.grad_accum
        split = " ".join(f"[{a}, {b})" for a, b in itertools.pairwise(self.parts))
        return (
            f"pipeline: {pp} stages, {m} micro-batches per step (1F1B, bubble "
            f"{100 * bubble_fraction(pp, m):.1f}%), layers per stage {split}"
        )

    def tied_weights_max_diff(self) -> float:
        """The embedding (first stage) and head (last stage) copies, over the world."""
        from megatron_glm.training.pipeline import tied_weights_max_diff

        local = tied_weights_max_diff(self.eng.module)
        diff = torch.tensor([local], device=self.eng.device)
        all_reduce(diff, op="max")
        return float(diff.item())


def build_runner(
    cfg: RunConfig,
    *,
    vocab_size: int,
    dims: ParallelDims,
    device: torch.device,
    loss: BatchLoss | None = None,
    init_weights: InitWeights | None = None,
) -> StepRunner:
    """Collective: the model, its engine and the runner for ``dims`` (the one place that asks
    whether the run is pipelined). ``loss`` defaults to pretraining's; ``init_weights``
    (finetuning from a checkpoint's weights) runs on the module before the engine exists, so
    DeepSpeed's master weights and partitions start from those values."""
    loss = loss or PretrainLoss()
    kind = PipelineRunner if dims.pp > 1 else DataParallelRunner
    return kind.build(
        cfg, vocab_size=vocab_size, dims=dims, device=device, loss=loss, init_weights=init_weights
    )
