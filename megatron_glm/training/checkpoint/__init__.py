"""Checkpoints: saving, loading, the atomic ``latest`` and resharding to another layout.

Layout of ``save_dir``::

    global_step100/              one complete checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed; with
                                 pipeline parallelism also layer_II-model_TT-model_states.pt)
        rng_rank00000.pt ...     per-rank python/numpy/torch(/CUDA) RNG states and the model's
                                 TP-private dropout stream (ours; tensors and plain values only)
        layout.json              iteration, tp, pp, data-parallel size, world size, ZeRO stage
                                 (checked before launch)
    latest                       text: the tag of the newest complete checkpoint

A resharded checkpoint (``tools/reshard_checkpoint.py``) has the model files of its new layout,
no ZeRO, RNG or layout files, and ``optimizer_state.pt``: the fp32 master weights and Adam
moments of every parameter as full tensors, which the loader slices for whatever (tp, pp, dp,
ZeRO 0-2) it runs (see :mod:`.optimizer_state` for why this form).

Modules, by concern:

- :mod:`.state`: the client state (iteration, data position, LR schedule, validation history,
  config snapshot) and per-rank RNG states; together with DeepSpeed's files they make a resumed
  run reproduce the uninterrupted one bitwise (fp32, CPU);
- :mod:`.save`: the publication protocol (write into ``.tmp``, rename, then ``latest``);
- :mod:`.latest`: the one reader and the one (atomic) writer of ``latest``;
- :mod:`.load`: pre-launch checks on the files, and the collective restore into an engine;
- :mod:`.reshard`: weights to another (tp, pp), by ``GLMModel`` parameter name;
- :mod:`.optimizer_state`: Adam's state to another (tp, pp, dp, ZeRO stage);
- :mod:`.deepspeed_files`: the only module that knows DeepSpeed's file and pipeline names.
"""

from megatron_glm.serialization import CheckpointFileError
from megatron_glm.training.checkpoint.deepspeed_files import (
    checkpoint_files,
    checkpoint_layout,
    is_zero3,
    model_state_files,
)
from megatron_glm.training.checkpoint.latest import read_latest, resolve_tag, write_latest
from megatron_glm.training.checkpoint.load import (
    check_architecture,
    check_checkpoint,
    check_layout,
    describe_saved_layout,
    load,
    load_model_state,
    resolve_load_dir,
)
from megatron_glm.training.checkpoint.optimizer_state import (
    STORE,
    FullOptimizerState,
    read_optimizer_state,
    restore_optimizer_state,
)
from megatron_glm.training.checkpoint.reshard import (
    RESHARD_KEY,
    ReshardResult,
    merge_shards,
    read_full_state,
    read_weight_shards,
    reshard_checkpoint,
    reshard_info,
    saved_config,
    split_state,
    write_checkpoint,
)
from megatron_glm.training.checkpoint.save import optimizer_param_names, save
from megatron_glm.training.checkpoint.shared import CheckpointDirectoryError, agree_on_checkpoint
from megatron_glm.training.checkpoint.state import (
    CLIENT_STATE_VERSION,
    LAYOUT,
    MODEL_PARALLEL_RNG,
    ClientState,
    NonFiniteError,
    NonFiniteWeightsError,
    rng_file,
    rng_state,
    set_rng_state,
    tag_for,
)

__all__ = [
    "CLIENT_STATE_VERSION",
    "LAYOUT",
    "MODEL_PARALLEL_RNG",
    "RESHARD_KEY",
    "STORE",
    "CheckpointDirectoryError",
    "CheckpointFileError",
    "ClientState",
    "FullOptimizerState",
    "NonFiniteError",
    "NonFiniteWeightsError",
    "ReshardResult",
    "agree_on_checkpoint",
    "check_architecture",
    "check_checkpoint",
    "check_layout",
    "checkpoint_files",
    "checkpoint_layout",
    "describe_saved_layout",
    "is_zero3",
    "load",
    "load_model_state",
    "merge_shards",
    "model_state_files",
    "optimizer_param_names",
    "read_full_state",
    "read_latest",
    "read_optimizer_state",
    "read_weight_shards",
    "reshard_checkpoint",
    "reshard_info",
    "resolve_load_dir",
    "resolve_tag",
    "restore_optimizer_state",
    "rng_file",
    "rng_state",
    "save",
    "saved_config",
    "set_rng_state",
    "split_state",
    "tag_for",
    "write_checkpoint",
    "write_latest",
]
