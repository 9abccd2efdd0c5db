"""Rewrite a checkpoint for another (tensor, pipeline) layout, with its optimizer state.

The model side is pure bookkeeping because initialisation and the layers agree on one rule: the
full (tp = 1) tensor is the concatenation of the shards along the parameter's partition
dimension, in TP-rank order, and replicated tensors are identical on every rank. The layout
(``GLMModel`` name -> partition dim) comes from the model definition
(:func:`megatron_glm.model.tensor_parallel_layout`, read off a meta-device model), never from
name patterns; where DeepSpeed put each shard (files, pipeline layer names) is
:mod:`.deepspeed_files`' business. So: read every shard under its ``GLMModel`` name
(:func:`read_weight_shards`), merge (concatenate split tensors, check replicated ones agree),
split into the new count, write the target files plus ``latest``.

Pipeline checkpoints store weights per layer (``layer_II`` holds ``layers.II`` of the model) and
do not depend on how the layers are split over the stages, so converting between any two
(tp, pp) layouts is the same merge and split with a renaming.

The optimizer state goes the same way (:mod:`.optimizer_state`): each TP rank's fp32 master
weights and Adam moments are rebuilt per parameter (shaped like that rank's weight shard),
merged with the same partition rule and stored as full tensors next to the new model files
(``optimizer_state.pt``); the loader slices them for its own layout after DeepSpeed has set up
the engine. Without readable optimizer state (``optimizer=False``, or a checkpoint that has
none) the marker says ``"dropped"`` and Adam's moments restart on load.

The padded vocabulary. With ``model.vocab_size = 0`` the embedding (and tied head) has the
tokenizer's size rounded up to ``make_vocab_size_divisible_by * tp`` rows, so it depends on tp:
8000 tokens are 8064 rows at tp 1 and 8192 at tp 2. Given the target's row count
(``vocab_rows``), resharding follows Megatron-LM's checkpoint converter
(``tools/checkpoint/saver_megatron.py``): padding rows beyond the target are cut, missing ones
are added as copies of the last row (a padding row, never a target), for the weight and for its
fp32 master and Adam moments alike. Real tokens keep their rows exactly; the resumed loss moves
only by the added (or removed) padding logits in the softmax.

The resharded checkpoint has ``"optimizer": None`` in its model-states files, no ZeRO files and
no per-rank RNG files (the ranks differ), and is marked with ``"tp_reshard"``
(:func:`reshard_info`); iteration, consumed samples and LR schedule in the client state are kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_glm.serialization import load_file
from megatron_glm.training.checkpoint.deepspeed_files import (
    checkpoint_layout,
    glm_name,
    is_optimizer_file,
    is_zero3,
    layer_file_name,
    layer_files,
    load_shards,
    model_state_files,
    model_states_name,
    read_zero3_weights,
    split_layer_name,
)
from megatron_glm.training.checkpoint.latest import resolve_tag, write_latest
from megatron_glm.training.checkpoint.optimizer_state import (
    STORE,
    FullOptimizerState,
    read_optimizer_state,
)

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
    files (by TP rank, then layer) and then the ``mp_rank_XX`` client-state files; last the
    optimizer state, when kept."""
    dropped: list[str]
    """Files of the source tag not carried over as files (RNG state; optimizer files whose
    content was dropped). Empty ZeRO files whose state went into the store are not listed."""
    source_pp: int = 1
    target_pp: int = 1
    optimizer_kept: bool = False
    vocab_rows: tuple[int, int] | None = None
    """(source, target) rows of the padded vocabulary when resharding changed them."""


VOCAB_PARAM = "word_embeddings.weight"
"""Suffix of the vocabulary-parallel parameter (embedding, also the tied output head)."""


def repad_vocab(tensor: Tensor, rows: int) -> Tensor:
    """``tensor`` (vocabulary rows first) with ``rows`` rows: padding cut, or the last row copied.

    Megatron-LM's converter rule; the caller guarantees ``rows`` covers the real vocabulary.
    """
    have = tensor.shape[0]
    if rows <= have:
        return tensor[:rows]
    return torch.cat([tensor, tensor[-1:].expand(rows - have, *tensor.shape[1:])])


def _repad_all(
    full: dict[str, Tensor], state: FullOptimizerState | None, rows: int | None
) -> tuple[int, int] | None:
    """Re-pad every vocabulary tensor (weights and optimizer state) in place; (old, new) rows."""
    names = [n for n in full if n.endswith(VOCAB_PARAM)]
    if rows is None or not names or full[names[0]].shape[0] == rows:
        return None
    old = full[names[0]].shape[0]
    for name in names:
        full[name] = repad_vocab(full[name], rows)
        for tensors in state.tensors.values() if state is not None else ():
            if name in tensors:
                tensors[name] = repad_vocab(tensors[name], rows)
    return old, rows


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
        full[name] = merge_tensor(name, [shard[name] for shard in shards], layout[name])
    missing = sorted(set(layout) - set(full))
    if missing:
        raise ValueError(f"checkpoint lacks model parameters {missing[:5]}")
    return full


def merge_tensor(name: str, parts: list[Tensor], dim: int | None) -> Tensor:
    """One full tensor from its TP pieces: concatenated along ``dim``, or (replicated, ``dim``
    None) the first piece after checking the others equal it."""
    if dim is not None:
        return torch.cat(parts, dim=dim)
    for rank, part in enumerate(parts[1:], start=1):
        if not torch.equal(part, parts[0]):
            raise ValueError(
                f"replicated tensor '{name}' differs between mp_rank_00 and "
                f"mp_rank_{rank:02d} (corrupt or not a tensor-parallel checkpoint)"
            )
    return parts[0]


def split_state(
    full: Mapping[str, Tensor], layout: Mapping[str, int | None], tp: int
) -> list[dict[str, Tensor]]:
    """``tp`` shards of a full state dict (replicated tensors copied to every shard)."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for name, tensor in full.items():
        for rank, piece in enumerate(split_tensor(name, tensor, layout[name], tp)):
            shards[rank][name] = piece
    return shards


def split_tensor(name: str, tensor: Tensor, dim: int | None, tp: int) -> list[Tensor]:
    """``tensor``'s ``tp`` TP pieces (its own copies; a replicated tensor itself, ``tp`` times)."""
    check_splits(name, tensor.shape, dim, tp)
    return [tensor] * tp if dim is None else [p.clone() for p in tensor.chunk(tp, dim=dim)]


def check_splits(name: str, shape: torch.Size, dim: int | None, tp: int) -> None:
    """ValueError naming the tensor unless its split dimension divides into ``tp`` pieces."""
    if dim is not None and shape[dim] % tp:
        raise ValueError(
            f"cannot split '{name}' {tuple(shape)} along dim {dim} into {tp} "
            f"equal shards (for the vocabulary: pad it to a multiple of {tp})"
        )


def _local_param_shapes(
    groups: list[Mapping[str, Any]], shard: Mapping[str, Tensor]
) -> list[dict[str, torch.Size]]:
    """DeepSpeed's per-optimizer-group ``param_shapes`` rewritten for the new shard."""
    return [{name: shard[name].shape for name in group if name in shard} for group in groups]


def read_weight_shards(tag_dir: str | os.PathLike[str]) -> list[dict[str, Tensor]]:
    """Each TP rank's shard of the whole model (every pipeline stage), by ``GLMModel`` name.

    Pipeline layer files hold their layer's own ``state_dict``; layer ``i`` of the pipeline is
    ``layers.i`` of the model (the tied output head is not saved: it is the embedding).
    ZeRO-3 checkpoints (never pipelined: DeepSpeed's pipeline takes ZeRO 0-1) keep the weights
    as flat fp32 partitions inside the optimizer-state files, one per data-parallel rank; each
    TP rank's full fp32 tensors are gathered from them
    (:func:`.deepspeed_files.read_zero3_weights`).
    """
    tag_dir = Path(tag_dir)
    if is_zero3(tag_dir):
        return [
            {glm_name(n, pipeline=False): t for n, t in read_zero3_weights(tag_dir, mp).items()}
            for mp in range(len(model_state_files(tag_dir)))
        ]
    layers = layer_files(tag_dir)
    if not layers:
        return [dict(b["module"]) for b in load_shards(tag_dir)]
    tp, _ = checkpoint_layout(tag_dir)
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for index, ranks in sorted(layers.items()):
        for rank, path in ranks.items():
            state = load_file(path)
            shards[rank].update({f"layers.{index}.{k}": v for k, v in state.items()})
    return shards


def read_full_state(
    tag_dir: str | os.PathLike[str], layout: Mapping[str, int | None] | None
) -> dict[str, Tensor]:
    """The full (tp = 1, pp = 1) ``GLMModel`` state dict of any (tp, pp) checkpoint tag."""
    return merge_shards(read_weight_shards(tag_dir), layout)


def _client_blob(base: Mapping[str, Any], marker: dict[str, Any], mp_world_size: int) -> dict:
    """A model-states blob's non-weight entries for the new layout (no DeepSpeed optimizer)."""
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
    """Write ``full`` as a (tp, pp) checkpoint tag in ``dst``; returns the files, the layer
    files by TP rank then layer, then the ``mp_rank_XX`` files.

    pp = 1: ``mp_rank_TT`` with the TP shard under ``"module"`` (GLMModel names). pp > 1:
    DeepSpeed's pipeline layout, ``layer_II-model_TT`` per layer and TP rank (names inside the
    layer) plus ``mp_rank_XX`` for every model-parallel rank with ``"module": None``. Layer
    files do not depend on how layers are partitioned over the stages, so any partition loads.

    One file is built at a time: pp = 1, each TP rank's shard in turn (``full[name]`` is looked
    up once per rank and only that rank's piece kept); pp > 1, layer by layer (each tensor looked
    up once, its pieces written to the layer's ``tp`` files). ``full`` may be a lazy mapping that
    reads and converts a tensor on lookup (the Hugging Face import): then peak memory is one
    output file plus one tensor, never the model.
    """
    if pp == 1:
        return [
            _write_tp_shard(dst, rank, _tp_shard(full, layout, tp, rank), base, marker, tp)
            for rank in range(tp)
        ]
    by_layer: dict[int, list[str]] = {}
    for name in full:
        by_layer.setdefault(split_layer_name(name)[0], []).append(name)
    layer_paths: dict[tuple[int, int], Path] = {}
    for index, names in sorted(by_layer.items()):
        pieces = {name: split_tensor(name, full[name], layout[name], tp) for name in names}
        for rank in range(tp):
            state = {split_layer_name(n)[1]: p[rank] for n, p in pieces.items()}
            layer_paths[rank, index] = dst / layer_file_name(index, rank)
            torch.save(state, layer_paths[rank, index])
    written = [layer_paths[key] for key in sorted(layer_paths)]
    for mp_rank in range(pp * tp):
        blob = _client_blob(base, marker, pp * tp)
        blob["module"] = None
        blob.pop("param_shapes", None)
        written.append(dst / model_states_name(mp_rank))
        torch.save(blob, written[-1])
    return written


def _tp_shard(
    full: Mapping[str, Tensor], layout: Mapping[str, int | None], tp: int, rank: int
) -> dict[str, Tensor]:
    """TP rank ``rank``'s shard, one tensor looked up at a time (its other pieces dropped)."""
    shard: dict[str, Tensor] = {}
    for name in full:
        tensor, dim = full[name], layout[name]
        check_splits(name, tensor.shape, dim, tp)
        shard[name] = tensor if dim is None or tp == 1 else tensor.chunk(tp, dim=dim)[rank].clone()
    return shard


def _write_tp_shard(
    dst: Path,
    rank: int,
    shard: dict[str, Tensor],
    base: Mapping[str, Any],
    marker: dict[str, Any],
    tp: int,
) -> Path:
    blob = _client_blob(base, marker, tp)
    blob["module"] = shard
    shapes = base.get("param_shapes")
    if isinstance(shapes, list) and marker.get("from_pp", 1) == 1:
        blob["param_shapes"] = _local_param_shapes(shapes, shard)
    else:
        blob.pop("param_shapes", None)  # pipeline names: not this layout's
    path = dst / model_states_name(rank)
    torch.save(blob, path)
    return path


def reshard_checkpoint(
    load_dir: str | os.PathLike[str],
    save_dir: str | os.PathLike[str],
    tp: int,
    layout: Mapping[str, int | None],
    *,
    pp: int = 1,
    tag: str | None = None,
    optimizer: bool = True,
    vocab_rows: int | None = None,
) -> ReshardResult:
    """Rewrite the checkpoint ``load_dir/<tag>`` for (``tp``, ``pp``) in ``save_dir`` + ``latest``.

    Any source layout (unpipelined or DeepSpeed pipeline files, any TP size, ZeRO 0-3) is read
    back to the full model (:func:`read_weight_shards`) and written for the target
    (:func:`write_checkpoint`); its optimizer state, unless ``optimizer`` is False, goes into
    ``optimizer_state.pt`` (:func:`.optimizer_state.read_optimizer_state`). Every non-weight
    entry of the model-states file (client state: iteration, consumed samples, LR schedule,
    config) is copied from the source's ``mp_rank_00``. ``vocab_rows``: the target layout's
    padded vocabulary (module docstring); None keeps the source's.
    """
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if pp < 1:
        raise ValueError(f"--pp must be >= 1, got {pp}")
    tag = resolve_tag(load_dir, tag)
    src = _Source.read(Path(load_dir) / tag, layout, tp, optimizer=optimizer, vocab_rows=vocab_rows)
    dst = Path(save_dir) / tag
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} already exists and is not empty; choose another --save")
    dst.mkdir(parents=True, exist_ok=True)
    kept = src.state is not None
    marker: dict[str, Any] = {
        "from_tp": src.tp,
        "to_tp": tp,
        "optimizer_state": "kept" if kept else "dropped",
    }
    if max(src.pp, pp) > 1:
        marker.update(from_pp=src.pp, to_pp=pp)
    written = write_checkpoint(src.full, layout, dst, tp=tp, pp=pp, base=src.base, marker=marker)
    if src.state is not None:
        written.append(dst / STORE)
        src.state.save(written[-1])
    write_latest(save_dir, tag)
    dropped = _not_carried(src.tag_dir, optimizer_kept=kept)
    return ReshardResult(
        tag,
        src.tp,
        tp,
        written,
        dropped,
        source_pp=src.pp,
        target_pp=pp,
        optimizer_kept=kept,
        vocab_rows=src.vocab_rows,
    )


@dataclass(frozen=True)
class _Source:
    """What resharding takes from the source tag: layout, client state, weights, optimizer."""

    tag_dir: Path
    tp: int
    pp: int
    base: dict[str, Any]
    """``mp_rank_00``'s blob (client state); its weights are read by read_weight_shards."""
    full: dict[str, Tensor]
    state: FullOptimizerState | None
    vocab_rows: tuple[int, int] | None

    @classmethod
    def read(
        cls,
        src: Path,
        layout: Mapping[str, int | None],
        target_tp: int,
        *,
        optimizer: bool,
        vocab_rows: int | None,
    ) -> _Source:
        """Everything of ``src``, the vocabulary re-padded to ``vocab_rows``; the target's split
        errors come before the optimizer is read."""
        src_tp, src_pp = checkpoint_layout(src)
        base = _peek(src)
        if base.get("mp_world_size", src_tp * src_pp) != src_tp * src_pp:
            raise ValueError(
                f"{src}: mp_world_size {base.get('mp_world_size')} in mp_rank_00 differs from "
                f"the layout of the files (tp {src_tp} x pp {src_pp})"
            )
        shards = read_weight_shards(src)
        full = merge_shards(shards, layout)
        for name, tensor in full.items():
            rows = vocab_rows if name.endswith(VOCAB_PARAM) else None
            check_splits(
                name,
                repad_vocab(tensor, rows).shape if rows else tensor.shape,
                layout[name],
                target_tp,
            )
        state = read_optimizer_state(src, shards, layout, pp=src_pp) if optimizer else None
        repadded = _repad_all(full, state, vocab_rows)
        return cls(src, src_tp, src_pp, base, full, state, repadded)


def _not_carried(src: Path, *, optimizer_kept: bool) -> list[str]:
    """Source files whose content the resharded checkpoint does not hold."""
    weights = set(model_state_files(src)) | {
        p for r in layer_files(src).values() for p in r.values()
    }
    dropped = []
    for path in sorted(src.iterdir()):
        optimizer_file = is_optimizer_file(path.name) or path.name == STORE
        if path in weights or (optimizer_kept and optimizer_file):
            continue
        dropped.append(path.name)
    return dropped


def _peek(tag_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``mp_rank_00``'s blob, memory-mapped (tensors are not read)."""
    return load_file(model_state_files(tag_dir)[0], mmap=True)


def reshard_info(tag_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``tp_reshard`` marker of a tag directory (None for a checkpoint written by training).

    The loader reads it to load DeepSpeed's part without optimizer files (there are none) and
    the optimizer state from ``optimizer_state.pt`` when the marker says ``"kept"``.
    """
    info = _peek(tag_dir).get(RESHARD_KEY)
    return dict(info) if info is not None else None


def saved_config(tag_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run config snapshot the training loop stores in the client state (``"config"``)."""
    config = _peek(tag_dir).get("config")
    return dict(config) if isinstance(config, Mapping) else None
