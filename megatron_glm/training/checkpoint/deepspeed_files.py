"""DeepSpeed's names, in one place: checkpoint files, model-parallel ranks, pipeline parameters.

Everything else in the checkpoint package speaks in GLM terms (``GLMModel`` state-dict names such
as ``layers.3.attention.dense.weight``, TP ranks, pipeline stages). This module is the only one
that knows how DeepSpeed 0.19 lays those out on disk and inside a ``PipelineModule``:

- ``mp_rank_XX_model_states.pt``: one per model-parallel rank ``XX = pp_rank * tp + tp_rank``
  (:class:`megatron_glm.parallel.dims.ParallelDims` is DeepSpeed's ``mpu``; its model-parallel
  group is the ``pp * tp`` ranks of one replica, in global-rank order); unpipelined it holds the
  TP shard under ``"module"``, pipelined ``"module": None``. ZeRO-3 writes one per data-parallel
  rank instead (``zero_pp_rank_D_mp_rank_XX_model_states.pt``).
- ``layer_II-model_TT-model_states.pt``: pipeline layer ``II``'s ``state_dict`` on TP rank ``TT``.
- ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` (``bf16_zero_...`` for DeepSpeed's bf16
  optimizer without ZeRO): data-parallel rank ``D``'s flat ZeRO partition of the optimizer;
  under ZeRO-3 also the only copy of the weights (:func:`read_zero3_weights`).
- Pipeline parameter names: layer ``I`` of the ``PipelineModule`` is registered as module
  ``"I"``; the tied embedding / output head lives under ``tied_modules.<key>`` on the first and
  the last stage. ``training.pipeline`` puts ``GLMModel.layers[I]`` at layer ``I``, so the GLM
  name is ``layers.I.<rest>`` (the tied module is ``layers.0``, the embedding).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_glm.serialization import CheckpointFileError, load_file

_MODEL_FILE = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_PIPE_KEY = re.compile(r"(\d+)\.(.+)")
TIED_KEY = "word_embeddings"
"""Key of the tied embedding / output head in the GLM ``PipelineModule`` (its ``TiedLayerSpec``,
``training.pipeline``); DeepSpeed saves the tied parameters as ``tied_modules.<key>.*``."""
_TIED_PREFIX = f"tied_modules.{TIED_KEY}."


def model_states_name(mp_rank: int) -> str:
    """The model-states file of a model-parallel rank (ZeRO 0-2)."""
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def layer_file_name(layer: int, tp_rank: int) -> str:
    """A pipeline checkpoint's file of one layer's TP shard."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_of(pp_rank: int, tp_rank: int, tp: int) -> int:
    """DeepSpeed's model-parallel rank of (pipeline stage, TP rank)."""
    return pp_rank * tp + tp_rank


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


def load_shards(tag_dir: str | os.PathLike[str], *, mmap: bool = False) -> list[dict[str, Any]]:
    """Every model-parallel rank's model-states blob of one tag (CPU tensors, safe loader)."""
    return [load_file(p, mmap=mmap) for p in model_state_files(tag_dir)]


def layer_files(tag_dir: str | os.PathLike[str]) -> dict[int, dict[int, Path]]:
    """Pipeline checkpoint: layer index -> TP rank -> ``layer_II-model_TT-model_states.pt``."""
    found: dict[int, dict[int, Path]] = {}
    for path in Path(tag_dir).iterdir():
        match = _LAYER_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
    return found


def optimizer_files(tag_dir: str | os.PathLike[str], mp_rank: int) -> list[Path]:
    """A model-parallel rank's ZeRO optimizer-state files in data-parallel rank order ([] if none).

    A gap in the data-parallel ranks is an error naming the directory: the flat partitions
    only make sense all together.
    """
    tag_dir = Path(tag_dir)
    found: dict[int, Path] = {}
    for path in tag_dir.iterdir():
        match = _OPTIM_FILE.fullmatch(path.name)
        if match and int(match.group(2)) == mp_rank:
            found[int(match.group(1))] = path
    if sorted(found) != list(range(len(found))):
        raise ValueError(
            f"{tag_dir}: ZeRO optimizer-state files of model-parallel rank {mp_rank} cover "
            f"data-parallel ranks {sorted(found)}, expected 0..{len(found) - 1} (incomplete?)"
        )
    return [found[d] for d in range(len(found))]


def is_optimizer_file(name: str) -> bool:
    """Whether a file name is one of DeepSpeed's ZeRO optimizer-state files."""
    return _OPTIM_FILE.fullmatch(name) is not None


def checkpoint_layout(tag_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """``(tp, pp)`` of a checkpoint tag directory, read off its file names.

    Unpipelined: one ``mp_rank_XX`` per TP rank. Pipelined (DeepSpeed's PipelineEngine): one
    ``layer_II-model_TT`` file per layer and TP rank, and one ``mp_rank_XX`` (client state, no
    weights) per model-parallel rank ``pp_rank * tp + tp_rank``.
    """
    tag_dir = Path(tag_dir)
    num_mp = len(model_state_files(tag_dir))
    layers = layer_files(tag_dir)
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


def split_layer_name(name: str) -> tuple[int, str]:
    """``layers.I.rest`` (a GLM name) -> ``(I, rest)``: the pipeline layer and its own name."""
    match = _LAYER_KEY.fullmatch(name)
    if match is None:
        raise ValueError(f"'{name}' is not a layers.<i>.<name> tensor of the GLM")
    return int(match.group(1)), match.group(2)


def glm_name(module_name: str, *, pipeline: bool) -> str:
    """The ``GLMModel`` name of an engine module's parameter.

    Unpipelined the engine's module already uses ``GLMModel``'s names. A ``PipelineModule``
    names layer ``I``'s parameters ``I.<rest>`` and the tied embedding / head
    ``tied_modules.word_embeddings.<rest>`` (both copies: the embedding, ``layers.0``).
    """
    if not pipeline:
        return module_name
    if module_name.startswith(_TIED_PREFIX):
        return f"layers.0.{module_name.removeprefix(_TIED_PREFIX)}"
    match = _PIPE_KEY.fullmatch(module_name)
    if match is None:
        raise ValueError(f"'{module_name}' is not a parameter name of the GLM pipeline")
    return f"layers.{match.group(1)}.{match.group(2)}"


@dataclass
class ZeroGroup:
    """One optimizer param group of a ZeRO-1/2 optimizer-state file (one data-parallel rank)."""

    slices: dict[str, Any]
    """Module parameter name -> ``fragment_address`` (start, numel) inside this partition."""
    flat: dict[str, Tensor]
    """``fp32`` (master weights), ``exp_avg``, ``exp_avg_sq``: this rank's flat partitions."""
    step: int
    """Adam's step count of the group (0 before the first update)."""


def read_zero_partition(path: Path) -> list[ZeroGroup]:
    """The param groups of one ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` (restricted loader).

    The layout is DeepSpeed's ``DeepSpeedZeroOptimizer.state_dict()`` (also
    ``BF16_Optimizer``'s): per group a flat fp32 partition, the torch optimizer's state of that
    flat tensor (empty before the first step) and ``param_slice_mappings``, where each parameter
    with elements in this partition starts and how many it has there.
    """
    from deepspeed.checkpoint.constants import (  # deferred: importing deepspeed takes seconds
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    from megatron_glm.compat.deepspeed import load_deepspeed_file

    try:
        osd = load_deepspeed_file(str(path), mmap=True)[OPTIMIZER_STATE_DICT]
        partitions = osd[SINGLE_PARTITION_OF_FP32_GROUPS]
        base = osd[BASE_OPTIMIZER_STATE]["state"]
        mappings = osd[PARAM_SLICE_MAPPINGS]
    except (KeyError, TypeError) as exc:
        raise CheckpointFileError(
            f"{path}: not a ZeRO-1/2 optimizer-state file (no {exc}); DeepSpeed older than 0.10 "
            "does not record which parameter each slice belongs to"
        ) from None
    groups = []
    for index, (flat, slices) in enumerate(zip(partitions, mappings, strict=True)):
        state = base.get(index, {})
        zeros = torch.zeros_like(flat)
        groups.append(
            ZeroGroup(
                slices=dict(slices),
                flat={
                    "fp32": flat,
                    "exp_avg": state.get("exp_avg", zeros),
                    "exp_avg_sq": state.get("exp_avg_sq", zeros),
                },
                step=int(state.get("step", 0)),
            )
        )
    return groups


def read_zero3_weights(tag_dir: str | os.PathLike[str], mp_rank: int) -> dict[str, Tensor]:
    """A ZeRO-3 model-parallel rank's full fp32 weights, by module name, in DeepSpeed's order.

    ZeRO-3 keeps no weights in the model-states files: each parameter is split over the ``D``
    data-parallel ranks, rank ``d`` holding ``ceil(numel / D)`` of its elements (the last rank's
    share zero-padded) in its ``fp32_flat_groups`` of ``zero_pp_rank_d_mp_rank_XX_optim_states
    .pt``. The parameters lie one after another in every rank's flat groups (read as one
    concatenated buffer), in the order of the model-states file's ``param_shapes``, which also
    gives the full shapes. Rebuilt as DeepSpeed's ``zero_to_fp32.py`` does for stage 3
    (``_zero3_merge_trainable_params``): per parameter, the ranks' pieces concatenated in rank
    order and cut to ``numel``; all files read through the restricted loader, memory-mapped.
    """
    tag_dir = Path(tag_dir)
    models = _model_files_by_rank(tag_dir).get(mp_rank, {})
    optims = optimizer_files(tag_dir, mp_rank)
    if not optims or len(optims) != len(models):
        raise CheckpointFileError(
            f"{tag_dir}: ZeRO-3 model-parallel rank {mp_rank} has {len(models)} model-states "
            f"and {len(optims)} optimizer-state files (zero_pp_rank_D_mp_rank_{mp_rank:02d}_"
            "optim_states.pt, one per data-parallel rank, hold its weights): incomplete checkpoint"
        )
    blob = load_file(models[0], mmap=True)
    shapes = _zero3_param_shapes(blob, models[0])
    flats = [_zero3_flat_groups(path, len(optims)) for path in optims]
    weights = _gather_zero3(shapes, flats, optims[0])
    buffers = blob.get("buffer_names") or []
    weights.update({n: t.float() for n, t in (blob.get("module") or {}).items() if n in buffers})
    return weights


def _zero3_param_shapes(blob: Any, path: Path) -> dict[str, torch.Size]:
    """``param_shapes`` (a list of per-group ordered dicts), flattened in order."""
    groups = blob.get("param_shapes") if isinstance(blob, dict) else None
    if not isinstance(groups, list):
        raise CheckpointFileError(f"{path}: no 'param_shapes' (not a ZeRO-3 model-states file)")
    return {name: torch.Size(shape) for group in groups for name, shape in group.items()}


def _zero3_flat_groups(path: Path, dp: int) -> list[Tensor]:
    """One data-parallel rank's fp32 flat groups; its partition count must be ``dp``."""
    from deepspeed.checkpoint.constants import (  # deferred: importing deepspeed takes seconds
        FP32_FLAT_GROUPS,
        OPTIMIZER_STATE_DICT,
        PARTITION_COUNT,
    )

    from megatron_glm.compat.deepspeed import load_deepspeed_file

    try:
        osd = load_deepspeed_file(str(path), mmap=True)[OPTIMIZER_STATE_DICT]
        flats, count = list(osd[FP32_FLAT_GROUPS]), osd[PARTITION_COUNT]
    except (KeyError, TypeError) as exc:
        raise CheckpointFileError(f"{path}: not a ZeRO-3 optimizer-state file (no {exc})") from None
    counts = set(count) if isinstance(count, list) else {count}
    if counts != {dp}:
        raise CheckpointFileError(
            f"{path}: partitioned over {sorted(counts)} data-parallel ranks, the tag has {dp} "
            "optimizer-state files for this model-parallel rank"
        )
    return flats


def _gather_zero3(
    shapes: dict[str, torch.Size], flats: list[list[Tensor]], where: Path
) -> dict[str, Tensor]:
    """Each parameter's pieces from every rank's flat groups, joined and cut to its shape."""
    dp = len(flats)
    sizes = [[t.numel() for t in rank] for rank in flats]
    if any(s != sizes[0] for s in sizes):
        raise CheckpointFileError(f"{where}: ZeRO-3 flat groups differ in size between ranks")
    bounds = [0, *torch.tensor(sizes[0], dtype=torch.long).cumsum(0).tolist()]
    out, offset = {}, 0
    for name, shape in shapes.items():
        part = -(-shape.numel() // dp)  # ceil: every rank holds this many, the tail padded
        if offset + part > bounds[-1]:
            raise CheckpointFileError(
                f"{where}: ZeRO-3 flat groups hold {bounds[-1]} elements per rank, too few for "
                f"'{name}' {tuple(shape)} at offset {offset}"
            )
        pieces = [_flat_range(rank, bounds, offset, part) for rank in flats]
        out[name] = torch.cat(pieces)[: shape.numel()].view(shape)
        offset += part
    if offset != bounds[-1]:
        raise CheckpointFileError(
            f"{where}: parameters take {offset} of the {bounds[-1]} elements of each rank's "
            "ZeRO-3 flat groups (param_shapes does not describe this partition)"
        )
    return out


def _flat_range(groups: list[Tensor], bounds: list[int], start: int, numel: int) -> Tensor:
    """Elements ``[start, start + numel)`` of ``groups`` read as one concatenated buffer."""
    pieces = []
    for index, flat in enumerate(groups):
        lo, hi = max(start, bounds[index]), min(start + numel, bounds[index + 1])
        if lo < hi:
            pieces.append(flat.narrow(0, lo - bounds[index], hi - lo))
    if not pieces:  # a parameter without elements
        return groups[0].new_empty(0)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
