"""GLM prefix-mask attention, forward + backward: our Triton kernel against torch's options.

Columns, all timed in the same run on the same tensors (bf16 by default, H heads, head dim D):

- ``triton``: :func:`megatron_glm.kernels.flash_attention.flash_glm_attention` on (sep,
  valid_len);
- ``sdpa_mask``: ``F.scaled_dot_product_attention`` with the boolean GLM mask (what ``kernels:
  torch`` runs; the mask is built outside the timed region, which favours the baseline);
- ``sdpa_none``: SDPA with no mask (FlashAttention, non-causal): the arithmetic bound of a mask
  that is mostly bidirectional -- GLM's kernel cannot beat it, only approach it;
- ``flex``: compiled FlexAttention with a prefix block mask (block mask built outside the timing);
- ``sdpa_causal``: FlashAttention's causal mode, a different and cheaper mask, for orientation.

Rows have ``sep`` drawn uniformly in ``[S/2, 7S/8]`` and ``valid_len = S``. Times are medians of
``--repeats`` CUDA-event measurements after warm-up. Ratios: ``sdpa_mask/triton`` (speed-up;
target >= 1.5) and ``triton/sdpa_none`` (overhead over the bound; target <= 1.15).

Without CUDA the script refuses, unless ``--smoke``: tiny shapes under Triton's CPU interpreter,
to check that the script runs (the numbers then mean nothing). ``--sweep`` times alternative tile
sizes for the kernel at the first size (for tuning ``default_blocks``).

    python tools/bench/bench_attention.py [--sizes 16x512,8x1024,4x2048,2x4096] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_glm.kernels.attention import glm_attention_mask
from megatron_glm.kernels.flash_attention import (
    AttentionBlocks,
    default_blocks,
    flash_glm_attention,
)
from megatron_glm.logs import setup_logging

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE_SIZES = "1x24"


def require_device(smoke: bool, script: str) -> torch.device:
    """CUDA, or (with ``--smoke``) CPU under the Triton interpreter; else exit with a message."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        sys.exit(
            f"{script}: needs a CUDA GPU and found none; run with --smoke for a CPU check of "
            "tiny shapes under TRITON_INTERPRET=1 (timings are then meaningless)"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def make_inputs(
    b: int, s: int, heads: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, Tensor]:
    """q, k, v ``[b, heads, s, d]`` (requiring grad), dout, sep in [S/2, 7S/8], valid_len = S."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = [torch.randn(b, heads, s, d, generator=g).to(device, dtype) for _ in range(3)]
    sep = torch.randint(s // 2, 7 * s // 8 + 1, (b,), generator=g).to(device)
    return dict(
        q=qkv[0].requires_grad_(),
        k=qkv[1].requires_grad_(),
        v=qkv[2].requires_grad_(),
        dout=torch.randn(b, heads, s, d, generator=g).to(device, dtype),
        sep=sep,
        valid_len=torch.full((b,), s, device=device),
    )


def _fwd_bwd(attn: Callable[[Tensor, Tensor, Tensor], Tensor], x: dict[str, Tensor]) -> Callable:
    def step() -> None:
        out = attn(x["q"], x["k"], x["v"])
        torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["dout"])

    return step


def variants(x: dict[str, Tensor], device: torch.device, blocks: AttentionBlocks | None) -> dict:
    """name -> fwd+bwd closure; FlexAttention only on CUDA (its CPU path is not comparable)."""
    s = x["q"].shape[2]
    mask = glm_attention_mask(x["sep"], x["valid_len"], s)  # [b, 1, s, s]
    out: dict[str, Callable[[], None]] = {
        "triton": _fwd_bwd(
            lambda q, k, v: flash_glm_attention(q, k, v, x["sep"], x["valid_len"], blocks=blocks),
            x,
        ),
        "sdpa_mask": _fwd_bwd(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), x
        ),
        "sdpa_none": _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), x),
        "sdpa_causal": _fwd_bwd(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), x
        ),
    }
    if device.type == "cuda":
        out["flex"] = _flex_variant(x)
    return out


def _flex_variant(x: dict[str, Tensor]) -> Callable[[], None]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sep, valid = x["sep"], x["valid_len"]
    b, _, s, _ = x["q"].shape

    def glm_mask(bi: Tensor, hi: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        return (kj < valid[bi]) & ((kj < sep[bi]) | (kj <= qi))

    block_mask = create_block_mask(glm_mask, b, None, s, s, device=x["q"].device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return _fwd_bwd(lambda q, k, v: compiled(q, k, v, block_mask=block_mask), x)


def check_against_sdpa(x: dict[str, Tensor], blocks: AttentionBlocks | None) -> float:
    """Max abs error of our output against SDPA on the same inputs (bool mask), fwd only."""
    mask = glm_attention_mask(x["sep"], x["valid_len"], x["q"].shape[2])
    with torch.no_grad():
        ours = flash_glm_attention(x["q"], x["k"], x["v"], x["sep"], x["valid_len"], blocks=blocks)
        ref = F.scaled_dot_product_attention(
            x["q"].float(), x["k"].float(), x["v"].float(), attn_mask=mask
        )
    return (ours.float() - ref).abs().max().item()


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(p.split("x")[0]), int(p.split("x")[1])) for p in text.split(",") if p]
    except (ValueError, IndexError):
        sys.exit(f"--sizes: expected BxS[,BxS...] such as 16x512,8x1024, got {text!r}")


def attention_table(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One row per size: ms per variant, ratios, and the max abs error against SDPA."""
    rows = []
    for b, s in parse_sizes(args.sizes):
        x = make_inputs(b, s, args.heads, args.head_dim, DTYPES[args.dtype], device)
        times = {
            name: time_ms(fn, device, args.repeats)
            for name, fn in variants(x, device, None).items()
        }
        rows.append(dict(b=b, s=s, err=check_against_sdpa(x, None), **times))
        print(f"  attention B{b} S{s}: done", file=sys.stderr)
    return rows


def print_attention_table(rows: list[dict[str, Any]], title: str) -> None:
    names = ["triton", "sdpa_mask", "sdpa_none", "flex", "sdpa_causal"]
    print(title)
    head = ("size", *names, "mask/triton", "triton/none", "max|err|")
    print(("{:>10}" + " {:>11}" * (len(head) - 1)).format(*head))
    for r in rows:
        cells = [f"{r[n]:.3f}" if n in r else "n/a" for n in names]
        cells += [f"{r['sdpa_mask'] / r['triton']:.2f}x", f"{r['triton'] / r['sdpa_none']:.2f}x"]
        cells.append(f"{r['err']:.1e}")
        print(("{:>10}" + " {:>11}" * len(cells)).format(f"B{r['b']} S{r['s']}", *cells))


def sweep(args: argparse.Namespace, device: torch.device) -> None:
    """Forward and backward tile candidates at the first size; prints ms per candidate."""
    b, s = parse_sizes(args.sizes)[0]
    dtype = DTYPES[args.dtype]
    x = make_inputs(b, s, args.heads, args.head_dim, dtype, device)
    base = default_blocks(args.head_dim, dtype)
    candidates = [base]
    for fwd_m, fwd_n in ((128, 64), (128, 128), (64, 64), (64, 128)):
        for dkdv_m, dkdv_n in ((32, 128), (64, 64), (64, 128)):
            for warps, stages in ((4, 2), (4, 3), (8, 3)):
                candidates.append(
                    replace(
                        base, fwd_m=fwd_m, fwd_n=fwd_n, dkdv_m=dkdv_m, dkdv_n=dkdv_n,
                        dq_m=dkdv_n, dq_n=dkdv_m, fwd_warps=warps, dkdv_warps=warps,
                        dq_warps=warps, num_stages=stages,
                    )
                )  # fmt: skip
    print(f"tile sweep, B{b} S{s} H{args.heads} D{args.head_dim} {args.dtype}, fwd+bwd ms")
    for blocks in candidates:
        try:
            ms = time_ms(_fwd_bwd(_fixed(x, blocks), x), device, args.repeats, args.warmup)
            print(f"  {ms:8.3f}  {blocks}")
        except Exception as exc:  # out of shared memory / registers: report and go on
            print(f"  {'failed':>8}  {blocks}: {type(exc).__name__}: {str(exc)[:80]}")


def _fixed(x: dict[str, Tensor], blocks: AttentionBlocks) -> Callable:
    return lambda q, k, v: flash_glm_attention(q, k, v, x["sep"], x["valid_len"], blocks=blocks)


def add_attention_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sizes", default="16x512,8x1024,4x2048,2x4096", help="BxS list")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=20, help="median of this many timings")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (interpreter) if no GPU")


def smoke_overrides(args: argparse.Namespace) -> None:
    """Tiny shapes (the interpreter gets through them in seconds): head dim 16, 1 head, fp32."""
    args.sizes, args.heads, args.head_dim, args.dtype = SMOKE_SIZES, 1, 16, "fp32"
    args.repeats, args.warmup = 1, 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_attention_args(ap)
    ap.add_argument("--sweep", action="store_true", help="time tile-size candidates instead")
    args = ap.parse_args(argv)
    device = require_device(args.smoke, "bench_attention")
    if args.smoke:
        smoke_overrides(args)
    if args.sweep:
        sweep(args, device)
        return
    rows = attention_table(args, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU interpreter (smoke)"
    print_attention_table(
        rows,
        f"GLM attention fwd+bwd, ms (median of {args.repeats}), H{args.heads} "
        f"D{args.head_dim} {args.dtype}, sep in [S/2, 7S/8], on {where}",
    )
    if args.smoke:
        print("(smoke run: tiny shapes; the timings are not performance numbers)")


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
