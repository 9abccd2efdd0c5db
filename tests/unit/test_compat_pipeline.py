"""Version seam: the private DeepSpeed behaviour ``compat.deepspeed``'s pipeline section relies on.

Each test pins one behaviour of the installed DeepSpeed that the pipeline path depends on and
that no public API promises, so an upgrade that changes it fails here, by name, instead of
hanging or silently mis-training in a multi-process run. Single process, no process group:
objects are half-built (``__new__``) with exactly the attributes the code under test reads.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch import nn

from megatron_glm.compat.deepspeed import (
    MaterializingPipelineModule,
    find_layer_type,
    reduce_zero_grad_norm_once,
    wrap_optimizer_step,
)
from megatron_glm.training.pipeline import pipeline_layer_names

# ----------------------------------------------------------------------------- OptimizerStep


def _bare_engine(calls: list[Any]) -> Any:
    """A PipelineEngine with only what ``_exec_schedule`` and ``_exec_optimizer_step`` read."""
    eng = PipelineEngine.__new__(PipelineEngine)
    nn.Module.__init__(eng)
    eng._reserve_pipe_buffers = lambda n: None
    eng.wall_clock_breakdown = lambda: False
    eng._take_model_step = lambda lr_kwargs: calls.append(("deepspeed step", lr_kwargs))
    eng.global_rank = 1  # rank 0 would also write monitor events
    return eng


class _OneStepSchedule:
    def num_pipe_buffers(self) -> int:
        return 1

    def __iter__(self) -> Iterator[list[Any]]:
        yield [schedule.OptimizerStep()]


def test_optimizer_step_instruction_is_the_method_we_wrap() -> None:
    table = PipelineEngine._INSTRUCTION_MAP
    assert table[schedule.OptimizerStep] is PipelineEngine._exec_optimizer_step
    assert "_take_model_step" in inspect.getsource(PipelineEngine._exec_optimizer_step)


def test_wrapped_optimizer_step_runs_the_hook_first_on_this_engine_only() -> None:
    calls: list[Any] = []
    eng, other = _bare_engine(calls), _bare_engine(calls)
    wrap_optimizer_step(eng, lambda engine: calls.append(("hook", engine)))
    PipelineEngine._exec_schedule(eng, _OneStepSchedule())  # dispatch through the instance
    assert calls == [("hook", eng), ("deepspeed step", None)]
    calls.clear()
    PipelineEngine._exec_schedule(other, _OneStepSchedule())  # class table untouched
    assert calls == [("deepspeed step", None)]
    assert PipelineEngine._INSTRUCTION_MAP[schedule.OptimizerStep] is (
        PipelineEngine._exec_optimizer_step
    )


# ----------------------------------------------------------------------------- PipelineModule


class _Tied(TiedLayerSpec):
    """A tied spec over a module built beforehand (as ``training.pipeline`` does)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__("tied", type(module), tied_weight_attr=["weight"])
        self.module = module

    def build(self, log: bool = False) -> nn.Module:
        return self.module


def _specs() -> list[Any]:
    with torch.device("meta"):
        first = nn.Embedding(64, 8)
        blocks = [nn.Linear(8, 8) for _ in range(3)]
        norm = nn.LayerNorm(8)
        head = nn.Embedding(64, 8)
    return [_Tied(first), *blocks, norm, _Tied(head)]


def _bare_module(specs: list[Any], stage: int, method: str, seen: list[Any]) -> Any:
    """A MaterializingPipelineModule of 2 stages, partitioned as ``stage`` (not built yet)."""
    pipe = MaterializingPipelineModule.__new__(MaterializingPipelineModule)
    nn.Module.__init__(pipe)
    pipe._materialize = lambda index, module: seen.append((index, module))
    pipe.num_stages = 2
    pipe._topo = PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=1)
    pipe.global_rank = stage  # the topology maps rank r to stage r
    pipe.loss_fn = None
    pipe._layer_specs = list(specs)
    pipe._partition_layers(method=method)
    return pipe


@pytest.mark.parametrize("method", ["parameters", "uniform", "type:linear"])
def test_local_bounds_are_this_stage_of_the_partition(method: str) -> None:
    """``_local_start``/``_local_stop`` are set by partitioning, before ``_build``, to this
    stage's slice of ``parts``; ``parameters`` counts meta-device layers without allocating."""
    specs = _specs()
    for stage in range(2):
        pipe = _bare_module(specs, stage, method, [])
        parts = list(pipe.parts)
        assert parts[0] == 0 and parts[-1] == len(specs) and parts == sorted(parts)
        assert (pipe._local_start, pipe._local_stop) == (parts[stage], parts[stage + 1])
    assert all(
        p.is_meta for s in specs for p in (s.module if isinstance(s, _Tied) else s).parameters()
    )


def test_build_materializes_exactly_the_local_layers_before_registering_them() -> None:
    specs = _specs()
    seen: list[Any] = []
    pipe = _bare_module(specs, 1, "uniform", seen)
    pipe.seed_layers = False
    pipe.forward_funcs, pipe.fwd_map = [], {}
    pipe.tied_modules, pipe.tied_weight_attrs = nn.ModuleDict(), {}
    registered: list[str] = []
    add_module = pipe.add_module

    def spy(name: str, module: nn.Module) -> None:
        registered.append(name)
        assert any(m is module for _, m in seen), "registered before it was materialised"
        add_module(name, module)

    pipe.add_module = spy
    MaterializingPipelineModule._build(pipe)
    local = range(pipe._local_start, pipe._local_stop)
    assert [i for i, _ in seen] == list(local) and len(local) == 3
    for index, module in seen:
        spec = specs[index]
        assert module is (spec.module if isinstance(spec, _Tied) else spec)
    # nn.Module layers are registered under their global index; the tied one by its key
    assert registered == [str(i) for i in local if not isinstance(specs[i], _Tied)]
    assert pipe.tied_modules["tied"] is specs[-1].module
    assert len(pipe.forward_funcs) == 3


def test_find_layer_type_is_a_case_insensitive_search_over_class_names() -> None:
    names = pipeline_layer_names(2)  # EmbeddingLayer, GLMBlock x2, FinalLayerNorm, TiedHead
    assert find_layer_type(names, "glmblock") == [1, 2]
    assert find_layer_type(names, "block") == [1, 2]  # search, not full match
    assert find_layer_type(names, "layer") == [0, 3]
    with pytest.raises(RuntimeError, match="found no valid layers"):
        find_layer_type(names, "attention")
    with pytest.raises(Exception) as bad:  # the ``regex`` module's error, as in DeepSpeed
        find_layer_type(names, "(")
    assert not isinstance(bad.value, RuntimeError)


def test_find_layer_type_agrees_with_partitioning_over_modules() -> None:
    specs = _specs()
    holder = SimpleNamespace(_layer_specs=specs)
    names = ["Embedding", "Linear", "Linear", "Linear", "LayerNorm", "Embedding"]
    for pattern in ("linear", "embedding", "norm"):
        assert PipelineModule._find_layer_type(holder, pattern) == find_layer_type(names, pattern)


# ----------------------------------------------------------------------------- ZeRO-1/2 norm


def test_zero_optimizer_still_has_the_norm_internals_we_patch() -> None:
    assert "norm_type" in inspect.signature(DeepSpeedZeroOptimizer.scaled_global_norm).parameters
    assert "self.model_parallel_group =" in inspect.getsource(DeepSpeedZeroOptimizer.__init__)
    direct = inspect.getsource(DeepSpeedZeroOptimizer.get_grad_norm_direct)
    assert "_model_parallel_all_reduce" in direct
    # A None group means "no collective" (no process group exists here: one would raise).
    t = torch.tensor([2.0])
    fake = SimpleNamespace(model_parallel_group=None)
    DeepSpeedZeroOptimizer._model_parallel_all_reduce(fake, t, None)
    assert t.item() == 2.0


def test_zero_norm_is_reduced_once_over_the_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    opt = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)
    group = object()
    opt.model_parallel_group = group
    groups_seen: list[Any] = []

    def per_group(norm_type: int = 2) -> torch.Tensor:  # this stage's norm: 3
        groups_seen.append(opt.model_parallel_group)
        return torch.tensor(3.0)

    opt.scaled_global_norm = per_group
    reduced: list[Any] = []

    def all_reduce(t: torch.Tensor, group: Any = None) -> None:  # the other stage's squares: 16
        reduced.append(group)
        t.add_(16.0)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    reduce_zero_grad_norm_once(SimpleNamespace(optimizer=opt))
    assert opt.scaled_global_norm(2).item() == pytest.approx(5.0)
    assert groups_seen == [None] and reduced == [group]  # local norm, then one collective
    assert opt.model_parallel_group is group
    # Not a ZeRO-1/2 optimizer: left alone.
    other = SimpleNamespace(scaled_global_norm=per_group)
    reduce_zero_grad_norm_once(SimpleNamespace(optimizer=other))
    assert other.scaled_global_norm is per_group
