"""Optimizer state across layouts, in one process (a world of 1 on gloo).

What :func:`read_optimizer_state` extracts from a checkpoint's files (ZeRO-1/2 flat partitions,
ZeRO-0's torch state) equals the live optimizer's state (DeepSpeed's ``safe_get_full_*`` under
ZeRO, torch's own state under ZeRO-0) bitwise. A resharded checkpoint then restores it into an
engine of another ZeRO stage (one with CPU offload: DeepSpeed's CPU Adam): that engine's state
equals the store bitwise, and its next update gives the weights of the engine that never stopped.
The same checkpoint resharded without its optimizer state gives other weights after that update
(the check above can fail).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from test_model import make_batch

from megatron_glm.compat.deepspeed import link_optimizer_state
from megatron_glm.config import load_config
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training import checkpoint as ckpt
from megatron_glm.training.engine import Engine
from megatron_glm.training.step import build_runner

VOCAB = 128
RUN = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    f"model.vocab_size={VOCAB}",
    "model.max_position_embeddings=64",
    "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0",
    "data.seq_length=24",
    "train.micro_batch_size=3",
    "train.global_batch_size=3",
    "optimizer.lr=0.003",
    "optimizer.warmup_iters=0",
]
KINDS = ("fp32", "exp_avg", "exp_avg_sq")

pytestmark = pytest.mark.slow


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.device]:
    from megatron_glm.training.distributed import DistEnv, destroy_distributed, init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # init_distributed writes them; restored after
    yield init_distributed(DistEnv(0, 1, 0, None, None))
    destroy_distributed()


def _engine(zero: int, device: torch.device, precision: str = "fp32", *extra: str) -> Engine:
    cfg = load_config(
        None, [*RUN, f"train.zero_stage={zero}", f"train.precision={precision}", *extra]
    )
    dims = ParallelDims.build()
    return build_runner(cfg, vocab_size=VOCAB, dims=dims, device=device).eng


def _step(eng: Engine, seed: int) -> float:
    """One update on one micro-batch; returns its loss (computed before the update)."""
    out = eng.engine(make_batch(seed))
    loss = out.sum_loss / out.num_tokens
    eng.engine.backward(loss)
    eng.engine.step()
    eng.scheduler.step()
    return float(loss.detach())


def _live(eng: Engine, param: torch.nn.Parameter, kind: str) -> torch.Tensor:
    """The optimizer's current value of ``kind`` for ``param`` (full, fp32)."""
    if eng.engine.optimizer is eng.optimizer:  # ZeRO-0 fp32: the torch optimizer itself
        return param.detach() if kind == "fp32" else eng.optimizer.state[param][kind]
    if kind == "fp32":
        return safe_get_full_fp32_param(param)
    return safe_get_full_optimizer_state(param, kind)


def _assert_state(eng: Engine, state: ckpt.FullOptimizerState, step: int, what: str) -> None:
    if eng.engine.optimizer is not eng.optimizer:
        # DeepSpeed 0.19 links the fragments of every group after the first group's first
        # step, when the later groups have no state yet: relink before reading through them.
        link_optimizer_state(eng.engine.optimizer)
    names = [n for n, _ in eng.module.named_parameters()]
    assert sorted(state.tensors["exp_avg"]) == sorted(names), what
    for name, param in eng.module.named_parameters():
        for kind in KINDS:
            assert torch.equal(state.tensors[kind][name], _live(eng, param, kind)), (what, kind)
    steps = {int(s["step"]) for s in eng.optimizer.state.values()}
    assert state.step == step and steps == {step}, (what, state.step, steps)


def _fp32(eng: Engine) -> dict[str, torch.Tensor]:
    return {n: _live(eng, p, "fp32").clone() for n, p in eng.module.named_parameters()}


def _save(eng: Engine, root: Path, iteration: int) -> Path:
    state = ckpt.ClientState(iteration, 3 * iteration, eng.scheduler.state_dict())
    return root / ckpt.save(eng, root, state)


@pytest.mark.parametrize(
    ("zero", "precision", "offload"),
    [
        (0, "fp32", False),
        (1, "fp32", False),
        (2, "fp32", False),
        (1, "bf16", False),
        (0, "fp32", True),  # restored into ZeRO-1 + CPU offload (DeepSpeed's CPU Adam)
    ],
)
def test_extracted_optimizer_state_equals_the_live_one_and_restores_into_another_stage(
    tmp_path: Path,
    device: torch.device,
    zero: int,
    precision: str,
    offload: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="megatron_glm")
    layout = tensor_parallel_layout(load_config(None, RUN).model)
    eng = _engine(zero, device, precision)
    _step(eng, 1), _step(eng, 2)
    tag_dir = _save(eng, tmp_path / "run", 2)
    shards = ckpt.read_weight_shards(tag_dir)
    state = ckpt.read_optimizer_state(tag_dir, shards, layout, pp=1)
    assert state is not None
    _assert_state(eng, state, 2, f"ZeRO-{zero} files")

    result = ckpt.reshard_checkpoint(tmp_path / "run", tmp_path / "r", 1, layout)
    assert result.optimizer_kept and result.files[-1].name == ckpt.STORE
    assert ckpt.reshard_info(tmp_path / "r" / "global_step2") == {
        "from_tp": 1,
        "to_tp": 1,
        "optimizer_state": "kept",
    }
    target = (zero + 1) % 3
    resumed = _engine(target, device, precision, f"train.cpu_offload={offload}")
    assert resumed.engine.zero_cpu_offload() == offload
    ckpt.load(resumed, tmp_path / "r")
    assert "was resharded: optimizer state from optimizer_state.pt" in caplog.text
    _assert_state(resumed, state, 2, f"ZeRO-{zero} -> ZeRO-{target} restored")

    loss, loss_resumed = _step(eng, 3), _step(resumed, 3)
    after, after_resumed = _fp32(eng), _fp32(resumed)
    worst = max(float((after[n] - after_resumed[n]).abs().max()) for n in after)
    print(
        f"{precision} ZeRO-{zero} -> ZeRO-{target}{' + offload' * offload}: step 3 loss "
        f"{loss:.8f} vs {loss_resumed:.8f}, "
        f"weights after it differ by {worst:.2e}"
    )
    assert loss_resumed == pytest.approx(loss, abs=1e-6)
    assert worst < 1e-6


def test_without_optimizer_state_the_next_update_differs(
    tmp_path: Path, device: torch.device
) -> None:
    """Control for the test above: Adam restarted gives other weights after one update."""
    layout = tensor_parallel_layout(load_config(None, RUN).model)
    eng = _engine(1, device)
    _step(eng, 1), _step(eng, 2)
    _save(eng, tmp_path / "run", 2)
    result = ckpt.reshard_checkpoint(tmp_path / "run", tmp_path / "r", 1, layout, optimizer=False)
    assert not result.optimizer_kept and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in (
        result.dropped
    )
    resumed = _engine(1, device)
    ckpt.load(resumed, tmp_path / "r")
    _step(eng, 3), _step(resumed, 3)
    after, after_resumed = _fp32(eng), _fp32(resumed)
    worst = max(float((after[n] - after_resumed[n]).abs().max()) for n in after)
    assert worst > 1e-4, worst


def test_bf16_without_zero_is_refused_both_ways(tmp_path: Path, device: torch.device) -> None:
    """bf16 at ZeRO-0 runs DeepSpeed's FP16_UnfusedOptimizer, whose state is neither torch's by
    name nor fragment-mapped: reading it and restoring into it are refused, naming the way out,
    rather than dropping Adam's state silently."""
    layout = tensor_parallel_layout(load_config(None, RUN).model)
    eng = _engine(0, device, "bf16")
    _step(eng, 1)
    tag_dir = _save(eng, tmp_path / "run", 1)
    with pytest.raises(ckpt.CheckpointFileError, match="reshard with --no-optimizer"):
        ckpt.read_optimizer_state(tag_dir, ckpt.read_weight_shards(tag_dir), layout, pp=1)
    fp32 = _engine(1, device)
    _step(fp32, 1)
    _save(fp32, tmp_path / "fp32", 1)
    ckpt.reshard_checkpoint(tmp_path / "fp32", tmp_path / "r", 1, layout)
    with pytest.raises(ValueError, match="FP16_UnfusedOptimizer is not supported"):
        ckpt.load(eng, tmp_path / "r")
