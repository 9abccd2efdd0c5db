"""Model-parallel RNG: which dropout masks must agree across TP ranks, and which must not.

Under tensor parallelism a dropout mask is drawn either on a *replicated* tensor or on a
*split* one:

* replicated (the residual stream without sequence parallelism, the embedding output): every
  TP rank holds the same values and must drop the same elements, or the replicas diverge. These
  masks come from the ordinary default generator, which the training loop seeds identically on
  every TP rank (and which the ranks consume in lockstep, since they run the same code);
* split (attention probabilities of this rank's heads; any ``[b, s/tp, h]`` slice under sequence
  parallelism): each rank holds *different* elements, and drawing their masks from the same
  generator state would correlate them (rank 1's heads dropped exactly where rank 0's are).
  These masks are drawn inside :meth:`ModelParallelRNG.fork`, which swaps in a generator state
  private to this TP rank and swaps it back out afterwards, so the default stream is untouched.

:class:`ModelParallelRNG` is Megatron-LM's ``CudaRNGStatesTracker`` reduced to the one stream it
is used for, made device generic (CPU or CUDA default generator), and owned by the model (no
module-level tracker). With a single TP rank and no sequence parallelism ``fork`` is a no-op, so
a tp=1 model draws every mask exactly as a model without this machinery would.

:func:`checkpoint` is ``torch.utils.checkpoint`` (non-reentrant) that additionally records the
tracker's state when the forward runs and restores it around the recomputation, so recomputed
masks (default *and* TP streams) equal the original ones and gradients are identical with and
without activation checkpointing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def tensor_parallel_seed(seed: int, *, tp_rank: int, pp_rank: int) -> int:
    """A 63-bit seed for the TP stream of (seed, pipeline stage, TP rank), distinct from ``seed``.

    Different TP ranks get different masks; different pipeline stages hold different layers and
    get different masks too. Data-parallel replicas share the stream, as in Megatron-LM (their
    data differ).
    """
    digest = hashlib.sha256(f"{seed}/tensor-parallel-rng/{pp_rank}/{tp_rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _get_device_state(device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    raise ValueError(f"ModelParallelRNG: unsupported device type {device.type!r} (cpu or cuda)")


def _set_device_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


class ModelParallelRNG:
    """The TP-rank-private dropout stream (see the module docstring).

    Args:
        enabled: whether masks inside :meth:`fork` need their own stream (``tp > 1`` or sequence
            parallelism). When False ``fork`` does nothing and the object holds no state.
        tp_rank, pp_rank: this rank's coordinates, mixed into the seed.

    The state is one generator state per device (created from the seed on first use), so the same
    object serves a model on CPU or on any CUDA device.
    """

    def __init__(self, *, enabled: bool, tp_rank: int = 0, pp_rank: int = 0) -> None:
        self.enabled = enabled
        self.tp_rank = tp_rank
        self.pp_rank = pp_rank
        self._seed: int | None = None
        self._states: dict[str, Tensor] = {}

    def manual_seed(self, seed: int) -> None:
        """(Re)start the stream from ``seed`` (the run's seed; the TP rank is mixed in)."""
        self._seed = tensor_parallel_seed(seed, tp_rank=self.tp_rank, pp_rank=self.pp_rank)
        self._states = {}

    def _state_for(self, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._states:
            if self._seed is None:
                raise RuntimeError(
                    "ModelParallelRNG.fork before manual_seed (model not initialised)"
                )
            gen = torch.Generator(device=device).manual_seed(self._seed)
            self._states[key] = gen.get_state()
        return self._states[key]

    @contextmanager
    def fork(self, device: torch.device | str = "cpu") -> Iterator[None]:
        """Draw random numbers on ``device`` from this TP rank's stream inside the block."""
        if not self.enabled:
            yield
            return
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        outer = _get_device_state(device)
        _set_device_state(device, self._state_for(device))
        try:
            yield
        finally:
            self._states[str(device)] = _get_device_state(device)
            _set_device_state(device, outer)

    def region(self, parallel: bool, device: torch.device | str = "cpu") -> Any:
        """``fork(device)`` for masks on split tensors, a no-op context for replicated ones."""
        return self.fork(device) if parallel else nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream exactly (save it with the per-rank RNG)."""
        return {"seed": self._seed, "states": {k: v.clone() for k, v in self._states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seed = state["seed"]
        self._states = {k: v.clone() for k, v in state["states"].items()}


class _Record:
    """Forward context of :func:`checkpoint`: remember the tracker state at forward time."""

    def __init__(self, rng: ModelParallelRNG, slot: dict[str, Any]) -> None:
        self.rng, self.slot = rng, slot

    def __enter__(self) -> None:
        self.slot["state"] = self.rng.state_dict()

    def __exit__(self, *exc: object) -> None:
        return None


class _Replay:
    """Recompute context of :func:`checkpoint`: run with the recorded state, then restore."""

    def __init__(self, rng: ModelParallelRNG, slot: dict[str, Any]) -> None:
        self.rng, self.slot = rng, slot
        self.current: dict[str, Any] | None = None

    def __enter__(self) -> None:
        self.current = self.rng.state_dict()
        self.rng.load_state_dict(self.slot["state"])

    def __exit__(self, *exc: object) -> None:
        assert self.current is not None
        self.rng.load_state_dict(self.current)


def checkpoint(fn: Callable[..., Tensor], *args: Any, rng: ModelParallelRNG) -> Tensor:
    """``fn(*args)`` with activations recomputed in backward, replaying every dropout stream.

    torch's non-reentrant checkpoint already saves and restores the default CPU/CUDA generators;
    the ``context_fn`` pair adds the TP stream of ``rng``. Nothing is recorded when the tracker is
    disabled (tp = 1), so the plain torch behaviour is kept exactly.
    """
    if not rng.enabled:
        return torch_checkpoint(fn, *args, use_reentrant=False)
    slot: dict[str, Any] = {}
    return torch_checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=lambda: (_Record(rng, slot), _Replay(rng, slot)),
    )
