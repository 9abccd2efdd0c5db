"""Our part of a checkpoint: the client state, per-rank RNG states, the errors a save raises.

The client state (inside DeepSpeed's model-states file) holds the iteration, the consumed samples
(the data position: rows are a pure function of (seed, epoch, sample index), so this *is* the
whole data and objective-sampler state), the LR schedule, validation history and a config
snapshot. The RNG files restore dropout exactly per rank (including the tensor-parallel stream of
:class:`megatron_glm.parallel.random.ModelParallelRNG`); both are tensors and plain values only,
so they load with the restricted unpickler.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
