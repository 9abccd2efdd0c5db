"""Fused elementwise kernels (TRITON_INTERPRET=1): bias+GeLU, bias+dropout+residual, LayerNorm.

bf16 caveat: the interpreter (Triton 3.9) rounds fp32 -> bf16 toward zero, where the GPU (and
torch) round to nearest even, so bf16 results may differ from torch by one bf16 ulp here; the bf16
tolerances below allow that, the fp32 ones do not.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.kernels import (
    LayerNorm,
    bias_dropout_add,
    bias_gelu,
    layer_norm,
)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def gelu_tanh_float64(u: torch.Tensor) -> torch.Tensor:
    """The textbook formula, independent of both implementations."""
    u = u.double()
    return 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(-2z) -> inf: gelu -> 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu(dtype: torch.dtype, interpret: None) -> None:
    x = randn(3, 5, 48, seed=0, dtype=dtype).mul(3).requires_grad_()  # 720 elements: 1 block
    bias = randn(48, seed=1, dtype=dtype).requires_grad_()
    y = bias_gelu(x, bias, kernels="triton")
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = gelu_tanh_float64(x64 + b64)
    tol: dict[str, Any] = (
        dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    )
    torch.testing.assert_close(y.double(), ref, **tol)
    grad = randn(3, 5, 48, seed=2, dtype=dtype)
    gx, gb = torch.autograd.grad(y, (x, bias), grad)
    rx, rb = torch.autograd.grad(ref, (x64, b64), grad.double())
    torch.testing.assert_close(gx.double(), rx, **tol)
    bias_tol: dict[str, Any] = (
        dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    )
    torch.testing.assert_close(gb.double(), rb, **bias_tol)
    assert gx.dtype == dtype and gb.dtype == dtype
    if dtype == torch.float32:  # the torch path is the same function, gradients included
        y_torch = bias_gelu(x, bias, kernels="torch")
        torch.testing.assert_close(y_torch, y, atol=1e-6, rtol=1e-5)
        tx, tb = torch.autograd.grad(y_torch, (x, bias), grad)
        torch.testing.assert_close(gx, tx, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gb, tb, atol=1e-5, rtol=1e-5)


def gelu_erf_float64(u: torch.Tensor) -> torch.Tensor:
    """The exact GeLU's textbook formula in float64."""
    u = u.double()
    return 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu_erf(dtype: torch.dtype, interpret: None) -> None:
    """``form="erf"`` (THUDM's GeLU): the Triton kernel and the torch path equal the float64
    formula, gradients included; the tanh form differs visibly on the same input, so a switch
    that was ignored would fail here."""
    x = randn(3, 5, 48, seed=30, dtype=dtype).mul(3).requires_grad_()
    bias = randn(48, seed=31, dtype=dtype).requires_grad_()
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = gelu_erf_float64(x64 + b64)
    grad = randn(3, 5, 48, seed=32, dtype=dtype)
    rx, rb = torch.autograd.grad(ref, (x64, b64), grad.double())
    tol: dict[str, Any] = (
        dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    )
    bias_tol: dict[str, Any] = (
        dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    )
    kernel_paths = ("triton", "torch") if dtype == torch.float32 else ("triton",)
    for kernels in kernel_paths:
        y = bias_gelu(x, bias, kernels=kernels, form="erf")
        torch.testing.assert_close(y.double(), ref, **tol, msg=kernels)
        gx, gb = torch.autograd.grad(y, (x, bias), grad)
        torch.testing.assert_close(gx.double(), rx, **tol, msg=kernels)
        torch.testing.assert_close(gb.double(), rb, **bias_tol, msg=kernels)
    tanh_gap = (gelu_tanh_float64(x64 + b64) - ref).abs().max().item()
    assert tanh_gap > 1e-4  # above the fp32 tolerance: the forms are told apart
    with pytest.raises(ValueError, match="form must be one of"):
        bias_gelu(x, bias, form="exact")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_bias_gelu_without_bias(interpret: None) -> None:
    """``bias=None``: no bias is read (none is allocated) and only ``dx`` is returned."""
    x = randn(4, 40, seed=20).mul(3).requires_grad_()
    y = bias_gelu(x, None, kernels="triton")
    ref = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    grad = randn(4, 40, seed=21)
    (gx,) = torch.autograd.grad(y, x, grad)
    (rx,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_mlp_fuses_its_real_biases(gelu: str, interpret: None) -> None:
    """The MLP as the model runs it (``skip_bias_add``: the fused ops add both linears' biases):
    output and the gradients of the input and of both biases equal an unfused ``F.linear`` /
    ``F.gelu`` reference (of ``model.gelu``'s form) built from the same parameters, on both
    kernel paths."""
    from megatron_glm.config import ModelConfig
    from megatron_glm.model import MLP

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, gelu=gelu)
    mlps = {k: MLP(replace(cfg, kernels=k)) for k in ("torch", "triton")}
    torch.manual_seed(0)
    for p in mlps["torch"].parameters():
        torch.nn.init.normal_(p, std=0.5)
    mlps["triton"].load_state_dict(mlps["torch"].state_dict())
    x = randn(2, 3, 32, seed=22)
    grad = randn(2, 3, 32, seed=23)
    w1, b1, w2, b2 = (
        t.detach().clone().requires_grad_()
        for t in (
            mlps["torch"].dense_h_to_4h.weight,
            mlps["torch"].dense_h_to_4h.bias,
            mlps["torch"].dense_4h_to_h.weight,
            mlps["torch"].dense_4h_to_h.bias,
        )
    )
    x_ref = x.clone().requires_grad_()
    approximate = "none" if gelu == "erf" else "tanh"
    ref = F.linear(F.gelu(F.linear(x_ref, w1, b1), approximate=approximate), w2, b2)
    ref.backward(grad)
    want = [ref, x_ref.grad, b1.grad, b2.grad]
    res: dict[str, list[torch.Tensor]] = {}
    for kernels, mlp in mlps.items():
        xk = x.clone().requires_grad_()
        out, bias = mlp(xk)
        assert bias is mlp.dense_4h_to_h.bias
        total = out + bias
        total.backward(grad)
        res[kernels] = [total, xk.grad, mlp.dense_h_to_4h.bias.grad, mlp.dense_4h_to_h.bias.grad]
    for kernels, got in res.items():
        for name, g, r in zip(("out", "dx", "dbias_4h", "dbias_h"), got, want, strict=True):
            assert g is not None and r is not None, name
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=f"{kernels} {name}")
    assert want[2] is not None and want[2].abs().sum() > 0  # the column bias gets a gradient


def test_bias_dropout_add(interpret: None) -> None:
    n = 4096 + 100  # several blocks and a ragged one
    x = randn(n // 4, 4, seed=3).requires_grad_()
    bias = randn(4, seed=4).requires_grad_()
    residual = randn(n // 4, 4, seed=5).requires_grad_()
    # eval (and p = 0): exactly residual + x + bias, as the reference
    for p, training in ((0.3, False), (0.0, True)):
        out = bias_dropout_add(x, bias, residual, p, training, kernels="triton")
        torch.testing.assert_close(out, residual + (x + bias), atol=0, rtol=0)

    torch.manual_seed(11)
    out = bias_dropout_add(x, bias, residual, 0.25, True, kernels="triton")
    kept = out != residual  # x + bias is never exactly 0 here
    frac = 1.0 - kept.float().mean().item()
    assert abs(frac - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)  # 4 sigma of a binomial
    scaled = residual + (x + bias) / 0.75
    torch.testing.assert_close(out[kept], scaled[kept], atol=1e-6, rtol=1e-6)
    grad = randn(n // 4, 4, seed=6)
    gx, gb, gr = torch.autograd.grad(out, (x, bias, residual), grad)
    want_gx = torch.where(kept, grad / 0.75, torch.zeros_like(grad))  # the same mask, regenerated
    torch.testing.assert_close(gx, want_gx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gb, want_gx.sum(0), atol=1e-5, rtol=1e-5)
    assert torch.equal(gr, grad)

    torch.manual_seed(11)  # the torch RNG state determines the mask (activation checkpointing)
    assert torch.equal(bias_dropout_add(x, bias, residual, 0.25, True, kernels="triton"), out)
    other = bias_dropout_add(x, bias, residual, 0.25, True, kernels="triton")
    assert not torch.equal(other, out)
    no_bias = bias_dropout_add(x, None, residual, 0.0, True, kernels="triton")
    torch.testing.assert_close(no_bias, residual + x, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        bias_dropout_add(x, bias, residual, 1.0, True, kernels="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm(dtype: torch.dtype, interpret: None) -> None:
    """hidden 48 (not a power of two), 14 rows over 4 backward programs (strided row loop)."""
    x = randn(2, 7, 48, seed=7, dtype=dtype).mul(2).add(1).requires_grad_()
    w = randn(48, seed=9, dtype=dtype).requires_grad_()
    b = randn(48, seed=10, dtype=dtype).requires_grad_()
    g_y = randn(2, 7, 48, seed=12, dtype=dtype)
    tol: dict[str, Any] = (
        dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    )
    y2 = layer_norm(x, w, b, 1e-5, kernels="triton")
    got2 = torch.autograd.grad((y2 * g_y).sum(), (x, w, b))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref2 = F.layer_norm(x64, (48,), w64, b64, 1e-5)
    want2 = torch.autograd.grad((ref2 * g_y.double()).sum(), (x64, w64, b64))
    torch.testing.assert_close(y2.double(), ref2, **tol)
    for name, g, r in zip(("x", "weight", "bias"), got2, want2, strict=True):
        torch.testing.assert_close(g.double(), r, **tol, msg=f"layer_norm d{name}")


def test_layer_norm_module_is_a_drop_in(interpret: None) -> None:
    plain = nn.LayerNorm(32, eps=1e-6)
    fused = LayerNorm(32, eps=1e-6, kernels="triton")
    assert list(fused.state_dict()) == list(plain.state_dict()) and isinstance(fused, nn.LayerNorm)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    fused.load_state_dict(plain.state_dict())
    x = randn(5, 32, seed=13)
    torch.testing.assert_close(fused(x), plain(x), atol=2e-6, rtol=2e-6)
