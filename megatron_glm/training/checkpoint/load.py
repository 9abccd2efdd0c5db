"""Loading: pre-launch checks on the files, then model, optimizer, schedule and RNG into an engine.

Loading is safe and exact (see :mod:`megatron_glm.serialization`): every file is read with torch's
restricted unpickler (DeepSpeed's through :mod:`megatron_glm.compat.deepspeed`), so a planted
pickle is refused naming the file; every rank checks that its own RNG file exists and the group
refuses to resume when any rank lacks one (``checkpoint.allow_missing_rng`` turns that into a
warning on every affected rank), since a rank with freshly seeded dropout makes the resume drift
silently. :func:`check_checkpoint` runs the same checks on the files before any process starts.

A checkpoint rewritten for another layout by ``tools/reshard_checkpoint.py`` (marked, see
:func:`.reshard.reshard_info`) has no DeepSpeed optimizer files and no RNG files: DeepSpeed loads
its weights with ``load_optimizer_states=False``, then the optimizer state comes from its
``optimizer_state.pt`` (:func:`.optimizer_state.restore_optimizer_state`), or restarts if the
reshard dropped it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_glm.config import ConfigError, ModelConfig, from_dict
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.serialization import LATEST, CheckpointFileError, load_file
from megatron_glm.training.checkpoint.deepspeed_files import (
    checkpoint_files,
    checkpoint_layout,
    load_shards,
    model_state_files,
)
from megatron_glm.training.checkpoint.group import rank, ranks_where
from megatron_glm.training.checkpoint.latest import read_latest
from megatron_glm.training.checkpoint.optimizer_state import STORE, restore_optimizer_state
from megatron_glm.training.checkpoint.reshard import read_full_state, reshard_info, saved_config
from megatron_glm.training.checkpoint.state import (
    LAYOUT,
    MODEL_PARALLEL_RNG,
    ClientState,
    rng_file,
    set_rng_state,
)
from megatron_glm.training.engine import Engine

logger = logging.getLogger(__name__)


def _saved_layout_record(load_dir: str, tag: str) -> dict[str, int] | None:
    """``layout.json`` of a tag, validated; None if the checkpoint has none (resharded)."""
    path = Path(load_dir) / tag / LAYOUT
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        record = {k: int(saved[k]) for k in ("iteration", "dp_size", "zero_stage")}
        record.update({k: int(saved.get(k, 1)) for k in ("tp", "pp")})
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointFileError(
            f"{path}: not a valid layout file ({type(exc).__name__}: {exc}); expected JSON with "
            "iteration, tp, pp, dp_size, zero_stage"
        ) from None
    return record


def check_layout(load_dir: str, *, dp_size: int, zero_stage: int, tp: int = 1, pp: int = 1) -> None:
    """Refuse, before any process starts, a checkpoint this layout cannot load.

    Model shards are per TP rank (and per pipeline stage): another tp or pp needs
    ``tools/reshard_checkpoint.py`` first. DeepSpeed stores ZeRO-1/2/3 optimizer state as one
    partition per data-parallel rank and cannot re-partition it on load; it would fail after
    start-up, on every rank (the reshard tool rewrites it for any data-parallel size). ZeRO-0
    checkpoints hold the full state and load at any data-parallel size.
    """
    tag = read_latest(load_dir)
    if tag is None:
        return
    saved = _saved_layout_record(load_dir, tag)
    if saved is None:
        return  # written by DeepSpeed directly, resharded or older: let DeepSpeed decide
    s_tp, s_pp = saved["tp"], saved["pp"]
    if (s_tp, s_pp) != (tp, pp):
        pp_flag = f" --pp {pp}" if max(pp, s_pp) > 1 else ""
        raise ConfigError(
            "parallel.tp",
            f"checkpoint {load_dir}/{tag} was written with tp {s_tp}, pp {s_pp}, this run is "
            f"tp {tp}, pp {pp}; convert it first with "
            f"python tools/reshard_checkpoint.py --load {load_dir} --tp {tp}{pp_flag} "
            "--save NEW_DIR (the optimizer state is carried over)",
        )
    s_dp, s_zero = saved["dp_size"], saved["zero_stage"]
    partitioned = s_zero > 0 or zero_stage > 0
    if partitioned and (s_dp, s_zero) != (dp_size, zero_stage):
        pp_flag = f" --pp {pp}" if pp > 1 else ""
        raise ConfigError(
            "train.zero_stage",
            f"checkpoint {load_dir}/{tag} was written with ZeRO-{s_zero} at data-parallel size "
            f"{s_dp}, this run is ZeRO-{zero_stage} at data-parallel size {dp_size}; DeepSpeed "
            "cannot re-partition ZeRO optimizer state. Resume with the same layout, or rewrite it "
            f"with python tools/reshard_checkpoint.py --load {load_dir} --tp {tp}{pp_flag} "
            "--save NEW_DIR and set checkpoint.load=NEW_DIR (the optimizer state is carried over)",
        )


def describe_saved_layout(load_dir: str) -> str:
    """``latest``'s tag, step and the layout that wrote it, in words (for a dry run)."""
    tag = read_latest(load_dir)
    if tag is None:
        return f"no '{LATEST}' file"
    saved = _saved_layout_record(load_dir, tag)
    if saved is None:  # resharded or written by DeepSpeed directly: the file names tell tp, pp
        tp, pp = checkpoint_layout(Path(load_dir) / tag)
        return f"{tag}, written at tp {tp}, pp {pp} (no {LAYOUT}: data parallel size unknown)"
    return (
        f"{tag} (step {saved['iteration']}), written at tp {saved['tp']}, pp {saved['pp']}, "
        f"data parallel {saved['dp_size']}, ZeRO-{saved['zero_stage']}"
    )


ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "max_position_embeddings",
    "layernorm_epsilon",
    "gelu",
)
"""``ModelConfig`` fields that define the function the weights compute (dropout, init and
kernel choices do not): a resumed run must use the checkpoint's values."""


def check_architecture(load_dir: str, model: ModelConfig) -> None:
    """Refuse, before launch, a run whose model differs from the checkpoint's snapshot.

    Most differences would fail later as a shape mismatch deep in DeepSpeed's loader; some
    (``gelu``, ``layernorm_epsilon``) would not fail at all and would silently train the
    weights as another function, e.g. an erf-GeLU model imported with ``from-hf`` resumed by a
    YAML left at the default tanh. A checkpoint without a snapshot is let through.
    """
    tag = read_latest(load_dir)
    saved = saved_config(Path(load_dir) / tag) if tag is not None else None
    if saved is None or not isinstance(saved.get("model"), Mapping):
        return
    theirs = from_dict(ModelConfig, dict(saved["model"]), prefix="model.")
    differ = [f for f in ARCHITECTURE_FIELDS if _arch_value(theirs, f) != _arch_value(model, f)]
    if differ:
        pairs = ", ".join(
            f"model.{f}: checkpoint {getattr(theirs, f)!r}, run {getattr(model, f)!r}"
            for f in differ
        )
        fix = " ".join(f"model.{f}={getattr(theirs, f)}" for f in differ)
        raise ConfigError(
            f"model.{differ[0]}",
            f"checkpoint {load_dir}/{tag} holds another model ({pairs}); resume with the "
            f"checkpoint's values (overrides: {fix})",
        )


def _arch_value(cfg: ModelConfig, name: str) -> Any:
    """A field's effective value (``ffn_hidden_size`` None means 4 x hidden_size)."""
    if name == "ffn_hidden_size" and cfg.ffn_hidden_size is None:
        return 4 * cfg.hidden_size
    return getattr(cfg, name)


def check_checkpoint(load_dir: str, *, world_size: int, allow_missing_rng: bool = False) -> str:
    """Pre-launch: every file of ``load_dir``'s latest checkpoint opens safely; returns its tag.

    Reads ``latest`` (plain tag, UTF-8), ``layout.json`` (valid JSON with the layout fields),
    and the pickled structure of every ``.pt`` file with the restricted unpickler and
    ``mmap=True`` (tensor bytes are not read, so this costs little even for large models): a
    truncated, corrupt or planted file raises :class:`CheckpointFileError` naming it. Each of
    the ``world_size`` ranks needs its RNG file unless the checkpoint was resharded (it has
    none by design) or ``allow_missing_rng``.
    """
    from megatron_glm.compat.deepspeed import load_deepspeed_file

    tag = read_latest(load_dir)
    if tag is None:
        raise CheckpointFileError(f"{load_dir}: no '{LATEST}' file (no checkpoint)")
    tag_dir = Path(load_dir) / tag
    _saved_layout_record(load_dir, tag)
    model_state_files(tag_dir)  # raises naming the directory if there is none
    for path in checkpoint_files(tag_dir):
        load_deepspeed_file(str(path), mmap=True)
    if reshard_info(tag_dir) is None and not allow_missing_rng:
        missing = [rng_file(tag_dir, r).name for r in range(world_size)]
        missing = [name for name in missing if not (tag_dir / name).is_file()]
        if missing:
            raise CheckpointFileError(
                f"{tag_dir}: no RNG state for {len(missing)} of this run's {world_size} ranks "
                f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): resuming "
                "would reseed their dropout streams silently, so the run would not "
                "continue exactly. Resume with the world size that wrote it, or set "
                "checkpoint.allow_missing_rng=true to accept the drift (on several nodes: "
                "the other nodes' ranks may have written theirs to their own disks; the "
                "checkpoint directory must be on a shared filesystem)"
            )
    return tag


def resolve_load_dir(load: str | None, save: str | None) -> str | None:
    """Where to resume from: ``checkpoint.load``, else ``checkpoint.save`` if it has ``latest``.

    An explicit ``load`` without a ``latest`` file is an error (a typo must not silently start
    a fresh run); the implicit auto-resume directory may simply not exist yet.
    """
    if load is not None:
        if read_latest(load) is None:
            raise ConfigError("checkpoint.load", f"{load} has no '{LATEST}' file (no checkpoint)")
        return load
    if save is not None and read_latest(save) is not None:
        return save
    return None


def load(
    engine: Engine, load_dir: str | os.PathLike[str], *, allow_missing_rng: bool = False
) -> ClientState:
    """Collective: restore model, optimizer, schedule and this rank's RNG from ``latest``.

    Every rank checks its own RNG file and the group agrees: if any rank lacks one, every rank
    raises (naming the missing files) unless ``allow_missing_rng``, in which case each rank
    without a file warns and keeps its freshly seeded streams. A resharded checkpoint (no
    DeepSpeed optimizer files and no RNG files, by design) gets its optimizer state from its
    store (:func:`.optimizer_state.restore_optimizer_state`), or restarts Adam if it has none.
    """
    from megatron_glm.compat.deepspeed import use_safe_checkpoint_engine

    tag = read_latest(load_dir)
    if tag is None:
        raise ValueError(f"{load_dir}: no '{LATEST}' file, nothing to resume from")
    tag_dir = Path(load_dir) / tag
    resharded = reshard_info(tag_dir) is not None
    mine = rng_file(tag_dir, rank())
    if not resharded:
        _agree_on_rng_files(engine, tag_dir, mine.is_file(), allow_missing_rng)
    use_safe_checkpoint_engine(engine.engine)
    path, raw = engine.engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_optimizer_states=not resharded,
        load_lr_scheduler_states=False,
    )
    if path is None or raw is None:
        raise ValueError(f"{load_dir}/{tag}: DeepSpeed could not load this checkpoint")
    client = ClientState.from_dict(raw, f"{load_dir}/{tag}")
    if resharded:
        _restore_resharded_optimizer(engine, tag_dir)
    engine.scheduler.load_state_dict(client.lr_scheduler)
    if mine.is_file():
        saved = load_file(mine)
        set_rng_state(saved)
        if MODEL_PARALLEL_RNG in saved:
            engine.model_rng.load_state_dict(saved[MODEL_PARALLEL_RNG])
    return client


def _restore_resharded_optimizer(engine: Engine, tag_dir: Path) -> None:
    """The optimizer state of a resharded checkpoint from its store, if it kept one."""
    store = tag_dir / STORE
    if store.is_file():
        restore_optimizer_state(engine, store)
    optimizer = f"optimizer state from {STORE}" if store.is_file() else "optimizer restarts"
    logger.info("note: %s was resharded: %s, RNG streams are freshly seeded", tag_dir, optimizer)


def _agree_on_rng_files(engine: Engine, tag_dir: Path, have: bool, allow: bool) -> None:
    """Collective (world): refuse on every rank, or warn on each rank lacking its RNG file."""
    missing = ranks_where(not have, engine.device)
    if not missing:
        return
    names = ", ".join(rng_file(tag_dir, r).name for r in missing[:4])
    if not allow:
        raise CheckpointFileError(
            f"{tag_dir}: rank(s) {missing} have no RNG file ({names}); resuming would reseed "
            "them and drift from the saved run. Resume with the world size that wrote it, or "
            "set checkpoint.allow_missing_rng=true"
        )
    if not have:
        logger.warning(
            "warning: rank %d: %s missing (checkpoint.allow_missing_rng): this rank's RNG streams "
            "are freshly seeded, the resume is not exact",
            rank(),
            rng_file(tag_dir, rank()),
        )


def load_model_state(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    *,
    layout: Mapping[str, int | None] | None = None,
) -> dict[str, torch.Tensor]:
    """The full (tp = 1) ``GLMModel`` state dict of a checkpoint (any tp, pp, ZeRO stage).

    A tensor- or pipeline-parallel checkpoint (``mp_rank_00..N-1``, or DeepSpeed's per-layer
    pipeline files) is merged with ``layout`` (name -> split dimension,
    :func:`megatron_glm.model.tensor_parallel_layout`), taken from the checkpoint's config
    snapshot when not given. ZeRO-3's partitioned weights are gathered (fp32).
    """
    tag = tag or read_latest(checkpoint_dir)
    if tag is None:
        raise ValueError(f"{checkpoint_dir}: no '{LATEST}' file and no tag given")
    tag_dir = Path(checkpoint_dir) / tag
    tp, pp = checkpoint_layout(tag_dir)
    if tp * pp == 1 and layout is None:
        return read_full_state(tag_dir, None)
    if layout is None:
        layout = _saved_layout(load_shards(tag_dir, mmap=True)[0], tag_dir)
    return read_full_state(tag_dir, layout)


def _saved_layout(blob: Mapping[str, Any], where: Path) -> dict[str, int | None]:
    """The TP layout of the model described by a checkpoint's config snapshot."""
    config = blob.get("config")
    if not isinstance(config, Mapping) or "model" not in config:
        raise ValueError(f"{where}: no config snapshot to merge TP shards with; pass layout=...")
    return tensor_parallel_layout(from_dict(ModelConfig, dict(config["model"]), prefix="model."))
