"""Rewrite a DeepSpeed checkpoint's model weights for another (tensor, pipeline) layout.

A checkpoint tag directory holds one ``mp_rank_XX_model_states.pt`` per model-parallel rank
(DeepSpeed's naming; with ``pp == 1`` XX is the TP rank), each with the rank's shard of the
weights under ``"module"``. Resharding is pure bookkeeping because initialisation and the layers
agree on one rule: the full (tp = 1) tensor is the concatenation of the shards along the
parameter's partition dimension, in TP-rank order, and replicated tensors are identical on every
rank. So: merge (concatenate split tensors, check replicated ones agree), split into the new
count, write ``mp_rank_00 .. mp_rank_{N-1}`` plus ``latest``. The layout (name -> partition dim)
comes from the model definition (:func:`megatron_glm.parallel.layers.partition_dims` of a
meta-device model), never from name patterns.

Pipeline checkpoints (DeepSpeed's PipelineEngine, ``pp > 1``) store weights per layer instead:
``layer_II-model_TT-model_states.pt`` holds TP rank TT's shard of layer II's ``state_dict``, and
the ``pp * tp`` files ``mp_rank_XX`` hold the client state with ``"module": None``. Layer II is
``layers.II`` of the unpipelined model and the files do not depend on how the layers are split
over the stages, so converting between any two (tp, pp) layouts is the same merge and split
with a renaming (:func:`read_full_state`, :func:`write_checkpoint`).

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

from megatron_glm.serialization import CheckpointFileError, load_file, read_latest_tag

_MODEL_FILE = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
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
    """The files written: unpipelined, ``mp_rank_XX`` in TP-rank order; pipelined, the layer
    files (by TP rank, then layer) and then the ``mp_rank_XX`` client-state files."""
    dropped: list[str]
    """Files of the source tag not carried over (optimizer and RNG state)."""
    source_pp: int = 1
    target_pp: int = 1


def _model_files_by_rank(tag_dir: Path) -> dict[int, dict[int, Path]]:
    """mp rank -> dp rank -> model-states file (dp rank -1: one file for the whole DP group)."""
    found: dict[int, dict[int, Path]] = {}
    for path in tag_dir.iterdir() if tag_dir.is_dir() else ():
        match = _MODEL_FILE.fullmatch(path.name)
        if match:
            dp = -1 if match.group(1) is None else int(match.group(1))
            found.setdefault(int(match.group(2)), {})[dp] = path
    return found


def model_state_files(tag_dir: str | os.PathLike[str]) -> list[Path]:
    """One model-states file per model-parallel rank, in rank order; ValueError if gappy.

    ZeRO 0-2 write ``mp_rank_XX_model_states.pt``. ZeRO-3 writes one per data-parallel rank too
    (``zero_pp_rank_D_mp_rank_XX_model_states.pt``, each holding only that rank's partition of
    the weights): data-parallel rank 0's file stands for its model-parallel rank here (the client
    state is the same in all of them); :func:`is_zero3` tells the layouts apart.
    """
    tag_dir = Path(tag_dir)
    found = _model_files_by_rank(tag_dir)
    if not found:
        raise ValueError(
            f"{tag_dir}: no mp_rank_XX_model_states.pt or zero_pp_rank_D_mp_rank_XX_model_states"
            ".pt files (not a checkpoint tag)"
        )
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{tag_dir}: model-states files for ranks {sorted(found)} are not 0..N-1")
    dp_ranks = sorted(found[0])
    for mp, files in sorted(found.items()):
        if sorted(files) != dp_ranks or (dp_ranks != [-1] and dp_ranks != list(range(len(files)))):
            raise ValueError(
                f"{tag_dir}: model-states files of model-parallel rank {mp} cover data-parallel "
                f"ranks {sorted(files)}, expected {dp_ranks} (incomplete ZeRO-3 checkpoint?)"
            )
    return [files[min(files)] for _, files in sorted(found.items())]


def is_zero3(tag_dir: str | os.PathLike[str]) -> bool:
    """Whether a tag directory holds ZeRO-3 (weights partitioned over data-parallel ranks)."""
    return any(-1 not in files for files in _model_files_by_rank(Path(tag_dir)).values())


def checkpoint_files(tag_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``.pt`` file of a tag directory (DeepSpeed's and ours), sorted by name."""
    return sorted(p for p in Path(tag_dir).iterdir() if p.suffix == ".pt" and p.is_file())


def resolve_tag(load_dir: str | os.PathLike[str], tag: str | None = None) -> str:
    """``tag``, or the one named by ``load_dir/latest`` (validated: a directory inside it)."""
    if tag is not None:
        return tag
    latest = read_latest_tag(load_dir)
    if latest is None:
        raise ValueError(f"{load_dir}: no 'latest' file; pass the checkpoint tag explicitly")
    return latest


def load_shards(tag_dir: str | os.PathLike[str], *, mmap: bool = False) -> list[dict[str, Any]]:
    """Every model-parallel rank's model-states blob of one tag (CPU tensors, safe loader)."""
    return [load_file(p, mmap=mmap) for p in model_state_files(tag_dir)]


def merge_shards(
    shards: Sequence[Mapping[str, Tensor]], layout: Mapping[str, int | None] | None
) -> dict[str, Tensor]:
    """The full (tp = 1) state dict from ``len(shards)`` TP shards.

    ``layout=None`` is allowed for a single shard (nothing to merge or check names against).
    """
    if layout is None:
        if len(shards) != 1:
            raise ValueError(f"merging {len(shards)} TP shards needs the model's layout")
        return dict(shards[0])
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


def _layer_files(tag_dir: Path) -> dict[int, dict[int, Path]]:
    """Pipeline checkpoint: layer index -> TP rank -> ``layer_II-model_TT-model_states.pt``."""
    found: dict[int, dict[int, Path]] = {}
    for path in tag_dir.iterdir():
        match = _LAYER_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
    return found


def checkpoint_layout(tag_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """``(tp, pp)`` of a checkpoint tag directory, read off its file names.

    Unpipelined: one ``mp_rank_XX`` per TP rank. Pipelined (DeepSpeed's PipelineEngine): one
    ``layer_II-model_TT`` file per layer and TP rank, and one ``mp_rank_XX`` (client state, no
    weights) per model-parallel rank ``pp_rank * tp + tp_rank``.
    """
    tag_dir = Path(tag_dir)
    num_mp = len(model_state_files(tag_dir))
    layers = _layer_files(tag_dir)
    if not layers:
        return num_mp, 1
    tp = len(next(iter(layers.values())))
    for index, ranks in sorted(layers.items()):
        if sorted(ranks) != list(range(tp)):
            raise ValueError(
                f"{tag_dir}: layer {index} has files for TP ranks {sorted(ranks)}, "
                f"expected 0..{tp - 1}"
            )
    if num_mp % tp:
        raise ValueError(f"{tag_dir}: {num_mp} mp_rank files for tp {tp} (not pp x tp)")
    return tp, num_mp // tp


def read_full_state(
    tag_dir: str | os.PathLike[str], layout: Mapping[str, int | None] | None
) -> dict[str, Tensor]:
    """The full (tp = 1, pp = 1) ``GLMModel`` state dict of any (tp, pp) checkpoint tag.

    Pipeline layer files hold their layer's own ``state_dict``; layer ``i`` of the pipeline is
    ``layers.i`` of the model (the tied output head is not saved: it is the embedding).
    ZeRO-3 checkpoints keep the weights as flat fp32 partitions inside the optimizer states, one
    per data-parallel rank; they are refused here with a message saying so.
    """
    tag_dir = Path(tag_dir)
    if is_zero3(tag_dir):
        raise CheckpointFileError(
            f"{tag_dir}: a ZeRO-3 checkpoint (weights partitioned over data-parallel ranks) "
            "cannot be merged or resharded here yet; resume it with the same layout, or "
            "consolidate it with DeepSpeed's zero_to_fp32.py first"
        )
    layers = _layer_files(tag_dir)
    if not layers:
        return merge_shards([b["module"] for b in load_shards(tag_dir)], layout)
    tp, _ = checkpoint_layout(tag_dir)
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for index, ranks in sorted(layers.items()):
        for rank, path in ranks.items():
            state = load_file(path)
            shards[rank].update({f"layers.{index}.{k}": v for k, v in state.items()})
    return merge_shards(shards, layout)


def _client_blob(base: Mapping[str, Any], marker: dict[str, Any], mp_world_size: int) -> dict:
    """A model-states blob's non-weight entries for the new layout (optimizer dropped)."""
    blob = dict(base)
    blob["mp_world_size"] = mp_world_size
    blob["optimizer"] = None
    blob[RESHARD_KEY] = marker
    return blob


def write_checkpoint(
    full: Mapping[str, Tensor],
    layout: Mapping[str, int | None],
    dst: Path,
    *,
    tp: int,
    pp: int,
    base: Mapping[str, Any],
    marker: dict[str, Any],
) -> list[Path]:
    """Write ``full`` as a (tp, pp) checkpoint tag in ``dst``; returns the files in write order.

    pp = 1: ``mp_rank_TT`` with the TP shard under ``"module"`` (GLMModel names). pp > 1:
    DeepSpeed's pipeline layout, ``layer_II-model_TT`` per layer and TP rank (names inside the
    layer) plus ``mp_rank_XX`` for every model-parallel rank with ``"module": None``. Layer
    files do not depend on how layers are partitioned over the stages, so any partition loads.
    """
    written: list[Path] = []
    shards = split_state(full, layout, tp)
    if pp == 1:
        for rank, shard in enumerate(shards):
            blob = _client_blob(base, marker, tp)
            blob["module"] = shard
            shapes = base.get("param_shapes")
            if isinstance(shapes, list) and marker.get("from_pp", 1) == 1:
                blob["param_shapes"] = _local_param_shapes(shapes, shard)
            else:
                blob.pop("param_shapes", None)  # pipeline names: not this layout's
            written.append(dst / f"mp_rank_{rank:02d}_model_states.pt")
            torch.save(blob, written[-1])
        return written
    for rank, shard in enumerate(shards):
        by_layer: dict[int, dict[str, Tensor]] = {}
        for name, tensor in shard.items():
            match = _LAYER_KEY.fullmatch(name)
            if match is None:
                raise ValueError(f"'{name}' is not a layers.<i>.<name> tensor of the GLM")
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        for index, state in sorted(by_layer.items()):
            written.append(dst / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
            torch.save(state, written[-1])
    for mp_rank in range(pp * tp):
        blob = _client_blob(base, marker, pp * tp)
        blob["module"] = None
        blob.pop("param_shapes", None)
        written.append(dst / f"mp_rank_{mp_rank:02d}_model_states.pt")
        torch.save(blob, written[-1])
    return written


def reshard_checkpoint(
    load_dir: str | os.PathLike[str],
    save_dir: str | os.PathLike[str],
    tp: int,
    layout: Mapping[str, int | None],
    *,
    pp: int = 1,
    tag: str | None = None,
) -> ReshardResult:
    """Rewrite the checkpoint ``load_dir/<tag>`` for (``tp``, ``pp``) in ``save_dir`` + ``latest``.

    Any source layout (unpipelined or DeepSpeed pipeline files, any TP size) is read back to the
    full model (:func:`read_full_state`) and written for the target (:func:`write_checkpoint`).
    Every non-weight entry of the model-states file (client state: iteration, consumed samples,
    LR schedule, config) is copied from the source's ``mp_rank_00``.
    """
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if pp < 1:
        raise ValueError(f"--pp must be >= 1, got {pp}")
    tag = resolve_tag(load_dir, tag)
    src = Path(load_dir) / tag
    src_tp, src_pp = checkpoint_layout(src)
    base = _peek(src)  # mp_rank_00's client state; its weights are read by read_full_state
    if base.get("mp_world_size", src_tp * src_pp) != src_tp * src_pp:
        raise ValueError(
            f"{src}: mp_world_size {base.get('mp_world_size')} in mp_rank_00 differs from the "
            f"layout of the files (tp {src_tp} x pp {src_pp})"
        )
    full = read_full_state(src, layout)
    dst = Path(save_dir) / tag
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} already exists and is not empty; choose another --save")
    dst.mkdir(parents=True, exist_ok=True)
    marker: dict[str, Any] = {"from_tp": src_tp, "to_tp": tp, "optimizer_state": "dropped"}
    if max(src_pp, pp) > 1:
        marker.update(from_pp=src_pp, to_pp=pp)
    written = write_checkpoint(full, layout, dst, tp=tp, pp=pp, base=base, marker=marker)
    (Path(save_dir) / "latest").write_text(tag)
    weights = set(model_state_files(src)) | {
        p for r in _layer_files(src).values() for p in r.values()
    }
    dropped = sorted(p.name for p in src.iterdir() if p not in weights)
    return ReshardResult(tag, src_tp, tp, written, dropped, source_pp=src_pp, target_pp=pp)


def _peek(tag_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``mp_rank_00``'s blob, memory-mapped (tensors are not read)."""
    return load_file(model_state_files(tag_dir)[0], mmap=True)


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
