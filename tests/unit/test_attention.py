"""GLM attention kernel (torch path) against an independent naive implementation."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_glm.kernels import (
    attention_backend,
    check_kernel_choice,
    glm_attention,
    glm_attention_mask,
)

S = 9


def naive_mask(sep: list[int], valid_len: list[int], s: int) -> torch.Tensor:
    """The rule written out with loops: query i sees key j iff j < L and (j < sep or j <= i)."""
    out = torch.zeros(len(sep), 1, s, s, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(sep, valid_len, strict=True)):
        for i in range(s):
            for j in range(s):
                out[b, 0, i, j] = j < n and (j < p or j <= i)
    return out


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """Plain softmax attention in float64; a row with no visible key gives zeros."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, n, s, s]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows -> NaN -> 0
    return (probs @ v.double()).to(q.dtype)


def random_qkv(b: int, heads: int = 2, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, S, d, generator=g) for _ in range(3)]


# (sep, valid_len) rows covering sep=0, sep=valid_len, valid_len=S, valid_len=0 and random ones.
CASES = [(0, 5), (4, 4), (3, S), (0, S), (S, S), (2, 7), (0, 0), (1, 1)]


def test_mask_matches_loops() -> None:
    g = torch.Generator().manual_seed(1)
    n = torch.randint(0, S + 1, (20,), generator=g)
    p = (torch.rand(20, generator=g) * (n + 1)).long()
    sep = [c[0] for c in CASES] + p.tolist()
    valid = [c[1] for c in CASES] + n.tolist()
    got = glm_attention_mask(torch.tensor(sep), torch.tensor(valid), S)
    assert got.dtype == torch.bool and got.shape == (len(sep), 1, S, S)
    assert torch.equal(got, naive_mask(sep, valid, S))


def test_attention_equals_naive_on_edge_and_random_lengths() -> None:
    g = torch.Generator().manual_seed(2)
    n = torch.randint(1, S + 1, (8,), generator=g)
    p = (torch.rand(8, generator=g) * (n + 1)).long()
    sep = [c[0] for c in CASES] + p.tolist()
    valid = [c[1] for c in CASES] + n.tolist()
    q, k, v = random_qkv(len(sep))
    out = glm_attention(
        q, k, v, torch.tensor(sep), torch.tensor(valid), dropout_p=0.5, training=False
    )
    ref = naive_attention(q, k, v, naive_mask(sep, valid, S))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zeros_and_finite_grads() -> None:
    q, k, v = (t.requires_grad_() for t in random_qkv(2))
    sep, valid = torch.tensor([0, 0]), torch.tensor([0, 3])  # row 0: every query fully masked
    out = glm_attention(q, k, v, sep, valid, dropout_p=0.0, training=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))  # nothing flows to row 0


def test_explicit_mask_fallback() -> None:
    q, k, v = random_qkv(3, seed=3)
    sep, valid = torch.tensor([2, 0, 5]), torch.tensor([6, 4, 5])
    from_pair = glm_attention(q, k, v, sep, valid, dropout_p=0.0, training=False)
    mask = glm_attention_mask(sep, valid, S)
    explicit = glm_attention(
        q, k, v, None, None, dropout_p=0.0, training=False, attention_mask=mask[:, 0]
    )  # [b, s, s] form
    torch.testing.assert_close(explicit, from_pair, atol=0, rtol=0)
    custom = torch.rand(3, 1, S, S, generator=torch.Generator().manual_seed(4)) > 0.5
    custom[0, 0, 4] = False  # a fully masked row in an arbitrary mask
    out = glm_attention(q, k, v, sep, valid, dropout_p=0.0, training=False, attention_mask=custom)
    torch.testing.assert_close(out, naive_attention(q, k, v, custom), atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training() -> None:
    q, k, v = random_qkv(2, seed=5)
    sep, valid = torch.tensor([3, 1]), torch.tensor([S, 6])
    eval_out = glm_attention(q, k, v, sep, valid, dropout_p=0.5, training=False)
    ref = glm_attention(q, k, v, sep, valid, dropout_p=0.0, training=True)
    torch.testing.assert_close(eval_out, ref, atol=0, rtol=0)
    torch.manual_seed(0)
    train_out = glm_attention(q, k, v, sep, valid, dropout_p=0.5, training=True)
    assert torch.isfinite(train_out).all() and not torch.allclose(train_out, ref)


def test_backend_dispatch_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert attention_backend("auto", torch.device("cpu")) == "torch"
    assert attention_backend("torch", torch.device("cpu")) == "torch"
    msg = (
        "config field 'model.kernels': 'triton' requested but no CUDA device is available and "
        "TRITON_INTERPRET=1 is not set (Triton kernels run on CUDA, or on CPU under Triton's "
        "interpreter); use 'auto' or 'torch'"
    )
    with pytest.raises(ValueError) as exc:
        check_kernel_choice("triton")
    assert str(exc.value) == msg
    q, k, v = random_qkv(1)
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="'triton' requested"):
        glm_attention(q, k, v, one, one, dropout_p=0.0, training=False, kernels="triton")
    with pytest.raises(ValueError, match=r"'sep' must be an integer tensor of shape \[batch\]"):
        glm_attention(q, k, v, one.float(), one, dropout_p=0.0, training=False)
    with pytest.raises(ValueError, match="'attention_mask' must be bool"):
        glm_attention(
            q, k, v, None, None, dropout_p=0.0, training=False, attention_mask=torch.ones(1, S, S)
        )
    with pytest.raises(ValueError, match=r"pass \(sep, valid_len\) or an explicit"):
        glm_attention(q, k, v, None, None, dropout_p=0.0, training=False)
