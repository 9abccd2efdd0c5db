"""Rewrite a DeepSpeed checkpoint's model weights for another tensor-parallel size.

A checkpoint tag directory holds one ``mp_rank_XX_model_states.pt`` per model-parallel rank
(DeepSpeed's naming; with ``pp == 1`` XX is the TP rank), each with the rank's shard of the
weights under ``"module"``. Resharding is pure bookkeeping because initialisation and the layers
agree on one rule: the full (tp = 1) tensor is the concatenation of the shards along the
parameter's partition dimension, in TP-rank order, and replicated tensors are identical on every
rank. So: merge (concatenate split tensors, check replicated ones agree), split into the new
count, write ``mp_rank_00 .. mp_rank_{N-1}`` plus ``latest``. The layout (name -> partition dim)
comes from the model definition (:func:`megatron_glm.parallel.layers.partition_dims` of a
meta-device model), never from name patterns.

Optimizer state is *not* carried over. DeepSpeed keeps it either inside the model-states file
(no ZeRO: one entry per local tensor, shaped like the old shards) or in
``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` (flat ZeRO partitions whose boundaries depend on
tp and dp); neither can be re-sliced without rebuilding the flat layout. The resharded checkpoint
therefore has ``"optimizer": None``, no ZeRO files and no per-rank RNG files, and is marked with
``"tp_reshard"`` (:func:`reshard_info`). Load it with
``engine.load_checkpoint(dir, load_optimizer_states=False)``: DeepSpeed then refreshes its fp32
master weights (ZeRO) from the loaded module, and Adam's moments start from zero (warm restart of
the optimizer; iteration, consumed samples and LR schedule in the client state are kept). A
continuation with the optimizer state goes through DeepSpeed's universal checkpoint
(``ds_to_universal.py`` then ``checkpoint.load_universal``), which needs the per-parameter TP
layout of this module in the checkpoint's ``universal_checkpoint_info``; not provided yet.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
RESHARD_KEY = "tp_reshard"
"""Key of the marker a resharded model-states file carries (DeepSpeed passes it through as
client state)."""


@dataclass(frozen=True)
class ReshardResult:
    """What :func:`reshard_checkpoint` did."""

    tag: str
    source_tp: int
    target_tp: int
    files: list[Path]
    """The model-states files written, in TP-rank order."""
    dropped: list[str]
    """Files of the source tag not carried over (optimizer and RNG state)."""


def model_state_files(tag_dir: str | os.PathLike[str]) -> list[Path]:
    """``mp_rank_XX_model_states.pt`` of a tag directory in rank order; ValueError if gappy."""
    tag_dir = Path(tag_dir)
    found: dict[int, Path] = {}
    for path in tag_dir.iterdir() if tag_dir.is_dir() else ():
        match = _MODEL_FILE.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise ValueError(f"{tag_dir}: no mp_rank_XX_model_states.pt files (not a checkpoint tag)")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{tag_dir}: model-states files for ranks {sorted(found)} are not 0..N-1")
    return [found[r] for r in range(len(found))]


def resolve_tag(load_dir: str | os.PathLike[str], tag: str | None = None) -> str:
    """``tag``, or the one named by ``load_dir/latest``."""
    if tag is not None:
        return tag
    latest = Path(load_dir) / "latest"
    if not latest.is_file():
        raise ValueError(f"{load_dir}: no 'latest' file; pass the checkpoint tag explicitly")
    return latest.read_text().strip()


def load_shards(tag_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every rank's model-states blob of one tag (CPU tensors)."""
    return [
        torch.load(p, map_location="cpu", weights_only=False) for p in model_state_files(tag_dir)
    ]


def merge_shards(
    shards: Sequence[Mapping[str, Tensor]], layout: Mapping[str, int | None]
) -> dict[str, Tensor]:
    """The full (tp = 1) state dict from ``len(shards)`` TP shards."""
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard) != names:
            raise ValueError(f"mp_rank_{rank:02d} holds different tensors than mp_rank_00")
    full: dict[str, Tensor] = {}
    for name in names:
        if name not in layout:
            raise ValueError(
                f"checkpoint tensor '{name}' is not a parameter of the model described by the "
                "config (different architecture?)"
            )
        dim = layout[name]
        parts = [shard[name] for shard in shards]
        if dim is None:
            for rank, part in enumerate(parts[1:], start=1):
                if not torch.equal(part, parts[0]):
                    raise ValueError(
                        f"replicated tensor '{name}' differs between mp_rank_00 and "
                        f"mp_rank_{rank:02d} (corrupt or not a tensor-parallel checkpoint)"
                    )
            full[name] = parts[0]
        else:
            full[name] = torch.cat(parts, dim=dim)
    missing = sorted(set(layout) - set(full))
    if missing:
        raise ValueError(f"checkpoint lacks model parameters {missing[:5]}")
    return full


def split_state(
    full: Mapping[str, Tensor], layout: Mapping[str, int | None], tp: int
) -> list[dict[str, Tensor]]:
    """``tp`` shards of a full state dict (replicated tensors copied to every shard)."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for name, tensor in full.items():
        dim = layout[name]
        if dim is None:
            pieces = [tensor] * tp
        else:
            if tensor.shape[dim] % tp:
                raise ValueError(
                    f"cannot split '{name}' {tuple(tensor.shape)} along dim {dim} into {tp} "
                    f"equal shards (for the vocabulary: pad it to a multiple of {tp})"
                )
            pieces = [p.clone() for p in tensor.chunk(tp, dim=dim)]
        for rank in range(tp):
            shards[rank][name] = pieces[rank]
    return shards


def _local_param_shapes(
    groups: list[Mapping[str, Any]], shard: Mapping[str, Tensor]
) -> list[dict[str, torch.Size]]:
    """DeepSpeed's per-optimizer-group ``param_shapes`` rewritten for the new shard."""
    return [{name: shard[name].shape for name in group if name in shard} for group in groups]


def reshard_checkpoint(
    load_dir: str | os.PathLike[str],
    save_dir: str | os.PathLike[str],
    tp: int,
    layout: Mapping[str, int | None],
    *,
    tag: str | None = None,
) -> ReshardResult:
    """Write ``save_dir/<tag>/mp_rank_XX_model_states.pt`` for ``tp`` ranks and ``latest``.

    Every non-weight entry of the model-states file (client state: iteration, consumed samples,
    LR schedule, config) is copied from ``mp_rank_00``; ``mp_world_size`` becomes ``tp``.
    """
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    tag = resolve_tag(load_dir, tag)
    src = Path(load_dir) / tag
    blobs = load_shards(src)
    if any(b.get("mp_world_size", len(blobs)) != len(blobs) for b in blobs):
        raise ValueError(
            f"{src}: mp_world_size in the files differs from their count {len(blobs)} "
            "(pipeline-parallel checkpoints are not supported by this tool)"
        )
    full = merge_shards([b["module"] for b in blobs], layout)
    dst = Path(save_dir) / tag
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} already exists and is not empty; choose another --save")
    dst.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for rank, shard in enumerate(split_state(full, layout, tp)):
        blob = dict(blobs[0])
        blob["module"] = shard
        blob["mp_world_size"] = tp
        blob["optimizer"] = None
        if isinstance(blob.get("param_shapes"), list):
            blob["param_shapes"] = _local_param_shapes(blob["param_shapes"], shard)
        blob[RESHARD_KEY] = {"from_tp": len(blobs), "to_tp": tp, "optimizer_state": "dropped"}
        path = dst / f"mp_rank_{rank:02d}_model_states.pt"
        torch.save(blob, path)
        written.append(path)
    (Path(save_dir) / "latest").write_text(tag)
    kept = {p.name for p in model_state_files(src)}
    dropped = sorted(p.name for p in src.iterdir() if p.name not in kept)
    return ReshardResult(tag, len(blobs), tp, written, dropped)


def _peek(tag_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``mp_rank_00``'s blob, memory-mapped (tensors are not read)."""
    path = model_state_files(tag_dir)[0]
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def reshard_info(tag_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``tp_reshard`` marker of a tag directory (None for a checkpoint written by training).

    A loader uses it to call ``load_checkpoint(..., load_optimizer_states=False)``.
    """
    info = _peek(tag_dir).get(RESHARD_KEY)
    return dict(info) if info is not None else None


def saved_config(tag_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run config snapshot the training loop stores in the client state (``"config"``)."""
    config = _peek(tag_dir).get("config")
    return dict(config) if isinstance(config, Mapping) else None
