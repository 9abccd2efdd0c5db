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
