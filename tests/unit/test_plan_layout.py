"""Layout planner: the step-time terms against hand computations, the ranking, the memory cut,
and every printed launch line accepted by the config and the launch checks."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from megatron_glm.config import ConfigError, RunConfig, load_config, load_yaml
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.model import num_parameters
from megatron_glm.planning.layout import (
    Assumptions,
    Cluster,
    GiB,
    Layout,
    dp_wire_bytes,
    layout_config,
    padded_vocab_size,
    parse_size,
    plan_layouts,
    step_time,
)
from megatron_glm.planning.memory import MemoryEstimate
from megatron_glm.training.preflight import validate_for_launch
from tools.plan_layout import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG_410M = ROOT / "configs" / "pretrain_glm_410m.yaml"
CONFIG_10B = ROOT / "configs" / "pretrain_glm_10b.yaml"
A = Assumptions(peak_flops=1e15, mfu=0.5, intra_node_bandwidth=100e9, inter_node_bandwidth=10e9)


def _memory(total: int) -> MemoryEstimate:
    return MemoryEstimate(
        params=total, grads=0, optimizer=0, master=0, activations=0, comm_buffers=0
    )


def test_parse_size_units_and_errors() -> None:
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("512MiB") == 2**29
    assert parse_size("4096") == 4096
    for bad in ("80 GiBs", "GiB", "-1GiB", "0GiB"):
        with pytest.raises(ValueError, match=f"memory size '{bad}'"):
            parse_size(bad)


def test_dp_wire_bytes_per_zero_stage() -> None:
    p, d = 1_000_000, 4
    ring = (d - 1) / d * p * 2  # one pass of bf16 over a 4-rank ring
    layouts = {z: Layout(1, 1, d, z, 1, False, False) for z in range(4)}
    assert dp_wire_bytes(layouts[0], p, 2, micro_batches=8) == pytest.approx(2 * ring)
    assert dp_wire_bytes(layouts[1], p, 2, micro_batches=8) == pytest.approx(2 * ring)
    assert dp_wire_bytes(layouts[2], p, 2, micro_batches=8) == pytest.approx(9 * ring)
    assert dp_wire_bytes(layouts[3], p, 2, micro_batches=8) == pytest.approx(24 * ring)
    assert dp_wire_bytes(Layout(1, 1, 1, 3, 1, False, False), p, 2, micro_batches=8) == 0.0


def _cfg_410m(layout: Layout) -> RunConfig:
    return layout_config(load_yaml(CONFIG_410M), layout)


def test_step_time_terms_equal_hand_computation() -> None:
    """glm-410m, 16 GPUs on 2 nodes of 8, tp 2 pp 2 dp 4, micro 4, ZeRO-1, bf16, no SP/ckpt.

    m = 1024 / (4 x 4) = 64. Stages are dp x tp = 8 ranks apart: exactly one node, so the stage
    boundary crosses nodes; a DP group (ranks 0, 2, 4, 6 of stage 0) stays inside node 0.
    """
    layout = Layout(
        tp=2,
        pp=2,
        dp=4,
        zero_stage=1,
        micro_batch_size=4,
        activation_checkpointing=False,
        sequence_parallel=False,
    )
    cfg = _cfg_410m(layout)
    L, h, s, v, gb, m, b = 30, 1024, 512, 30592, 1024, 64, 4
    n_matmul = L * (4 * h * h + 2 * h * 4 * h) + v * h
    flops_per_token = 6 * n_matmul + 12 * L * h * s
    compute = flops_per_token * gb * s / (16 * 1e15 * 0.5)
    act = b * s * h * 2  # one bf16 activation [b, s, h]
    tp_comm = 8 * (1 / 2) * act * (L // 2) * m / 100e9  # 4 all-reduces x 2 (t-1)/t per layer
    bubble = (2 - 1) / m * (compute + tp_comm)
    # a half of each activation per TP rank across the node boundary, then gathered in the node
    pp_comm = 2 * m * (act / 2 / 10e9 + act / 2 / 100e9)
    params = v * h + 2 * 512 * h + L * (12 * h * h + 13 * h) + 2 * h
    dp_comm = 2 * (3 / 4) * params / 4 * 2 / 100e9  # inside a node
    t = step_time(cfg, layout, Cluster(gpus=16, gpu_memory=80 * GiB, nodes=2), A, v)
    assert t.compute == pytest.approx(compute, rel=1e-12)
    assert t.tp_comm == pytest.approx(tp_comm, rel=1e-12)
    assert t.bubble == pytest.approx(bubble, rel=1e-12)
    assert t.pp_comm == pytest.approx(pp_comm, rel=1e-12)
    assert t.dp_comm == pytest.approx(dp_comm, rel=1e-12)
    assert t.total == pytest.approx(compute + tp_comm + bubble + pp_comm + dp_comm, rel=1e-12)
    # 4 GPUs per node: the DP group {0, 2, 4, 6} spans nodes 0 and 1, and the stages too
    four = step_time(cfg, layout, Cluster(gpus=16, gpu_memory=80 * GiB, nodes=4), A, v)
    assert four.dp_comm == pytest.approx(dp_comm * 10, rel=1e-12)
    assert four.pp_comm == pytest.approx(pp_comm, rel=1e-12)
    # 16 GPUs on one node: every link is NVLink
    one = step_time(cfg, layout, Cluster(gpus=16, gpu_memory=80 * GiB, nodes=1), A, v)
    assert one.pp_comm == pytest.approx(2 * m * act / 100e9, rel=1e-12)


def test_checkpointing_and_sequence_parallel_terms() -> None:
    """Recomputation costs a third more compute; SP sends the same slices between stages but
    needs no all-gather after them."""
    base = Layout(2, 2, 4, 1, 4, False, False)
    both = Layout(2, 2, 4, 1, 4, True, True)
    cluster = Cluster(gpus=16, gpu_memory=80 * GiB, nodes=2)
    plain = step_time(_cfg_410m(base), base, cluster, A, 30592)
    other = step_time(_cfg_410m(both), both, cluster, A, 30592)
    assert other.compute == pytest.approx(plain.compute * 4 / 3, rel=1e-12)
    act = 4 * 512 * 1024 * 2
    gather = 2 * 64 * act / 2 / 100e9  # m = 64 micro-batches, both directions
    assert other.pp_comm == pytest.approx(plain.pp_comm - gather, rel=1e-12)
    assert other.pp_comm == pytest.approx(2 * 64 * act / 2 / 10e9, rel=1e-12)
    # recomputation repeats the forward's 2 gathers and 2 reductions: 12 transfers, not 8; SP
    # adds the all-reduce of the 6h sequence-split parameters' gradients (15 layers x m = 64)
    param_grads = 2 * (1 / 2) * 6 * 1024 * 2 * 15 * 64 / 100e9
    assert other.tp_comm == pytest.approx(plain.tp_comm * 12 / 8 + param_grads, rel=1e-12)


def test_ranking_with_free_communication_is_compute_then_bubble() -> None:
    """Bandwidth without limit and everything fitting: a step is its compute (pp = 1, no
    recomputation) and the bubble ``(pp - 1) / m`` next; ties go to the biggest micro-batch."""
    free = Assumptions(
        peak_flops=1e15, mfu=0.5, intra_node_bandwidth=1e30, inter_node_bandwidth=1e30
    )
    search = plan_layouts(
        load_yaml(CONFIG_410M),
        Cluster(gpus=8, gpu_memory=80 * GiB),
        free,
        estimator=lambda cfg, world, vocab: _memory(1),
    )
    times = [p.time.total for p in search.plans]
    assert times == sorted(times)
    n_matmul = 30 * (4 * 1024**2 + 8 * 1024**2) + 30592 * 1024
    compute = (6 * n_matmul + 12 * 30 * 1024 * 512) * 1024 * 512 / (8 * 1e15 * 0.5)
    flat = [p for p in search.plans if p.layout.pp == 1 and not p.layout.activation_checkpointing]
    assert search.plans[: len(flat)] == flat and len(flat) > 100
    assert all(p.time.total == pytest.approx(compute, rel=1e-9) for p in flat)
    assert search.plans[0].layout.micro_batch_size == 1024  # tp 8, dp 1: one micro-batch
    after = search.plans[len(flat)]  # pp 2, tp 4, dp 1, micro 1: m = 1024, the smallest bubble
    assert (after.layout.pp, after.layout.tp, after.layout.micro_batch_size) == (2, 4, 1)
    assert after.time.total == pytest.approx(compute * (1 + 1 / 1024), rel=1e-9)
    assert search.too_large == 0 and search.rejected_by_config > 0
    # ZeRO-2/3 with a pipeline and SP at tp 1 are the config's refusals, never plans
    for plan in search.plans:
        assert plan.layout.pp == 1 or plan.layout.zero_stage <= 1
        assert plan.layout.tp > 1 or not plan.layout.sequence_parallel


def test_tensor_parallel_traffic_ranks_tp_last_on_a_small_model() -> None:
    """With finite bandwidth, TP's per-layer traffic makes tp > 1 lose to tp 1 on glm-410m."""
    search = plan_layouts(
        load_yaml(CONFIG_410M),
        Cluster(gpus=8, gpu_memory=80 * GiB),
        A,
        estimator=lambda cfg, world, vocab: _memory(1),
    )
    best_tp = next(p.time.total for p in search.plans if p.layout.tp == 1)
    assert all(p.time.total > best_tp for p in search.plans if p.layout.tp > 1)


def test_a_layout_that_does_not_fit_is_excluded() -> None:
    """Memory grows with the micro-batch; a 72 GiB budget (80 less 10%) keeps micro <= 8."""

    def estimator(cfg: RunConfig, world: int, vocab: int) -> MemoryEstimate:
        return _memory(cfg.train.micro_batch_size * 9 * GiB)

    search = plan_layouts(
        load_yaml(CONFIG_410M), Cluster(gpus=8, gpu_memory=80 * GiB), A, estimator=estimator
    )
    assert search.plans and all(p.layout.micro_batch_size <= 8 for p in search.plans)
    assert {p.layout.micro_batch_size for p in search.plans} == {1, 2, 4, 8}
    accepted = search.candidates - search.rejected_by_config
    assert search.too_large == accepted - len(search.plans) > 0
    assert search.smallest_too_large == 16 * 9 * GiB


def test_heads_not_divisible_by_tp_are_refused_by_the_config() -> None:
    raw = load_yaml(CONFIG_410M)
    raw["model"]["num_attention_heads"] = 8
    raw["model"]["hidden_size"] = 1024
    search = plan_layouts(
        raw,
        Cluster(gpus=16, gpu_memory=80 * GiB, nodes=1),
        A,
        estimator=lambda cfg, world, vocab: _memory(1),
    )
    assert {p.layout.tp for p in search.plans} == {1, 2, 4, 8}  # 16 does not divide 8 heads
    with pytest.raises(ConfigError, match="num_attention_heads"):
        layout_config(raw, Layout(16, 1, 1, 0, 1, False, False))


def test_vocab_from_the_tokenizer_is_padded_per_tp() -> None:
    cfg = load_config(CONFIG_410M, ["model.vocab_size=0"])
    assert padded_vocab_size(cfg, 1, 30000) == 30080
    assert padded_vocab_size(cfg, 4, 30000) == 30208
    with pytest.raises(ConfigError, match="--vocab-size"):
        padded_vocab_size(cfg, 1, None)


def _printed_commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.startswith("   deepspeed")]


@pytest.mark.parametrize(("config", "gpus", "nodes"), [(CONFIG_410M, 8, 1), (CONFIG_10B, 16, 2)])
def test_every_printed_plan_passes_the_launch_checks(
    config: Path, gpus: int, nodes: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(config), "--gpus", str(gpus), "--gpu-memory", "80GiB", "--top", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    print(out)
    commands = _printed_commands(out)
    assert len(commands) == 5
    for cmd in commands:
        assert cmd[:2] == ["deepspeed", "--hostfile" if nodes > 1 else "--num_gpus"]
        assert cmd[cmd.index("--num_gpus") + 1] == str(gpus // nodes)
        cfg = load_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--config") + 2 :])
        validate_for_launch(cfg, gpus, check_data=False)
        assert gpus // nodes % cfg.parallel.tp == 0


def test_nothing_fits_exits_one(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", str(CONFIG_10B), "--gpus", "1", "--gpu-memory", "16GiB"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "0 fit" in out and "no layout fits" in out


def test_vocab_comes_from_the_configs_tokenizer(
    tmp_path: Path,
    tiny_tokenizer_model: Path,
    tiny_tokenizer: GLMTokenizer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """model.vocab_size 0: the tool reads data.tokenizer_model and pads it per tp."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: glm-tiny\ndata:\n  tokenizer_model: {tiny_tokenizer_model}\n"
        "  seq_length: 64\ntrain:\n  global_batch_size: 8\n"
    )
    config.parent.joinpath("configs", "model").mkdir(parents=True)
    config.parent.joinpath("configs", "model", "glm-tiny.yaml").write_text(
        (ROOT / "configs" / "model" / "glm-tiny.yaml").read_text()
    )
    assert main(["--config", str(config), "--gpus", "2", "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    rows = tiny_tokenizer.padded_vocab_size  # its pieces and GLM's specials, padded at tp 1
    assert rows != tiny_tokenizer.vocab_size
    assert out.startswith(f"glm-tiny ({num_parameters(load_config(config).model, rows):,} ")
