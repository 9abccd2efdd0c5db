"""GLM model: mask semantics end to end, loss, init, tied head, checkpointing, sizes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatron_glm.config import ModelConfig, from_dict
from megatron_glm.model import (
    GLMBlock,
    GLMModel,
    build_model,
    flops_per_token,
    glm_loss,
    init_layer,
    matmul_parameters,
    num_parameters,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "model").glob("*.yaml"))
VOCAB = 128
B, S = 3, 24


def tiny(**overrides: object) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **overrides})  # type: ignore[arg-type]


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of [part A | part B (one span) | padding] with GLM's 2D positions."""
    g = torch.Generator().manual_seed(seed)
    sep = torch.tensor([10, 6, 0])
    valid = torch.tensor([18, S, 5])
    tokens = torch.randint(0, VOCAB, (B, S), generator=g)
    position_ids = torch.zeros(B, 2, S, dtype=torch.long)
    for r in range(B):
        p, n = int(sep[r]), int(valid[r])
        position_ids[r, 0, :p] = torch.arange(p)
        position_ids[r, 0, p:n] = max(p - 1, 0)  # the span's mask position
        position_ids[r, 1, p:n] = torch.arange(1, n - p + 1)
    targets = torch.randint(0, VOCAB, (B, S), generator=g)
    loss_mask = torch.zeros(B, S)
    for r in range(B):
        loss_mask[r, int(sep[r]) : int(valid[r])] = 1.0
    return dict(
        tokens=tokens,
        position_ids=position_ids,
        sep=sep,
        valid_len=valid,
        targets=targets,
        loss_mask=loss_mask,
        objective=torch.tensor([0, 2, 1]),
    )


def run(model: GLMModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"])


@pytest.fixture(scope="module")
def model() -> GLMModel:
    return build_model(tiny(), vocab_size=VOCAB, seed=0).eval()


# ----------------------------------------------------------------------------- mask semantics


@torch.no_grad()
def test_part_b_never_changes_part_a(model: GLMModel) -> None:
    batch = make_batch()
    base = run(model, batch)
    changed = dict(batch, tokens=batch["tokens"].clone())
    for r in range(B):
        p = int(batch["sep"][r])
        changed["tokens"][r, p:] = (changed["tokens"][r, p:] + 1) % VOCAB
    out = run(model, changed)
    for r in range(B):
        p = int(batch["sep"][r])
        torch.testing.assert_close(out[r, :p], base[r, :p], atol=1e-6, rtol=0)
    assert not torch.allclose(out[1, 6:], base[1, 6:])  # part B did change


@torch.no_grad()
def test_part_b_is_causal(model: GLMModel) -> None:
    batch = make_batch(1)
    base = run(model, batch)
    row, k = 1, 12  # sep=6, valid_len=S: change every token after position k
    changed = dict(batch, tokens=batch["tokens"].clone())
    changed["tokens"][row, k + 1 :] = (changed["tokens"][row, k + 1 :] + 7) % VOCAB
    out = run(model, changed)
    torch.testing.assert_close(out[row, : k + 1], base[row, : k + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(out[row, k + 1 :], base[row, k + 1 :])


@torch.no_grad()
def test_padding_never_changes_valid_outputs(model: GLMModel) -> None:
    batch = make_batch(2)
    base = run(model, batch)
    changed = dict(
        batch, tokens=batch["tokens"].clone(), position_ids=batch["position_ids"].clone()
    )
    for r in range(B):
        n = int(batch["valid_len"][r])
        changed["tokens"][r, n:] = (changed["tokens"][r, n:] + 3) % VOCAB
        changed["position_ids"][r, :, n:] = 5
    out = run(model, changed)
    for r in range(B):
        n = int(batch["valid_len"][r])
        torch.testing.assert_close(out[r, :n], base[r, :n], atol=1e-6, rtol=0)
    # Positive control: a valid part-A token does change valid outputs.
    control = dict(batch, tokens=batch["tokens"].clone())
    control["tokens"][0, 0] = (control["tokens"][0, 0] + 1) % VOCAB
    assert not torch.allclose(run(model, control)[0, :18], base[0, :18])


@torch.no_grad()
def test_explicit_mask_equals_pair(model: GLMModel) -> None:
    from megatron_glm.kernels import glm_attention_mask

    batch = make_batch(3)
    mask = glm_attention_mask(batch["sep"], batch["valid_len"], S)
    out = model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"], mask)
    torch.testing.assert_close(out, run(model, batch), atol=0, rtol=0)


# ----------------------------------------------------------------------------- loss


def reference_loss(model: GLMModel, hidden: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Full [b, s, vocab] logits, CE everywhere, then masked."""
    logits = F.linear(hidden, model.embedding.word_embeddings.weight)  # [b, s, V]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), batch["targets"].reshape(-1), reduction="none")
    return (ce.view(B, S) * batch["loss_mask"]).sum(), ce.view(B, S)


def test_loss_positions_only_equals_full_logits_reference() -> None:
    model = build_model(tiny(), vocab_size=VOCAB, seed=1).eval()
    batch = make_batch(4)
    batch["loss_mask"][0, 12] = 0.25  # a fractional weight must be honoured
    hidden = run(model, batch)
    out = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
    ref, ce = reference_loss(model, hidden, batch)
    torch.testing.assert_close(out.sum_loss, ref, atol=1e-5, rtol=1e-6)
    assert out.num_tokens.item() == pytest.approx(batch["loss_mask"].sum().item())
    # Per objective (rows: 0 -> span, 1 -> document, 2 -> sentence) and they add up.
    weighted = (ce * batch["loss_mask"]).sum(1)  # [b]
    expect_sum = torch.stack([weighted[0], weighted[2], weighted[1]]).detach()
    expect_cnt = batch["loss_mask"].sum(1)[[0, 2, 1]]
    torch.testing.assert_close(out.per_objective_sum, expect_sum, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.per_objective_count, expect_cnt)
    torch.testing.assert_close(
        out.per_objective_sum.sum(), out.sum_loss.detach(), atol=0, rtol=1e-6
    )
    assert not out.per_objective_sum.requires_grad
    # Gradients equal the reference's too.
    (g_out,) = torch.autograd.grad(out.sum_loss, model.head_weight, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref, model.head_weight)
    torch.testing.assert_close(g_out, g_ref, atol=1e-6, rtol=1e-5)


def test_loss_accepts_head_weight_and_rejects_bad_objective(model: GLMModel) -> None:
    batch = make_batch(5)
    with torch.no_grad():
        hidden = run(model, batch)
    a = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
    b = glm_loss(
        model.head_weight, hidden, batch["targets"], batch["loss_mask"], batch["objective"]
    )
    assert torch.equal(a.sum_loss, b.sum_loss)
    bad_objective = torch.tensor([0, 3, 1])
    with pytest.raises(ValueError, match=r"objective ids must be in \[0, 3\), got 0\.\.3"):
        glm_loss(model, hidden, batch["targets"], batch["loss_mask"], bad_objective, check_ids=True)
    empty = glm_loss(model, hidden, batch["targets"], torch.zeros(B, S), batch["objective"])
    assert empty.sum_loss.item() == 0.0 and empty.num_tokens.item() == 0.0


def test_loss_reads_no_id_range_back_by_default(
    model: GLMModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-micro-batch loss makes no ``aminmax`` host sync (ids are checked at collation);
    ``check_ids=True`` is the debugging path that does."""
    batch = make_batch(5)
    with torch.no_grad():
        hidden = run(model, batch)
    args = (model, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
    want = glm_loss(*args, check_ids=True)
    calls: list[int] = []
    real_aminmax = torch.aminmax

    def counting_aminmax(t: torch.Tensor) -> Any:
        calls.append(t.numel())
        return real_aminmax(t)

    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    got = glm_loss(*args)
    assert calls == []
    assert torch.equal(got.sum_loss, want.sum_loss)
    assert torch.equal(got.per_objective_sum, want.per_objective_sum)
    glm_loss(*args, check_ids=True)
    assert len(calls) == 2  # objective ids and target ids


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(hidden_dropout=0.0, attention_dropout=0.0), vocab_size=VOCAB, seed=2)
    batch = make_batch(6)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        hidden = run(model, batch)
        out = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
        loss = out.sum_loss / out.num_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.1)  # near-uniform at init
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- init


def test_same_seed_same_weights_and_stage_independence() -> None:
    cfg = tiny(num_layers=3)
    a = build_model(cfg, vocab_size=VOCAB, seed=7)
    b = build_model(cfg, vocab_size=VOCAB, seed=7)
    c = build_model(cfg, vocab_size=VOCAB, seed=8)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    # A layer built alone (as on a pipeline stage) gets the same weights as in the full model.
    std = cfg.init_method_std
    block = GLMBlock(cfg)
    init_layer(block, layer_index=2, seed=7, std=std, output_std=std / math.sqrt(6))
    for (name, p), q in zip(block.named_parameters(), a.layers[2].parameters(), strict=True):
        assert torch.equal(p, q), name


def test_init_statistics() -> None:
    cfg = tiny(num_layers=4, hidden_size=128, num_attention_heads=4)
    model = build_model(cfg, vocab_size=VOCAB, seed=3)
    out_std = 0.02 / math.sqrt(2 * 4)
    block = model.layers[1]
    assert isinstance(block, GLMBlock)
    assert block.attention.query_key_value.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.dense_h_to_4h.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attention.dense.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert block.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(out_std, rel=0.05)
    emb = model.embedding
    for table in (emb.word_embeddings, emb.position_embeddings, emb.block_position_embeddings):
        assert table.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for name, p in model.named_parameters():
        if "layernorm" in name:
            assert torch.equal(p, torch.full_like(p, 1.0 if name.endswith("weight") else 0.0))
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name


# ----------------------------------------------------------------------------- tied head


def test_tied_head_gets_gradient_from_both_uses() -> None:
    model = build_model(tiny(hidden_dropout=0.0, attention_dropout=0.0), vocab_size=VOCAB, seed=4)
    weight = model.embedding.word_embeddings.weight
    assert model.head_weight is weight and model.head_weight.data_ptr() == weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == num_parameters(model.cfg, VOCAB)
    batch = make_batch(7)

    def loss_with(head: torch.Tensor) -> torch.Tensor:
        hidden = run(model, batch)
        out = glm_loss(head, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
        return out.sum_loss

    (g_total,) = torch.autograd.grad(loss_with(weight), weight)
    head_copy = weight.detach().clone().requires_grad_()
    g_embed, g_head = torch.autograd.grad(loss_with(head_copy), [weight, head_copy])
    assert g_embed.abs().sum() > 0 and g_head.abs().sum() > 0
    torch.testing.assert_close(g_total, g_embed + g_head, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpointing


def grads_with(checkpointing: bool, dropout_seed: int) -> tuple[dict[str, torch.Tensor], int]:
    cfg = tiny(activation_checkpointing=checkpointing, hidden_dropout=0.1, attention_dropout=0.1)
    model = build_model(cfg, vocab_size=VOCAB, seed=5)
    batch = make_batch(8)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += 1
        return t

    torch.manual_seed(dropout_seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = run(model, batch)
    out = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["objective"])
    out.sum_loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def test_activation_checkpointing_gives_identical_gradients() -> None:
    plain, saved_plain = grads_with(False, dropout_seed=11)
    ckpt, saved_ckpt = grads_with(True, dropout_seed=11)
    other, _ = grads_with(False, dropout_seed=12)
    assert saved_ckpt < saved_plain  # checkpointing really dropped activations
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 12 + 3 + 2  # every parameter
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=0, rtol=0, msg=name)
    assert any(not torch.allclose(other[n], plain[n]) for n in plain)  # dropout is really on


# ----------------------------------------------------------------------------- sizes


PAPER = {
    "glm-large": 335e6,
    "glm-410m": 410e6,
    "glm-515m": 515e6,
    "glm-10b": 10e9,
    "glm-130b": 130e9,
}


def load_model_config(path: Path) -> ModelConfig:
    return from_dict(ModelConfig, yaml.safe_load(path.read_text()), prefix="model.")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_on_meta_with_analytic_count(path: Path) -> None:
    cfg = load_model_config(path)
    vocab = VOCAB if cfg.vocab_size == 0 else None
    with torch.device("meta"):
        model = GLMModel(cfg, vocab or cfg.vocab_size)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == num_parameters(cfg, vocab)
    if cfg.name in PAPER:
        assert abs(count / PAPER[cfg.name] - 1) < 0.03, (cfg.name, count)


def test_all_paper_sizes_are_shipped() -> None:
    assert set(PAPER) <= {p.stem for p in CONFIGS}


def test_flops_per_token_formula() -> None:
    cfg = load_model_config(next(p for p in CONFIGS if p.stem == "glm-large"))
    h, L, V, S_ = 1024, 24, 30592, 512
    n_matmul = L * (3 * h * h + h * h + 8 * h * h) + V * h
    assert matmul_parameters(cfg) == n_matmul
    assert flops_per_token(cfg, None, S_) == 6 * n_matmul + 12 * L * h * S_
    tiny_cfg = dataclasses.replace(cfg, ffn_hidden_size=1000)
    assert matmul_parameters(tiny_cfg) == L * (4 * h * h + 2 * h * 1000) + V * h


# ----------------------------------------------------------------------------- errors


def test_build_errors() -> None:
    with pytest.raises(ValueError) as exc:
        build_model(tiny(vocab_size=0), seed=0)
    assert str(exc.value) == (
        "config field 'model.vocab_size': 0 (= from the tokenizer) but no vocab_size was passed "
        "to build the model"
    )
    with pytest.raises(ValueError, match=r"'model\.vocab_size': 256 but the tokenizer's padded"):
        build_model(tiny(vocab_size=256), vocab_size=VOCAB, seed=0)
    with pytest.raises(ValueError, match=r"'model\.kernels': 'triton' requested"):
        build_model(tiny(kernels="triton"), vocab_size=VOCAB, seed=0)


def test_forward_shape_errors(model: GLMModel) -> None:
    batch = make_batch()
    long = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sequence length 65 exceeds config field 'model\.max_"):
        model(long, torch.zeros(1, 2, 65, dtype=torch.long), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"position_ids must be \[b, 2, s\] = \(3, 2, 24\)"):
        model(batch["tokens"], batch["position_ids"][:, 0], batch["sep"], batch["valid_len"])
    with pytest.raises(ValueError, match=r"valid_len must be \[b\] = \(3,\)"):
        model(batch["tokens"], batch["position_ids"], batch["sep"], batch["valid_len"][:2])
