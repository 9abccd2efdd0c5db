"""The GPU benchmark scripts run (``--smoke``: tiny shapes, CPU interpreter) and refuse on CPU."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # bench_kernels imports bench_attention by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_gpu() -> None:
    for name in ("bench_attention", "bench_kernels"):
        with pytest.raises(SystemExit) as exc:
            load(name).main([])
        assert str(exc.value) == (
            f"{name}: needs a CUDA GPU and found none; run with --smoke for a CPU check of tiny "
            "shapes under TRITON_INTERPRET=1 (timings are then meaningless)"
        )


@pytest.mark.slow
def test_bench_kernels_smoke(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # what --smoke sets on CPU; restored after
    load("bench_kernels").main(["--smoke"])
    out = capsys.readouterr().out
    for title in ("== kernels vs fp32", "== attention fwd+bwd", "== cross entropy", "== element"):
        assert title in out
    checks = dict(re.findall(r"^\s*(\S.*?)\s+(\d\.\d\de[-+]\d\d)\s+\S+$", out, re.MULTILINE))
    assert len(checks) == 5, (
        out
    )  # attention, cross entropy, bias_gelu, bias_dropout_add, layer_norm
    for kernel, err in checks.items():  # fp32 under the interpreter: rounding-level agreement
        assert float(err) < 1e-4, (kernel, err)
    assert re.search(r"B1 S24\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(n/a|[\d.]+)\s+[\d.]+\s+[\d.]+x", out)
