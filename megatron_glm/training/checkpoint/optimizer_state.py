"""Adam's state across layouts: read it per parameter from any layout, restore it into any other.

Why a store of full tensors, not DeepSpeed files for the target layout. A ZeRO-1/2 file holds one
flat fp32 partition per optimizer param group and data-parallel rank; where each parameter lands
in it depends on the group membership of the stage's parameters, DeepSpeed's alignment padding and
the data-parallel size, all decided inside ``DeepSpeedZeroOptimizer.__init__``. Writing those
files for a layout we are not running would re-implement that bookkeeping and break silently when
it changes. Instead the resharded checkpoint stores, per ``GLMModel`` parameter, the full (tp = 1)
fp32 master weight and Adam moments (``optimizer_state.pt``, plain tensors: it loads with the
restricted unpickler, memory-mapped, so each rank reads only its slices), and the loader, once
DeepSpeed has built the engine in the target layout, sets each local parameter's slice through
DeepSpeed's public fragment API (``safe_set_full_fp32_param`` /
``safe_set_full_optimizer_state``), which knows its own partitioning. This is DeepSpeed's
universal checkpoint idea (``ds_to_universal.py``) without its pickled per-parameter files and
without giving DeepSpeed a TP layout description: the TP split uses the same partition rule as
the weights (a moment has its parameter's shape).

Reading (:func:`read_optimizer_state`), per model-parallel rank of the source:

- ZeRO-1/2: the data-parallel ranks' flat partitions, each parameter's pieces concatenated in
  data-parallel order (``param_slice_mappings`` says where each piece lies) and shaped like the
  rank's weight shard of that parameter (our model's names and shapes, not DeepSpeed's
  ``param_shapes``);
- ZeRO-0: the torch optimizer's own state in the model-states file, indexed by position, named
  by the names ``save`` records (``optimizer_param_names``); the fp32 weights are the module's.

then the TP shards are merged like the weights. ZeRO-3's optimizer state is refused (its
weights are read: :func:`.deepspeed_files.read_zero3_weights`).

Restoring (:func:`restore_optimizer_state`): the torch optimizer's state is created for every
parameter it holds (the flat partitions under ZeRO), with the saved step count; under ZeRO-0 it
is filled directly, under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) DeepSpeed links each
parameter's fragment to it (:func:`megatron_glm.compat.deepspeed.link_optimizer_state`) and the
fragment API fills it. The LR schedule, iteration and data position stay in the client state,
which is layout-independent. Not carried: an fp16 loss scaler (it restarts at its initial
scale). Refused with a message naming ``--no-optimizer``, as source or target: ZeRO-3, and
DeepSpeed's fp16/bf16 optimizers without ZeRO (their state is neither torch's by name nor
fragment-mapped).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megatron_glm.parallel.layers import partition_dims
from megatron_glm.serialization import CheckpointFileError, load_file
from megatron_glm.training.checkpoint.deepspeed_files import (
    glm_name,
    is_zero3,
    load_shards,
    mp_rank_of,
    optimizer_files,
    read_zero_partition,
)
from megatron_glm.training.engine import Engine

STORE = "optimizer_state.pt"
"""File of a resharded checkpoint holding the full per-parameter optimizer state."""
KINDS = ("fp32", "exp_avg", "exp_avg_sq")
"""What is kept per parameter: the fp32 master weight and Adam's two moments."""
MOMENTS = KINDS[1:]
OPTIMIZER_NAMES = "optimizer_param_names"
"""Client-state key (written by ``save``): the torch optimizer's parameter names by group."""
_VERSION = 1


@dataclass
class FullOptimizerState:
    """Adam's state of the whole model in ``GLMModel`` names, independent of any layout."""

    step: int
    """Updates applied so far (Adam's bias correction)."""
    tensors: dict[str, dict[str, Tensor]]
    """Kind (:data:`KINDS`) -> parameter name -> full (tp = 1) tensor."""

    def save(self, path: Path) -> None:
        """Write as plain tensors (contiguous copies: views would save their whole storage)."""
        blob: dict[str, Any] = {"version": _VERSION, "step": self.step}
        for kind, tensors in self.tensors.items():
            blob[kind] = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
        torch.save(blob, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FullOptimizerState:
        """Read a store (memory-mapped: a rank touches only the slices it takes)."""
        blob = load_file(path, mmap=True)
        if not isinstance(blob, dict) or blob.get("version") != _VERSION:
            raise CheckpointFileError(f"{path}: not a megatron_glm optimizer-state store")
        missing = [k for k in (*KINDS, "step") if k not in blob]
        if missing:
            raise CheckpointFileError(f"{path}: optimizer-state store lacks {missing}")
        return cls(step=int(blob["step"]), tensors={k: dict(blob[k]) for k in KINDS})


# ----------------------------------------------------------------------------- reading

RankState = tuple[int, dict[str, dict[str, Tensor]]]
"""(step, kind -> GLM name -> tensor shaped like the rank's weight shard)."""


def read_optimizer_state(
    tag_dir: str | os.PathLike[str],
    weight_shards: Sequence[Mapping[str, Tensor]],
    layout: Mapping[str, int | None],
    *,
    pp: int,
) -> FullOptimizerState | None:
    """The full optimizer state of a checkpoint tag, or None if it holds none.

    ``weight_shards`` are the tag's weights per TP rank by ``GLMModel`` name (every stage),
    which give each parameter's shard shape. A resharded tag's store is read as it is.
    """
    tag_dir = Path(tag_dir)
    if (tag_dir / STORE).is_file():
        return FullOptimizerState.load(tag_dir / STORE)
    if is_zero3(tag_dir):
        raise CheckpointFileError(
            f"{tag_dir}: ZeRO-3 optimizer state (Adam's moments partitioned per parameter over "
            "the data-parallel ranks) is not carried over; reshard with --no-optimizer (the "
            "weights are read, Adam restarts)"
        )
    tp = len(weight_shards)
    blobs = load_shards(tag_dir, mmap=True)
    found = [
        _rank_state(tag_dir, mp_rank_of(s, t, tp), blobs, weight_shards[t], pipeline=pp > 1)
        for s in range(pp)
        for t in range(tp)
    ]
    if all(f is None for f in found):
        return None
    missing = [m for m, f in enumerate(found) if f is None]
    if missing:
        raise CheckpointFileError(
            f"{tag_dir}: model-parallel rank(s) {missing} have no optimizer state"
        )
    ranks = [f for f in found if f is not None]
    steps = {step for step, _ in ranks}
    if len(steps) != 1:
        raise CheckpointFileError(f"{tag_dir}: optimizer step counts differ: {sorted(steps)}")
    return FullOptimizerState(step=steps.pop(), tensors=_merge_ranks(ranks, weight_shards, layout))


def _merge_ranks(
    ranks: list[RankState],
    weight_shards: Sequence[Mapping[str, Tensor]],
    layout: Mapping[str, int | None],
) -> dict[str, dict[str, Tensor]]:
    """Model-parallel ranks (``pp_rank * tp + tp_rank`` order) -> full tensors per kind.

    The stages of one TP rank are joined (the pipeline's tied head repeats the embedding: the
    first stage's copy is kept), then the TP shards merged like the weights.
    """
    from megatron_glm.training.checkpoint.reshard import merge_shards

    tp = len(weight_shards)
    per_tp: list[dict[str, dict[str, Tensor]]] = [{k: {} for k in KINDS} for _ in range(tp)]
    for index, (_, tensors) in enumerate(ranks):
        for kind in KINDS:
            per_tp[index % tp][kind] = {**tensors[kind], **per_tp[index % tp][kind]}
    merged = {}
    for kind in KINDS:  # in the weights' order, which merge_shards compares across TP ranks
        ordered = [
            {n: per_tp[t][kind][n] for n in weight_shards[t] if n in per_tp[t][kind]}
            for t in range(tp)
        ]
        merged[kind] = merge_shards(ordered, layout)
    return merged


def _rank_state(
    tag_dir: Path,
    mp_rank: int,
    blobs: list[dict[str, Any]],
    shard: Mapping[str, Tensor],
    *,
    pipeline: bool,
) -> RankState | None:
    """One model-parallel rank's optimizer state (ZeRO-1/2 files, else ZeRO-0's), or None."""
    files = optimizer_files(tag_dir, mp_rank)
    if files:
        return _zero_state(files, shard, pipeline=pipeline)
    blob = blobs[mp_rank]
    optimizer = blob.get("optimizer")
    if optimizer is None:
        return None
    names = blob.get(OPTIMIZER_NAMES)
    where = f"{tag_dir}/mp_rank_{mp_rank:02d}"
    if not isinstance(optimizer, Mapping) or "state" not in optimizer:
        keys = sorted(optimizer) if isinstance(optimizer, Mapping) else type(optimizer).__name__
        raise CheckpointFileError(
            f"{where}: optimizer state in a form resharding does not read (DeepSpeed's fp16/bf16 "
            f"optimizer without ZeRO: {keys}); reshard with --no-optimizer (Adam restarts)"
        )
    if names is None:
        raise CheckpointFileError(
            f"{where}: ZeRO-0 optimizer state without the names of its parameters (written "
            "before megatron_glm recorded them); reshard with --no-optimizer (Adam restarts)"
        )
    return _torch_state(optimizer, names, shard, where)


def _zero_state(files: list[Path], shard: Mapping[str, Tensor], *, pipeline: bool) -> RankState:
    """Concatenate each parameter's pieces over the data-parallel partitions, in rank order."""
    pieces: dict[str, dict[str, list[Tensor]]] = {k: {} for k in KINDS}
    steps = set()
    for path in files:
        for group in read_zero_partition(path):
            steps.add(group.step)
            for local_name, address in group.slices.items():
                name = glm_name(local_name, pipeline=pipeline)
                for kind in KINDS:
                    piece = group.flat[kind].narrow(0, address.start, address.numel)
                    pieces[kind].setdefault(name, []).append(piece)
    if len(steps) != 1:
        raise CheckpointFileError(f"{files[0].parent}: ZeRO step counts differ: {sorted(steps)}")
    out: dict[str, dict[str, Tensor]] = {k: {} for k in KINDS}
    for kind in KINDS:
        for name, parts in pieces[kind].items():
            out[kind][name] = _shaped(torch.cat(parts), name, shard, files[0])
    return steps.pop(), out


def _shaped(flat: Tensor, name: str, shard: Mapping[str, Tensor], where: Path) -> Tensor:
    """``flat`` in the shape of the weight shard ``name``; an error naming both if it cannot be."""
    if name not in shard:
        raise CheckpointFileError(
            f"{where}: optimizer state for '{name}', which the model files do not hold"
        )
    shape = shard[name].shape
    if flat.numel() != shard[name].numel():
        raise CheckpointFileError(
            f"{where}: optimizer state of '{name}' has {flat.numel()} elements over the "
            f"data-parallel partitions, its weight shard {tuple(shape)} has {shard[name].numel()}"
        )
    return flat.view(shape)


def _torch_state(
    optimizer: Mapping[str, Any],
    names: list[list[str]],
    shard: Mapping[str, Tensor],
    where: str,
) -> RankState:
    """ZeRO-0: torch's ``state_dict`` (state by position) named by the recorded names."""
    groups = optimizer["param_groups"]
    if [len(g["params"]) for g in groups] != [len(n) for n in names]:
        raise CheckpointFileError(f"{where}: optimizer groups do not match the recorded names")
    out: dict[str, dict[str, Tensor]] = {k: {} for k in KINDS}
    steps = set()
    for group, group_names in zip(groups, names, strict=True):
        for index, name in zip(group["params"], group_names, strict=True):
            weight = shard[name]
            state = optimizer["state"].get(index, {})
            steps.add(int(state.get("step", 0)))
            out["fp32"][name] = weight.float()
            for kind in MOMENTS:
                out[kind][name] = state.get(kind, torch.zeros_like(weight, dtype=torch.float32))
    if len(steps) != 1:
        raise CheckpointFileError(f"{where}: optimizer step counts differ: {sorted(steps)}")
    return steps.pop(), out


# ----------------------------------------------------------------------------- restoring


def restore_optimizer_state(engine: Engine, path: str | os.PathLike[str]) -> int:
    """Set the engine's fp32 master weights and Adam state from a store; returns the step.

    Call after ``load_checkpoint(..., load_optimizer_states=False)`` (the module weights are
    loaded). Each rank takes the slices of its own parameters (TP shard; DeepSpeed picks the
    data-parallel fragment).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megatron_glm.compat.deepspeed import check_optimizer_state_linkable, link_optimizer_state

    full = FullOptimizerState.load(path)
    local = _local_values(engine, full, Path(path))
    inner, wrapper = engine.optimizer, engine.engine.optimizer
    if wrapper is inner:  # ZeRO-0 without a precision wrapper: the module's own parameters
        by_param = {id(p): values for p, values in local}
        _set_torch_state(inner, full.step, lambda p: by_param[id(p)])
        return full.step
    check_optimizer_state_linkable(wrapper)  # before anything is changed
    _set_torch_state(inner, full.step, None)
    link_optimizer_state(wrapper)
    for param, values in local:
        safe_set_full_fp32_param(param, values["fp32"])
        for kind in MOMENTS:
            safe_set_full_optimizer_state(param, values[kind], kind)
    return full.step


def _local_values(
    engine: Engine, full: FullOptimizerState, where: Path
) -> list[tuple[nn.Parameter, dict[str, Tensor]]]:
    """This rank's parameters with their slices of every kind (TP shard, full over DP)."""
    pipeline = engine.dims.pp > 1
    dims = partition_dims(engine.module)
    tp, tp_rank = engine.dims.tp, engine.dims.tp_rank
    out = []
    for local_name, param in engine.module.named_parameters():
        name, dim = glm_name(local_name, pipeline=pipeline), dims[local_name]
        values = {}
        for kind in KINDS:
            tensor = full.tensors[kind].get(name)
            if tensor is None:
                raise CheckpointFileError(
                    f"{where}: no {kind} for parameter '{name}' (another architecture?)"
                )
            if dim is not None and tp > 1:
                tensor = tensor.chunk(tp, dim=dim)[tp_rank]
            if tensor.shape != param.shape:
                raise CheckpointFileError(
                    f"{where}: {kind} of '{name}' gives this rank a {tuple(tensor.shape)} slice, "
                    f"its parameter is {tuple(param.shape)}"
                )
            values[kind] = tensor.to(device=param.device, dtype=torch.float32)
        out.append((param, values))
    return out


def _set_torch_state(optimizer: torch.optim.Optimizer, step: int, values: Any) -> None:
    """Give every parameter of a torch Adam(W) its state through ``load_state_dict``.

    ``values(param)`` gives the moments; None means zeros shaped like the parameter (a flat
    ZeRO partition, filled through the fragment API afterwards). ``load_state_dict`` puts each
    tensor on its parameter's device and dtype and keeps ``step`` the way Adam expects it.
    """
    saved = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    integer = getattr(optimizer, "integer_step", False)  # DeepSpeed's CPU Adam counts in an int
    for index, param in enumerate(params):
        entry: dict[str, Any] = {
            "step": step if integer else torch.tensor(float(step), dtype=torch.float32)
        }
        for kind in MOMENTS:
            entry[kind] = torch.zeros_like(param) if values is None else values(param)[kind]
        state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
