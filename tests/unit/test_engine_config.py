"""Engine set-up without starting DeepSpeed: config dict, weight-decay groups, skippable AdamW,
launch checks, stop conditions, the checkpoint `latest` pointer, and the pipeline's launch
refusals, DeepSpeed settings, bubble fraction and checkpoint file layout."""

from __future__ import annotations

import copy
import os
import runpy
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from megatron_glm.config import RunConfig, load_config
from megatron_glm.model import build_model
from megatron_glm.serialization import CheckpointFileError
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
from megatron_glm.training.metrics import (
    StepStats,
    Throughput,
    bubble_fraction,
    format_log_line,
    step_scalars,
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


def _skippable(kind: str, params: list[torch.nn.Parameter], **kwargs: Any) -> Any:
    if kind == "cpu_adam":  # compiles DeepSpeed's C++ op at its first use in this environment
        from megatron_glm.training.cpu_adam import SkippableCPUAdam

        return SkippableCPUAdam(params, **kwargs)
    return SkippableAdamW(params, **kwargs)


@pytest.mark.parametrize("kind", ["adamw", "cpu_adam"])
def test_skippable_optimizers_leave_parameters_and_moments(kind: str) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = _skippable(kind, [p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    after_one = p.detach().clone()
    state = copy.deepcopy(opt.state[p])
    p.grad = torch.full((3,), float("nan"))
    opt.skip_next_step = True
    opt.step()
    assert opt.last_step_skipped and not opt.skip_next_step
    assert torch.equal(p.detach(), after_one)
    assert all(
        torch.equal(torch.as_tensor(opt.state[p][k]), torch.as_tensor(v)) for k, v in state.items()
    )
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.last_step_skipped and not torch.equal(p.detach(), after_one)


def test_cpu_adam_takes_torch_adamw_steps() -> None:
    """ZeRO-Offload's optimizer (DeepSpeed's C++ CPU Adam, AdamW mode) and torch's AdamW make
    the same updates, decoupled weight decay included: the offloaded run may equal the plain one."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4099, generator=g)  # not a multiple of the SIMD width: the tail too
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    kwargs = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    opts = [
        _skippable(kind, [p], **kwargs)
        for kind, p in zip(("adamw", "cpu_adam"), params, strict=True)
    ]
    for _ in range(5):
        grad = torch.randn(4099, generator=g)
        for opt, p in zip(opts, params, strict=True):
            p.grad = grad.clone()
            opt.step()
    moved = (params[0] - start).abs().max()
    assert moved > 1e-2
    assert torch.allclose(params[1], params[0], rtol=0, atol=1e-6), (
        (params[1] - params[0]).abs().max()
    )
    assert opts[1].state[params[1]]["step"] == 5 and opts[1].integer_step


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
    if not torch.cuda.is_available() and not get_accelerator().is_fp16_supported():
        with pytest.raises(
            ValueError, match=r"^config field 'train\.precision': fp16 needs a GPU"
        ) as err:
            validate_for_launch(_cfg("train.precision=fp16"), 1, check_data=False)
        assert "runs on GPUs; on CPU use bf16" in str(err.value)
    validate_for_launch(_cfg("train.cpu_offload=true", "train.zero_stage=2"), 1, check_data=False)
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
        f"--load {tmp_path} --tp 1 --save NEW_DIR (the optimizer state is carried over)"
    )


# ----------------------------------------------------------------------------- pipeline parallelism


def test_pipeline_refusals_name_the_field_and_the_alternative() -> None:
    validate_for_launch(_cfg("parallel.pp=2", "train.zero_stage=1"), 2, check_data=False)
    for stage in (2, 3):
        with pytest.raises(ValueError) as err:
            validate_for_launch(
                _cfg("parallel.pp=2", f"train.zero_stage={stage}"), 2, check_data=False
            )
        assert str(err.value) == (
            f"config field 'train.zero_stage': ZeRO-{stage} cannot be combined with "
            "parallel.pp=2: DeepSpeed's pipeline engine accumulates each stage's gradients over "
            "the micro-batches of a step, which ZeRO-2 (sharded gradients) and ZeRO-3 (sharded "
            "parameters) do not allow, and DeepSpeed refuses it; use train.zero_stage=1 (sharded "
            "optimizer state) with pipeline parallelism, or parallel.pp=1 with ZeRO-2/3"
        )
    # Layouts that do not divide: layers vs stages and heads vs tp (config), world size (launch).
    with pytest.raises(
        ValueError, match=r"^config field 'model\.num_layers': must be divisible by parallel\.pp"
    ):
        _cfg("parallel.pp=3", "model.num_layers=4")
    with pytest.raises(
        ValueError,
        match=r"^config field 'model\.num_attention_heads': must be divisible by parallel\.tp",
    ):
        _cfg("parallel.tp=4", "model.num_attention_heads=2")
    with pytest.raises(
        ValueError,
        match=r"^config field 'parallel\.tp': tp \* pp = 4 does not divide the world size 6$",
    ):
        validate_for_launch(_cfg("parallel.tp=2", "parallel.pp=2"), 6, check_data=False)


def test_partition_by_a_type_that_no_layer_has_is_refused_before_launch() -> None:
    """DeepSpeed's own matcher (case-insensitive search) decides, before any process group."""
    for method in ("type:GLMBlock", "type:block", "type:Embedding|Head", "uniform"):
        validate_for_launch(
            _cfg("parallel.pp=2", f"parallel.partition_method={method}"), 2, check_data=False
        )
    layers = "EmbeddingLayer, GLMBlock, FinalLayerNorm, TiedHead"
    with pytest.raises(ValueError) as err:
        validate_for_launch(
            _cfg("parallel.pp=2", "parallel.partition_method=type:GLMBlok"), 2, check_data=False
        )
    assert str(err.value) == (
        "config field 'parallel.partition_method': 'type:GLMBlok' selects no layer; the "
        f"pipeline's layers are {layers}: use e.g. type:GLMBlock, or parameters or uniform"
    )
    with pytest.raises(ValueError) as err:
        validate_for_launch(
            _cfg("parallel.pp=2", "parallel.partition_method=type:(Block"), 2, check_data=False
        )
    assert str(err.value).startswith(
        "config field 'parallel.partition_method': 'type:(Block' is not a regex (missing )"
    )
    # without a pipeline the method is unused, so not checked
    validate_for_launch(_cfg("parallel.partition_method=type:GLMBlok"), 1, check_data=False)


def test_deepspeed_config_of_a_pipeline() -> None:
    pp = _cfg("parallel.pp=2", "train.zero_stage=0", "optimizer.clip_grad=0.5")
    ds = deepspeed_config(pp, dp_size=1)
    assert ds["pipeline"] == {"pipe_partitioned": True, "grad_partitioned": True}
    assert ds["gradient_clipping"] == 0.0  # ZeRO-0 fp32 + PP: the step hook clips (engine)
    sp = _cfg(
        "parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "train.zero_stage=1"
    )
    ds = deepspeed_config(sp, dp_size=1)
    assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    assert ds["gradient_clipping"] == 1.0  # ZeRO-1: DeepSpeed clips
    assert "pipeline" not in deepspeed_config(_cfg(), dp_size=1)


def test_bubble_fraction_and_log_line() -> None:
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    with pytest.raises(
        ValueError, match=r"^bubble_fraction: pp \(0\) and micro_batches \(4\) >= 1$"
    ):
        bubble_fraction(0, 4)
    speed = Throughput(tokens_per_s=1000.0, tflops_per_device=0.5, mfu=None)
    stats = StepStats(
        iteration=3,
        train_iters=10,
        consumed_samples=12,
        loss=5.0,
        objective_loss={"span": 5.0},
        lr=1e-3,
        grad_norm=1.0,
        loss_scale=1.0,
        speed=speed,
        memory_mib=10.0,
        seconds_per_step=0.1,
        layout="tp 2 pp 4 dp 1",
        pipeline_bubble=bubble_fraction(4, 4),
    )
    assert format_log_line(stats).endswith(" | 0.100 s/step | tp 2 pp 4 dp 1, bubble 42.9%")
    assert step_scalars(stats)["perf/pipeline_bubble"] == pytest.approx(3 / 7)


def _pipeline_checkpoint(root: Path, full: dict[str, torch.Tensor], layout: dict, pp: int) -> Path:
    """A (tp 2, pp) checkpoint written the way DeepSpeed's PipelineEngine names its files."""
    from megatron_glm.training.checkpoint import write_checkpoint

    tag = root / "global_step5"
    tag.mkdir(parents=True)
    (root / "latest").write_text("global_step5")
    base = {"iteration": 5, "config": {"model": {"num_layers": 2}}, "optimizer": {"x": 1}}
    write_checkpoint(full, layout, tag, tp=2, pp=pp, base=base, marker={})
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank00000.pt"):
        (tag / name).write_bytes(b"")
    return tag


def test_pipeline_checkpoint_files_reshard_and_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DeepSpeed's pipeline layout (per-layer files), (tp 2, pp 2) -> (1, 1) -> (1, 4) -> (2, 1),
    and ``load_model_state`` of each: the same full state dict, bitwise."""
    from megatron_glm.model import tensor_parallel_layout
    from megatron_glm.training.checkpoint import (
        checkpoint_layout,
        load_model_state,
        reshard_checkpoint,
    )

    cfg = _cfg().model
    full = build_model(cfg, vocab_size=128, seed=3).state_dict()
    layout = tensor_parallel_layout(cfg)
    src = _pipeline_checkpoint(tmp_path / "tp2pp2", full, layout, pp=2)
    names = sorted(p.name for p in src.iterdir())
    assert names[:8] == [f"layer_0{i}-model_0{t}-model_states.pt" for i in range(4) for t in (0, 1)]
    assert names[8:12] == [f"mp_rank_0{m}_model_states.pt" for m in range(4)]
    assert checkpoint_layout(src) == (2, 2)
    blob = torch.load(src / "mp_rank_03_model_states.pt", weights_only=True)
    assert blob["module"] is None and blob["mp_world_size"] == 4 and blob["iteration"] == 5
    block = torch.load(src / "layer_01-model_01-model_states.pt", weights_only=True)
    assert set(block) == {k.removeprefix("layers.1.") for k in full if k.startswith("layers.1.")}
    chain = [("tp2pp2", "r11", 1, 1), ("r11", "r14", 1, 4), ("r14", "r21", 2, 1)]
    for source, target, tp, pp in chain:
        # The source's optimizer files are empty placeholders: weights only (--no-optimizer).
        result = reshard_checkpoint(
            tmp_path / source, tmp_path / target, tp, layout, pp=pp, optimizer=False
        )
        assert (result.source_pp, result.target_tp, result.target_pp) == (
            checkpoint_layout(tmp_path / source / "global_step5")[1],
            tp,
            pp,
        )
        assert checkpoint_layout(tmp_path / target / "global_step5") == (tp, pp)
        state = load_model_state(tmp_path / target, layout=layout)
        assert state.keys() == full.keys()
        assert all(torch.equal(state[k], v) for k, v in full.items()), target
    tool = runpy.run_path(str(Path(__file__).parents[2] / "tools" / "reshard_checkpoint.py"))
    args = ["--load", str(tmp_path / "r14"), "--save", str(tmp_path / "cli")]
    tool["main"]([*args, "--tp", "2", "--pp", "2"])
    assert capsys.readouterr().out.splitlines()[0] == (
        f"resharded {tmp_path / 'r14'}/global_step5: (tp 1, pp 4) -> (tp 2, pp 2)"
    )
    assert sorted(p.name for p in (tmp_path / "cli" / "global_step5").iterdir()) == names[:12]
    with pytest.raises(
        CheckpointFileError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: empty"
    ):
        reshard_checkpoint(tmp_path / "tp2pp2", tmp_path / "kept", 1, layout, pp=1)
    first = reshard_checkpoint(
        tmp_path / "tp2pp2", tmp_path / "again", 1, layout, pp=1, optimizer=False
    )
    assert first.dropped == ["rng_rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert torch.load(first.files[0], weights_only=True)["optimizer"] is None
