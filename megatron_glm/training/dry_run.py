"""``--dry-run``: the plan of a launch, from the config and a world size alone.

``glm-pretrain --config RUN.yaml --dry-run --world-size N`` answers "what would N processes
do with this config" on a laptop: no process group, no launcher variables, and neither the
corpus nor the tokenizer need to be present (the vocabulary comes from ``model.vocab_size``
when the tokenizer is absent). What the launch would refuse later for lack of a file, or a
checkpoint of another layout, is reported with what to do instead of refusing the plan.

The output is a list of named sections, each built by a small function of a :class:`RunPlan`
(``(title, builder)`` pairs in :data:`SECTIONS`). A builder returns its text, or None when it
has nothing to say; a new section is one more pair.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megatron_glm.config import RunConfig, to_dict
from megatron_glm.model import GLMModel, flops_per_token, num_parameters
from megatron_glm.parallel.layers import partition_dims
from megatron_glm.planning.memory import estimate_memory


@dataclass(frozen=True)
class RunPlan:
    """What every section reads: the config, the world size and what follows from them."""

    cfg: RunConfig
    world_size: int
    dp: int
    """Data-parallel size: world size / (tp * pp)."""
    vocab: int | None
    """Padded vocabulary (embedding rows); None when neither the config nor a tokenizer says."""
    vocab_source: str
    """Where ``vocab`` came from, or why it is unknown."""


SectionBuilder = Callable[[RunPlan], str | None]


def plan_run(cfg: RunConfig, world_size: int) -> RunPlan:
    """The plan of ``cfg`` on ``world_size`` processes (the config already validated for it)."""
    from megatron_glm.training.preflight import data_parallel_size

    vocab, source = _vocabulary(cfg)
    return RunPlan(cfg, world_size, data_parallel_size(cfg, world_size), vocab, source)


def _vocabulary(cfg: RunConfig) -> tuple[int | None, str]:
    """``model.vocab_size`` if set, else the tokenizer's padded vocabulary if it is there."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    path = cfg.data.tokenizer_model
    if path and Path(path).exists():
        from megatron_glm.training.preflight import load_tokenizer

        return load_tokenizer(cfg).padded_vocab_size, f"tokenizer {path}, padded"
    return None, (
        f"unknown: model.vocab_size is 0 and the tokenizer {path or '(none)'} is not here; "
        "set model.vocab_size to the padded vocabulary"
    )


def config_section(plan: RunPlan) -> str:
    """The resolved config as YAML (the file, the model preset and the overrides merged)."""
    return yaml.safe_dump(to_dict(plan.cfg), sort_keys=False).rstrip()


def layout_section(plan: RunPlan) -> str:
    """World = tp x pp x dp, and the batch: micro x accumulation x dp = global."""
    from megatron_glm.training.engine import gradient_accumulation_steps

    p, t = plan.cfg.parallel, plan.cfg.train
    accumulation = gradient_accumulation_steps(plan.cfg, plan.dp)
    sp = ", sequence parallel" if p.sequence_parallel and p.tp > 1 else ""
    return "\n".join(
        [
            f"world size {plan.world_size}, data parallel {plan.dp}, tensor parallel {p.tp}, "
            f"pipeline parallel {p.pp}{sp}",
            f"batch: micro batch {t.micro_batch_size} x gradient accumulation {accumulation} x "
            f"data parallel {plan.dp} = global batch {t.global_batch_size} sequences of "
            f"{plan.cfg.data.seq_length} tokens",
            f"ZeRO-{t.zero_stage}, {t.precision}, {t.train_iters} steps",
        ]
    )


def stage_parameters(plan: RunPlan) -> list[int]:
    """Parameters held by one rank of each pipeline stage (its TP shard; with pp > 1 the last
    stage holds its own copy of the tied output head), split as DeepSpeed splits the layers."""
    assert plan.vocab is not None
    cfg, p = plan.cfg, plan.cfg.parallel
    with torch.device("meta"):
        model = GLMModel(cfg.model, plan.vocab)
    counts = [_shard_numel(layer, p.tp) for layer in model.layers]
    if p.pp == 1:
        return [sum(counts)]
    from megatron_glm.compat.deepspeed import pipeline_stage_bounds
    from megatron_glm.training.pipeline import pipeline_layer_names

    counts.append(plan.vocab * cfg.model.hidden_size // p.tp)  # TiedHead
    names = pipeline_layer_names(cfg.model.num_layers)
    bounds = pipeline_stage_bounds(counts, names, p.partition_method, p.pp)
    return [sum(counts[a:b]) for a, b in itertools.pairwise(bounds)]


def _shard_numel(module: torch.nn.Module, tp: int) -> int:
    """Parameters of ``module`` on one TP rank: split tensors / tp, replicated ones whole."""
    dims = partition_dims(module)
    return sum(
        p.numel() // tp if dims[name] is not None else p.numel()
        for name, p in module.named_parameters()
    )


def parameters_section(plan: RunPlan) -> str:
    """Total parameters, FLOPs per token, and what one rank of each stage holds."""
    if plan.vocab is None:
        return f"vocabulary {plan.vocab_source}"
    cfg = plan.cfg
    total = num_parameters(cfg.model, plan.vocab)
    flops = flops_per_token(cfg.model, plan.vocab, cfg.data.seq_length)
    lines = [
        f"total {total:,} ({total / 1e6:.2f}M), vocabulary {plan.vocab} ({plan.vocab_source}), "
        f"FLOPs/token {flops:,}"
    ]
    per_stage = stage_parameters(plan)
    for stage, count in enumerate(per_stage):
        where = f"pipeline stage {stage}, " if len(per_stage) > 1 else ""
        lines.append(
            f"per rank ({where}tp shard 1/{cfg.parallel.tp}): {count:,} ({count / 1e6:.2f}M)"
        )
    return "\n".join(lines)


def data_section(plan: RunPlan) -> str:
    """Which data and tokenizer files a real launch will need and whether they are here."""
    d = plan.cfg.data

    def state(path: str) -> str:
        return "present" if Path(path).exists() else "NOT FOUND (the launch needs it)"

    task_dir = plan.cfg.finetune.task_dir
    if task_dir:  # finetuning reads its task's JSONL files, not a preprocessed corpus
        lines = [f"finetune.task_dir {task_dir}: {state(task_dir)}"]
    else:
        lines = [f"{prefix}.bin/.idx: {state(prefix + '.bin')}" for prefix in d.data_path]
    if not d.data_path and not task_dir:
        lines.append("data.data_path: empty (the launch needs a preprocessed corpus)")
    tokenizer = d.tokenizer_model
    lines.append(f"tokenizer {tokenizer}: {state(tokenizer)}" if tokenizer else "no tokenizer")
    return "\n".join(lines)


def checkpoint_section(plan: RunPlan) -> str:
    """What the run resumes from and whether it can, at this layout (``checkpoint.load``, else
    ``checkpoint.save``'s ``latest``): a checkpoint of another layout is named with the
    command that converts it."""
    from megatron_glm.training.checkpoint import describe_saved_layout, resolve_load_dir
    from megatron_glm.training.preflight import resume_problem

    c = plan.cfg.checkpoint
    load_dir = resolve_load_dir(c.load, c.save)  # an explicit load without 'latest' raises
    if load_dir is None:
        return f"none: a fresh start ({c.save or 'no checkpoint.save'} has no 'latest')"
    p, t = plan.cfg.parallel, plan.cfg.train
    problem = resume_problem(plan.cfg, load_dir, plan.world_size)
    verdict = "resumes as is" if problem is None else f"will not resume as is: {problem}"
    return "\n".join(
        [
            f"{load_dir}: {describe_saved_layout(load_dir)}",
            f"this run: tp {p.tp}, pp {p.pp}, data parallel {plan.dp}, ZeRO-{t.zero_stage}",
            verdict,
        ]
    )


def deepspeed_section(plan: RunPlan) -> str:
    """The DeepSpeed config JSON the engine is built with."""
    from megatron_glm.training.engine import deepspeed_config

    return json.dumps(deepspeed_config(plan.cfg, plan.dp), indent=2)


def memory_section(plan: RunPlan) -> str:
    """Peak bytes per rank (:func:`megatron_glm.planning.memory.estimate_memory`), counted for
    the kernels the launch would use: GPU ones, CPU ones under ``DS_ACCELERATOR=cpu``."""
    if plan.vocab is None:
        return f"vocabulary {plan.vocab_source}"
    device = "cpu" if os.environ.get("DS_ACCELERATOR") == "cpu" else "cuda"
    est = estimate_memory(plan.cfg, plan.world_size, vocab_size=plan.vocab, device=device)
    kernels = "CPU (DS_ACCELERATOR=cpu)" if device == "cpu" else "GPU"
    return "\n".join(
        [
            *est.lines(),
            f"  counted for {kernels} kernels; tools/plan_layout.py searches layouts that fit",
        ]
    )


SECTIONS: tuple[tuple[str, SectionBuilder], ...] = (
    ("config", config_section),
    ("layout", layout_section),
    ("parameters", parameters_section),
    ("memory", memory_section),
    ("data", data_section),
    ("checkpoint", checkpoint_section),
    ("DeepSpeed config", deepspeed_section),
)
"""The dry run's sections, in order."""


def describe_run(
    cfg: RunConfig,
    world_size: int,
    sections: Sequence[tuple[str, SectionBuilder]] = SECTIONS,
) -> str:
    """The plan as text: ``# title`` then the section's lines, sections apart by a blank line."""
    plan = plan_run(cfg, world_size)
    parts = []
    for title, build in sections:
        body = build(plan)
        if body is not None:
            parts.append(f"# {title}\n{body}")
    return "\n\n".join(parts)
