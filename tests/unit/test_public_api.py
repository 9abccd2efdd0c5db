"""``from megatron_glm import ...``: every public name is the object at its documented path, and
``import megatron_glm`` stays cheap (no torch, no DeepSpeed)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import megatron_glm

DOCUMENTED = {  # as listed in megatron_glm/__init__.py's docstring and the README
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


def test_all_is_the_documented_list() -> None:
    assert sorted(megatron_glm.__all__) == sorted(DOCUMENTED)
    for name, module in DOCUMENTED.items():  # the package docstring names each one's home
        assert any(
            name in line and line.rstrip().endswith(module)
            for line in (megatron_glm.__doc__ or "").splitlines()
        ), name


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_each_name_is_the_object_at_its_path(name: str) -> None:
    exported = getattr(megatron_glm, name)
    assert exported is getattr(importlib.import_module(DOCUMENTED[name]), name)
    assert name in dir(megatron_glm)


def test_star_import_and_unknown_names() -> None:
    namespace: dict[str, object] = {}
    exec("from megatron_glm import *", namespace)
    assert set(DOCUMENTED) <= set(namespace)
    with pytest.raises(AttributeError, match="has no attribute 'GLMModle'"):
        _ = megatron_glm.GLMModle  # type: ignore[attr-defined]


def test_import_is_cheap() -> None:
    """A fresh interpreter: the package import pulls in neither torch nor DeepSpeed; asking for
    a model-side name then imports torch (but still not DeepSpeed)."""
    code = (
        "import sys, megatron_glm\n"
        "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))\n"
        "megatron_glm.GLMModel, megatron_glm.run_pretraining\n"
        "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == ["[]", "['torch']"]
