"""DeepSpeed seam: every use of a DeepSpeed private internal lives here, one section each.

- pipeline engine: the instruction map, ``PipelineModule``'s build internals, its layer-type
  matcher and the ZeRO optimizer's grad-norm internals the pipeline runner hooks;
- checkpoint loading: the restricted loader (this docstring);
- start-up and warnings: the op-compatibility cache and three torch warnings DeepSpeed causes;
- optimizer-state restore: relinking the fragment views of a resharded checkpoint's state;
- ZeRO-3 partitions: a partitioned parameter's whole value (:func:`full_weight`).
- CPU Adam step powers: re-creating the C++ CPU Adam before each step, for an exact resume.

Each function's docstring says why it exists and which upstream change would remove it;
``tests/unit/test_compat.py``, ``test_compat_pipeline.py`` and ``test_optimizer_state.py`` fail
when the pinned DeepSpeed changes the behaviour relied on.

Checkpoint loading. DeepSpeed 0.19's DeepSpeed 0.19's ``TorchCheckpointEngine.load`` calls
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
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import Tensor, nn

from megatron_glm.serialization import load_file

# ============================================================================ pipeline engine
# Private names of DeepSpeed 0.19's PipelineEngine / PipelineModule / ZeRO-1/2 optimizer that the
# pipeline path (``training.pipeline``, ``training.step``) relies on; nothing outside this module
# touches them. ``tests/unit/test_compat_pipeline.py`` checks each behaviour relied on.


def wrap_optimizer_step(engine: Any, before: Callable[[Any], None]) -> None:
    """Make ``engine`` (a ``PipelineEngine``) call ``before(engine)`` at the start of its
    ``OptimizerStep`` instruction, then DeepSpeed's own step.

    Why: ``train_batch`` runs the optimizer step inside the schedule, after every backward and
    gradient all-reduce of the step and before anything returns to the caller. That is the only
    point where the loop can publish the last stage's loss to every stage and decide, on every
    rank alike, to skip a non-finite update (and take the ZeRO-0 fp32 gradient norm). The engine
    dispatches instructions through ``self._INSTRUCTION_MAP`` (a class attribute looked up on the
    instance), so an instance-level copy with one entry replaced changes this engine only.

    Upstream change that removes it: a public pre-optimizer-step hook on ``PipelineEngine`` (or
    ``train_batch`` leaving the step to the caller).
    """
    table = dict(type(engine)._INSTRUCTION_MAP)
    if schedule.OptimizerStep not in table:
        raise RuntimeError("DeepSpeed's PipelineEngine has no OptimizerStep instruction any more")
    original = table[schedule.OptimizerStep]

    def optimizer_step(self: Any, **kwargs: Any) -> None:
        before(self)
        original(self, **kwargs)

    table[schedule.OptimizerStep] = optimizer_step
    engine._INSTRUCTION_MAP = table


class MaterializingPipelineModule(PipelineModule):
    """A ``PipelineModule`` that calls ``materialize(index, module)`` on each of this stage's
    layers just before DeepSpeed registers them.

    Why: the layers are created on the meta device (no memory; ``partition_method=parameters``
    still counts their parameters), and only this stage's share should ever be allocated and
    initialised. DeepSpeed decides the share inside ``__init__`` (``_partition_layers`` sets
    ``_local_start`` / ``_local_stop``) and registers the layers in ``_build``, with no public
    hook in between, so ``_build`` is overridden and reads those private bounds and
    ``_layer_specs``. A layer is an ``nn.Module`` or a ``LayerSpec`` whose ``build()`` returns
    the same (meta) module at every call.

    Upstream change that removes it: a public per-layer build/initialisation hook, or
    PipelineModule accepting meta-device layers and materialising only the local ones.
    """

    def __init__(
        self, layers: Sequence[Any], *, materialize: Callable[[int, nn.Module], None], **kwargs: Any
    ) -> None:
        self._materialize = materialize
        super().__init__(layers, **kwargs)

    def _build(self) -> None:
        for index in range(self._local_start, self._local_stop):
            spec = self._layer_specs[index]
            self._materialize(index, spec.build() if isinstance(spec, LayerSpec) else spec)
        super()._build()


def find_layer_type(names: Sequence[str], pattern: str) -> list[int]:
    """Indices of the layers whose class name matches ``pattern``, as DeepSpeed's
    ``partition_method=type:PATTERN`` selects them.

    Why: a pattern that selects no layer is found by DeepSpeed only once every rank builds its
    PipelineModule inside the process group; the launch checks want the same answer up front,
    from names alone. ``PipelineModule._find_layer_type`` (private) only reads ``_layer_specs``
    and each entry's ``__name__``, so it runs over plain name holders and cannot disagree with
    the partitioning. Raises ``RuntimeError`` when nothing matches and the ``regex`` module's
    error for an invalid pattern (as DeepSpeed does).

    Upstream change that removes it: a public (static) layer-type matcher.
    """
    holder = SimpleNamespace(_layer_specs=[SimpleNamespace(__name__=n) for n in names])
    return list(PipelineModule._find_layer_type(holder, pattern))


def pipeline_stage_bounds(
    layer_params: Sequence[int], names: Sequence[str], method: str, stages: int
) -> list[int]:
    """Where DeepSpeed's ``PipelineModule`` cuts the layers into ``stages``: ``stages + 1``
    boundaries (stage ``s`` holds layers ``bounds[s]:bounds[s + 1]``).

    Why: a dry run reports each stage's parameters without building the pipeline (that needs
    the process group). ``PipelineModule._partition_layers`` (private) picks the partitioner by
    ``partition_method``: ``uniform`` splits the layer count, ``parameters`` balances each
    layer's trainable parameters (``layer_params``, counted as each rank builds them, TP shard
    included), ``type:REGEX`` balances the layers whose class name matches. The same
    ``deepspeed.runtime.utils`` partitioners run here, so the answer cannot differ.

    Upstream change that removes it: a public function from method and layers to the parts.
    """
    from deepspeed.runtime import utils as ds_utils

    method = method.lower()
    if method == "uniform":
        return list(ds_utils.partition_uniform(num_items=len(names), num_parts=stages))
    if method == "parameters":
        weights = list(layer_params)
    elif method.startswith("type:"):
        chosen = set(find_layer_type(names, method.split(":")[1]))
        weights = [int(i in chosen) for i in range(len(names))]
    else:
        raise ValueError(f"partition method {method!r} is not one DeepSpeed implements")
    return list(ds_utils.partition_balanced(weights=weights, num_parts=stages))


def reduce_zero_grad_norm_once(engine: Any) -> None:
    """Make ZeRO-1/2's gradient norm issue the same collectives on every pipeline stage.

    Why: ``DeepSpeedZeroOptimizer.scaled_global_norm`` takes one norm per optimizer param group
    and all-reduces each over the model-parallel group, which with a pipeline spans the stages.
    The stages build their groups from different layers, and empty groups are dropped (by
    ``engine.param_groups`` and again by ``deepspeed.initialize``), so a stage holding only the
    embedding (``partition_method=parameters`` on a 2-layer model: no bias or LayerNorm gain,
    so no no-decay group) has one group where the next stage has two. The stages then issue
    different numbers of all-reduces and deadlock (stage 0 already waits in the loss broadcast
    that ends ``train_batch`` while stage 1 waits in its second norm all-reduce).

    Here the per-group norms are taken over this stage only (reduced over DP as before) and
    their sum of squares is all-reduced over the model-parallel group once: the same norm
    (``sqrt`` of the sum of every group's squares on every stage), one collective whatever the
    group count. A non-finite group makes DeepSpeed's combined norm ``inf``; ``inf`` survives
    the sum, so every stage sees the overflow alike.

    It relies on two names internal to DeepSpeed 0.19's ZeRO-1/2 optimizer:
    ``scaled_global_norm`` and ``model_parallel_group``, which ``_model_parallel_all_reduce``
    skips when ``None``; both are asserted so a DeepSpeed change fails loudly instead of hanging.

    Upstream change that removes it: ZeRO's norm reducing once per step over the model-parallel
    group (not once per param group), or keeping empty param groups.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return  # ZeRO-0 (ours or BF16_Optimizer): one norm over all groups already
    for name in ("model_parallel_group", "scaled_global_norm"):
        assert hasattr(optimizer, name), f"DeepSpeed's ZeRO optimizer has no {name} any more"
    group = optimizer.model_parallel_group
    per_group = optimizer.scaled_global_norm  # the bound original

    def scaled_global_norm(norm_type: int = 2) -> Tensor:
        optimizer.model_parallel_group = None
        try:
            local = per_group(norm_type)  # this stage's norm over all its groups, DP-reduced
        finally:
            optimizer.model_parallel_group = group
        squares = local.float() ** 2  # inf stays inf
        if group is not None:
            torch.distributed.all_reduce(squares, group=group)
        return squares.sqrt()

    optimizer.scaled_global_norm = scaled_global_norm


# ============================================================================ ZeRO-3 partitions
# ``deepspeed.zero.GatheredParameters`` is public; telling a partitioned parameter from a plain
# one reads the ``ds_id`` attribute ZeRO-3 sets on the parameters it partitions (DeepSpeed's own
# test in ``GatheredParameters``). ``tests/distributed/test_finetune_layouts.py`` fails if the
# gathered copies stop matching one process's weights.


def full_weight(param: Tensor) -> Tensor:
    """The whole of a parameter (this TP rank's shard of it), ZeRO-3 partitioned or not.

    A partitioned parameter is gathered over its data-parallel group and copied out (a
    collective: every rank of the group calls this for the same parameters in the same order);
    a plain one is returned as a detached view, no copy.
    """
    if not hasattr(param, "ds_id"):
        return param.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.detach().clone()


# ============================================================================ checkpoint loading

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
    fast-writer) is refused rather than silently left unsafe. Idempotent: an engine loads more
    than once when a finetuning run resumes and then reads its best checkpoint.
    """
    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is SafeTorchCheckpointEngine:
        return
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(
            f"DeepSpeed checkpoint engine {type(current).__name__} is not supported: "
            "megatron_glm loads checkpoints only through its restricted loader"
        )
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


# ============================================================================ start-up and warnings
# DeepSpeed internals used outside the pipeline and checkpoint code: the op-compatibility cache
# and the warnings its calls make torch emit.

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
        r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
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
    """Within the block (or the decorated call), ignore three torch warnings DeepSpeed 0.19 causes.

    Why. Neither says anything about the run, and both repeat once per rank and run:

    - ZeRO calls ``torch.distributed.all_gather_into_tensor`` and (stage 3, reducing gradients)
      ``reduce_scatter_tensor`` (``deepspeed.comm.torch``), which torch 2.13 deprecates with a
      ``FutureWarning`` each (in favour of ``all_gather_single`` / ``reduce_scatter_single``);
    - the pipeline engine sends an activation by broadcasting it from the sending stage (an
      in-place collective on a tensor in the autograd graph), and torch warns when backward passes
      that node. A broadcast leaves its source unchanged, so the identity gradient torch uses is
      right (the pipeline equality tests check every step's loss against one process).

    Each filter matches message, category *and* the emitting module, and lives only as long as
    the block (``warnings.catch_warnings`` restores the process's filters on exit), so the same
    warnings from anything else, or after training, still show.

    Upstream change that removes this: DeepSpeed calling the ``*_single`` collectives on
    torch >= 2.13, and sending pipeline activations with point-to-point ops (or a custom
    autograd function) rather than an in-place broadcast. ``tests/unit/test_compat.py``
    checks that the pinned versions still emit every one of them (drop the entry when one is
    gone) and that the filters match them.
    """
    with warnings.catch_warnings():
        for message, category, module in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


# ========================================================================== optimizer-state restore
# For resharded checkpoints (training/checkpoint/optimizer_state.py).
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


# ============================================================================ CPU Adam step powers
# For ZeRO-Offload's optimizer (training/cpu_adam.py).
#
# Why this exists. DeepSpeed's C++ CPU Adam keeps the bias-correction powers beta1^t and beta2^t
# in its own C++ object (``Adam_Optimizer::IncrementStep``, csrc/includes/cpu_adam.h), not in the
# optimizer state that checkpoints save: while the step count goes up by one it multiplies them
# by beta once more (float products), and when the count jumps -- the first step after a resume,
# the C++ object being new -- it computes them with ``std::pow``. Both are right to a float
# ulp, but not the same ulp, so a resumed run's updates differ from the uninterrupted run's in
# the last bit from the first step on (measured: ~1e-9 in a third of the weights after 5 steps).
# Re-creating the C++ object before every step (``create_adam`` under the same ``opt_id``
# replaces it) makes every step take the ``pow`` path, so the update depends only on the saved
# state and a resume is exact. The cost is one small allocation per step.
# tests/distributed/test_precision_offload.py (final checkpoint of a resumed offload run equal to
# the uninterrupted run's, bitwise) fails if the behaviour changes.
#
# Upstream change that removes this: ``IncrementStep`` computing the powers from the step count
# alone (always ``pow``), or the powers saved in the optimizer state.


def restart_cpu_adam_powers(optimizer: Any) -> None:
    """Replace ``optimizer``'s (a ``DeepSpeedCPUAdam``) C++ object with a fresh one, whose next
    step computes beta^t with ``pow`` from the step count (see the section comment)."""
    d = optimizer.defaults
    beta1, beta2 = d["betas"]
    optimizer.ds_opt_adam.create_adam(
        optimizer.opt_id,
        d["lr"],
        beta1,
        beta2,
        d["eps"],
        d["weight_decay"],
        optimizer.adam_w_mode,
        False,
    )
