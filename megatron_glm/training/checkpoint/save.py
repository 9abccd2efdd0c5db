"""Saving: DeepSpeed's files plus ours into ``global_stepN.tmp``, then published atomically.

Publication protocol (a crash at any point leaves the previous checkpoint usable):

0. every rank checks its parameters (its ZeRO-3 partition, its pipeline stage) for non-finite
   values; if any rank finds one, nothing is written and :class:`NonFiniteWeightsError` is raised
   on every rank: a diverged model is never published over the last good checkpoint;
1. rank 0 removes a stale ``global_stepN.tmp`` left by an earlier crash; all ranks write
   DeepSpeed's files and their RNG file into ``global_stepN.tmp``
   (``engine.save_checkpoint(..., save_latest=False)``: DeepSpeed would otherwise write
   ``latest`` itself, before we know every rank's files are complete);
2. barrier; rank 0 renames ``global_stepN.tmp`` to ``global_stepN`` (atomic on POSIX);
3. rank 0 writes ``latest`` (:func:`.latest.write_latest`) -- last;
4. barrier, so no rank proceeds (or exits) before the checkpoint is published;
5. every rank compares what it sees of the published checkpoint with rank 0's view, which
   warns if they differ (:func:`.shared.warn_unless_shared`): a ``checkpoint.save`` on
   node-local disks is named at the first save, not only at the resume that refuses it.

Each model-parallel rank's client state also records the ``GLMModel`` names of its torch
optimizer's parameters, group by group (:data:`OPTIMIZER_NAMES`), when the optimizer holds the
module's own parameters (ZeRO-0): DeepSpeed saves that optimizer's state by position only, and
resharding needs to know which parameter each moment belongs to. (ZeRO-1/2 files carry their own
per-parameter map.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_glm.serialization import CheckpointFileError
from megatron_glm.training.checkpoint.deepspeed_files import glm_name
from megatron_glm.training.checkpoint.group import barrier, rank, ranks_where
from megatron_glm.training.checkpoint.latest import read_latest, write_latest
from megatron_glm.training.checkpoint.optimizer_state import OPTIMIZER_NAMES
from megatron_glm.training.checkpoint.shared import warn_unless_shared
from megatron_glm.training.checkpoint.state import (
    LAYOUT,
    MODEL_PARALLEL_RNG,
    ClientState,
    NonFiniteWeightsError,
    rng_file,
    rng_state,
    tag_for,
)
from megatron_glm.training.engine import Engine


def save(engine: Engine, save_dir: str | os.PathLike[str], state: ClientState) -> str:
    """Collective: write and publish the checkpoint of ``state.iteration``; returns its tag.

    Raises :class:`NonFiniteWeightsError` on every rank, writing nothing, when any rank's
    parameters are not finite. An existing directory of the same tag (a crashed run's, or one
    being overwritten on purpose) is moved aside before the rename and deleted only after
    ``latest`` is rewritten.
    """
    root = Path(save_dir)
    tag = tag_for(state.iteration)
    _refuse_non_finite(engine, root, tag)
    tmp_tag = f"{tag}.tmp"
    me = rank()
    if me == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    client = state.to_dict()
    names = optimizer_param_names(engine)
    if names is not None:
        client[OPTIMIZER_NAMES] = names
    # DeepSpeed barriers before writing, so the stale .tmp is gone before anyone writes.
    engine.engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client, save_latest=False)
    rng = {**rng_state(), MODEL_PARALLEL_RNG: engine.model_rng.state_dict()}
    torch.save(rng, rng_file(root / tmp_tag, me))
    barrier()
    if me == 0:
        (root / tmp_tag / LAYOUT).write_text(json.dumps(_layout_record(engine, state.iteration)))
        _publish(root, tag, tmp_tag)
    barrier()
    warn_unless_shared(str(save_dir), "checkpoint.save", engine.device)  # not a node's disk
    return tag


def optimizer_param_names(engine: Engine) -> list[list[str]] | None:
    """The GLM names of the torch optimizer's parameters by group, or None under ZeRO >= 1.

    ZeRO replaces the optimizer's parameters by flat partitions, which are not module
    parameters (their files map names to slices themselves).
    """
    pipeline = engine.dims.pp > 1
    by_id = {id(p): glm_name(n, pipeline=pipeline) for n, p in engine.module.named_parameters()}
    groups = [group["params"] for group in engine.optimizer.param_groups]
    if not all(id(p) in by_id for params in groups for p in params):
        return None
    return [[by_id[id(p)] for p in params] for params in groups]


def _layout_record(engine: Engine, iteration: int) -> dict[str, int]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "iteration": iteration,
        "tp": engine.dims.tp,
        "pp": engine.dims.pp,
        "dp_size": engine.dp_size,
        "world_size": world,
        "zero_stage": int(engine.engine.zero_optimization_stage()),
    }


def _publish(root: Path, tag: str, tmp_tag: str) -> None:
    """Rank 0: atomic rename of the complete ``tmp_tag`` to ``tag``, then ``latest``."""
    final, old = root / tag, root / f"{tag}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(root / tmp_tag, final)
    write_latest(root, tag)
    shutil.rmtree(old, ignore_errors=True)


def _local_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's share of the weights: ZeRO-3 partitions (``ds_tensor``) or the parameters."""
    return [getattr(p, "ds_tensor", p).detach() for p in module.parameters()]


def _refuse_non_finite(engine: Engine, root: Path, tag: str) -> None:
    """Collective (world): raise on every rank if any rank's parameters hold NaN or inf.

    One device-to-host copy for the whole model, not one per parameter."""
    tensors = [t for t in _local_tensors(engine.module) if t.numel()]
    finite = [torch.isfinite(t).all() for t in tensors]
    bad = bool(not torch.stack(finite).all()) if finite else False
    ranks = ranks_where(bad, engine.device)
    if ranks:
        try:
            previous = read_latest(root)
        except CheckpointFileError:
            previous = None
        kept = f"{root}/latest still names {previous}" if previous else "no checkpoint exists yet"
        raise NonFiniteWeightsError(
            f"not saving {root}/{tag}: the parameters on rank(s) {ranks} hold non-finite values "
            f"(the model diverged); nothing was written, {kept}"
        )
