"""DeepSpeed seam: safe checkpoint loading.

Why this exists. DeepSpeed 0.19's ``TorchCheckpointEngine.load`` calls
``torch.load(path, weights_only=False)`` on every model-states, optimizer-states and pipeline
layer file it reads, so a crafted pickle planted in a checkpoint directory runs code on resume.
:func:`use_safe_checkpoint_engine` replaces an engine's ``checkpoint_engine`` (a public attribute
that every DeepSpeed load path -- ``DeepSpeedEngine.load_checkpoint``, the ZeRO optimizer-state
readers and ``PipelineModule.load_state_dir`` -- reads from) with one that loads through
:func:`megatron_glm.serialization.load_file`: torch's restricted unpickler plus the allow-list
below.

The allow-list is exactly the non-plain classes DeepSpeed's own checkpoints contain, found by
loading ZeRO 0-3, pipeline and bf16 checkpoints with ``weights_only=True``
(``tests/unit/test_safe_loading.py`` saves such a checkpoint and fails if a new class appears):

- ``LossScaler`` / ``DynamicLossScaler``: the ZeRO-1/2 optimizer keeps its loss scaler object;
- ``fragment_address``: a two-int dataclass of ZeRO-1/2's flat-partition bookkeeping;
- ``ZeroStageEnum``: the ZeRO-3 optimizer state records its stage as an enum.

The restricted unpickler only rebuilds these from their saved attributes; none runs code.

Upstream change that removes this module: DeepSpeed loading with ``weights_only=True`` (and
registering its own classes with ``torch.serialization.add_safe_globals``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from megatron_glm.serialization import load_file

DEEPSPEED_SAFE_GLOBALS: tuple[Any, ...] = (
    LossScaler,
    DynamicLossScaler,
    fragment_address,
    ZeroStageEnum,
)
"""DeepSpeed classes its checkpoints pickle (see the module docstring)."""


def load_deepspeed_file(path: str, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """Load one file DeepSpeed wrote, with the restricted unpickler; errors name the file."""
    return load_file(
        path, map_location=map_location, mmap=mmap, safe_globals=DEEPSPEED_SAFE_GLOBALS
    )


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with :func:`load_deepspeed_file` as its loader."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_deepspeed_file(path, map_location=map_location)


def use_safe_checkpoint_engine(engine: Any) -> None:
    """Make ``engine`` (a ``DeepSpeedEngine``) load checkpoints through the restricted loader.

    Only the plain torch engine is replaced; a configured alternative (Nebula, decoupled,
    fast-writer) is refused rather than silently left unsafe.
    """
    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(
            f"DeepSpeed checkpoint engine {type(current).__name__} is not supported: "
            "megatron_glm loads checkpoints only through its restricted loader"
        )
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


# ==================================================================================================
# Start-up and warnings (helper H5: kernels/seam). DeepSpeed internals used outside the pipeline
# and checkpoint code: the op-compatibility cache and the warnings its calls make torch emit.
# ==================================================================================================

SHM_COMM_OP: str = "deepspeed_shm_comm"
"""Key of DeepSpeed's CPU shared-memory comm op in ``deepspeed.ops.__compatible_ops__``."""


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on the CPU accelerator.

    Why. On CPU, DeepSpeed's torch comm backend (``deepspeed.comm.torch.build_shm_op``) compiles
    a C++ extension when the process group starts (a minute on a 2-core machine, and it needs a
    compiler) that only ``inference_all_reduce`` uses; training collectives go through
    ``torch.distributed``. ``build_shm_op`` skips the build when the op is marked incompatible in
    ``deepspeed.ops.__compatible_ops__``, a private, lazily probed module-level dict that DeepSpeed
    keeps as one object precisely so that edits persist; we mark it.

    Upstream change that removes this: a public switch (config or environment) to disable the
    shared-memory comm op, or building it only on first use by ``inference_all_reduce``.
    ``tests/unit/test_compat.py`` checks that the key exists and that ``build_shm_op`` then
    returns None without building.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        FutureWarning,
        r"torch\.distributed\.c10d_logger",
    ),
    (
        r"c10d::broadcast_: an autograd kernel was not registered",
        UserWarning,
        r"torch\.autograd\.graph",
    ),
)
"""(message regex, category, module regex) of the warnings :func:`known_warnings_silenced`
ignores. The module is the one the warning is attributed to (torch's wrapper frames)."""


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Within the block (or the decorated call), ignore two torch warnings DeepSpeed 0.19 causes.

    Why. Neither says anything about the run, and both repeat once per rank and run:

    - ZeRO calls ``torch.distributed.all_gather_into_tensor`` (``deepspeed.comm.torch``), which
      torch 2.13 deprecates with a ``FutureWarning`` (in favour of ``all_gather_single``);
    - the pipeline engine sends an activation by broadcasting it from the sending stage (an
      in-place collective on a tensor in the autograd graph), and torch warns when backward passes
      that node. A broadcast leaves its source unchanged, so the identity gradient torch uses is
      right (the pipeline equality tests check every step's loss against one process).

    Each filter matches message, category *and* the emitting module, and lives only as long as
    the block (``warnings.catch_warnings`` restores the process's filters on exit), so the same
    warnings from anything else, or after training, still show.

    Upstream change that removes this: DeepSpeed calling ``all_gather_single`` on torch >= 2.13,
    and sending pipeline activations with point-to-point ops (or a custom autograd function)
    rather than an in-place broadcast. ``tests/unit/test_compat.py`` checks that the pinned
    versions still emit both warnings (drop the entry when one is gone) and that the filters
    match them.
    """
    with warnings.catch_warnings():
        for message, category, module in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield
