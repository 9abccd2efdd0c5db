"""Every fused kernel on one GPU: correctness against its reference, then time against torch.

1. Check: each Triton kernel against its torch reference evaluated in fp32 on the same (bf16)
   inputs -- output and input gradients, max abs error and max error relative to the largest
   reference value.
2. Attention forward+backward against SDPA with the boolean mask, SDPA without mask
   (FlashAttention non-causal), FlexAttention with a prefix block mask and causal SDPA, at
   (B16,S512) (B8,S1024) (B4,S2048) (B2,S4096), H16 D64 (see ``bench_attention.py``).
   Targets: ``sdpa_mask/triton >= 1.5`` and ``triton/sdpa_none <= 1.15`` at every size.
3. Cross entropy on loss positions, forward+backward, fused (chunked, Triton) against eager
   (``F.linear(...).float()`` + ``F.cross_entropy``): time and peak memory allocated above the
   inputs, at V = 30592 and 50304, h 1024, ``--ce-rows`` rows. Target: peak <= 1/4 of eager.
4. Elementwise ops forward+backward on ``[B*S, h]`` (``[B*S, 4h]`` for GeLU) against eager torch
   and ``torch.compile`` of the same eager code.

All baselines are measured in the same run. Tables are printed last. Without CUDA the script
refuses, unless ``--smoke`` (tiny shapes, CPU interpreter, numbers meaningless).

    python tools/bench/bench_kernels.py [--smoke] [--sizes ...] [--ce-rows 8192]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import (
    DTYPES,
    add_attention_args,
    attention_table,
    make_inputs,
    print_attention_table,
    require_device,
    smoke_overrides,
    time_ms,
)

from megatron_glm.kernels import (
    bias_dropout_add,
    bias_gelu,
    fused_cross_entropy,
    layer_norm,
)
from megatron_glm.kernels.attention import glm_attention_mask
from megatron_glm.kernels.flash_attention import flash_glm_attention
from megatron_glm.logs import setup_logging

T = "triton"
"""Every call names the Triton path explicitly (``auto`` would pick torch in a CPU smoke run)."""

# ----------------------------------------------------------------------------- 1. correctness


def _errors(got: list[Tensor], want: list[Tensor]) -> tuple[float, float]:
    """Max abs error and max abs error / max |reference| over several tensors."""
    abs_err = max(
        (g.float() - w.float()).abs().max().item() for g, w in zip(got, want, strict=True)
    )
    scale = max(w.float().abs().max().item() for w in want)
    return abs_err, abs_err / max(scale, 1e-30)


def _grads(fn: Callable[..., Tensor], inputs: list[Tensor], seed: int = 0) -> list[Tensor]:
    """Output and gradients of ``fn(*inputs)`` for a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return [out, *torch.autograd.grad(out, leaves, g)]


def check_kernels(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float, float]]:
    dtype = DTYPES[args.dtype]
    b, s = (1, 24) if args.smoke else (4, 1024)
    rows: list[tuple[str, float, float]] = []

    x = make_inputs(b, s, args.heads, args.head_dim, dtype, device, seed=1)
    x["sep"][0] = 0  # a fully causal row and a padded one, beside the random ones
    x["valid_len"][-1] = s - s // 5
    mask = glm_attention_mask(x["sep"], x["valid_len"], s)
    qkv = [x["q"], x["k"], x["v"]]
    got = _grads(lambda q, k, v: flash_glm_attention(q, k, v, x["sep"], x["valid_len"]), qkv)
    want = _grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        [t.float() for t in qkv],
    )
    rows.append(("attention out,dq,dk,dv", *_errors(got, want)))

    n, h, vocab = (16, 32, 300) if args.smoke else (4096, 1024, 50304)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, h, generator=g) * 0.02).to(device, dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    weights = torch.ones(n, device=device)
    got = _grads(
        lambda a, w: fused_cross_entropy(a, w, targets, weights, kernels=T).sum_loss,
        [hidden, weight],
    )
    want = _grads(lambda a, w: _eager_ce(a, w, targets, weights), [hidden.float(), weight.float()])
    rows.append(("cross entropy loss,dh,dW", *_errors(got, want)))

    tokens, h = (50, 48) if args.smoke else (8192, 1024)
    a = torch.randn(tokens, 4 * h, generator=g).to(device, dtype)
    bias4 = torch.randn(4 * h, generator=g).to(device, dtype)
    got = _grads(lambda u, c: bias_gelu(u, c, kernels=T), [a, bias4])
    want = _grads(lambda u, c: F.gelu(u + c, approximate="tanh"), [a.float(), bias4.float()])
    rows.append(("bias_gelu y,dx,db", *_errors(got, want)))

    xs, res = (torch.randn(tokens, h, generator=g).to(device, dtype) for _ in range(2))
    w, bias = (torch.randn(h, generator=g).to(device, dtype) for _ in range(2))
    got = _grads(lambda u, c, r: bias_dropout_add(u, c, r, 0.1, False, kernels=T), [xs, bias, res])
    want = _grads(lambda u, c, r: r + (u + c), [xs.float(), bias.float(), res.float()])
    rows.append(("bias_dropout_add (eval)", *_errors(got, want)))
    got = _grads(lambda u, c, d: layer_norm(u, c, d, 1e-5, kernels=T), [xs, w, bias])
    want = _grads(
        lambda u, c, d: F.layer_norm(u, (h,), c, d, 1e-5), [xs.float(), w.float(), bias.float()]
    )
    rows.append(("layer_norm y,dx,dw,db", *_errors(got, want)))
    print("  checks: done", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- 3. cross entropy


def _eager_ce(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    ce = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    return (ce * weights).sum()


def _ce_step(fused: bool, x: Tensor, w: Tensor, t: Tensor, wt: Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = (
            fused_cross_entropy(x, w, t, wt, kernels=T).sum_loss
            if fused
            else _eager_ce(x, w, t, wt)
        )
        torch.autograd.grad(loss, (x, w))

    return step


def _peak_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory allocated above what was allocated before ``fn`` (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ce_table(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    n, h = (16, 32) if args.smoke else (args.ce_rows, 1024)
    out = []
    for vocab in (300,) if args.smoke else (30592, 50304):
        g = torch.Generator().manual_seed(vocab)
        x = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        w = (torch.randn(vocab, h, generator=g) * 0.02).to(device, dtype).requires_grad_()
        t = torch.randint(0, vocab, (n,), generator=g).to(device)
        wt = torch.ones(n, device=device)
        row: dict[str, Any] = dict(vocab=vocab, rows=n)
        for name, fused in (("fused", True), ("eager", False)):
            step = _ce_step(fused, x, w, t, wt)
            row[f"{name}_ms"] = time_ms(step, device, args.repeats, args.warmup)
            row[f"{name}_mib"] = _peak_mib(step, device)
        out.append(row)
        print(f"  cross entropy V{vocab}: done", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- 4. elementwise


def elementwise_table(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    tokens, h = (50, 48) if args.smoke else (8192, 1024)
    g = torch.Generator().manual_seed(3)

    def t(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    a, b4 = t(tokens, 4 * h), t(4 * h)
    x, r, w, b = t(tokens, h), t(tokens, h), t(h), t(h)
    cases: list[tuple[str, Callable[..., Tensor], Callable[..., Tensor], list[Tensor]]] = [
        ("bias_gelu [T,4h]", lambda u, c: bias_gelu(u, c, kernels=T),
         lambda u, c: F.gelu(u + c, approximate="tanh"), [a, b4]),
        ("bias_dropout_add p=.1", lambda u, c, q: bias_dropout_add(u, c, q, 0.1, True, kernels=T),
         lambda u, c, q: q + F.dropout(u + c, 0.1, True), [x, b, r]),
        ("layer_norm", lambda u, c, d: layer_norm(u, c, d, 1e-5, kernels=T),
         lambda u, c, d: F.layer_norm(u, (h,), c, d, 1e-5), [x, w, b]),
    ]  # fmt: skip
    out = []
    for name, ours, eager, inputs in cases:
        row: dict[str, Any] = dict(op=name)
        impls = [("triton", ours), ("eager", eager)]
        if device.type == "cuda":
            impls.append(("compiled", torch.compile(eager)))
        for label, fn in impls:
            row[label] = time_ms(_fwd_bwd(fn, inputs), device, args.repeats, args.warmup)
        out.append(row)
    print("  elementwise: done", file=sys.stderr)
    return out


def _fwd_bwd(fn: Callable[..., Tensor], inputs: list[Tensor]) -> Callable[[], None]:
    def step() -> None:
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return step


# ----------------------------------------------------------------------------- printing


def print_tables(
    args: argparse.Namespace,
    where: str,
    checks: list[tuple[str, float, float]],
    attention: list[dict[str, Any]],
    ce: list[dict[str, Any]],
    elementwise: list[dict[str, Any]],
) -> None:
    print(f"\n== kernels vs fp32 reference ({args.dtype} inputs) on {where}")
    print(f"{'kernel':>30} {'max|err|':>10} {'rel':>10}")
    for name, abs_err, rel in checks:
        print(f"{name:>30} {abs_err:>10.2e} {rel:>10.2e}")
    print()
    print_attention_table(
        attention,
        f"== attention fwd+bwd ms (median of {args.repeats}), H{args.heads} D{args.head_dim} "
        f"{args.dtype}, sep in [S/2, 7S/8], on {where}",
    )
    print(f"\n== cross entropy fwd+bwd on {where} (h {1024 if not args.smoke else 32})")
    head = ("V", "rows", "fused ms", "eager ms", "speed-up", "fused MiB", "eager MiB", "mem ratio")
    print(("{:>8}" * 2 + "{:>11}" * 6).format(*head))
    for r in ce:
        fm, em = r["fused_mib"], r["eager_mib"]
        mem = [f"{fm:.0f}", f"{em:.0f}", f"{fm / em:.3f}"] if fm is not None else ["n/a"] * 3
        cells = [
            f"{r['fused_ms']:.3f}",
            f"{r['eager_ms']:.3f}",
            f"{r['eager_ms'] / r['fused_ms']:.2f}x",
        ]
        print(("{:>8}" * 2 + "{:>11}" * 6).format(r["vocab"], r["rows"], *cells, *mem))
    print(f"\n== elementwise fwd+bwd ms on {where}")
    print(f"{'op':>24} {'triton':>9} {'eager':>9} {'compiled':>9} {'eager/tri':>9} {'comp/tri':>9}")
    for r in elementwise:
        comp = r.get("compiled")
        comp_ms = f"{comp:.3f}" if comp else "n/a"
        comp_ratio = f"{comp / r['triton']:.2f}x" if comp else "n/a"
        eager_ratio = f"{r['eager'] / r['triton']:.2f}x"
        print(
            f"{r['op']:>24} {r['triton']:>9.3f} {r['eager']:>9.3f} {comp_ms:>9} "
            f"{eager_ratio:>9} {comp_ratio:>9}"
        )
    if args.smoke:
        print("(smoke run: tiny shapes; the timings are not performance numbers)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_attention_args(ap)
    ap.add_argument("--ce-rows", type=int, default=8192, help="loss positions for the CE bench")
    args = ap.parse_args(argv)
    device = require_device(args.smoke, "bench_kernels")
    if args.smoke:
        smoke_overrides(args)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU interpreter (smoke)"
    checks = check_kernels(args, device)
    attention = attention_table(args, device)
    ce = ce_table(args, device)
    elementwise = elementwise_table(args, device)
    print_tables(args, where, checks, attention, ce, elementwise)


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
