"""Checks that need the world size, the machine or the filesystem, run before any process group.

``RunConfig`` enforces every rule that needs only the config, on load (ranges, heads and vocab
dividing over tp, layers over pp, ZeRO with a pipeline, unknown keys): this module does not
repeat them. What the config cannot know is the launch: the data-parallel size (world size /
(tp * pp)) that the global batch must divide into, whether the machine can run fp16 (a GPU, or
a CPU with native fp16), and whether the data, tokenizer and checkpoint files exist and hold
what they should. One rule that reads only the config is checked here because its code cannot
live in the leaf ``config`` module: a ``type:REGEX`` partition is matched by DeepSpeed's own
matcher (``training.pipeline.check_partition_method``).

Finding these out after ``init_process_group`` would mean N ranks failing with N tracebacks (or
hanging in a collective), so :func:`validate_for_launch` is the first thing ``pretrain.main``
calls, with ``WORLD_SIZE`` from the environment. Every error names the config field
(:class:`~megatron_glm.config.ConfigError`), or the file and what is wrong with it: the
checkpoint to resume from is opened file by file (restricted unpickler, tensor bytes not read)
and every dataset is checked (header, sizes, dtype, emptiness, token ids against the tokenizer's
vocabulary: :func:`megatron_glm.data.indexed.check_dataset`), so a truncated, corrupt or planted
file is named here rather than in N tracebacks after start-up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_glm.config import ConfigError, RunConfig
from megatron_glm.data.indexed import check_dataset
from megatron_glm.data.tokenizer import Tokenizer
from megatron_glm.data.tokenizer import load_tokenizer as _load
from megatron_glm.model import resolve_vocab_size
from megatron_glm.training.checkpoint import (
    check_architecture,
    check_checkpoint,
    check_layout,
    resolve_load_dir,
)


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """World size / (tp * pp), which must divide evenly."""
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if world_size % model_parallel:
        raise ConfigError(
            "parallel.tp",
            f"tp * pp = {model_parallel} does not divide the world size {world_size}",
        )
    return world_size // model_parallel


def validate_for_launch(
    cfg: RunConfig, world_size: int, *, check_data: bool = True, check_resume: bool = True
) -> None:
    """Raise ValueError naming the field for every launch-time misconfiguration.

    ``check_data=False`` skips the data/tokenizer files (runs fed by another batch source);
    ``check_resume=False`` the checkpoint to resume from (the dry run reports on it instead:
    :func:`resume_problem`).
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if cfg.parallel.pp > 1:
        from megatron_glm.training.pipeline import check_partition_method  # imports DeepSpeed

        check_partition_method(cfg.parallel.partition_method, cfg.model.num_layers)
    dp = data_parallel_size(cfg, world_size)
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} is not micro_batch_size ({t.micro_batch_size}) x "
            f"gradient accumulation x data-parallel size ({dp}); use a multiple of "
            f"{t.micro_batch_size * dp}",
        )
    if t.precision == "fp16":
        _check_fp16()
    load_dir = resolve_load_dir(cfg.checkpoint.load, cfg.checkpoint.save)  # checkpoint.load
    if load_dir is not None and check_resume:
        _check_resume(cfg, load_dir, world_size)
    if check_data:
        _check_data(cfg)


def _check_fp16() -> None:
    """fp16 runs where DeepSpeed's accelerator supports it: CUDA, or a CPU with native fp16.

    DeepSpeed's engine asks its accelerator (``is_fp16_supported``: on CPU, oneDNN's fp16 support,
    AVX512-FP16/AMX-FP16) and raises "Type fp16 is not supported on your device" on every rank
    after the process group started; the same question is asked here, before the launch.
    """
    if torch.cuda.is_available():
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        raise ConfigError(
            "train.precision",
            f"fp16 needs a GPU here: DeepSpeed's {accelerator.device_name()} accelerator runs "
            "fp16 only on CPUs with native fp16 (AVX512-FP16/AMX-FP16), which this one lacks. "
            "fp16 with dynamic loss scaling runs on GPUs; on CPU use bf16 (bf16 forward and "
            "backward, fp32 master weights and optimizer) or fp32",
        )


def _check_resume(cfg: RunConfig, load_dir: str, world_size: int) -> None:
    """The checkpoint to resume from fits this layout, opens safely and holds this model."""
    dp, p = data_parallel_size(cfg, world_size), cfg.parallel
    check_layout(load_dir, dp_size=dp, zero_stage=cfg.train.zero_stage, tp=p.tp, pp=p.pp)
    check_checkpoint(
        load_dir, world_size=world_size, allow_missing_rng=cfg.checkpoint.allow_missing_rng
    )
    check_architecture(load_dir, cfg.model)


def resume_problem(cfg: RunConfig, load_dir: str, world_size: int) -> str | None:
    """Why the launch would refuse to resume from ``load_dir`` (what to do included), or None.

    The dry run reports it instead of refusing: planning a run at another layout than the
    checkpoint's is what one does before resharding it.
    """
    try:
        _check_resume(cfg, load_dir, world_size)
    except ConfigError as exc:
        return exc.message
    except ValueError as exc:  # CheckpointFileError: a file named
        return str(exc)
    return None


def load_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The run's tokenizer, its vocabulary padded for the model (multiple of 128 x tp)."""
    return _load(
        cfg.data.tokenizer_model,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        tp=cfg.parallel.tp,
    )


def _check_data(cfg: RunConfig) -> None:
    d = cfg.data
    if not d.data_path:
        raise ConfigError("data.data_path", "is empty; give the prefix of a preprocessed corpus")
    for prefix in d.data_path:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(
                    "data.data_path",
                    f"{prefix}{suffix} not found (preprocess the corpus with "
                    "tools/preprocess_data.py; give the prefix without .bin/.idx)",
                )
    if not d.tokenizer_model:
        raise ConfigError(
            "data.tokenizer_model",
            "is empty; give a SentencePiece .model path or a tokenizer folder",
        )
    if not Path(d.tokenizer_model).exists():
        raise ConfigError("data.tokenizer_model", f"{d.tokenizer_model} not found")
    tokenizer = load_tokenizer(cfg)
    resolve_vocab_size(cfg.model, tokenizer.padded_vocab_size)  # names model.vocab_size
    for prefix in d.data_path:  # header, sizes, dtype, emptiness, token ids < vocabulary
        check_dataset(prefix, tokenizer.vocab_size)
