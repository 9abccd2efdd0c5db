"""DeepSpeed engine set-up: the config dict, AdamW with weight-decay groups, the loss module.

One code path for every world size: the run config becomes a DeepSpeed config *dict* (no JSON
file to keep in sync), the optimizer is a torch ``AdamW`` we build ourselves, and
``deepspeed.initialize`` wraps both.

Optimizer choice: torch's AdamW, except under ZeRO-Offload. Without offload DeepSpeed then
compiles no op (its FusedAdam is a CUDA extension built at first use): on CUDA torch's
``fused=True`` AdamW is a single multi-tensor kernel, on par with FusedAdam and without a build
step. With ``train.cpu_offload`` the update runs on the CPU partitions, where DeepSpeed's C++ CPU
Adam is the fast choice (5-7x torch's, by DeepSpeed's figures): :mod:`.cpu_adam` (compiled once
per Python environment). Either optimizer is a :class:`~megatron_glm.training.skip.SkippableStep`
so the loop can skip an update whose loss was non-finite in every precision, not only under fp16
loss scaling. ``zero_force_ds_cpu_optimizer`` stays off: DeepSpeed checks the class by identity and
ours is a subclass.

The loss lives inside the engine's module (:class:`GLMPretrainModule`): under ZeRO-3 the tied
head weight is gathered by DeepSpeed's hooks only while the engine's forward runs, so computing
the loss outside ``engine(...)`` would see a partitioned (empty) weight.

Which module the engine wraps (the whole GLM, or this stage's ``PipelineModule``) is the step
runner's choice (``training.step``); :func:`initialize` is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatron_glm.config import OptimizerConfig, RunConfig
from megatron_glm.model import GLMModel
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.random import ModelParallelRNG
from megatron_glm.training.batches import MODEL_INPUTS, Batch
from megatron_glm.training.losses import BatchLoss, LossSums, PretrainLoss
from megatron_glm.training.lr_schedule import AnnealingLR, build_scheduler
from megatron_glm.training.skip import SkippableStep

STEPS_PER_PRINT = 2**31 - 1
"""DeepSpeed's own progress print is disabled (the loop logs); it must still be an int."""


def gradient_accumulation_steps(cfg: RunConfig, dp_size: int) -> int:
    """``global_batch / (micro_batch * dp)``; preflight has already checked divisibility."""
    per_step = cfg.train.micro_batch_size * dp_size
    assert cfg.train.global_batch_size % per_step == 0, "validate_for_launch not called"
    return cfg.train.global_batch_size // per_step


def clips_itself(cfg: RunConfig) -> bool:
    """Pipeline + ZeRO-0 + fp32: gradient clipping is ours, not DeepSpeed's.

    DeepSpeed's fp32 ``clip_grad_norm_`` (ZeRO-0) counts a non-tensor-parallel gradient only on
    model-parallel rank 0, and with a pipeline that rank is the first *stage* of the ``pp x tp``
    group: the other stages' gradients would be left out of the norm and the clip factor would
    be wrong. The pipeline's optimizer-step hook then clips with the correct norm instead
    (``training.pipeline.StepHook``). ZeRO-1 and the fp16/bf16 optimizers count correctly.
    """
    t = cfg.train
    return cfg.parallel.pp > 1 and t.zero_stage == 0 and t.precision == "fp32"


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a run (batch, accumulation, ZeRO, precision, clipping)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, dp_size),
        "gradient_clipping": 0.0 if clips_itself(cfg) else cfg.optimizer.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
    }
    if cfg.parallel.pp > 1:
        # DeepSpeed's pipeline sends a TP-replicated activation as 1/tp slices and all-gathers
        # it on the receiving stage; under sequence parallelism each TP rank's activation is a
        # different sequence slice, not a replica, so that must be off.
        partitioned = not cfg.parallel.sequence_parallel
        ds["pipeline"] = {"pipe_partitioned": partitioned, "grad_partitioned": partitioned}
    if t.precision == "fp16":
        ds["fp16"].update(
            {
                "loss_scale": 0,  # 0 = dynamic
                "initial_scale_power": t.initial_scale_power,
                "loss_scale_window": t.loss_scale_window,
                "hysteresis": t.hysteresis,
                "min_loss_scale": t.min_loss_scale,
            }
        )
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices decay; biases, LayerNorm and other 1-D tensors do not.

    The rule is by tensor rank (``ndim < 2`` means bias or norm gain), which also covers
    parameters added later without a name convention. Empty groups are dropped (DeepSpeed drops
    them too), so pipeline stages can hold different numbers of groups: a stage of the
    embedding alone has no 1-D parameter. ZeRO's per-group collectives across the stages are
    made independent of that count by ``compat.deepspeed.reduce_zero_grad_norm_once``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class SkippableAdamW(SkippableStep, torch.optim.AdamW):
    """torch's AdamW whose next ``step()`` can be turned into a no-op (:class:`SkippableStep`)."""


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, *, device: torch.device, cpu_offload: bool
) -> SkippableStep:
    """AdamW over :func:`param_groups`: DeepSpeed's CPU Adam under ZeRO-Offload, else torch's
    (fused on CUDA)."""
    kwargs: dict[str, Any] = {
        "lr": cfg.lr,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_eps,
    }
    groups = param_groups(model, cfg.weight_decay)
    if cpu_offload:
        from megatron_glm.training.cpu_adam import SkippableCPUAdam  # imports DeepSpeed

        return SkippableCPUAdam(groups, **kwargs)
    return SkippableAdamW(groups, fused=device.type == "cuda" or None, **kwargs)


class GLMPretrainModule(nn.Module):
    """The engine's module: GLM forward + a :class:`BatchLoss` (pretraining's by default),
    returning the loss sums.

    It adopts the GLM's ``layers`` as its own child (the GLM object itself is kept outside the
    module tree), so parameter names and checkpoints are exactly ``GLMModel``'s (``layers.0...``)
    and a saved state dict loads into a plain :class:`GLMModel`.
    """

    def __init__(self, glm: GLMModel, loss: BatchLoss | None = None) -> None:
        super().__init__()
        self.layers = glm.layers
        object.__setattr__(self, "glm", glm)
        self.loss: BatchLoss = loss or PretrainLoss()

    def forward(self, batch: Batch) -> LossSums:
        """Sums of one micro-batch (see :class:`megatron_glm.training.losses.LossSums`)."""
        glm: GLMModel = self.glm  # type: ignore[assignment]
        hidden = glm(*(batch[k] for k in MODEL_INPUTS))
        return self.loss(glm, hidden, batch)


@dataclass
class Engine:
    """What the loop drives: DeepSpeed's engine, our optimizer and schedule, the layout."""

    engine: Any
    """``deepspeed.DeepSpeedEngine`` (a ``PipelineEngine`` when ``dims.pp > 1``)."""
    optimizer: SkippableStep
    """The inner torch optimizer (DeepSpeed may wrap it in a ZeRO/fp16 optimizer)."""
    scheduler: AnnealingLR
    """Stepped by the loop after each applied update."""
    module: nn.Module
    """The engine's module: :class:`GLMPretrainModule` (parameters possibly partitioned under
    ZeRO-3), or this stage's ``PipelineModule`` when ``dims.pp > 1``."""
    dims: ParallelDims
    """The layout (DeepSpeed's ``mpu``); loss sums are reduced over ``dims.dp_group``."""
    model_rng: ModelParallelRNG
    """The model's TP-private dropout stream (checkpointed with the per-rank RNG states)."""
    dp_rank: int
    dp_size: int
    grad_accum: int
    device: torch.device


def initialize(
    module: nn.Module,
    cfg: RunConfig,
    *,
    dims: ParallelDims,
    device: torch.device,
    model_rng: ModelParallelRNG,
) -> Engine:
    """Wrap ``module`` (float32, on ``device``, built with ``dims``) in a DeepSpeed engine.

    ``module`` is a :class:`GLMPretrainModule` or, with ``dims.pp > 1``, this stage's
    ``PipelineModule`` (DeepSpeed then returns a ``PipelineEngine``). Without a pipeline
    ``dims`` is DeepSpeed's ``mpu``: ZeRO partitions over ``dims.dp_group`` and the gradient
    norm (clipping) is all-reduced over the model-parallel group, counting replicated
    parameters once. With one, DeepSpeed derives its ``mpu`` (a ``PipelineParallelGrid``) from
    the PipelineModule's topology, which is ``dims.topology()``: the same ranks in the same
    groups as ``dims``.
    """
    import deepspeed

    optimizer = build_optimizer(
        module, cfg.optimizer, device=device, cpu_offload=cfg.train.cpu_offload
    )
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train.train_iters)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        config=deepspeed_config(cfg, dims.dp_size),
        mpu=None if dims.pp > 1 else dims,
        dist_init_required=False,
    )
    return Engine(
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        module=module,
        dims=dims,
        model_rng=model_rng,
        dp_rank=dims.dp_rank,
        dp_size=dims.dp_size,
        grad_accum=gradient_accumulation_steps(cfg, dims.dp_size),
        device=device,
    )


def uses_manual_grad_norm(ds: Any) -> bool:
    """True where the gradient norm is ours to compute: DeepSpeed reports none at ZeRO-0 fp32."""
    return ds.zero_optimization_stage() == 0 and not (ds.fp16_enabled() or ds.bfloat16_enabled())
