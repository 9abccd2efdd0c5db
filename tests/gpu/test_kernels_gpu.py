"""Compiled Triton kernels on a GPU at realistic shapes (skipped without CUDA).

bf16 results are judged against an fp32 reference on the same (upcast) inputs, with the error of
torch's own bf16 implementation as the yardstick: ours may be at most twice as far off (plus a
small absolute slack), which is tight enough to catch a wrong mask or a missing rescale and loose
enough not to depend on accumulation order.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.kernels import (
    attention_backend,
    bias_dropout_add,
    bias_gelu,
    fused_cross_entropy,
    glm_attention_mask,
    layer_norm,
)
from megatron_glm.kernels.cross_entropy import default_chunk_rows
from megatron_glm.kernels.flash_attention import flash_glm_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def max_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want, strict=True))


def out_and_grads(fn, inputs: list[torch.Tensor], grad_seed: int = 0) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    return [out, *torch.autograd.grad(out, leaves, g)]


def lengths(b: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows plus the edge rows sep = 0, sep = valid_len, valid_len = S."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.randint(s // 4, s + 1, (b,), generator=g)
    sep = (torch.rand(b, generator=g) * (valid + 1)).long()
    sep[0], valid[0] = 0, s
    if b > 1:
        sep[1] = valid[1]
    return sep.to(DEV), valid.to(DEV)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s", [1024, 1000])
def test_attention_bf16(d: int, s: int) -> None:
    b, heads = 4, 16
    sep, valid = lengths(b, s, seed=s + d)
    g = torch.Generator().manual_seed(d)
    qkv = [torch.randn(b, heads, s, d, generator=g).to(DEV, torch.bfloat16) for _ in range(3)]
    mask = glm_attention_mask(sep, valid, s)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    ref = out_and_grads(sdpa, [t.float() for t in qkv])
    torch_bf16 = out_and_grads(sdpa, qkv)
    ours = out_and_grads(lambda q, k, v: flash_glm_attention(q, k, v, sep, valid), qkv)
    assert max_err(ours, ref) <= 2 * max_err(torch_bf16, ref) + 1e-3


def test_attention_fp32_without_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    b, heads, s, d = 2, 4, 333, 64
    sep, valid = lengths(b, s, seed=1)
    g = torch.Generator().manual_seed(1)
    qkv = [torch.randn(b, heads, s, d, generator=g).to(DEV) for _ in range(3)]
    mask = glm_attention_mask(sep, valid, s)
    ref = out_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), qkv
    )
    ours = out_and_grads(lambda q, k, v: flash_glm_attention(q, k, v, sep, valid), qkv)
    assert max_err(ours, ref) < 1e-4


def test_auto_is_triton_on_cuda() -> None:
    assert attention_backend("auto", torch.device(DEV)) == "triton"


def test_cross_entropy_bf16_and_memory() -> None:
    n, h, vocab = 4096, 1024, 50304
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, h, generator=g).to(DEV, torch.bfloat16)
    weight = (torch.randn(vocab, h, generator=g) * 0.02).to(DEV, torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEV)
    weights = torch.rand(n, generator=g).to(DEV)

    def eager(a, w):
        ce = F.cross_entropy(F.linear(a, w).float(), targets, reduction="none")
        return (ce * weights).sum()

    def fused(a, w):
        return fused_cross_entropy(a, w, targets, weights, kernels="triton").sum_loss

    ref = out_and_grads(eager, [hidden.float(), weight.float()])
    torch_bf16 = out_and_grads(eager, [hidden, weight])
    ours = out_and_grads(fused, [hidden, weight])
    chunks = math.ceil(n / default_chunk_rows(vocab, torch.bfloat16))
    for i, factor in enumerate((2, 2, 1 + chunks)):  # dweight: one bf16 rounding per chunk
        assert max_err([ours[i]], [ref[i]]) <= factor * max_err([torch_bf16[i]], [ref[i]]) + 1e-3

    def peak(fn) -> int:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out_and_grads(fn, [hidden, weight])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak(fused) <= peak(eager) / 4


@pytest.mark.parametrize("op", ["bias_gelu", "layer_norm", "bda_eval", "bias_gelu_erf"])
def test_elementwise_bf16(op: str) -> None:
    tokens, h = 8192, 1024
    g = torch.Generator().manual_seed(3)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEV, torch.bfloat16)

    cases = {
        "bias_gelu": (
            lambda x, b: bias_gelu(x, b, kernels="triton"),
            lambda x, b: F.gelu(x + b, approximate="tanh"),
            [r(tokens, 4 * h), r(4 * h)],
        ),
        "layer_norm": (
            lambda x, w, b: layer_norm(x, w, b, 1e-5, kernels="triton"),
            lambda x, w, b: F.layer_norm(x, (h,), w, b, 1e-5),
            [r(tokens, h), r(h), r(h)],
        ),
        "bda_eval": (
            lambda x, b, y: bias_dropout_add(x, b, y, 0.1, False, kernels="triton"),
            lambda x, b, y: y + (x + b),
            [r(tokens, h), r(h), r(tokens, h)],
        ),
        "bias_gelu_erf": (  # model.gelu: erf (THUDM's imported models)
            lambda x, b: bias_gelu(x, b, kernels="triton", form="erf"),
            lambda x, b: F.gelu(x + b),
            [r(tokens, 4 * h), r(4 * h)],
        ),
    }
    ours_fn, torch_fn, inputs = cases[op]
    ref = out_and_grads(torch_fn, [t.float() for t in inputs])
    torch_bf16 = out_and_grads(torch_fn, inputs)
    ours = out_and_grads(ours_fn, inputs)
    for i in range(len(ref)):
        assert max_err([ours[i]], [ref[i]]) <= 2 * max_err([torch_bf16[i]], [ref[i]]) + 1e-2, i


def test_dropout_statistics_and_replay() -> None:
    x = torch.randn(4096, 1024, device=DEV)
    residual = torch.zeros_like(x)
    torch.manual_seed(0)
    out = bias_dropout_add(x, None, residual, 0.1, True, kernels="triton")
    frac = (out == 0).float().mean().item()
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / x.numel())
    torch.manual_seed(0)
    assert torch.equal(bias_dropout_add(x, None, residual, 0.1, True, kernels="triton"), out)
