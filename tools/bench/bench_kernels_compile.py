"""Compile every Triton kernel ahead of time for a GPU target, without a GPU: resource report.

Triton's compiler runs on the CPU all the way to a cubin (``ptxas`` ships with Triton), so on a
machine without a GPU this checks that each kernel *compiles* for the target with the tile sizes
the dispatcher picks, and reports what ``cuobjdump`` says each uses: registers per thread
(``REG``; 255 is the ceiling), spill stack (``STACK`` > 0 means register spills, usually a sign
that the tiles are too large for the warps), and static shared memory (dynamic shared memory,
which Triton uses for pipelined tiles, is ``metadata.shared``; an H100 block may use 227 KiB).
It cannot time anything: the runtime numbers come from ``bench_kernels.py`` on a GPU.

    python tools/bench/bench_kernels_compile.py [--arch 90] [--only attention]
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default; silences a warning

import torch
import triton
from triton import JITFunction
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron_glm.kernels import cross_entropy as ce
from megatron_glm.kernels import flash_attention as fa
from megatron_glm.kernels import fused_bias_dropout_add as bda
from megatron_glm.kernels import fused_bias_gelu as gelu
from megatron_glm.kernels import layernorm as ln
from megatron_glm.logs import setup_logging


@dataclass
class Case:
    """One kernel specialisation: pointer element types, constexprs and launch options."""

    group: str
    label: str
    kernel: Any  # a TritonKernel
    pointers: dict[str, str]
    constexprs: dict[str, Any]
    floats: tuple[str, ...] = ()
    options: dict[str, int] = field(default_factory=lambda: {"num_warps": 4, "num_stages": 2})


def attention_cases() -> list[Case]:
    cases = []
    for d in (64, 128):
        for dtype in ("bf16", "fp32"):
            blk = _gpu_blocks(d, torch.bfloat16 if dtype == "bf16" else torch.float32)
            stages = blk.num_stages
            prec = "tf32" if dtype == "bf16" else "ieee"
            io = {n: f"*{dtype}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
            stats = {"LSE": "*fp32", "DELTA": "*fp32", "SEP": "*i64", "VALID": "*i64"}
            tag = f"d{d} {dtype}"
            delta_m = min(blk.dq_m, 4096 // d)
            cases += [
                Case("attention", f"fwd {tag} {blk.fwd_m}x{blk.fwd_n}", fa._fwd_kernel,
                     io | stats, dict(HEAD_DIM=d, BLOCK_M=blk.fwd_m, BLOCK_N=blk.fwd_n,
                                      DOT_PRECISION=prec), ("qk_scale",),
                     {"num_warps": blk.fwd_warps, "num_stages": stages}),
                Case("attention", f"dkdv {tag} {blk.dkdv_m}x{blk.dkdv_n}", fa._bwd_dkdv_kernel,
                     io | stats, dict(HEAD_DIM=d, BLOCK_M=blk.dkdv_m, BLOCK_N=blk.dkdv_n,
                                      DOT_PRECISION=prec), ("qk_scale", "sm_scale"),
                     {"num_warps": blk.dkdv_warps, "num_stages": stages}),
                Case("attention", f"dq {tag} {blk.dq_m}x{blk.dq_n}", fa._bwd_dq_kernel,
                     io | stats, dict(HEAD_DIM=d, BLOCK_M=blk.dq_m, BLOCK_N=blk.dq_n,
                                      DOT_PRECISION=prec), ("qk_scale", "sm_scale"),
                     {"num_warps": blk.dq_warps, "num_stages": stages}),
                Case("attention", f"delta {tag} {delta_m} rows", fa._bwd_delta_kernel, io | stats,
                     dict(HEAD_DIM=d, BLOCK_M=delta_m)),
            ]  # fmt: skip
    return cases


def _gpu_blocks(d: int, dtype: Any) -> fa.AttentionBlocks:
    """The tiles ``default_blocks`` picks on a GPU (the interpreter's are smaller)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return fa.default_blocks(d, dtype)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def other_cases() -> list[Case]:
    ptr = {n: "*bf16" for n in ("X", "BIAS", "Y", "DY", "DX", "RESIDUAL", "OUT")}
    ptr |= {"W": "*bf16", "B": "*bf16", "LOGITS": "*bf16", "TARGETS": "*i64", "SEED": "*i64"}
    ptr |= {n: "*fp32" for n in ("MAX", "SUMEXP", "TARGET_LOGIT", "LSE", "SCALE", "MEAN", "RSTD")}
    ptr |= {"DW_PART": "*fp32", "DB_PART": "*fp32"}
    cases = [
        Case("cross_entropy", "stats V-block 4096", ce._ce_stats_kernel, ptr,
             dict(BLOCK_V=4096), (), {"num_warps": 8, "num_stages": 2}),
        Case("cross_entropy", "grad V-block 4096", ce._ce_grad_kernel, ptr,
             dict(BLOCK_V=4096), (), {"num_warps": 8, "num_stages": 2}),
        Case("bias_gelu", "fwd", gelu._bias_gelu_fwd_kernel, ptr,
             dict(HAS_BIAS=True, BLOCK=gelu.BLOCK)),
        Case("bias_gelu", "bwd", gelu._bias_gelu_bwd_kernel, ptr,
             dict(HAS_BIAS=True, BLOCK=gelu.BLOCK)),
        Case("bias_dropout_add", "fwd", bda._bda_fwd_kernel, ptr,
             dict(HAS_BIAS=True, DROPOUT=True, BLOCK=bda.BLOCK), ("p", "scale")),
        Case("bias_dropout_add", "bwd", bda._bda_bwd_kernel, ptr, dict(BLOCK=bda.BLOCK),
             ("p", "scale")),
    ]  # fmt: skip
    for h in (1024, 4096):
        opts = {"num_warps": ln._num_warps(h), "num_stages": 2}
        cases += [
            Case("layer_norm", f"fwd h{h}", ln._ln_fwd_kernel, ptr, dict(BLOCK_H=h), ("eps",),
                 opts),
            Case("layer_norm", f"bwd h{h}", ln._ln_bwd_kernel, ptr, dict(BLOCK_H=h), (), opts),
        ]  # fmt: skip
    return cases


def compile_case(case: Case, arch: int) -> dict[str, Any]:
    fn = case.kernel.fn
    jit = JITFunction(fn)
    signature = {}
    for name in inspect.signature(fn).parameters:
        if name in case.constexprs:
            signature[name] = "constexpr"
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            signature[name] = case.pointers.get(name, "i32")
    t0 = time.perf_counter()
    compiled = triton.compile(
        ASTSource(jit, signature, constexprs=case.constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=case.options,
    )
    seconds = time.perf_counter() - t0
    return dict(usage=_resource_usage(compiled.asm["cubin"]), dyn_shared=compiled.metadata.shared,
                seconds=seconds)  # fmt: skip


def _resource_usage(cubin: bytes) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    line = next((x for x in text.splitlines() if "REG:" in x), "")
    return " ".join(p for p in line.split() if p.split(":")[0] in ("REG", "STACK", "SHARED"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--only", default="", help="comma list of groups (attention, layer_norm...)")
    args = ap.parse_args(argv)
    groups = {g for g in args.only.split(",") if g}
    cases = [c for c in attention_cases() + other_cases() if not groups or c.group in groups]
    rows: list[tuple[Case, dict[str, Any] | None, str | None]] = []
    for case in cases:
        try:
            rows.append((case, compile_case(case, args.arch), None))
        except Exception as exc:  # a kernel that does not compile is the finding; keep going
            rows.append((case, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"))
        print(f"  {case.group} {case.label}: done", file=sys.stderr)
    print(f"Triton {triton.__version__} ahead-of-time compile for sm_{args.arch} (no GPU needed)")
    print(
        f"{'kernel':>18} {'specialisation':>28} {'warps':>5} {'stages':>6} {'dyn smem':>9}  usage"
    )
    for case, res, err in rows:
        opts = case.options
        head = f"{case.group:>18} {case.label:>28} {opts['num_warps']:>5} {opts['num_stages']:>6}"
        if res is None:
            print(f"{head} {'FAILED':>9}  {err}")
        else:
            print(f"{head} {res['dyn_shared']:>9}  {res['usage']}")
    if any(err for _, _, err in rows):
        sys.exit(1)


if __name__ == "__main__":
    setup_logging(info_stream="stderr")  # stdout is the result
    main()
