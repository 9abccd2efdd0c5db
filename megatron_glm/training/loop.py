"""The training loop: global-batch loss normalisation, validation, logging, checkpoints, stops.

Loss normalisation (DESIGN.md: ``loss = sum(CE * mask) / sum(mask)`` over the *global* batch).
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
(``glm_loss`` is replicated over TP), so every count and statistic is reduced over
``dims.dp_group`` only; over the world it would be counted ``tp`` times and the gradient would
come out ``tp`` times too small.

Non-finite losses: the step's loss sum is all-reduced *before* the optimizer step; if it is not
finite, every rank's :class:`SkippableAdamW` skips the update (in every precision). DeepSpeed
also skips, on its own, an update whose gradients are not finite although the loss was (its
ZeRO optimizers check the gradient norm in every precision; under fp16 this is the dynamic loss
scaler's overflow). Every skipped update counts toward ``train.max_nonfinite_steps`` consecutive
ones, after which the run stops with :class:`NonFiniteLossError` naming the step, without
writing a checkpoint -- except fp16 overflows while the loss scale can still shrink, which are
the scaler calibrating itself, not divergence. No checkpoint is written while the last step was
skipped, and :func:`checkpoint.save` refuses non-finite weights in any case.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from megatron_glm.config import RunConfig, to_dict
from megatron_glm.parallel.layers import grad_norm as model_grad_norm
from megatron_glm.training import checkpoint as ckpt
from megatron_glm.training.checkpoint import NonFiniteError
from megatron_glm.training.distributed import all_reduce
from megatron_glm.training.engine import Engine, uses_manual_grad_norm
from megatron_glm.training.metrics import (
    ScalarWriter,
    StepStats,
    bubble_fraction,
    device_peak_tflops,
    format_log_line,
    memory_mib,
    perplexity,
    step_scalars,
    throughput,
)
from megatron_glm.training.signals import StopConditions

OBJECTIVE_NAMES: tuple[str, ...] = ("span", "sentence", "document")
"""Objective ids 0, 1, 2 of the batch contract's ``objective`` column."""

Batch = dict[str, Tensor]


class BatchSource(Protocol):
    """This rank's micro-batches (batch contract dicts, on CPU)."""

    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        """The training stream from a global position (rows consumed by all DP ranks)."""
        ...

    def valid_batches(self) -> Iterable[Batch] | None:
        """The same validation micro-batches at every call (this rank's share of ``eval_iters``
        global batches), or None."""
        ...


class NonFiniteLossError(NonFiniteError):
    """Too many consecutive skipped updates (non-finite loss or gradients); names the step."""


@dataclass
class StepOutput:
    """Global (all-reduced) results of one optimizer step."""

    loss_sum: float
    num_tokens: float
    objective_sum: list[float]
    objective_count: list[float]
    finite: bool
    applied: bool
    grad_norm: float | None
    loss_scale: float

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_tokens


@dataclass
class EvalResult:
    """Validation loss over ``eval_iters`` micro-batches per rank, all-reduced."""

    loss: float
    objective_loss: dict[str, float | None]

    def line(self, iteration: int) -> str:
        per = " | ".join(
            f"{k} {v:.4f} ppl {perplexity(v):.2f}" if v is not None else f"{k} n/a"
            for k, v in self.objective_loss.items()
        )
        return (
            f"validation at step {iteration} | loss {self.loss:.4f} ppl "
            f"{perplexity(self.loss):.2f} | {per}"
        )

    def scalars(self) -> dict[str, float]:
        out = {"valid/loss": self.loss, "valid/ppl": perplexity(self.loss)}
        for k, v in self.objective_loss.items():
            if v is not None:
                out[f"valid/loss_{k}"] = v
                out[f"valid/ppl_{k}"] = perplexity(v)
        return out


@dataclass
class TrainResult:
    """What a run did (rank 0 holds the same numbers as every rank)."""

    iteration: int
    consumed_samples: int
    exit_reason: str
    """``completed``, ``SIGTERM``, ``SIGUSR1``, ``exit_duration_mins``, ...; errors raise."""
    step_losses: dict[int, float] = field(default_factory=dict)
    """Global-batch loss of every step run by this process (iteration -> loss)."""
    step_grad_norms: dict[int, float | None] = field(default_factory=dict)
    """Gradient norm of every step (None when the update was skipped)."""
    valid_history: list[tuple[int, float]] = field(default_factory=list)
    """(iteration, validation loss), including those from before a resume."""
    checkpoint: str | None = None
    """Tag of the last checkpoint written, if any."""
    tied_weights_max_diff: float | None = None
    """Pipeline runs: max |embedding - output head| over the tied copies at the end."""


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _manual_grad_norm(eng: Engine) -> float:
    """L2 norm of the whole model's (already DP-averaged) gradient; DeepSpeed reports none at
    ZeRO-0 fp32. Under TP a rank holds shards: replicated tensors count once (TP rank 0) and the
    squares are summed over the model-parallel group, as in DeepSpeed's own clipping norm."""
    return float(model_grad_norm(eng.module.parameters(), eng.dims))


def _loss_scale(eng: Engine) -> float:
    opt = eng.engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1):
            return float(value)
    return 1.0


def _global_token_count(eng: Engine, micro_batches: list[Batch]) -> float:
    """``N``: loss tokens of the step over all micro-batches and DP ranks (known up front)."""
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


def train_step(eng: Engine, micro_batches: list[Batch]) -> StepOutput:
    """Forward/backward over the step's micro-batches and one (possibly skipped) update.

    See the module docstring for the loss scaling that makes the update the global-batch mean.
    """
    if eng.pipeline is not None:
        return pipeline_train_step(eng, micro_batches)
    ds = eng.engine
    num_tokens = _global_token_count(eng, micro_batches)
    factor = eng.grad_accum * eng.dp_size / num_tokens
    stats = torch.zeros(7, dtype=torch.float64, device=eng.device)  # [sum, obj sum x3, obj cnt x3]
    manual_norm = uses_manual_grad_norm(ds)
    grad_norm: float | None = None
    finite = True
    for i, mb in enumerate(micro_batches):
        out = ds(_to_device(mb, eng.device))
        ds.backward(out.sum_loss * factor)
        stats[0] += out.sum_loss.detach().to(torch.float64)
        stats[1:4] += out.per_objective_sum.to(torch.float64)
        stats[4:7] += out.per_objective_count.to(torch.float64)
        if i == len(micro_batches) - 1:
            all_reduce(stats, group=eng.dims.dp_group)
            finite = bool(torch.isfinite(stats[0]))
            eng.optimizer.skip_next_step = not finite
            if manual_norm and finite:
                grad_norm = _manual_grad_norm(eng)
                # ZeRO-0 fp32: DeepSpeed checks no gradient; a non-finite one must not apply.
                eng.optimizer.skip_next_step = not math.isfinite(grad_norm)
        ds.step()
    # DeepSpeed may skip the inner step itself (fp16 overflow) without consuming the flag.
    eng.optimizer.skip_next_step = False
    values = stats.tolist()
    return _step_output(
        eng, values[0], values[1:4], values[4:7], num_tokens, manual_norm, grad_norm
    )


def _step_output(
    eng: Engine,
    loss_sum: float,
    objective_sum: list[float],
    objective_count: list[float],
    num_tokens: float,
    manual_norm: bool,
    grad_norm: float | None,
) -> StepOutput:
    """The step's record, with DeepSpeed's grad norm where it computed one (non-manual norm)."""
    ds = eng.engine
    finite = math.isfinite(loss_sum)
    # Skipped by DeepSpeed (its ZeRO/fp16 optimizers' gradient check) or by ours (non-finite
    # loss, or a non-finite gradient norm where the norm is ours): ``last_step_skipped`` is only
    # stale when DeepSpeed skipped the inner step, and then ``was_step_applied`` is False.
    applied = finite and bool(ds.was_step_applied()) and not eng.optimizer.last_step_skipped
    if not applied:
        grad_norm = None
    elif not manual_norm:
        value = ds.get_global_grad_norm()
        grad_norm = None if value is None else float(value)
    return StepOutput(
        loss_sum=loss_sum,
        num_tokens=num_tokens,
        objective_sum=objective_sum,
        objective_count=objective_count,
        finite=finite,
        applied=applied,
        grad_norm=grad_norm,
        loss_scale=_loss_scale(eng),
    )


def pipeline_train_step(eng: Engine, micro_batches: list[Batch]) -> StepOutput:
    """One step through DeepSpeed's 1F1B schedule (``PipelineEngine.train_batch``).

    Every stage holds the step's micro-batches (the first stage feeds the inputs, the last the
    labels); ``N`` is counted from them before the schedule runs, so the last stage scales each
    micro-batch's loss sum by ``A * D / N`` exactly as :func:`train_step` does. The statistics,
    the skip decision and (ZeRO-0 fp32) the grad norm come from the optimizer-step hook.
    """
    from megatron_glm.training.pipeline import micro_batch_iterator

    assert eng.pipeline is not None
    ds, hook = eng.engine, eng.pipeline.hook
    num_tokens = _global_token_count(eng, micro_batches)
    eng.pipeline.loss.begin(eng.grad_accum * eng.dp_size / num_tokens, eng.device)
    hook.stats = None
    ds.train_batch(data_iter=micro_batch_iterator(micro_batches, eng.device))
    eng.optimizer.skip_next_step = False
    assert hook.stats is not None, "the pipeline ran no optimizer step"
    values = hook.stats.tolist()  # [sum, tokens, obj sum x3, obj tokens x3]
    return _step_output(
        eng, values[0], values[2:5], values[5:8], num_tokens, hook.manual_norm, hook.grad_norm
    )


@torch.no_grad()
def _pipeline_eval_stats(eng: Engine, batches: Iterable[Batch]) -> Tensor:
    """Validation sums through DeepSpeed's inference schedule, on every rank."""
    from megatron_glm.training.pipeline import micro_batch_iterator

    assert eng.pipeline is not None
    ds, loss = eng.engine, eng.pipeline.loss
    micro = list(batches)
    loss.begin(1.0, eng.device)
    ds.eval_batch(
        micro_batch_iterator(micro, eng.device),
        compute_loss=True,
        reduce_output=None,
        bcast_loss=False,
        num_micro_batches=len(micro),
    )
    return loss.reduce(ds.is_last_stage())


@torch.no_grad()
def evaluate(eng: Engine, batches: Iterable[Batch]) -> EvalResult:
    """Validation loss (dropout off), all-reduced over DP; per objective too."""
    if eng.pipeline is not None:
        return _eval_result(_pipeline_eval_stats(eng, batches).tolist())
    ds = eng.engine
    ds.eval()
    stats = torch.zeros(8, dtype=torch.float64, device=eng.device)  # [sum, n, obj sum, obj cnt]
    try:
        for mb in batches:
            out = ds(_to_device(mb, eng.device))
            stats[0] += out.sum_loss.to(torch.float64)
            stats[1] += out.num_tokens.to(torch.float64)
            stats[2:5] += out.per_objective_sum.to(torch.float64)
            stats[5:8] += out.per_objective_count.to(torch.float64)
    finally:
        ds.train()
    all_reduce(stats, group=eng.dims.dp_group)
    return _eval_result(stats.tolist())


def _eval_result(v: list[float]) -> EvalResult:
    """``[sum, tokens, obj sum x3, obj tokens x3]`` (global) -> losses."""
    if v[1] <= 0:
        raise RuntimeError("validation batches have no loss tokens")
    per = {
        name: (v[2 + k] / v[5 + k] if v[5 + k] > 0 else None)
        for k, name in enumerate(OBJECTIVE_NAMES)
    }
    return EvalResult(loss=v[0] / v[1], objective_loss=per)


class _Window:
    """Accumulates steps between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.loss_sum = 0.0
        self.tokens = 0.0
        self.obj_sum = [0.0, 0.0, 0.0]
        self.obj_count = [0.0, 0.0, 0.0]
        self.grad_norms: list[float] = []
        self.skipped = 0
        self.lr = math.nan

    def add(self, out: StepOutput, seconds: float, lr: float) -> None:
        self.steps += 1
        self.lr = lr
        self.seconds += seconds
        if not out.applied:
            self.skipped += 1
        if out.finite:
            self.loss_sum += out.loss_sum
            self.tokens += out.num_tokens
            for k in range(3):
                self.obj_sum[k] += out.objective_sum[k]
                self.obj_count[k] += out.objective_count[k]
        if out.grad_norm is not None and math.isfinite(out.grad_norm):
            self.grad_norms.append(out.grad_norm)


@dataclass
class _RunState:
    """Counters of one ``Trainer.train`` call."""

    iteration: int
    consumed: int
    history: list[tuple[int, float]]
    last_saved: int | None
    result: TrainResult
    bad_steps: int = 0

    @classmethod
    def begin(cls, start: ckpt.ClientState | None, start_is_saved: bool) -> _RunState:
        iteration = start.iteration if start else 0
        consumed = start.consumed_samples if start else 0
        history = list(start.valid_history) if start else []
        return cls(
            iteration=iteration,
            consumed=consumed,
            history=history,
            last_saved=iteration if (start is not None and start_is_saved) else None,
            result=TrainResult(iteration, consumed, "completed", valid_history=history),
        )

    def finish(self) -> TrainResult:
        self.result.iteration = self.iteration
        self.result.consumed_samples = self.consumed
        return self.result


class Trainer:
    """Runs ``cfg`` on an initialised :class:`Engine` with a :class:`BatchSource`.

    ``flops_per_token`` comes from the model (``megatron_glm.model.flops_per_token``).
    Console output (rank 0 only) goes through ``log``; it defaults to ``print``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        eng: Engine,
        source: BatchSource,
        *,
        flops_per_token: float,
        world_size: int,
        rank: int,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.eng = eng
        self.source = source
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.rank = rank
        self._log_fn = log or (lambda msg: print(msg, flush=True))
        self._bar: tqdm | None = None
        self.peak = device_peak_tflops(cfg.train.precision)

    def log(self, msg: str) -> None:
        """Rank 0 prints; the tqdm bar, if any, is redrawn below the message."""
        if self.rank != 0:
            return
        if self._bar is not None:
            self._bar.clear()
        self._log_fn(msg)
        if self._bar is not None:
            self._bar.refresh()

    # ------------------------------------------------------------------ pieces

    def _validate(self, iteration: int, writer: ScalarWriter) -> float | None:
        batches = self.source.valid_batches()
        if batches is None:
            return None
        result = evaluate(self.eng, batches)
        self.log(result.line(iteration))
        if self.rank == 0:
            writer.write(result.scalars(), iteration)
        return result.loss

    def _log_window(
        self, window: _Window, iteration: int, consumed: int, writer: ScalarWriter
    ) -> None:
        if window.steps == 0:
            return
        tokens = window.steps * self.cfg.train.global_batch_size * self.cfg.data.seq_length
        speed = throughput(
            tokens=tokens,
            seconds=max(window.seconds, 1e-9),
            flops_per_token=self.flops_per_token,
            world_size=self.world_size,
            peak=self.peak,
        )
        stats = StepStats(
            iteration=iteration,
            train_iters=self.cfg.train.train_iters,
            consumed_samples=consumed,
            loss=window.loss_sum / window.tokens if window.tokens > 0 else math.nan,
            objective_loss={
                name: (window.obj_sum[k] / window.obj_count[k] if window.obj_count[k] else None)
                for k, name in enumerate(OBJECTIVE_NAMES)
            },
            lr=window.lr,
            grad_norm=(
                sum(window.grad_norms) / len(window.grad_norms) if window.grad_norms else None
            ),
            loss_scale=_loss_scale(self.eng),
            speed=speed,
            memory_mib=memory_mib(self.eng.device),
            seconds_per_step=window.seconds / window.steps,
            skipped_steps=window.skipped,
            layout=self._layout(),
            pipeline_bubble=self._bubble(),
        )
        self.log(format_log_line(stats))
        if self.rank == 0:
            writer.write(step_scalars(stats), iteration)

    def _layout(self) -> str | None:
        d = self.eng.dims
        return None if d.tp * d.pp == 1 else f"tp {d.tp} pp {d.pp} dp {d.dp_size}"

    def _bubble(self) -> float | None:
        d = self.eng.dims
        return None if d.pp == 1 else bubble_fraction(d.pp, self.eng.grad_accum)

    def _save(self, run: _RunState) -> str:
        assert self.cfg.checkpoint.save is not None
        state = ckpt.ClientState(
            iteration=run.iteration,
            consumed_samples=run.consumed,
            lr_scheduler=self.eng.scheduler.state_dict(),
            config=to_dict(self.cfg),
            valid_history=list(run.history),
        )
        t0 = time.perf_counter()
        tag = ckpt.save(self.eng, self.cfg.checkpoint.save, state)
        self.log(
            f"saved checkpoint {self.cfg.checkpoint.save}/{tag} ({time.perf_counter() - t0:.1f} s)"
        )
        return tag

    # ------------------------------------------------------------------ the loop

    def train(
        self,
        start: ckpt.ClientState | None = None,
        *,
        stop: StopConditions | None = None,
        start_is_saved: bool = False,
    ) -> TrainResult:
        """Train from ``start`` (a loaded checkpoint) or from scratch until done or stopped.

        ``start_is_saved``: ``start`` came from ``checkpoint.save`` itself, so that iteration
        needs no new checkpoint if the run stops before its first step.
        """
        t = self.cfg.train
        run = _RunState.begin(start, start_is_saved)
        writer = ScalarWriter(self.cfg.logging.tensorboard_dir if self.rank == 0 else None)
        show_bar = self.rank == 0 and self.cfg.logging.progress_bar and sys.stderr.isatty()
        if show_bar:
            self._bar = tqdm(
                total=t.train_iters, initial=run.iteration, dynamic_ncols=True, file=sys.stderr
            )
        try:
            if start is None and t.eval_interval > 0:
                self._validate_into(run, writer)
            # A run resumed at its end builds no stream: the data is sized for train_iters.
            done = run.iteration >= t.train_iters
            stream = iter(()) if done else self.source.train_batches(run.consumed)
            window = _Window()
            while run.iteration < t.train_iters:
                self._one_step(run, stream, window)
                self._report(run, window, writer)
                reason = self._stop_reason(run, stop)
                if self._save_due(run, reason):
                    run.result.checkpoint = self._save(run)
                    run.last_saved = run.iteration
                if reason is not None:
                    run.result.exit_reason = reason
                    self.log(f"stopping after step {run.iteration}: {reason}")
                    break
            self._summarise(run.history)
            self._check_tied_weights(run)
            return run.finish()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            writer.close()

    def _one_step(self, run: _RunState, stream: Iterator[Batch], window: _Window) -> None:
        """Fetch the step's micro-batches, train, advance counters and the LR schedule."""
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(self.eng.grad_accum)]
        lr = float(self.eng.scheduler.get_last_lr()[0])  # the LR this step uses
        out = train_step(self.eng, micro)
        window.add(out, time.perf_counter() - t0, lr)
        run.iteration += 1
        run.consumed += self.cfg.train.global_batch_size
        run.result.step_losses[run.iteration] = out.loss
        run.result.step_grad_norms[run.iteration] = out.grad_norm
        if out.applied:
            self.eng.scheduler.step()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{out.loss:.4f}", refresh=False)
        self._check_finite(run, out)

    def _check_finite(self, run: _RunState, out: StepOutput) -> None:
        """Count consecutive skipped updates; raise after ``train.max_nonfinite_steps``."""
        limit = self.cfg.train.max_nonfinite_steps
        reason = self._skip_reason(out)
        if reason is None:
            run.bad_steps = 0
            return
        self.log(f"step {run.iteration}: {reason}")
        if not out.finite or not self._is_scaler_overflow(out):
            run.bad_steps += 1
        if run.bad_steps >= limit:
            raise NonFiniteLossError(
                f"stopping at step {run.iteration}: {run.bad_steps} consecutive steps with a "
                f"non-finite loss or gradients (train.max_nonfinite_steps={limit}); no "
                "checkpoint written, the last good one is intact"
            )

    def _skip_reason(self, out: StepOutput) -> str | None:
        """What the log says about a step whose update was not applied (None: it was)."""
        if not out.finite:
            return f"non-finite loss {out.loss}, update skipped"
        if out.applied:
            return None
        if self.cfg.train.precision == "fp16":
            return f"fp16 overflow, update skipped (loss scale now {out.loss_scale:g})"
        return (
            f"non-finite gradients (loss {out.loss:.4f} was finite), DeepSpeed skipped the update"
        )

    def _is_scaler_overflow(self, out: StepOutput) -> bool:
        """fp16 overflow with room to shrink the loss scale: expected, not divergence."""
        t = self.cfg.train
        return t.precision == "fp16" and out.loss_scale > t.min_loss_scale

    def _report(self, run: _RunState, window: _Window, writer: ScalarWriter) -> None:
        """Log line every ``log_interval`` steps, validation every ``eval_interval`` (and at
        the last step)."""
        t, it = self.cfg.train, run.iteration
        if it % self.cfg.logging.log_interval == 0 or it == t.train_iters:
            self._log_window(window, it, run.consumed, writer)
            window.reset()
        if t.eval_interval > 0 and (it % t.eval_interval == 0 or it == t.train_iters):
            self._validate_into(run, writer)

    def _validate_into(self, run: _RunState, writer: ScalarWriter) -> None:
        loss = self._validate(run.iteration, writer)
        if loss is not None:
            run.history.append((run.iteration, loss))

    def _stop_reason(self, run: _RunState, stop: StopConditions | None) -> str | None:
        """Signal/deadline (agreed by all ranks) or a planned ``exit_interval`` stop."""
        reason = stop.should_stop(self.eng.device) if stop is not None else None
        t = self.cfg.train
        planned = t.exit_interval > 0 and run.iteration % t.exit_interval == 0
        if reason is None and planned and run.iteration < t.train_iters:
            reason = "exit_interval"
        return reason

    def _save_due(self, run: _RunState, reason: str | None) -> bool:
        """Save on stops, at the end and every ``save_interval`` steps; never a state that was
        just loaded or saved, and never after a non-finite step."""
        c = self.cfg.checkpoint
        if c.save is None or run.bad_steps > 0 or run.last_saved == run.iteration:
            return False
        periodic = c.save_interval > 0 and run.iteration % c.save_interval == 0
        return reason is not None or run.iteration == self.cfg.train.train_iters or periodic

    def _check_tied_weights(self, run: _RunState) -> None:
        """Pipeline: the embedding (first stage) and head (last stage) copies must be equal."""
        if self.eng.pipeline is None:
            return
        from megatron_glm.training.pipeline import tied_weights_max_diff

        diff = torch.tensor([tied_weights_max_diff(self.eng.module)], device=self.eng.device)
        all_reduce(diff, op="max")
        run.result.tied_weights_max_diff = float(diff.item())
        self.log(f"tied embedding / output head copies: max |difference| {diff.item():.3g}")

    def _summarise(self, history: list[tuple[int, float]]) -> None:
        if len(history) < 2:
            return
        (i0, first), (i1, last) = history[0], history[-1]
        change = 100.0 * (last - first) / first if first else math.nan
        self.log(
            f"validation loss: {first:.4f} at step {i0} -> {last:.4f} at step {i1} ({change:+.1f}%)"
        )
