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


# ============================================================================================
# Optimizer-state restore for resharded checkpoints (training/checkpoint/optimizer_state.py)
# ============================================================================================
#
# Why this exists. DeepSpeed's public fragment API (``deepspeed.utils.safe_set_full_fp32_param``,
# ``safe_set_full_optimizer_state``) writes a parameter's slice of the fp32 master weights and of
# the optimizer state. Under ZeRO-1/2 and DeepSpeed's bf16 optimizer it writes through a view
# per parameter (``param._hp_mapping.optim_fragment``) that DeepSpeed creates only after the first
# optimizer step (``_lazy_init_hp_params_optimizer_state``), since torch's Adam creates its
# state lazily. A checkpoint restored before any step therefore needs that private method called
# once the torch optimizer's state exists. DeepSpeed's own universal-checkpoint loader does the
# equivalent inline (``load_hp_checkpoint_state_from_checkpoint_dir``), reading pickles.
# DeepSpeed 0.19.8 itself calls it after the *first* param group's first step, when the later
# groups have no state yet, and never again: without a relink, ``safe_get_full_optimizer_state``
# fails for every parameter outside group 0 (here: the no-weight-decay group).
# tests/unit/test_optimizer_state.py fails if either behaviour changes.
#
# Upstream change that removes this: a public "initialise optimizer state" call, or the fragment
# API creating the state on first write.


def check_optimizer_state_linkable(optimizer: Any) -> None:
    """Raise ValueError unless :func:`link_optimizer_state` can serve ``optimizer``.

    ``optimizer`` must be DeepSpeed's ZeRO-1/2 (``DeepSpeedZeroOptimizer``) or
    ``BF16_Optimizer``; other wrappers (ZeRO-3, the fp16/bf16 optimizers without ZeRO) are
    refused with a message.
    """
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is None or not hasattr(optimizer, "_hp_optimizer_states_linked"):
        raise ValueError(
            f"restoring resharded optimizer state into DeepSpeed's {type(optimizer).__name__} "
            "is not supported (ZeRO-0 in fp32 and ZeRO-1/2 are); reshard with --no-optimizer "
            "to restart Adam's moments instead"
        )


def link_optimizer_state(optimizer: Any) -> None:
    """Point every parameter's optimizer-state fragment at the torch optimizer's current state.

    The torch optimizer inside ``optimizer`` (see :func:`check_optimizer_state_linkable`) must
    already hold state for each of its flat partitions.
    """
    check_optimizer_state_linkable(optimizer)
    optimizer._hp_optimizer_states_linked = False  # relink to the state just created
    optimizer._lazy_init_hp_params_optimizer_state()
