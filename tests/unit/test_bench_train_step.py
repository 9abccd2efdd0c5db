"""``tools/bench/bench_train_step.py`` runs end to end on CPU (``--smoke``) and refuses otherwise.

The smoke run goes through the same code as the GPU benchmark (our model + glm_loss, HF
``BertForMaskedLM``, fused AdamW, the table), so a broken import, a changed model API or a wrong
FLOP/ratio computation fails here instead of on the next lent GPU.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "bench" / "bench_train_step.py"
HEADER = re.compile(
    r"^\s*model\s+batch\s+loss tok\s+ours tok/s\s+HF tok/s\s+ratio\s+ours TFLOP/s\s+MFU\s+"
    r"HF MFU\s+target$",
    re.MULTILINE,
)
ROW = re.compile(
    r"^\s*smoke-tiny\s+2\s+([\d.]+)%\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)x\s+(\S+)"
    r"\s+(n/a|[\d.]+%)\s+(n/a|[\d.]+%)\s+-$",  # MFU: n/a on CPU (a GPU has a peak)
    re.MULTILINE,
)


def smoke_flops_per_token() -> int:
    """6 N_matmul + 12 L h S for the smoke shape, written out: L 2, h 64, f 256, V 512, S 64."""
    layers, h, f, vocab, s = 2, 64, 256, 512, 64
    n_matmul = layers * (3 * h * h + h * h + 2 * h * f) + vocab * h  # QKV, dense, MLP, tied head
    return 6 * n_matmul + 12 * layers * h * s


@pytest.mark.slow
def test_smoke_run_prints_consistent_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--profile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    header = HEADER.search(out)
    assert header, out
    profile = out.index("== profile: ours, smoke-tiny b2 S64 fp32")
    assert "aten::mm" in out[profile : header.start()]  # our step's op table, before the table
    assert "targets (glm-410m): ours/HF >= 1.70x and MFU >= 50%" in out
    match = ROW.search(out)
    assert match, out
    # The table is the last thing printed: only the smoke note may follow the row.
    assert out.rstrip().splitlines()[-1].startswith("(smoke run:"), out
    frac, ours, hf, ratio, tflops, mfu, hf_mfu = match.groups()
    if not torch.cuda.is_available():
        assert (mfu, hf_mfu) == ("n/a", "n/a")  # no peak for a CPU: never a guessed MFU
    ours_tps, hf_tps = float(ours.replace(",", "")), float(hf.replace(",", ""))
    assert 5.0 < float(frac) < 80.0  # GLM rows: part B only carries loss
    rounding = 0.01 + 0.5 / min(ours_tps, hf_tps)  # 3 significant digits; integer tok/s
    assert float(ratio) == pytest.approx(ours_tps / hf_tps, rel=2 * rounding)
    assert float(tflops) == pytest.approx(ours_tps * smoke_flops_per_token() / 1e12, rel=rounding)
    # Both models trained on the 512-word vocabulary from a fresh init: loss ~ ln(512).
    losses = re.findall(r"smoke-tiny b2 (ours|HF): [\d,]+ tok/s, loss ([\d.]+)", proc.stderr)
    assert sorted(who for who, _ in losses) == ["HF", "ours"], proc.stderr
    for who, loss in losses:
        assert abs(float(loss) - math.log(512)) < 0.5, (who, loss)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_gpu() -> None:
    with pytest.raises(SystemExit) as exc:
        _load().main([])
    assert str(exc.value) == (
        "bench_train_step: needs a CUDA GPU and found none; run with --smoke for a CPU check of a "
        "tiny model (timings are then meaningless)"
    )  # sys.exit(str): the message goes to stderr and the exit status is 1


def test_unknown_model_is_named() -> None:
    bench = _load()
    with pytest.raises(ValueError, match=r"--models: no model config .*glm-nope\.yaml \(known: "):
        bench.load_workload("glm-nope", 512, 0.1, "auto")
