"""Checkpoints: DeepSpeed's model/optimizer files plus our client state, published atomically.

Layout of ``save_dir``::

    global_step100/              one complete checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed; with
                                 pipeline parallelism also layer_II-model_TT-model_states.pt)
        rng_rank00000.pt ...     per-rank python/numpy/torch(/CUDA) RNG states and the model's
                                 TP-private dropout stream (ours; tensors and plain values only)
        layout.json              iteration, tp, pp, data-parallel size, world size, ZeRO stage
                                 (checked before launch)
    latest                       text: the tag of the newest complete checkpoint

Publication protocol (a crash at any point leaves the previous checkpoint usable):

0. every rank checks its parameters (its ZeRO-3 partition, its pipeline stage) for non-finite
   values; if any rank finds one, nothing is written and :class:`NonFiniteWeightsError` is raised
   on every rank: a diverged model is never published over the last good checkpoint;
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

Loading is safe and exact (see :mod:`megatron_glm.serialization`): every file is read with torch's
restricted unpickler (DeepSpeed's through :mod:`megatron_glm.compat.deepspeed`), so a planted
pickle is refused naming the file; every rank checks that its own RNG file exists and the group
refuses to resume when any rank lacks one (``checkpoint.allow_missing_rng`` turns that into a
warning on every affected rank), since a rank with freshly seeded dropout makes the resume drift
silently. :func:`check_checkpoint` runs the same checks on the files before any process starts.

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

from megatron_glm.config import ConfigError, ModelConfig, from_dict
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.parallel.reshard import (
    checkpoint_files,
    checkpoint_layout,
    load_shards,
    model_state_files,
    read_full_state,
    reshard_info,
)
from megatron_glm.serialization import LATEST, CheckpointFileError, load_file, read_latest_tag
from megatron_glm.training.engine import Engine

CLIENT_STATE_VERSION = 1
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


class NonFiniteError(RuntimeError):
    """Training produced non-finite numbers and stopped (``pretrain`` exits 3)."""


class NonFiniteWeightsError(NonFiniteError):
    """The model holds non-finite values at a save; nothing was published."""


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU and (if present) CUDA.

    Stored as tensors and plain values only, so the file loads with ``weights_only=True``:
    numpy's MT19937 key becomes an int64 tensor.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only when both sides have CUDA)."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    npy = state["numpy"]
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], key, npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(tag_dir: str | os.PathLike[str], rank: int) -> Path:
    """Where global rank ``rank`` keeps its RNG states in a checkpoint tag directory."""
    return Path(tag_dir) / f"rng_rank{rank:05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_latest(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag in ``load_dir/latest``, or None when there is no complete checkpoint.

    A ``latest`` that is not UTF-8, not a plain directory name inside ``load_dir`` or that names
    a missing checkpoint is an error naming the file
    (:func:`megatron_glm.serialization.read_latest_tag`).
    """
    return read_latest_tag(load_dir)


def _write_latest(save_dir: Path, tag: str) -> None:
    tmp = save_dir / f"{LATEST}.tmp"
    with open(tmp, "w") as fh:
        fh.write(tag)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, save_dir / LATEST)


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
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    # DeepSpeed barriers before writing, so the stale .tmp is gone before anyone writes.
    engine.engine.save_checkpoint(
        str(root), tag=tmp_tag, client_state=state.to_dict(), save_latest=False
    )
    rng = {**rng_state(), MODEL_PARALLEL_RNG: engine.model_rng.state_dict()}
    torch.save(rng, rng_file(root / tmp_tag, rank))
    _barrier()
    if rank == 0:
        (root / tmp_tag / LAYOUT).write_text(json.dumps(_layout_record(engine, state.iteration)))
        _publish(root, tag, tmp_tag)
    _barrier()
    return tag


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
    _write_latest(root, tag)
    shutil.rmtree(old, ignore_errors=True)


def _local_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's share of the weights: ZeRO-3 partitions (``ds_tensor``) or the parameters."""
    return [getattr(p, "ds_tensor", p).detach() for p in module.parameters()]


def _ranks_where(flag: bool, device: torch.device) -> list[int]:
    """Collective (world): the ranks on which ``flag`` holds, the same list on every rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    flags[_rank()] = int(flag)
    if dist.is_initialized():
        dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def _refuse_non_finite(engine: Engine, root: Path, tag: str) -> None:
    """Collective (world): raise on every rank if any rank's parameters hold NaN or inf.

    One device-to-host copy for the whole model, not one per parameter."""
    tensors = [t for t in _local_tensors(engine.module) if t.numel()]
    finite = [torch.isfinite(t).all() for t in tensors]
    bad = bool(not torch.stack(finite).all()) if finite else False
    ranks = _ranks_where(bad, engine.device)
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
    start-up, on every rank. ZeRO-0 checkpoints hold the full state and load at any
    data-parallel size.
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
            "--save NEW_DIR (optimizer state restarts)",
        )
    s_dp, s_zero = saved["dp_size"], saved["zero_stage"]
    partitioned = s_zero > 0 or zero_stage > 0
    if partitioned and (s_dp, s_zero) != (dp_size, zero_stage):
        raise ConfigError(
            "train.zero_stage",
            f"checkpoint {load_dir}/{tag} was written with ZeRO-{s_zero} at data-parallel size "
            f"{s_dp}, this run is ZeRO-{zero_stage} at "
            f"data-parallel size {dp_size}; DeepSpeed cannot re-partition ZeRO optimizer state. "
            "Resume with the same layout, or rewrite its weights with python "
            f"tools/reshard_checkpoint.py --load {load_dir} --tp {tp} --save NEW_DIR and set "
            "checkpoint.load=NEW_DIR (optimizer state restarts)",
        )


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
                "checkpoint.allow_missing_rng=true to accept the drift"
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
    without a file warns and keeps its freshly seeded streams. A resharded checkpoint (weights
    only, no RNG files by design) is loaded with the optimizer restarted.
    """
    from megatron_glm.compat.deepspeed import use_safe_checkpoint_engine

    tag = read_latest(load_dir)
    if tag is None:
        raise ValueError(f"{load_dir}: no '{LATEST}' file, nothing to resume from")
    tag_dir = Path(load_dir) / tag
    resharded = reshard_info(tag_dir) is not None
    mine = rng_file(tag_dir, _rank())
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
    engine.scheduler.load_state_dict(client.lr_scheduler)
    if mine.is_file():
        saved = load_file(mine)
        set_rng_state(saved)
        if MODEL_PARALLEL_RNG in saved:
            engine.model_rng.load_state_dict(saved[MODEL_PARALLEL_RNG])
    if resharded and _rank() == 0:
        print(
            f"note: {load_dir}/{tag} was resharded: optimizer state restarts (weights only), "
            "RNG streams are freshly seeded"
        )
    return client


def _agree_on_rng_files(engine: Engine, tag_dir: Path, have: bool, allow: bool) -> None:
    """Collective (world): refuse on every rank, or warn on each rank lacking its RNG file."""
    missing = _ranks_where(not have, engine.device)
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
        print(
            f"warning: rank {_rank()}: {rng_file(tag_dir, _rank())} missing "
            "(checkpoint.allow_missing_rng): this rank's RNG streams are freshly seeded, the "
            "resume is not exact",
            flush=True,
        )


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
    snapshot when not given. ZeRO-3 checkpoints hold partitioned weights and are refused with
    a message saying so.
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
