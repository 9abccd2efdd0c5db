"""The training loop: steps, validation, logging, checkpoints and stops around a step runner.

The loop drives a :class:`~megatron_glm.training.step.StepRunner` (data-parallel or pipeline,
chosen once by ``step.build_runner``; the loss normalisation is documented there) and does the
bookkeeping common to every kind of step: the learning-rate schedule, log lines and TensorBoard
scalars, validation (``training.evaluation``), checkpoints and stop conditions.

Non-finite steps: a runner reports an update it skipped (non-finite loss, or gradients DeepSpeed
found non-finite). Every skipped update counts toward ``train.max_nonfinite_steps`` consecutive
ones, after which the run stops with :class:`NonFiniteLossError` naming the step, without
writing a checkpoint -- except fp16 overflows while the loss scale can still shrink, which are
the scaler calibrating itself, not divergence. No checkpoint is written while the last step was
skipped, and :func:`checkpoint.save` refuses non-finite weights in any case.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from megatron_glm.config import RunConfig, to_dict
from megatron_glm.training import checkpoint as ckpt
from megatron_glm.training.batches import Batch, BatchSource
from megatron_glm.training.checkpoint import NonFiniteError
from megatron_glm.training.evaluation import BestMetric, EvalResult, evaluate
from megatron_glm.training.loss_stats import LossStats
from megatron_glm.training.metrics import (
    ScalarWriter,
    StepStats,
    bubble_fraction,
    device_peak_tflops,
    format_log_line,
    memory_mib,
    step_scalars,
    throughput,
)
from megatron_glm.training.signals import StopConditions
from megatron_glm.training.step import StepOutput, StepRunner

logger = logging.getLogger(__name__)

BEST_RECORD = "best.json"
"""Next to the best checkpoint: its metric, value and iteration (a resumed run keeps comparing
against it)."""

__all__ = ["Batch", "BatchSource", "NonFiniteLossError", "TrainResult", "Trainer"]


def _discard(msg: str) -> None:
    """A non-zero rank's sink for a caller-supplied ``log``."""


class NonFiniteLossError(NonFiniteError):
    """Too many consecutive skipped updates (non-finite loss or gradients); names the step."""


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


class _Window:
    """Accumulates steps between two log lines."""

    def __init__(self, objectives: tuple[str, ...]) -> None:
        self.objectives = objectives
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.stats = LossStats.zeros(self.objectives)
        """Sums of the finite steps."""
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
            self.stats = self.stats + out.stats
        if out.grad_norm is not None and math.isfinite(out.grad_norm):
            self.grad_norms.append(out.grad_norm)

    @property
    def loss(self) -> float:
        return self.stats.loss if self.stats.num_tokens > 0 else math.nan


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
    """Runs ``cfg`` with a :class:`StepRunner` (its engine built) and a :class:`BatchSource`.

    ``flops_per_token`` comes from the model (``megatron_glm.model.flops_per_token``).
    Console output goes through ``log``; it defaults to this module's logger at INFO, whose
    handler (``megatron_glm.logs.setup_logging``) shows rank 0 only unless every rank is asked for.
    """

    def __init__(
        self,
        cfg: RunConfig,
        runner: StepRunner,
        source: BatchSource,
        *,
        flops_per_token: float,
        world_size: int,
        rank: int,
        log: Callable[[str], None] | None = None,
        best: BestMetric | None = None,
        eval_metrics: Callable[[StepRunner], dict[str, float]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.best = best
        self.eval_metrics = eval_metrics
        """Collective, after each validation's loss: more figures for its line and ``best``."""
        """Keep the checkpoint of the best validation ``best`` in ``<checkpoint.save>/best``."""
        self._best_value: float | None = None
        self.runner = runner
        self.eng = runner.eng
        self.source = source
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.rank = rank
        # The default goes through logging, whose handler picks the ranks (rank 0 unless every
        # rank is asked for); a caller's own ``log`` gets rank 0's lines only, as ``print`` did.
        self._log_fn = logger.info if log is None else (log if rank == 0 else _discard)
        self._bar: tqdm | None = None
        self.peak = device_peak_tflops(cfg.train.precision)

    def log(self, msg: str) -> None:
        """One console line; which ranks show it is the logging setup's choice (rank 0 by
        default), and the tqdm bar (rank 0 only) is redrawn below it."""
        if self._bar is not None:
            self._bar.clear()
        self._log_fn(msg)
        if self._bar is not None:
            self._bar.refresh()

    # ------------------------------------------------------------------ pieces

    def _validate(self, iteration: int, writer: ScalarWriter) -> EvalResult | None:
        batches = self.source.valid_batches()
        if batches is None:
            return None
        result = evaluate(self.runner, batches)
        if self.eval_metrics is not None:
            result.metrics.update(self.eval_metrics(self.runner))
        self.log(result.line(iteration))
        if self.rank == 0:
            writer.write(result.scalars(), iteration)
        return result

    def _keep_best(self, run: _RunState, result: EvalResult, writer: ScalarWriter) -> None:
        """Log the best-checkpoint metric; save ``<checkpoint.save>/best`` when it improves
        (one tag kept there). Not at step 0: nothing was trained yet."""
        assert self.best is not None
        value = self.best.value(result)
        if value is None:
            return
        name, save = self.best.name, self.cfg.checkpoint.save
        if self.rank == 0:
            writer.write({f"valid/{name}": value}, run.iteration)
        improved = run.iteration > 0 and self.best.improves(value, self._best_value)
        if improved:
            self._best_value = value
        where = ""
        if improved and save is not None and run.bad_steps == 0:
            best_dir = Path(save) / "best"
            tag = ckpt.save(self.eng, best_dir, self._client_state(run))
            if self.rank == 0:
                for old in best_dir.iterdir():
                    if old.is_dir() and old.name != tag:
                        shutil.rmtree(old)
                record = {"metric": name, "value": value, "iteration": run.iteration}
                (best_dir / BEST_RECORD).write_text(json.dumps(record) + "\n")
            where = f", saved {best_dir}/{tag}"
        best = "n/a" if self._best_value is None else f"{self._best_value:.4f}"
        self.log(f"validation at step {run.iteration} | {name} {value:.4f} | best {best}{where}")

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
            loss=window.loss,
            objective_loss=window.stats.objective_losses(),
            lr=window.lr,
            grad_norm=(
                sum(window.grad_norms) / len(window.grad_norms) if window.grad_norms else None
            ),
            loss_scale=self.runner.loss_scale(),
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

    def _saved_best(self) -> float | None:
        """The best value a resumed run had kept (``best/best.json``), if it names our metric."""
        save = self.cfg.checkpoint.save
        path = None if save is None else Path(save) / "best" / BEST_RECORD
        if self.best is None or path is None or not path.is_file():
            return None
        record = json.loads(path.read_text())
        return float(record["value"]) if record.get("metric") == self.best.name else None

    def _client_state(self, run: _RunState) -> ckpt.ClientState:
        return ckpt.ClientState(
            iteration=run.iteration,
            consumed_samples=run.consumed,
            lr_scheduler=self.eng.scheduler.state_dict(),
            config=to_dict(self.cfg),
            valid_history=list(run.history),
        )

    def _save(self, run: _RunState) -> str:
        assert self.cfg.checkpoint.save is not None
        t0 = time.perf_counter()
        tag = ckpt.save(self.eng, self.cfg.checkpoint.save, self._client_state(run))
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
        if start is not None:
            self._best_value = self._saved_best()
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
            window = _Window(self.runner.objectives)
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
        out = self.runner.train_step(micro)
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
        result = self._validate(run.iteration, writer)
        if result is not None:
            run.history.append((run.iteration, result.loss))
            if self.best is not None:
                self._keep_best(run, result, writer)

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
        """Where tied weights have several copies (pipeline: embedding on the first stage, head
        on the last), they must be equal."""
        diff = self.runner.tied_weights_max_diff()
        if diff is None:
            return
        run.result.tied_weights_max_diff = diff
        self.log(f"tied embedding / output head copies: max |difference| {diff:.3g}")

    def _summarise(self, history: list[tuple[int, float]]) -> None:
        if len(history) < 2:
            return
        (i0, first), (i1, last) = history[0], history[-1]
        change = 100.0 * (last - first) / first if first else math.nan
        self.log(
            f"validation loss: {first:.4f} at step {i0} -> {last:.4f} at step {i1} ({change:+.1f}%)"
        )
