"""Validation: a runner's global loss sums over the validation batches, as losses and lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from megatron_glm.training.batches import Batch
from megatron_glm.training.metrics import perplexity
from megatron_glm.training.step import StepRunner


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


@dataclass(frozen=True)
class BestMetric:
    """The validation figure that picks the best checkpoint (``<checkpoint.save>/best``).

    ``name`` is ``loss`` or one of the loss's objectives (its per-objective ratio: finetuning's
    ``accuracy`` objective sums correct predictions over examples).
    """

    name: str
    higher_is_better: bool

    def value(self, result: EvalResult) -> float | None:
        if self.name == "loss":
            return result.loss
        return result.objective_loss.get(self.name)

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


def evaluate(runner: StepRunner, batches: Iterable[Batch]) -> EvalResult:
    """Collective: validation loss (dropout off), global over DP; per objective too."""
    stats = runner.eval_step(batches)
    if stats.num_tokens <= 0:
        raise RuntimeError("validation batches have no loss tokens")
    return EvalResult(loss=stats.loss, objective_loss=stats.objective_losses())
