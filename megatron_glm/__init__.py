"""megatron_glm: an open trainer for GLM (General Language Model) on DeepSpeed.

Layers, one-way: ``parallel`` <- ``kernels`` <- ``model`` <- ``training``; ``data`` stands alone
(docs/design.md, "Layers"). Nothing in the library reads ``sys.argv`` or keeps global state; CLIs
live in ``tools/`` and in the ``__main__``-style entry module (``megatron_glm.pretrain``).

The public API, importable from here (README, "Use as a library")::

    GLMModel, build_model              megatron_glm.model.glm
    RunConfig, ModelConfig, load_config  megatron_glm.config
    ParallelDims                       megatron_glm.parallel.dims
    GLMTokenizer                       megatron_glm.data.tokenizer
    IndexedDataset, IndexedDatasetBuilder  megatron_glm.data.indexed
    BlankInfilling                     megatron_glm.data.blank_infilling
    run_pretraining                    megatron_glm.pretrain
    load_model_state                   megatron_glm.training.checkpoint
    fill_blank, fill_blanks            megatron_glm.generation.blank_fill
    GenerationConfig, FillResult       megatron_glm.generation.config
    generate                           megatron_glm.generation.decoder
    setup_logging                      megatron_glm.logs

Each name is imported on first use (as litgpt's ``__init__`` does), so ``import megatron_glm``
costs no torch or DeepSpeed import: a tool that only reads a config or an index stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "GLMModel": "megatron_glm.model.glm",
    "build_model": "megatron_glm.model.glm",
    "RunConfig": "megatron_glm.config",
    "ModelConfig": "megatron_glm.config",
    "load_config": "megatron_glm.config",
    "ParallelDims": "megatron_glm.parallel.dims",
    "GLMTokenizer": "megatron_glm.data.tokenizer",
    "IndexedDataset": "megatron_glm.data.indexed",
    "IndexedDatasetBuilder": "megatron_glm.data.indexed",
    "BlankInfilling": "megatron_glm.data.blank_infilling",
    "run_pretraining": "megatron_glm.pretrain",
    "load_model_state": "megatron_glm.training.checkpoint",
    "fill_blank": "megatron_glm.generation.blank_fill",
    "fill_blanks": "megatron_glm.generation.blank_fill",
    "GenerationConfig": "megatron_glm.generation.config",
    "FillResult": "megatron_glm.generation.config",
    "generate": "megatron_glm.generation.decoder",
    "setup_logging": "megatron_glm.logs",
}
"""Public name -> the module that defines it (imported lazily by :func:`__getattr__`)."""

if TYPE_CHECKING:
    from megatron_glm.config import ModelConfig, RunConfig, load_config
    from megatron_glm.data.blank_infilling import BlankInfilling
    from megatron_glm.data.indexed import IndexedDataset, IndexedDatasetBuilder
    from megatron_glm.data.tokenizer import GLMTokenizer
    from megatron_glm.generation.blank_fill import fill_blank, fill_blanks
    from megatron_glm.generation.config import FillResult, GenerationConfig
    from megatron_glm.generation.decoder import generate
    from megatron_glm.logs import setup_logging
    from megatron_glm.model.glm import GLMModel, build_model
    from megatron_glm.parallel.dims import ParallelDims
    from megatron_glm.pretrain import run_pretraining
    from megatron_glm.training.checkpoint import load_model_state

__all__ = [
    "BlankInfilling",
    "FillResult",
    "GLMModel",
    "GLMTokenizer",
    "GenerationConfig",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "ModelConfig",
    "ParallelDims",
    "RunConfig",
    "build_model",
    "fill_blank",
    "fill_blanks",
    "generate",
    "load_config",
    "load_model_state",
    "run_pretraining",
    "setup_logging",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and remember the object."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
