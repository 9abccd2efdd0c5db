"""Checkpoints: DeepSpeed's model/optimizer files plus our client state, published atomically.

Layout of ``save_dir``::

    global_step100/              one complete checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed; with
                                 pipeline parallelism also layer_II-model_TT-model_states.pt)
        rng_rank00000.pt ...     per-rank python/numpy/torch(/CUDA) RNG states and the model's
                                 TP-private dropout stream (ours)
        layout.json              iteration, tp, pp, data-parallel size, ZeRO stage (checked on
                                 resume)
    latest                       text: the tag of the newest complete checkpoint

Publication protocol (a crash at any point leaves the previous checkpoint usable):

1. rank 0 removes a stale ``global_stepN.tmp`` left by an earlier crash; all ranks write
   DeepSpeed's files and their RNG file into ``global_stepN.tmp``
   (``engine.save_checkpoint(..., save_latest=False)``: DeepSpeed would otherwise write
   ``latest`` itself, before we know every rank's files are complete);
2. barrier; rank 0 renames ``global_stepN.tmp`` to ``global_stepN`` (atomic on POSIX);
3. rank 0 writes ``latest`` through a temporary file and ``os.replace`` -- last;
4. barrier, so no rank proceeds (or exits) before the checkpoint is published.

The client state (inside DeepSpeed's model-states file) holds the iteration, the consumed samples
(the data position: rows are a pure function of (seed, epoch, sample index), so this *is* the
whole data and objective-sampler state), the LR schedule, validation history and a config
snapshot. The RNG files restore dropout exactly per rank (including the tensor-parallel
stream of :class:`megatron_glm.parallel.random.ModelParallelRNG`), which together makes a resumed
run reproduce the uninterrupted one bitwise (fp32, CPU).

A checkpoint rewritten for another TP size by ``tools/reshard_checkpoint.py`` holds weights only
(:func:`megatron_glm.parallel.reshard.reshard_info` marks it): it is loaded without optimizer
state, and Adam's moments restart.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_glm.config import ModelConfig, from_dict
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.parallel.reshard import (
    checkpoint_layout,
    load_shards,
    read_full_state,
    reshard_info,
)
from megatron_glm.training.engine import Engine

CLIENT_STATE_VERSION = 1
LATEST = "latest"
LAYOUT = "layout.json"
MODEL_PARALLEL_RNG = "model_parallel"
"""Key of the model's TP dropout stream inside a per-rank RNG file."""


def tag_for(iteration: int) -> str:
    """Directory name of the checkpoint after ``iteration`` steps."""
    return f"global_step{iteration}"


@dataclass
class ClientState:
    """Training state that is ours, not DeepSpeed's (saved inside its model-states file)."""

    iteration: int
    """Optimizer steps completed."""
    consumed_samples: int
    """Training rows consumed over all data-parallel ranks (the data position)."""
    lr_scheduler: dict[str, Any]
    """``AnnealingLR.state_dict()``."""
    config: dict[str, Any] = field(default_factory=dict)
    """Snapshot of the run config that wrote the checkpoint (for inspection)."""
    valid_history: list[tuple[int, float]] = field(default_factory=list)
    """(iteration, validation loss) of every validation so far."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CLIENT_STATE_VERSION,
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "lr_scheduler": self.lr_scheduler,
            "config": self.config,
            "valid_history": [list(x) for x in self.valid_history],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> ClientState:
        if raw.get("version") != CLIENT_STATE_VERSION:
            raise ValueError(
                f"{where}: client state version {raw.get('version')!r} is not "
                f"{CLIENT_STATE_VERSION} (not a megatron_glm checkpoint, or a newer one)"
            )
        return cls(
            iteration=int(raw["iteration"]),
            consumed_samples=int(raw["consumed_samples"]),
            lr_scheduler=dict(raw["lr_scheduler"]),
            config=dict(raw.get("config", {})),
            valid_history=[(int(i), float(v)) for i, v in raw.get("valid_history", [])],
        )


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU and (if present) CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only when both sides have CUDA)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_latest(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag in ``load_dir/latest``, or None when there is no complete checkpoint."""
    path = Path(load_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or not (Path(load_dir) / tag).is_dir():
        raise ValueError(
            f"{path} names checkpoint {tag!r}, which does not exist in {load_dir}; "
            "point 'checkpoint.load' at a valid checkpoint directory"
        )
    return tag


def _write_latest(save_dir: Path, tag: str) -> None:
    tmp = save_dir / f"{LATEST}.tmp"
    with open(tmp, "w") as fh:
        fh.write(tag)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, save_dir / LATEST)


def save(engine: Engine, save_dir: str | os.PathLike[str], state: ClientState) -> str:
    """Collective: write and publish the checkpoint of ``state.iteration``; returns its tag.

    An existing directory of the same tag (a crashed run's, or one being overwritten on purpose)
    is moved aside before the rename and deleted only after ``latest`` is rewritten.
    """
    root = Path(save_dir)
    tag = tag_for(state.iteration)
    tmp_tag = f"{tag}.tmp"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    # DeepSpeed barriers before writing, so the stale .tmp is gone before anyone writes.
    engine.engine.save_checkpoint(
        str(root), tag=tmp_tag, client_state=state.to_dict(), save_latest=False
    )
    rng = {**rng_state(), MODEL_PARALLEL_RNG: engine.model_rng.state_dict()}
    torch.save(rng, root / tmp_tag / f"rng_rank{rank:05d}.pt")
    _barrier()
    if rank == 0:
        layout = {
            "iteration": state.iteration,
            "tp": engine.dims.tp,
            "pp": engine.dims.pp,
            "dp_size": engine.dp_size,
            "zero_stage": int(engine.engine.zero_optimization_stage()),
        }
        (root / tmp_tag / LAYOUT).write_text(json.dumps(layout))
        final, old = root / tag, root / f"{tag}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(root / tmp_tag, final)
        _write_latest(root, tag)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag


def check_layout(load_dir: str, *, dp_size: int, zero_stage: int, tp: int = 1, pp: int = 1) -> None:
    """Refuse, before any process starts, a checkpoint this layout cannot load.

    Model shards are per TP rank (and per pipeline stage): another tp or pp needs
    ``tools/reshard_checkpoint.py`` first. DeepSpeed stores ZeRO-1/2/3 optimizer state as one
    partition per data-parallel rank and cannot re-partition it on load; it would fail after
    start-up, on every rank. ZeRO-0 checkpoints hold the full state and load at any
    data-parallel size.
    """
    tag = read_latest(load_dir)
    if tag is None:
        return
    path = Path(load_dir) / tag / LAYOUT
    if not path.is_file():
        return  # written by DeepSpeed directly, resharded or older: let DeepSpeed decide
    saved = json.loads(path.read_text())
    s_tp, s_pp = int(saved.get("tp", 1)), int(saved.get("pp", 1))
    if (s_tp, s_pp) != (tp, pp):
        pp_flag = f" --pp {pp}" if max(pp, s_pp) > 1 else ""
        raise ValueError(
            f"config field 'parallel.tp': checkpoint {load_dir}/{tag} was written with tp {s_tp}, "
            f"pp {s_pp}, this run is tp {tp}, pp {pp}; convert it first with "
            f"python tools/reshard_checkpoint.py --load {load_dir} --tp {tp}{pp_flag} "
            "--save NEW_DIR (optimizer state restarts)"
        )
    s_dp, s_zero = int(saved["dp_size"]), int(saved["zero_stage"])
    partitioned = s_zero > 0 or zero_stage > 0
    if partitioned and (s_dp, s_zero) != (dp_size, zero_stage):
        raise ValueError(
            f"config field 'train.zero_stage': checkpoint {load_dir}/{tag} was written with "
            f"ZeRO-{s_zero} at data-parallel size {s_dp}, this run is ZeRO-{zero_stage} at "
            f"data-parallel size {dp_size}; DeepSpeed cannot re-partition ZeRO optimizer state. "
            "Resume with the same layout, or rewrite its weights with python "
            f"tools/reshard_checkpoint.py --load {load_dir} --tp {tp} --save NEW_DIR and set "
            "checkpoint.load=NEW_DIR (optimizer state restarts)"
        )


def resolve_load_dir(load: str | None, save: str | None) -> str | None:
    """Where to resume from: ``checkpoint.load``, else ``checkpoint.save`` if it has ``latest``.

    An explicit ``load`` without a ``latest`` file is an error (a typo must not silently start
    a fresh run); the implicit auto-resume directory may simply not exist yet.
    """
    if load is not None:
        if read_latest(load) is None:
            raise ValueError(
                f"config field 'checkpoint.load': {load} has no '{LATEST}' file (no checkpoint)"
            )
        return load
    if save is not None and read_latest(save) is not None:
        return save
    return None


def load(engine: Engine, load_dir: str | os.PathLike[str]) -> ClientState:
    """Collective: restore model, optimizer, schedule and this rank's RNG from ``latest``.

    A checkpoint written by a different number of ranks has no RNG file for some ranks; those
    keep their freshly seeded RNG (the resume is then not bitwise identical, and says so). A
    resharded checkpoint (weights only) is loaded with the optimizer restarted.
    """
    tag = read_latest(load_dir)
    if tag is None:
        raise ValueError(f"{load_dir}: no '{LATEST}' file, nothing to resume from")
    resharded = reshard_info(Path(load_dir) / tag) is not None
    path, raw = engine.engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_optimizer_states=not resharded,
        load_lr_scheduler_states=False,
    )
    if path is None or raw is None:
        raise ValueError(f"{load_dir}/{tag}: DeepSpeed could not load this checkpoint")
    client = ClientState.from_dict(raw, f"{load_dir}/{tag}")
    engine.scheduler.load_state_dict(client.lr_scheduler)
    rng_file = Path(load_dir) / tag / f"rng_rank{_rank():05d}.pt"
    if rng_file.is_file():
        saved = torch.load(rng_file, weights_only=False)
        set_rng_state(saved)
        if MODEL_PARALLEL_RNG in saved:
            engine.model_rng.load_state_dict(saved[MODEL_PARALLEL_RNG])
    elif _rank() == 0 and not resharded:
        print(f"note: {rng_file} missing (different world size?); RNG streams not restored")
    if resharded and _rank() == 0:
        print(
            f"note: {load_dir}/{tag} was resharded: optimizer state restarts (weights only), "
            "RNG streams are freshly seeded"
        )
    return client


def load_model_state(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    *,
    layout: Mapping[str, int | None] | None = None,
) -> dict[str, torch.Tensor]:
    """The full (tp = 1) ``GLMModel`` state dict of a checkpoint saved without ZeRO-3.

    A tensor- or pipeline-parallel checkpoint (``mp_rank_00..N-1``, or DeepSpeed's per-layer
    pipeline files) is merged with ``layout`` (name -> split dimension,
    :func:`megatron_glm.model.tensor_parallel_layout`), taken from the checkpoint's config
    snapshot when not given. ZeRO-3 checkpoints hold partitioned weights; consolidate
    them with DeepSpeed's ``zero_to_fp32`` first.
    """
    tag = tag or read_latest(checkpoint_dir)
    if tag is None:
        raise ValueError(f"{checkpoint_dir}: no '{LATEST}' file and no tag given")
    tag_dir = Path(checkpoint_dir) / tag
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ValueError(
            f"{path} not found (ZeRO-3 checkpoint? run DeepSpeed's zero_to_fp32.py on it first)"
        )
    tp, pp = checkpoint_layout(tag_dir)
    if tp * pp == 1:
        return dict(load_shards(tag_dir)[0]["module"])
    if layout is None:
        layout = _saved_layout(torch.load(path, map_location="cpu", weights_only=False), tag_dir)
    return read_full_state(tag_dir, layout)


def _saved_layout(blob: Mapping[str, Any], where: Path) -> dict[str, int | None]:
    """The TP layout of the model described by a checkpoint's config snapshot."""
    config = blob.get("config")
    if not isinstance(config, Mapping) or "model" not in config:
        raise ValueError(f"{where}: no config snapshot to merge TP shards with; pass layout=...")
    return tensor_parallel_layout(from_dict(ModelConfig, dict(config["model"]), prefix="model."))
