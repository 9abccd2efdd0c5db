"""One finetuning run: task data as a :class:`BatchSource`, the task's loss, weights from
``finetune.init``, and the pretraining session and loop around them.

What is shared with pretraining (``training.session.train_in_group``): process group, seeds,
engine at any (tp, pp, dp) layout, resume from ``checkpoint.save`` (exact: the data order is a
pure function of ``train.seed`` and the samples consumed), checkpoints, signals, logging and
TensorBoard. What finetuning brings (``training.session.RunTask``): the loss
(:mod:`.losses`), the start weights (``finetune.init``: weights only, at iteration 0, with a
fresh optimizer and schedule, like a resharded checkpoint whose optimizer state was dropped),
the metric of ``<checkpoint.save>/best``, and the test-split evaluation at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from megatron_glm.config import ConfigError, RunConfig
from megatron_glm.data.tokenizer import Tokenizer
from megatron_glm.finetune import tasks
from megatron_glm.finetune.losses import ClozeLoss, Seq2SeqLoss
from megatron_glm.training.batches import Batch
from megatron_glm.training.evaluation import BestMetric, evaluate

if TYPE_CHECKING:
    from megatron_glm.model import GLMModel
    from megatron_glm.training.loop import TrainResult

logger = logging.getLogger(__name__)

Collate = Callable[[Sequence[Any]], Batch]
"""Examples (``None`` pads) -> one micro-batch."""


class FinetuneData:
    """This data-parallel rank's micro-batches of a task (a :class:`BatchSource`).

    Training samples run over epochs, each a permutation drawn from ``seed + epoch``: global
    sample ``g`` is example ``perm[epoch(g)][g % n]``, so a resume at ``consumed_samples`` reads
    exactly what the uninterrupted run would have. Step ``k``'s global batch is samples
    ``[k * G, (k + 1) * G)``; rank ``r`` takes micro-batches ``j * dp + r``. Evaluation covers
    every example once, padded with weightless rows so that every rank runs as many
    micro-batches as the others.
    """

    def __init__(
        self,
        train: Sequence[Any],
        valid: Sequence[Any] | None,
        collate: Collate,
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        self.train, self.valid, self.collate = train, valid, collate
        self.micro, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _example(self, g: int) -> Any:
        n = len(self.train)
        epoch = g // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(n)}
        return self.train[int(self._perms[epoch][g % n])]

    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        start = consumed_samples + self.dp_rank * self.micro
        stride = self.dp_size * self.micro
        while True:
            yield self.collate([self._example(start + i) for i in range(self.micro)])
            start += stride

    def valid_batches(self) -> Iterable[Batch] | None:
        return None if self.valid is None else self.eval_batches(self.valid)

    def eval_batches(self, examples: Sequence[Any]) -> list[Batch]:
        """Every example once over the DP ranks, padded to a whole number of micro-batches."""
        per_step = self.micro * self.dp_size
        steps = -(-len(examples) // per_step)
        padded: list[Any] = [*examples, *[None] * (steps * per_step - len(examples))]
        mine = padded[self.dp_rank * self.micro :]
        return [self.collate(mine[k * per_step :][: self.micro]) for k in range(steps)]


def task_loss(cfg: RunConfig, tok: Tokenizer) -> tuple[ClozeLoss | Seq2SeqLoss, Collate]:
    """The task's loss and collator."""
    f, seq = cfg.finetune, cfg.data.seq_length
    if f.task == "seq2seq":
        mask_id = tok.gmask_id if f.mask == "[gMASK]" else tok.mask_id

        def seq2seq(rows: Sequence[Any]) -> Batch:
            return tasks.seq2seq_batch(
                tok, rows, seq, mask_id=mask_id, max_target_length=f.max_target_length
            )

        return Seq2SeqLoss(f.label_smoothing), seq2seq
    pattern = tasks.Pattern.parse(f.patterns[f.pattern_id])
    candidates = tasks.verbalizer_ids(tok, f.verbalizers)
    loss = ClozeLoss.build(candidates, f.score)

    def cloze(rows: Sequence[Any]) -> Batch:
        if loss.single_token:
            return tasks.cloze_single_batch(tok, pattern, rows, seq)
        return tasks.cloze_multi_batch(tok, pattern, candidates, rows, seq)

    return loss, cloze


def read_split(cfg: RunConfig, split: str) -> list[Any]:
    f = cfg.finetune
    path = tasks.split_path(f.task_dir, split)
    if f.task == "seq2seq":
        return list(tasks.read_seq2seq(path))
    return list(tasks.read_classification(path, list(f.verbalizers)))


def check_finetune(cfg: RunConfig) -> None:
    """Pre-launch: the task's files read cleanly (file:line otherwise), verbalizers exist, and
    ``finetune.init`` holds a checkpoint of this architecture."""
    f = cfg.finetune
    if not f.task_dir:
        raise ConfigError("finetune.task_dir", "is empty; give the folder of train.jsonl ...")
    if f.task == "cloze" and len(f.verbalizers) < 2:
        raise ConfigError(
            "finetune.verbalizers", "cloze needs a verbalizer for each of >= 2 labels"
        )
    for split in ("train", "validation"):
        read_split(cfg, split)
    if not cfg.data.tokenizer_model or not Path(cfg.data.tokenizer_model).exists():
        raise ConfigError("data.tokenizer_model", f"{cfg.data.tokenizer_model!r} not found")
    if f.init is not None:
        from megatron_glm.training.checkpoint import check_architecture, read_latest

        if read_latest(f.init) is None:
            raise ConfigError("finetune.init", f"{f.init} has no 'latest' file (no checkpoint)")
        check_architecture(f.init, cfg.model)
    _check_resumes_a_finetune_run(cfg)


def _check_resumes_a_finetune_run(cfg: RunConfig) -> None:
    """What ``checkpoint.load`` (or the auto-resume of ``checkpoint.save``) names must be a run
    of this finetuning task: resuming a pretraining checkpoint would continue its iteration,
    optimizer and LR schedule as if they were the task's. Starting from one is ``finetune.init``.
    """
    from megatron_glm.training.checkpoint import read_latest, resolve_load_dir, saved_config

    load = resolve_load_dir(cfg.checkpoint.load, cfg.checkpoint.save)
    if load is None:
        return
    snapshot = saved_config(Path(load) / str(read_latest(load))) or {}
    theirs = snapshot.get("finetune")
    if not isinstance(theirs, dict) or not theirs.get("task_dir"):  # pretraining leaves it ""
        field = "checkpoint.load" if cfg.checkpoint.load else "checkpoint.save"
        raise ConfigError(
            field,
            f"{load} is not a checkpoint of a finetuning run (a pretraining run or an import?): "
            f"start from it with finetune.init={load} and a new checkpoint.save",
        )
    if theirs.get("task") != cfg.finetune.task:
        raise ConfigError(
            "finetune.task",
            f"{load} is a {theirs.get('task')!r} finetuning run, this run is {cfg.finetune.task!r}",
        )


def init_weights_from(path: str) -> Callable[[nn.Module, bool], None]:
    """Copies a checkpoint's weights (any layout it was saved at) into a fresh module's
    parameters, this rank's shard of each; the vocabulary rows are re-padded if the padding
    differs (the same tokenizer padded for another tp)."""
    from megatron_glm.parallel.layers import full_shape, shard_of
    from megatron_glm.training.checkpoint import load_model_state
    from megatron_glm.training.checkpoint.deepspeed_files import glm_name
    from megatron_glm.training.checkpoint.reshard import repad_vocab

    @torch.no_grad()
    def apply(module: nn.Module, pipeline: bool) -> None:
        full = load_model_state(path)
        for mod_name, mod in module.named_modules():
            for pname, param in mod.named_parameters(recurse=False):
                name = glm_name(f"{mod_name}.{pname}" if mod_name else pname, pipeline=pipeline)
                if name not in full:
                    raise ValueError(f"finetune.init: {path} has no weight {name}")
                value, shape = full[name], full_shape(mod, pname, param.shape)
                if value.shape != shape and value.shape[1:] == shape[1:]:
                    value = repad_vocab(value, shape[0])
                if value.shape != shape:
                    raise ValueError(
                        f"finetune.init: {path}: {name} is {tuple(value.shape)}, the model's "
                        f"{tuple(shape)}"
                    )
                param.copy_(shard_of(mod, pname, value))
        logger.info("finetune: weights from %s (optimizer and schedule start fresh)", path)

    return apply


def best_metric(cfg: RunConfig) -> BestMetric:
    name = cfg.finetune.best_metric
    return BestMetric(name, higher_is_better=name != "loss")


def finetune_task(cfg: RunConfig) -> tuple[Callable[[int, int], tuple[FinetuneData, int]], Any]:
    """The batch-source factory and the ``training.session.RunTask`` of a finetuning run."""
    from megatron_glm.training import session  # imports deepspeed: keep it late
    from megatron_glm.training.preflight import load_tokenizer

    tok = load_tokenizer(cfg)
    loss, collate = task_loss(cfg, tok)
    made: list[FinetuneData] = []

    def make_source(dp_rank: int, dp_size: int) -> tuple[FinetuneData, int]:
        source = FinetuneData(
            read_split(cfg, "train"),
            read_split(cfg, "validation"),
            collate,
            micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=cfg.train.seed,
        )
        made.append(source)
        return source, tok.padded_vocab_size

    def after(runner: Any, trainer: Any) -> None:
        test_evaluation(cfg, made[-1], tok)(runner, trainer)

    task = session.RunTask(
        loss=loss,
        init_weights=init_weights_from(cfg.finetune.init) if cfg.finetune.init else None,
        best=best_metric(cfg),
        eval_metrics=validation_decoding(cfg, tok) if cfg.finetune.task == "seq2seq" else None,
        after=after,
    )
    return make_source, task


def validation_decoding(cfg: RunConfig, tok: Tokenizer) -> Callable[[Any], dict[str, float]]:
    """Seq2seq, at every validation: ROUGE-1/2/L and exact match of greedy decodes of the
    validation split (the loss alone does not say whether the generated text improves; the
    best checkpoint may be chosen by ``rougeL``), at any layout (:func:`_decode_scores`)."""
    examples = read_split(cfg, "validation")

    def figures(runner: Any) -> dict[str, float]:
        return _decode_scores(cfg, runner, tok, examples)

    return figures


def run_finetuning(
    cfg: RunConfig, env: Any = None, *, log: Callable[[str], None] | None = None
) -> TrainResult:
    """Finetune ``cfg`` as ``glm-finetune`` does: launch checks (fields, task files, ``init``),
    then the pretraining session with the task. ``env`` defaults to the launcher's variables."""
    from megatron_glm.training import session  # imports deepspeed: keep it late
    from megatron_glm.training.distributed import read_dist_env
    from megatron_glm.training.preflight import validate_for_launch

    env = read_dist_env() if env is None else env
    validate_for_launch(cfg, env.world_size, check_data=False)
    check_finetune(cfg)
    make_source, task = finetune_task(cfg)
    return session.run_pretraining(cfg, env, make_source=make_source, log=log, task=task)


def test_evaluation(cfg: RunConfig, source: FinetuneData, tok: Tokenizer) -> Callable[..., None]:
    """After the run: the test split's loss and metrics (cloze: accuracy, macro F1; seq2seq:
    ROUGE and exact match of greedy decodes) of the best checkpoint (the final weights when
    none was kept), logged, in TensorBoard and, on rank 0, in
    ``<checkpoint.save>/test_metrics.json``."""

    def after(runner: Any, trainer: Any) -> None:
        try:
            examples = read_split(cfg, "test")
        except FileNotFoundError:
            trainer.log("no test.jsonl: test evaluation skipped")
            return
        which = _load_best(cfg, runner)
        result = evaluate(runner, source.eval_batches(examples))
        figures = {"loss": result.loss, **result.metrics}
        if cfg.finetune.task == "seq2seq":
            figures.update(_decode_scores(cfg, runner, tok, examples))
        text = " | ".join(f"{k} {v:.4f}" for k, v in figures.items())
        trainer.log(f"test ({len(examples)} examples, {which}) | {text}")
        if trainer.rank == 0:
            _write_test_metrics(cfg, figures)

    return after


def _load_best(cfg: RunConfig, runner: Any) -> str:
    """Collective: the weights of ``<checkpoint.save>/best`` into the engine, if it exists (the
    run is over, so its optimizer and RNG states may be overwritten too). Returns which weights
    the test sees."""
    from megatron_glm.training import checkpoint as ckpt

    best = None if cfg.checkpoint.save is None else Path(cfg.checkpoint.save) / "best"
    if best is None or ckpt.read_latest(best) is None:
        return "final weights"
    state = ckpt.load(runner.eng, best)
    return f"best checkpoint, step {state.iteration}"


def _write_test_metrics(cfg: RunConfig, figures: dict[str, float]) -> None:
    import json

    from megatron_glm.training.metrics import ScalarWriter

    writer = ScalarWriter(cfg.logging.tensorboard_dir)
    writer.write({f"test/{k}": v for k, v in figures.items()}, cfg.train.train_iters)
    writer.close()
    if cfg.checkpoint.save is not None:
        path = Path(cfg.checkpoint.save) / "test_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1) + "\n")


def _decode_scores(
    cfg: RunConfig,
    runner: Any,
    tok: Tokenizer,
    examples: Sequence[tasks.Seq2SeqExample],
) -> dict[str, float]:
    """Collective: ROUGE-1/2/L and exact match of greedy decodes (``finetune.evaluate``) of
    ``examples``, at any layout: every rank decodes the whole list with this TP rank's shard of
    every layer (:func:`decoding_model`), TP ranks together, so every rank gets the same figures
    (the best-checkpoint choice depends on them)."""
    from megatron_glm.finetune.evaluate import seq2seq_predictions
    from megatron_glm.finetune.metrics import exact_match, rouge
    from megatron_glm.generation import GenerationConfig

    f = cfg.finetune
    gen = GenerationConfig(max_new_tokens=min(f.max_target_length, cfg.data.seq_length // 2))
    sources = [ex.source for ex in examples]  # cut to data.seq_length there, as training cuts
    model = decoding_model(cfg, runner, tok)
    with torch.no_grad():
        preds = seq2seq_predictions(
            model, tok, sources, gen, mask=f.mask, max_length=cfg.data.seq_length
        )
    refs = [ex.target for ex in examples]
    return {**rouge(preds, refs), "exact_match": exact_match(preds, refs)}


def decoding_model(cfg: RunConfig, runner: Any, tok: Tokenizer) -> GLMModel:
    """Collective: the engine's weights as a plain ``GLMModel`` in eval mode, this TP rank's
    shard of every layer (``training.whole_model``: pipeline stages broadcast their layers,
    ZeRO-3 partitions are gathered, sequence parallelism is off; no copy at pp 1 without
    ZeRO-3)."""
    from megatron_glm.model.glm import resolve_vocab_size
    from megatron_glm.training.whole_model import whole_model

    eng = runner.eng
    vocab = resolve_vocab_size(cfg.model, tok.padded_vocab_size)
    parts = getattr(runner, "parts", None) if eng.dims.pp > 1 else None
    return whole_model(eng.module, eng.dims, cfg.model, vocab, parts=parts)
