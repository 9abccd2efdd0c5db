"""Parallel layers at tp = 1, shard initialisation, cross entropy, RNG tracker, resharding.

Single process: what needs several ranks is in tests/distributed/test_tensor_parallel.py. A
sizes-only ParallelDims (no process group) is enough to build and initialise a TP shard.
"""

from __future__ import annotations

import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.kernels import LayerNorm
from megatron_glm.model import GLMModel, build_model, tensor_parallel_layout
from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_glm.parallel.random import ModelParallelRNG, checkpoint
from megatron_glm.training.checkpoint import merge_shards, reshard_info, split_state

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128


def tiny(**overrides: object) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=32)
    return ModelConfig(**{**base, **overrides})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- tp = 1


def test_tp1_layers_are_exactly_linear_embedding_layernorm() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    for layer in (ColumnParallelLinear(8, 12), RowParallelLinear(8, 12)):
        ref = nn.Linear(8, 12)
        assert list(layer.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
        layer.load_state_dict(ref.state_dict())
        torch.testing.assert_close(layer(x), ref(x), atol=0, rtol=0)
    emb, ref_emb = VocabParallelEmbedding(10, 8), nn.Embedding(10, 8)
    assert list(emb.state_dict()) == list(ref_emb.state_dict())
    emb.load_state_dict(ref_emb.state_dict())
    tokens = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(emb(tokens), ref_emb(tokens), atol=0, rtol=0)
    ln = LayerNorm(8, eps=1e-5)
    assert isinstance(ln, nn.LayerNorm)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8,), eps=1e-5), atol=0, rtol=0)


def test_skip_bias_add_returns_the_bias_unapplied() -> None:
    """Megatron's ``skip_bias_add``: ``(x A^T, b)`` with the layer's own bias Parameter, whose
    sum is the plain layer's output; the state dict is unchanged."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        ref, skip = nn.Linear(8, 12), cls(8, 12, skip_bias_add=True)
        assert list(skip.state_dict()) == ["weight", "bias"]
        skip.load_state_dict(ref.state_dict())
        out, bias = skip(x)
        assert bias is skip.bias
        torch.testing.assert_close(out, F.linear(x, ref.weight), atol=0, rtol=0)
        torch.testing.assert_close(out + bias, ref(x), atol=1e-6, rtol=1e-6)
        no_bias = cls(8, 12, bias=False, skip_bias_add=True)
        no_bias.load_state_dict({"weight": ref.weight.detach()})
        out, bias = no_bias(x)
        assert bias is None
        torch.testing.assert_close(out, F.linear(x, ref.weight), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"skip_bias_add .* cannot be combined with gather_output"):
        ColumnParallelLinear(8, 12, skip_bias_add=True, gather_output=True)


def test_layer_size_errors() -> None:
    dims = ParallelDims(world_size=4, tp=4)
    with pytest.raises(ValueError, match=r"^output features \(6\) must be divisible by parallel"):
        ColumnParallelLinear(8, 6, dims=dims)
    with pytest.raises(ValueError, match=r"^padded vocabulary size \(10\) must be divisible"):
        VocabParallelEmbedding(10, 8, dims=dims)
    with pytest.raises(ValueError, match="sequence parallelism needs tp > 1"):
        RowParallelLinear(8, 8, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"^padded vocabulary size 130 must be divisible by "):
        GLMModel(tiny(), 130, dims=dims)
    with pytest.raises(ValueError) as exc:
        GLMModel(tiny(num_attention_heads=2, hidden_size=32), VOCAB, dims=dims)
    assert str(exc.value) == (
        "config field 'model.num_attention_heads': 2 must be divisible by parallel.tp (4)"
    )


# ----------------------------------------------------------------------------- shard init


def shard_model(cfg: ModelConfig, tp: int, rank: int) -> GLMModel:
    """This rank's shard, built and initialised without any process group."""
    dims = ParallelDims(world_size=tp, tp=tp, rank=rank)
    with torch.device("meta"):
        model = GLMModel(cfg, VOCAB, dims=dims)
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    return model


@pytest.mark.parametrize("tp", [2, 4])
def test_shards_are_slices_of_the_tp1_init(tp: int) -> None:
    cfg = tiny()
    full = build_model(cfg, vocab_size=VOCAB, seed=3).state_dict()
    layout = tensor_parallel_layout(cfg)
    shards = [shard_model(cfg, tp, r) for r in range(tp)]
    merged = merge_shards([m.state_dict() for m in shards], layout)
    assert merged.keys() == full.keys()
    for name in full:
        assert torch.equal(merged[name], full[name]), name
    # Fused QKV: rank r holds [q_i; k_i; v_i] of its heads, i.e. whole heads of the full layout.
    heads, d, h = 4, 8, 32
    full_qkv = full["layers.1.attention.query_key_value.weight"].view(heads, 3, d, h)
    for r, m in enumerate(shards):
        local = m.state_dict()["layers.1.attention.query_key_value.weight"].view(-1, 3, d, h)
        mine = slice(r * heads // tp, (r + 1) * heads // tp)
        for j in range(3):  # q, k, v
            assert torch.equal(local[:, j], full_qkv[mine, j])
    # DeepSpeed's attributes survive meta -> materialise: split tensors marked, others not.
    params = dict(shards[0].named_parameters())
    assert params["layers.1.mlp.dense_4h_to_h.weight"].partition_dim == 1  # type: ignore[attr-defined]
    assert params["layers.0.word_embeddings.weight"].tensor_model_parallel  # type: ignore[attr-defined]
    assert not getattr(params["layers.1.mlp.dense_4h_to_h.bias"], "tensor_model_parallel", False)


def test_glm_loss_refuses_a_shard_without_dims() -> None:
    from megatron_glm.model import glm_loss

    shard = shard_model(tiny(), 2, 0)
    hidden, zeros = torch.zeros(1, 4, 32), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError) as exc:
        glm_loss(
            shard.head_weight, hidden, zeros, torch.ones(1, 4), torch.zeros(1, dtype=torch.long)
        )
    assert str(exc.value) == (
        "glm_loss: the head weight is a tensor-parallel shard; pass the model or dims=..."
    )


def test_partition_layout_of_the_glm() -> None:
    layout = tensor_parallel_layout(tiny())
    assert len(layout) == 29
    expected = {
        "layers.0.word_embeddings.weight": 0,
        "layers.0.position_embeddings.weight": None,
        "layers.1.attention.query_key_value.weight": 0,
        "layers.1.attention.query_key_value.bias": 0,
        "layers.1.attention.dense.weight": 1,
        "layers.1.attention.dense.bias": None,
        "layers.2.mlp.dense_h_to_4h.bias": 0,
        "layers.2.mlp.dense_4h_to_h.weight": 1,
        "layers.2.input_layernorm.weight": None,
        "layers.3.final_layernorm.bias": None,
    }
    assert {k: layout[k] for k in expected} == expected


# ----------------------------------------------------------------------------- cross entropy


@pytest.mark.parametrize("valid", [None, 50])
def test_single_rank_cross_entropy_equals_torch(valid: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 64, generator=g) * 4).requires_grad_()
    limit = valid or 64
    target = torch.randint(0, limit, (7,), generator=g)
    weights = torch.rand(7, generator=g)
    got = vocab_parallel_cross_entropy(
        logits, target, None, vocab_start=0, vocab_size=64, valid_vocab_size=valid
    )
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    ref = F.cross_entropy(logits[:, :limit], target, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_got, g_ref, atol=1e-7, rtol=1e-6)
    assert valid is None or g_got[:, valid:].abs().max() == 0  # padding rows get no gradient


def test_cross_entropy_input_errors() -> None:
    logits = torch.zeros(3, 8)
    with pytest.raises(ValueError) as exc:
        vocab_parallel_cross_entropy(
            logits, torch.tensor([0, 8, 1]), None, vocab_start=0, vocab_size=8
        )
    assert str(exc.value) == (
        "vocab_parallel_cross_entropy: target ids must be in [0, 8), got 0..8"
    )
    with pytest.raises(ValueError, match=r"logits must be \[n, v\] and target \[n\]"):
        vocab_parallel_cross_entropy(
            logits, torch.zeros(2, dtype=torch.long), None, vocab_start=0, vocab_size=8
        )


# ----------------------------------------------------------------------------- RNG tracker


def test_fork_uses_a_private_stream_and_leaves_the_default_one_alone() -> None:
    rng0, rng1 = (
        ModelParallelRNG(enabled=True, tp_rank=0),
        ModelParallelRNG(enabled=True, tp_rank=1),
    )
    for r in (rng0, rng1):
        r.manual_seed(5)
    torch.manual_seed(1)
    expected_default = torch.rand(4)
    torch.manual_seed(1)
    with rng0.fork():
        a0 = torch.rand(4)
    with rng1.fork():
        a1 = torch.rand(4)
    assert torch.equal(torch.rand(4), expected_default)  # default stream untouched
    assert not torch.equal(a0, a1) and not torch.equal(a0, expected_default)
    state = rng0.state_dict()
    with rng0.fork():
        b0 = torch.rand(4)
    assert not torch.equal(b0, a0)  # the stream advances
    rng0.load_state_dict(state)
    with rng0.fork():
        assert torch.equal(torch.rand(4), b0)  # and replays from a saved state
    disabled = ModelParallelRNG(enabled=False)
    torch.manual_seed(1)
    with disabled.fork():
        assert torch.equal(torch.rand(4), expected_default)  # tp = 1: the default stream


def test_checkpoint_replays_the_private_stream() -> None:
    rng = ModelParallelRNG(enabled=True, tp_rank=1)
    weight = torch.randn(16, 16, requires_grad=True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with rng.fork():
            x = F.dropout(x @ weight, p=0.5, training=True)
        return F.dropout(x, p=0.5, training=True) @ weight  # default stream

    grads: list[torch.Tensor] = []
    for ckpt in (False, True, False):
        rng.manual_seed(3 if len(grads) < 2 else 4)
        torch.manual_seed(0)
        x = torch.randn(4, 16)
        out = checkpoint(fn, x, rng=rng) if ckpt else fn(x)
        (g,) = torch.autograd.grad(out.square().sum(), weight)
        grads.append(g)
    assert torch.equal(grads[0], grads[1])
    assert not torch.allclose(grads[0], grads[2])  # another private seed -> other masks


# ----------------------------------------------------------------------------- resharding


def test_merge_split_round_trip_and_replicated_mismatch() -> None:
    layout = {"w": 0, "v": 1, "r": None}
    full = {
        "w": torch.arange(24.0).view(4, 6),
        "v": torch.arange(8.0).view(2, 4),
        "r": torch.ones(3),
    }
    shards = split_state(full, layout, 2)
    assert torch.equal(shards[1]["w"], full["w"][2:]) and torch.equal(
        shards[1]["v"], full["v"][:, 2:]
    )
    merged = merge_shards(shards, layout)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    shards[1]["r"] = torch.zeros(3)
    with pytest.raises(
        ValueError, match="replicated tensor 'r' differs between mp_rank_00 and mp_rank_01"
    ):
        merge_shards(shards, layout)
    with pytest.raises(ValueError, match=r"cannot split 'w' \(4, 6\) along dim 0 into 3 equal"):
        split_state(full, layout, 3)


@pytest.mark.slow
def test_reshard_cli_on_a_deepspeed_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny()
    model = build_model(cfg, vocab_size=VOCAB, seed=1)
    layout = tensor_parallel_layout(cfg)
    src = tmp_path / "run" / "global_step7"
    src.mkdir(parents=True)
    (tmp_path / "run" / "latest").write_text("global_step7")
    for rank, shard in enumerate(split_state(model.state_dict(), layout, 2)):
        blob = {
            "module": shard,
            "mp_world_size": 2,
            "optimizer": {"state": {}},
            "iteration": 7,
            "config": {"model": dataclasses.asdict(cfg)},
        }
        torch.save(blob, src / f"mp_rank_{rank:02d}_model_states.pt")
    (src / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "reshard_checkpoint.py"),
            "--load",
            str(tmp_path / "run"),
            "--tp",
            "4",
            "--save",
            str(tmp_path / "tp4"),
            "--no-optimizer",  # the optimizer files are empty placeholders
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    dst = tmp_path / "tp4" / "global_step7"
    assert out.splitlines() == [
        f"resharded {tmp_path / 'run'}/global_step7: tp 2 -> 4",
        *(f"  wrote {dst / f'mp_rank_0{r}_model_states.pt'}" for r in range(4)),
        "  not carried over (optimizer restarts): zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    assert (tmp_path / "tp4" / "latest").read_text() == "global_step7"
    blobs = [torch.load(dst / f"mp_rank_0{r}_model_states.pt", weights_only=True) for r in range(4)]
    assert blobs[3]["iteration"] == 7 and blobs[3]["mp_world_size"] == 4
    assert blobs[3]["optimizer"] is None
    assert reshard_info(dst) == {"from_tp": 2, "to_tp": 4, "optimizer_state": "dropped"}
    merged = merge_shards([b["module"] for b in blobs], layout)
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    # A bad target size: exit status 2 and the reason (in-process: no second interpreter).
    tool = runpy.run_path(str(ROOT / "tools" / "reshard_checkpoint.py"))
    # Without --no-optimizer the optimizer state is read, and the empty file is named.
    with pytest.raises(SystemExit) as exc:
        tool["main"](["--load", str(tmp_path / "run"), "--tp", "4", "--save", str(tmp_path / "y")])
    assert exc.value.code == 2
    empty = src / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert f"error: {empty}: empty file (truncated checkpoint?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        tool["main"](["--load", str(tmp_path / "run"), "--tp", "3", "--save", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "error: cannot split 'layers.0.word_embeddings.weight' (128, 32) along dim 0 into 3" in (
        capsys.readouterr().err
    )
