"""``tools/bench/bench_precision.py`` runs end to end (a few steps), printing only its tables.

Its figures at full length are in the README ("Precision and offload"); here a 3-step run checks
that the script still drives the real loop and that bf16 differs from fp32, but not by much. The
offload comparison (its own rows) is skipped: ``tests/distributed/test_precision_offload.py``
checks offload, and each of its runs here would cost seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "bench" / "bench_precision.py"
ROW = re.compile(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.e+-]+)$", re.MULTILINE)


@pytest.mark.slow
def test_short_run_prints_the_precision_comparison() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--offload-steps", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("glm-tiny, 3 steps, ZeRO-1, 1 CPU process: fp32 vs bf16"), out
    assert "WARNING" not in out  # DeepSpeed's logger writes to stdout: silenced
    (step, fp32, bf16, rel), *_ = ROW.findall(out)
    assert step == "1" and abs(float(bf16) - float(fp32)) / float(fp32) == pytest.approx(
        float(rel), abs=1e-6
    )
    worst = re.search(r"max relative difference over 3 steps: (\S+)\n", out)
    assert worst, out
    assert 0 < float(worst.group(1)) < 1e-3, out
    assert out.endswith(f"{worst.group(0)}bf16 within 5.0e-03 of fp32: yes\n"), out
    assert "Offload" not in out
