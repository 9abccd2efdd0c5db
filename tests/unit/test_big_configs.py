"""The large shipped recipes (GLM-2B, GLM-10B, GLM-130B-shaped) at their recommended layouts.

Each recipe names its layout (parallel.tp/pp, ZeRO, micro-batch) and, in its header, the GPU
count it was planned for. Here every (tp, pp) rank of that layout is built on the meta device
(no memory): the model's layers at each TP rank, partitioned over the stages by DeepSpeed's own
``partition_balanced`` on the layers' parameter counts, which is what ``PipelineModule`` does for
``partition_method=parameters`` (the tied head included, as DeepSpeed counts it). Counting each
split parameter on every TP rank, each replicated one on TP rank 0 only, and the tied head's copy
not at all, the per-rank counts must add up to ``num_parameters`` (the analytic count) and come
within 5% of the paper's nominal size; the launch checks accept the layout at that world size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepspeed.runtime.utils import partition_balanced
from torch import nn

from megatron_glm.config import RunConfig, load_config
from megatron_glm.model import GLMModel, num_parameters
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training.pipeline import TiedHead
from megatron_glm.training.preflight import validate_for_launch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {  # recipe: (GPUs it was planned for, the paper's nominal parameter count)
    "pretrain_glm_2b.yaml": (16, 2e9),
    "pretrain_glm_10b.yaml": (64, 10e9),
    "pretrain_glm_130b.yaml": (640, 130e9),
}


def _rank_count(layers: list[nn.Module], tp_rank: int) -> int:
    """Parameters this rank holds: split ones always, replicated ones on TP rank 0 only."""
    return sum(
        p.numel()
        for layer in layers
        if not isinstance(layer, TiedHead)  # the head's copy of the embedding counts once
        for p in layer.parameters()
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0
    )


def per_rank_parameters(cfg: RunConfig) -> dict[tuple[int, int], int]:
    """(tp_rank, pp_rank) -> parameters, from meta-device layers split as the pipeline splits."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    assert cfg.parallel.partition_method == "parameters"
    counts: dict[tuple[int, int], int] = {}
    for tp_rank in range(tp):
        dims = ParallelDims(world_size=tp * pp, tp=tp, pp=pp, rank=tp_rank)
        with torch.device("meta"):
            glm = GLMModel(cfg.model, cfg.model.vocab_size, dims=dims)
            layers = [*glm.layers, TiedHead(cfg.model, cfg.model.vocab_size, dims=dims)]
        assert all(p.is_meta for layer in layers for p in layer.parameters())
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        parts = [int(x) for x in partition_balanced(weights=sizes, num_parts=pp)]
        assert parts[0] == 0 and parts[-1] == len(layers) and parts == sorted(set(parts))
        for stage in range(pp):
            counts[tp_rank, stage] = _rank_count(layers[parts[stage] : parts[stage + 1]], tp_rank)
    return counts


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_builds_on_every_rank_and_counts_add_up(recipe: str) -> None:
    gpus, paper = RECIPES[recipe]
    cfg = load_config(CONFIGS / recipe)
    validate_for_launch(cfg, gpus, check_data=False)
    counts = per_rank_parameters(cfg)
    assert len(counts) == cfg.parallel.tp * cfg.parallel.pp
    total = num_parameters(cfg.model)
    assert sum(counts.values()) == total
    assert abs(total / paper - 1) < 0.05, (recipe, total)
    # the stages balance: no rank holds more than 1.5x an even share of the split weights
    assert max(counts.values()) < 1.5 * total / len(counts)
    print(
        f"{recipe}: {total:,} parameters over tp {cfg.parallel.tp} x pp {cfg.parallel.pp}; "
        f"per rank {min(counts.values()):,} .. {max(counts.values()):,}"
    )
