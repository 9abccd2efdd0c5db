"""Pipeline parallelism: the GLM's stage-able layers in DeepSpeed's PipelineModule.

Stages. ``GLMModel.layers`` is already a flat list of tuple-in/tuple-out layers, so the pipeline
is that list plus the tied output head::

    index   layer                                   input tuple -> output tuple
    0       EmbeddingLayer   (tied "word_embeddings")  (tokens, position_ids, sep, valid_len)
                                                        -> (hidden, sep, valid_len)
    1..N    GLMBlock                                  (hidden, sep, valid_len) -> same
    N+1     FinalLayerNorm                            (hidden, sep, valid_len) -> hidden
    N+2     TiedHead         (tied "word_embeddings")  hidden -> (hidden, head weight)

``sep`` and ``valid_len`` (the whole attention mask, docs/design.md, "Batch contract") travel with
the hidden states, so every stage masks attention without a side channel; ``position_ids`` are used
by the embedding only. The loss (:class:`PipelineLoss`, DeepSpeed's ``loss_fn``) runs on the last
stage with the labels ``(targets, loss_mask, objective)`` that DeepSpeed hands the last stage from
the same data iterator the first stage reads. Layer indices 0..N+1 are exactly ``GLMModel.layers``
indices, and DeepSpeed's per-layer checkpoint files (``layer_XX-model_YY-model_states.pt``) hold
exactly that layer's ``state_dict``, so a pipeline checkpoint converts to an unpipelined one by
renaming.

Tied weights. The output head is the word embedding. The first stage owns the embedding, the last
a :class:`TiedHead` holding one more copy of the same ``[vocab/tp, h]`` shard (DeepSpeed's
``TiedLayerSpec``): DeepSpeed all-reduces the two copies' gradients between the two stages (per
TP rank and DP replica) before every step and counts the copy once in the gradient norm
(``ds_pipe_replicated``), so the copies stay bitwise equal.

Construction on the meta device. Every layer is created on the meta device first (no memory), and
DeepSpeed partitions the specs over the stages (``partition_method``: ``parameters`` balances
trainable parameter counts, ``uniform`` layer counts, ``type:GLMBlock`` block counts). Only this
stage's layers are then materialised and initialised with :func:`megatron_glm.model.init_layer`,
whose per-parameter generators make them identical to the same layers of the unpipelined model.

Loss normalisation stays exact: the loop counts the step's loss tokens ``N`` over all micro-batches
and DP ranks *before* ``train_batch`` and sets ``PipelineLoss.scale = A * D / N``; DeepSpeed divides
the last stage's backward loss by ``A`` (micro-batches) and averages over ``D`` replicas, so the
update is the gradient of the global-batch mean (as without PP, see ``loop``).

Optimizer-step hook. DeepSpeed runs the optimizer step inside ``train_batch``. Every rank's
``OptimizerStep`` instruction is wrapped (:class:`StepHook`, installed by
``compat.deepspeed.wrap_optimizer_step``): one all-reduce over the world
publishes the last stage's loss statistics to every rank, the non-finite-loss skip flag is set on
every rank alike, and at ZeRO-0 fp32 (where DeepSpeed keeps no norm) the gradient norm is taken
before clipping, as the unpipelined loop does. Under ZeRO-1 the gradient norm is all-reduced over
the stages once per step (``compat.deepspeed.reduce_zero_grad_norm_once``), not once per optimizer
param group: the stages' group counts differ with the partition, and unequal collectives deadlock.

Every private DeepSpeed name this relies on lives in :mod:`megatron_glm.compat.deepspeed`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec
from torch import Tensor, nn

from megatron_glm.compat.deepspeed import MaterializingPipelineModule, find_layer_type
from megatron_glm.config import ConfigError, ModelConfig
from megatron_glm.model import GLMModel, init_layer
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.layers import VocabParallelEmbedding
from megatron_glm.parallel.layers import grad_norm as model_grad_norm
from megatron_glm.parallel.random import ModelParallelRNG
from megatron_glm.training.batches import MODEL_INPUTS, Batch, to_device
from megatron_glm.training.checkpoint.deepspeed_files import TIED_KEY
from megatron_glm.training.loss_stats import LossAccumulator, LossStats
from megatron_glm.training.losses import BatchLoss

TIED_ATTR = "word_embeddings.weight"
"""The tied parameter, by the same name in :class:`EmbeddingLayer` and :class:`TiedHead`."""


class TiedHead(nn.Module):
    """The last stage's copy of the tied word embedding ``[vocab/tp, h]`` (the output head)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, dims: ParallelDims) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(vocab_size, cfg.hidden_size, dims=dims)


def head_forward(head: TiedHead, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Last layer: the final hidden states ``[b, s, h]`` and the head weight for the loss."""
    return hidden, head.word_embeddings.weight


class _Prebuilt(TiedLayerSpec):
    """A ``TiedLayerSpec`` over a module already created (on the meta device)."""

    def __init__(self, module: nn.Module, forward_fn: Any = None) -> None:
        super().__init__(
            TIED_KEY, type(module), forward_fn=forward_fn, tied_weight_attr=[TIED_ATTR]
        )
        self.module = module

    def build(self, log: bool = False) -> nn.Module:
        return self.module


class PipelineLoss:
    """DeepSpeed's ``loss_fn`` on the last stage: a :class:`BatchLoss`, scaled, statistics kept.

    ``scale`` is set by the step runner before each ``train_batch`` (``A * D / N``; 1 for
    evaluation); :attr:`stats` accumulates the unscaled sums of the micro-batches since
    :meth:`begin`. DeepSpeed prints this class's name as the pipeline's loss.
    """

    def __init__(self, dims: ParallelDims, kernels: str, loss: BatchLoss) -> None:
        self.dims = dims
        self.kernels = kernels
        self.loss = loss
        self.scale = 1.0
        self.stats = LossAccumulator(loss.objectives, "cpu")

    def begin(self, scale: float, device: torch.device) -> None:
        """Start a step (or an evaluation) whose backward losses are ``sum * scale``."""
        self.scale = scale
        self.stats = LossAccumulator(self.loss.objectives, device)

    def __call__(self, outputs: tuple[Tensor, Tensor], labels: Sequence[Tensor]) -> Tensor:
        hidden, weight = outputs  # [b, s, h], [vocab/tp, h]
        batch = dict(zip(self.loss.label_keys, labels, strict=True))
        out = self.loss(weight, hidden, batch, dims=self.dims, kernels=self.kernels)
        self.stats.add(out)
        return out.sum_loss * self.scale

    def reduce(self, is_last_stage: bool) -> LossStats:
        """Collective (world): the step's global statistics on every rank.

        Each sum exists on every TP rank of every last-stage replica; TP rank 0 contributes.
        """
        return self.stats.reduce_from(is_last_stage and self.dims.tp_rank == 0)


class StepHook:
    """Runs at the start of DeepSpeed's ``OptimizerStep`` instruction inside ``train_batch``
    (``compat.deepspeed.wrap_optimizer_step``).

    Every rank executes it once per step, after its stage's last backward and the gradient
    all-reduces (tied and data-parallel), so the world all-reduce of the loss statistics is
    safe here, and every rank sets the same skip flag before DeepSpeed's step runs. At ZeRO-0
    fp32 it also takes the gradient norm (and clips, ``clip_grad > 0``).
    """

    def __init__(
        self, loss: PipelineLoss, optimizer: Any, *, manual_norm: bool, clip_grad: float = 0.0
    ) -> None:
        self.loss = loss
        self.optimizer = optimizer
        self.manual_norm = manual_norm
        self.clip_grad = clip_grad
        """> 0: clip to this norm here (``engine.clips_itself``); needs ``manual_norm``."""
        assert manual_norm or clip_grad == 0.0
        self.stats: LossStats | None = None
        self.grad_norm: float | None = None

    def __call__(self, engine: Any) -> None:
        stats = self.loss.reduce(engine.is_last_stage())
        self.stats = stats
        finite = stats.finite
        self.optimizer.skip_next_step = not finite
        self.grad_norm = None
        if self.manual_norm and finite:
            params = list(engine.module.parameters())
            counted = [p for p in params if not getattr(p, "ds_pipe_replicated", False)]
            norm = float(model_grad_norm(counted, self.loss.dims))  # same on every rank
            self.grad_norm = norm
            # ZeRO-0 fp32: DeepSpeed checks no gradient; a non-finite one must not apply.
            self.optimizer.skip_next_step = not math.isfinite(norm)
            if self.clip_grad > 0 and math.isfinite(norm):
                clip_by_norm(params, norm, self.clip_grad)


@torch.no_grad()
def clip_by_norm(params: Sequence[Tensor], norm: float, max_norm: float) -> None:
    """Scale gradients by ``min(1, max_norm / (norm + 1e-6))`` (DeepSpeed's / Megatron's rule).

    Every local copy is scaled, the tied ones included: each stage updates its own copy.
    """
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


class GLMPipelineModule(MaterializingPipelineModule):
    """PipelineModule whose local layers are materialised and initialised at build time."""

    def __init__(
        self,
        specs: list[Any],
        *,
        dims: ParallelDims,
        loss: PipelineLoss,
        partition_method: str,
        device: torch.device,
        seed: int,
        cfg: ModelConfig,
    ) -> None:
        std = cfg.init_method_std
        out_std = std / math.sqrt(2.0 * cfg.num_layers)
        last = len(specs) - 1

        def materialize(index: int, module: nn.Module) -> None:
            """This stage's layer ``index`` (on the meta device) -> ``device``, initialised."""
            module.to_empty(device=device)
            glm_index = 0 if index == last else index  # the head shares the embedding's seed
            init_layer(module, layer_index=glm_index, seed=seed, std=std, output_std=out_std)

        super().__init__(
            specs,
            materialize=materialize,
            topology=dims.topology(),
            loss_fn=loss,
            partition_method=partition_method,
            activation_checkpoint_interval=0,  # blocks checkpoint themselves (model config)
        )


def pipeline_layer_names(num_layers: int) -> list[str]:
    """Class names of the pipeline's layers in order, as ``build_pipeline`` lays them out.

    What ``partition_method=type:REGEX`` matches, known without building a layer.
    """
    return ["EmbeddingLayer", *["GLMBlock"] * num_layers, "FinalLayerNorm", TiedHead.__name__]


def check_partition_method(method: str, num_layers: int) -> None:
    """Raise ValueError (naming the field) for a ``type:REGEX`` that selects no layer.

    DeepSpeed would raise only once every rank builds its PipelineModule, inside the process
    group. The match is DeepSpeed's own (``compat.deepspeed.find_layer_type``) run over the
    layer classes' names, so the check cannot disagree with the partitioning. ``parameters``
    and ``uniform`` need no check: with ``num_layers`` divisible by ``pp`` (the config's rule)
    the ``num_layers + 3`` layers outnumber the stages and DeepSpeed's partitions never leave a
    stage without layers, and every layer holds parameters.
    """
    if not method.lower().startswith("type:"):
        return
    pattern = method.lower().split(":")[1]  # DeepSpeed lower-cases and takes this piece
    names = pipeline_layer_names(num_layers)
    try:
        find_layer_type(names, pattern)
    except Exception as exc:  # RuntimeError: no match; the ``regex`` module's error: bad pattern
        what = "selects no layer" if isinstance(exc, RuntimeError) else f"is not a regex ({exc})"
        kinds = ", ".join(dict.fromkeys(names))
        raise ConfigError(
            "parallel.partition_method",
            f"{method!r} {what}; the pipeline's layers are {kinds}: use e.g. type:GLMBlock, or "
            "parameters or uniform",
        ) from None


def build_pipeline(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    dims: ParallelDims,
    device: torch.device,
    seed: int,
    partition_method: str = "parameters",
    loss: BatchLoss,
) -> tuple[GLMPipelineModule, ModelParallelRNG]:
    """Collective: this stage's part of the GLM as a PipelineModule, and the model's TP stream.

    The weights equal those of ``build_model(cfg, vocab_size=..., seed=seed)`` layer by layer;
    ``loss`` runs on the last stage (:class:`PipelineLoss`).
    """
    with torch.device("meta"):
        glm = GLMModel(cfg, vocab_size, dims=dims)  # validates vocab/heads against tp
        head = TiedHead(cfg, vocab_size, dims=dims)
    layers = list(glm.layers)
    specs: list[Any] = [
        _Prebuilt(layers[0]),
        *layers[1:],
        _Prebuilt(head, forward_fn=head_forward),
    ]
    names = [
        s.typename.__name__ if isinstance(s, TiedLayerSpec) else type(s).__name__ for s in specs
    ]
    assert names == pipeline_layer_names(cfg.num_layers), names  # what preflight checks against
    pipe = GLMPipelineModule(
        specs,
        dims=dims,
        loss=PipelineLoss(dims, cfg.kernels, loss),
        partition_method=partition_method,
        device=device,
        seed=seed,
        cfg=cfg,
    )
    glm.rng.manual_seed(seed)
    return pipe, glm.rng


def micro_batch_iterator(
    micro_batches: Sequence[Batch], device: torch.device, label_keys: Sequence[str]
) -> Iterator[Any]:
    """DeepSpeed's ``(inputs, labels)`` pairs: the first stage reads inputs, the last labels
    (the loss's ``label_keys``, in that order)."""
    for mb in micro_batches:
        b = to_device(mb, device)
        yield tuple(b[k] for k in MODEL_INPUTS), tuple(b[k] for k in label_keys)


def tied_weights_max_diff(pipe: PipelineModule) -> float:
    """Collective (tied groups): max |embedding - head| between the first and last stage.

    0.0 on stages that hold no tied copy. Costs one broadcast of the ``[vocab/tp, h]`` shard.
    """
    worst = 0.0
    for weight, group in pipe.get_tied_weights_and_groups():
        ranks = pipe.tied_comms[TIED_KEY]["ranks"]
        first = weight.detach().clone()
        torch.distributed.broadcast(first, src=min(ranks), group=group)
        worst = max(worst, float((weight.detach() - first).abs().max()))
    return worst


__all__ = [
    "GLMPipelineModule",
    "PipelineLoss",
    "StepHook",
    "TiedHead",
    "build_pipeline",
    "check_partition_method",
    "head_forward",
    "micro_batch_iterator",
    "pipeline_layer_names",
    "tied_weights_max_diff",
]
