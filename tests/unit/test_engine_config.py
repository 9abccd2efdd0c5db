"""Engine set-up without starting DeepSpeed: config dict, weight-decay groups, skippable AdamW,
launch checks, stop conditions and the checkpoint `latest` pointer."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from megatron_glm.config import RunConfig, load_config
from megatron_glm.model import build_model
from megatron_glm.training.checkpoint import (
    check_layout,
    read_latest,
    resolve_load_dir,
    tag_for,
)
from megatron_glm.training.engine import (
    GLMPretrainModule,
    SkippableAdamW,
    deepspeed_config,
    param_groups,
)
from megatron_glm.training.preflight import validate_for_launch
from megatron_glm.training.signals import StopConditions


def _cfg(*overrides: str) -> RunConfig:
    return load_config(None, ["model.vocab_size=128", "data.seq_length=32", *overrides])


def test_deepspeed_config_fp32_zero1() -> None:
    cfg = _cfg("train.micro_batch_size=2", "train.global_batch_size=16", "train.zero_stage=1")
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 / (2 * 2)
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 1.0
    assert ds["wall_clock_breakdown"] is False


def test_deepspeed_config_fp16_loss_scaler_and_offload() -> None:
    cfg = _cfg(
        "train.precision=fp16",
        "train.zero_stage=3",
        "train.cpu_offload=true",
        "train.initial_scale_power=12",
        "train.loss_scale_window=500",
        "train.hysteresis=3",
        "train.min_loss_scale=0.5",
        "optimizer.clip_grad=0.5",
    )
    ds = deepspeed_config(cfg, dp_size=1)
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 500,
        "hysteresis": 3,
        "min_loss_scale": 0.5,
    }
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5
    assert _cfg("train.precision=bf16").train.precision == "bf16"
    assert deepspeed_config(_cfg("train.precision=bf16"), 1)["bf16"] == {"enabled": True}


def test_weight_decay_groups_exclude_biases_and_layernorms() -> None:
    cfg = _cfg()
    glm = build_model(cfg.model, device="cpu", seed=1)
    groups = param_groups(GLMPretrainModule(glm), weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in glm.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("word_embeddings" in n for n in decay_names)
    assert any("bias" in n for n in no_decay_names)
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay_names) + len(no_decay_names) == len(list(glm.parameters()))


def test_pretrain_module_has_the_glm_parameter_names() -> None:
    glm = build_model(_cfg().model, device="cpu", seed=1)
    module = GLMPretrainModule(glm)
    assert list(module.state_dict()) == list(glm.state_dict())


def test_skippable_adamw_leaves_parameters_and_moments() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    after_one = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((3,), float("nan"))
    opt.skip_next_step = True
    opt.step()
    assert opt.last_step_skipped and not opt.skip_next_step
    assert torch.equal(p.detach(), after_one)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.last_step_skipped and not torch.equal(p.detach(), after_one)


def test_launch_checks_name_the_field() -> None:
    validate_for_launch(_cfg("parallel.tp=2"), 2, check_data=False)  # tp 2 x dp 1
    with pytest.raises(
        ValueError, match=r"^config field 'parallel\.tp': tp \* pp = 2 does not divide the world"
    ):
        validate_for_launch(_cfg("parallel.tp=2"), 3, check_data=False)
    with pytest.raises(
        ValueError,
        match=r"^config field 'model\.ffn_hidden_size': 90 must be divisible by parallel\.tp \(4\)",
    ):
        validate_for_launch(
            _cfg(
                "parallel.tp=4",
                "model.num_attention_heads=4",
                "model.hidden_size=64",
                "model.ffn_hidden_size=90",
            ),
            4,
            check_data=False,
        )
    with pytest.raises(
        ValueError,
        match=r"^config field 'data\.seq_length': 30 must be divisible by parallel\.tp \(4\) "
        r"with parallel\.sequence_parallel",
    ):
        validate_for_launch(
            _cfg(
                "parallel.tp=4",
                "parallel.sequence_parallel=true",
                "data.seq_length=30",
                "model.num_attention_heads=4",
                "model.hidden_size=64",
            ),
            4,
            check_data=False,
        )
    with pytest.raises(
        ValueError, match=r"^config field 'model\.vocab_size': 130 must be divisible by parallel"
    ):
        validate_for_launch(
            _cfg(
                "parallel.tp=4",
                "model.vocab_size=130",
                "model.num_attention_heads=4",
                "model.hidden_size=64",
            ),
            4,
            check_data=False,
        )
    with pytest.raises(ValueError, match=r"^config field 'train\.global_batch_size': 8 is not"):
        validate_for_launch(
            _cfg("train.micro_batch_size=4", "train.global_batch_size=8"), 4, check_data=False
        )
    validate_for_launch(
        _cfg("train.micro_batch_size=4", "train.global_batch_size=8"), 2, check_data=False
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^config field 'train\.precision': fp16 needs"):
            validate_for_launch(_cfg("train.precision=fp16"), 1, check_data=False)
    with pytest.raises(ValueError, match=r"^config field 'data\.data_path': is empty"):
        validate_for_launch(_cfg(), 1)


def test_stop_conditions_signal_and_deadline() -> None:
    with StopConditions(0.0) as stop:
        assert stop.should_stop(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(torch.device("cpu")) == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored
    expired = StopConditions(1.0, start_time=time.monotonic() - 61.0)
    assert expired.should_stop(torch.device("cpu")) == "exit_duration_mins"
    assert StopConditions(1.0).should_stop(torch.device("cpu")) is None


def test_latest_pointer_and_resume_directory(tmp_path: Path) -> None:
    assert tag_for(100) == "global_step100"
    assert read_latest(tmp_path) is None
    assert resolve_load_dir(None, str(tmp_path)) is None  # nothing to auto-resume yet
    assert resolve_load_dir(None, None) is None
    with pytest.raises(ValueError, match=r"^config field 'checkpoint\.load': .* no 'latest'"):
        resolve_load_dir(str(tmp_path), None)
    (tmp_path / "latest").write_text("global_step7")
    with pytest.raises(ValueError, match="names checkpoint 'global_step7', which does not exist"):
        read_latest(tmp_path)
    (tmp_path / "global_step7").mkdir()
    assert read_latest(tmp_path) == "global_step7"
    assert resolve_load_dir(None, str(tmp_path)) == str(tmp_path)
    assert resolve_load_dir(str(tmp_path), "/elsewhere") == str(tmp_path)


def test_zero_checkpoint_layout_must_match(tmp_path: Path) -> None:
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    check_layout(str(tmp_path), dp_size=8, zero_stage=1)  # no layout.json: DeepSpeed decides
    (tmp_path / "global_step4" / "layout.json").write_text(
        '{"iteration": 4, "dp_size": 2, "zero_stage": 1}'
    )
    check_layout(str(tmp_path), dp_size=2, zero_stage=1)
    with pytest.raises(
        ValueError,
        match=r"^config field 'train\.zero_stage': checkpoint .* was written with ZeRO-1 at "
        r"data-parallel size 2, this run is ZeRO-1 at data-parallel size 1",
    ):
        check_layout(str(tmp_path), dp_size=1, zero_stage=1)
    with pytest.raises(ValueError, match="this run is ZeRO-0 at data-parallel size 2"):
        check_layout(str(tmp_path), dp_size=2, zero_stage=0)
    (tmp_path / "global_step4" / "layout.json").write_text(
        '{"iteration": 4, "dp_size": 2, "zero_stage": 0}'
    )
    check_layout(str(tmp_path), dp_size=4, zero_stage=0)  # full state: any DP size


def test_checkpoint_of_another_tp_pp_layout_is_refused_with_the_reshard_command(
    tmp_path: Path,
) -> None:
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    (tmp_path / "global_step4" / "layout.json").write_text(
        '{"iteration": 4, "tp": 2, "pp": 1, "dp_size": 2, "zero_stage": 0}'
    )
    check_layout(str(tmp_path), dp_size=1, zero_stage=0, tp=2)
    with pytest.raises(ValueError) as err:
        check_layout(str(tmp_path), dp_size=4, zero_stage=0, tp=1)
    assert str(err.value) == (
        f"config field 'parallel.tp': checkpoint {tmp_path}/global_step4 was written with tp 2, "
        "pp 1, this run is tp 1, pp 1; convert it first with python tools/reshard_checkpoint.py "
        f"--load {tmp_path} --tp 1 --save NEW_DIR (optimizer state restarts)"
    )
