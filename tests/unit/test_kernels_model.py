"""The whole glm-tiny model: ``kernels: triton`` (interpreter) equals ``kernels: torch``.

Loss and every parameter gradient, dropout off (the fused dropout draws a different mask than
torch's, by design). Whatever the model routes through :mod:`megatron_glm.kernels` is covered;
the log lines checked at the end name the ops that must have run on the Triton path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import yaml

from megatron_glm.config import ModelConfig, from_dict
from megatron_glm.kernels.dispatch import log_once
from megatron_glm.model import build_model, glm_loss

TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "glm-tiny.yaml"
VOCAB = 256


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``[part A | part B | padding]``: a normal row, sep = 0 with padding, no padding."""
    g = torch.Generator().manual_seed(seed)
    b, s = 3, 24
    sep, valid = torch.tensor([9, 0, 15]), torch.tensor([20, 11, 24])
    position_ids = torch.zeros(b, 2, s, dtype=torch.long)
    loss_mask = torch.zeros(b, s)
    for r in range(b):
        p, n = int(sep[r]), int(valid[r])
        position_ids[r, 0, :p] = torch.arange(p)
        position_ids[r, 0, p:n] = max(p - 1, 0)
        position_ids[r, 1, p:n] = torch.arange(1, n - p + 1)
        loss_mask[r, p:n] = 1.0
    return dict(
        tokens=torch.randint(0, VOCAB, (b, s), generator=g),
        position_ids=position_ids,
        sep=sep,
        valid_len=valid,
        targets=torch.randint(0, VOCAB, (b, s), generator=g),
        loss_mask=loss_mask,
        objective=torch.tensor([0, 2, 1]),
    )


def loss_and_grads(cfg: ModelConfig, data: dict[str, torch.Tensor]):
    model = build_model(cfg, vocab_size=VOCAB, seed=3)
    hidden = model(data["tokens"], data["position_ids"], data["sep"], data["valid_len"])
    out = glm_loss(model, hidden, data["targets"], data["loss_mask"], data["objective"])
    (out.sum_loss / out.num_tokens).backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.slow
def test_glm_tiny_triton_equals_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    log_once.cache_clear()
    caplog.set_level(logging.INFO, logger="megatron_glm.kernels.dispatch")
    raw = yaml.safe_load(TINY.read_text())
    base = from_dict(ModelConfig, {**raw, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    data = batch()
    ref, ref_grads = loss_and_grads(dataclasses.replace(base, kernels="torch"), data)
    got, grads = loss_and_grads(dataclasses.replace(base, kernels="triton"), data)
    torch.testing.assert_close(got.sum_loss, ref.sum_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got.per_objective_sum, ref.per_objective_sum, atol=1e-5, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    lines = {r.getMessage() for r in caplog.records}
    for op in ("attention", "layer_norm", "bias_gelu", "bias_dropout_add"):  # the wired ops
        assert f"kernels: {op} uses triton (interpreter) on cpu (model.kernels=triton)" in lines
