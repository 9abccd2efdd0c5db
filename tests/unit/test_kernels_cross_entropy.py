"""Fused linear + cross entropy: both backends against eager full-logits cross entropy."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_glm.kernels import fused_cross_entropy


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(n: int, h: int, vocab: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    weights[::5] = 0.0  # zero-weight rows contribute neither loss nor gradient
    return hidden, weight, targets, weights


def eager(hidden, weight, targets, weights):
    """What the model did before: full fp32 logits, F.cross_entropy, weighted sum."""
    ce = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    return (ce * weights).sum(), ce


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_loss_and_grads_match_eager(kernels: str, interpret: None) -> None:
    """37 rows in chunks of 16 (uneven last chunk), vocab 300 (not a power of two), fp32; the
    incoming gradient is 1.7, not 1, so backward's scaling is exercised."""
    hidden, weight, targets, weights = make_inputs(37, 32, 300, seed=0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_cross_entropy(h1, w1, targets, weights, kernels=kernels, chunk_rows=16)
    ref_sum, ref_ce = eager(h2, w2, targets, weights)
    (out.sum_loss * 1.7).backward()
    (ref_sum * 1.7).backward()
    torch.testing.assert_close(out.sum_loss, ref_sum, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.per_row, ref_ce, atol=1e-5, rtol=1e-6)
    assert not out.per_row.requires_grad
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-6, rtol=1e-5)


def test_bf16_matches_eager_rounding(interpret: None) -> None:
    """bf16 logits are rounded once as in ``F.linear(...).float()``; the Triton kernels read and
    write bf16 (the grad overwrites the logits), so gradients carry bf16 rounding."""
    hidden, weight, targets, weights = make_inputs(24, 32, 200, seed=1, dtype=torch.bfloat16)
    results = []
    for fn in ("triton", "torch", "eager"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fn == "eager":
            loss, ce = eager(h, w, targets, weights)
        else:
            out = fused_cross_entropy(h, w, targets, weights, kernels=fn, chunk_rows=10)
            loss, ce = out.sum_loss, out.per_row
        loss.backward()
        results.append((loss, ce, h.grad, w.grad))
    for got in results[:2]:
        torch.testing.assert_close(got[0], results[2][0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got[1], results[2][1], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got[2], results[2][2], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got[3], results[2][3], atol=2e-2, rtol=2e-2)


def test_no_grad_and_empty_and_errors() -> None:
    hidden, weight, targets, weights = make_inputs(9, 8, 50, seed=2)
    weight.requires_grad_()
    with torch.no_grad():
        out = fused_cross_entropy(hidden, weight, targets, weights, kernels="torch", chunk_rows=4)
    assert not out.sum_loss.requires_grad
    torch.testing.assert_close(out.sum_loss, eager(hidden, weight, targets, weights)[0])
    empty = fused_cross_entropy(
        hidden[:0], weight, targets[:0], weights[:0], kernels="torch", chunk_rows=4
    )
    empty.sum_loss.backward()
    assert empty.sum_loss.item() == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight))
    bad = torch.tensor([3, 0, 7, 50, 1, 2, 9, 4, 8])
    with pytest.raises(ValueError) as exc:
        fused_cross_entropy(hidden, weight, bad, weights, kernels="torch", check_ids=True)
    assert str(exc.value) == "fused_cross_entropy: targets must be in [0, 50), got 0..50"
    with pytest.raises(
        ValueError, match=r"targets \(9,\) and weights \(8,\) must both be \[rows\]"
    ):
        fused_cross_entropy(hidden, weight, targets, weights[:8], kernels="torch")


def _vocab_parallel_worker(rank: int, tmp: str) -> None:
    """One TP rank: half the vocabulary; both backends; saves loss and grads to ``tmp``."""
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    hidden, weight, targets, weights = make_inputs(21, 16, 160, seed=3)
    half = weight.shape[0] // 2
    out = {}
    for kernels in ("torch", "triton"):
        h = hidden.clone().requires_grad_()
        w = weight[rank * half : (rank + 1) * half].clone().requires_grad_()
        res = fused_cross_entropy(
            h, w, targets, weights, kernels=kernels, chunk_rows=8,
            tp_group=dist.group.WORLD, vocab_start=rank * half,
        )  # fmt: skip
        res.sum_loss.backward()
        out[kernels] = (res.sum_loss.detach(), res.per_row, h.grad, w.grad)
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_vocab_parallel_two_ranks(tmp_path) -> None:
    """Two gloo ranks each holding half the head: the loss equals eager CE over the whole vocab
    on both ranks, the weight gradients are the slices of the full one, and the hidden gradients
    are partial sums (their sum over ranks is the full gradient)."""
    # fork: the children inherit the imported modules (spawn would re-import torch per rank)
    mp.start_processes(_vocab_parallel_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    hidden, weight, targets, weights = make_inputs(21, 16, 160, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_sum, ref_ce = eager(h, w, targets, weights)
    ref_sum.backward()
    for kernels in ("torch", "triton"):
        per_rank = [results[r][kernels] for r in range(2)]
        for loss, ce, _, _ in per_rank:
            torch.testing.assert_close(loss, ref_sum.detach(), atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(ce, ref_ce.detach(), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(per_rank[0][2] + per_rank[1][2], h.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.cat([per_rank[0][3], per_rank[1][3]]), w.grad)
