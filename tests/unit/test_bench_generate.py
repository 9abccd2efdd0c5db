"""``tools/bench/bench_generate.py`` runs end to end on a tiny shape and its table adds up.

The tiny run goes through the same code as the glm-base benchmark (cached and uncached decoders,
the HF export's ``generate`` when the export has it, the table), so a changed decoder API or a
broken ratio fails here rather than in the next benchmark run.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "bench" / "bench_generate.py"
ROW = re.compile(
    r"^(ours, KV cache, batched|ours, uncached, one at a time|HF export, generate\(\))\s+"
    r"(\d+|n/a)\s+(\d+|n/a)\s+([\d.e+-]+|n/a)\s+([\d.]+|n/a)\s+([\d.]+x|n/a)$",
    re.MULTILINE,
)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_generate"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_a_consistent_table(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script()
    flags = "--layers 2 --hidden 64 --heads 2 --vocab 256 --batch 3 --prompt 20 --new-tokens 5"
    assert bench.main([*flags.split(), "--uncached-rows", "2"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups()[1:] for m in ROW.finditer(out)}
    assert len(rows) == 3, out
    cached, uncached = rows["ours, KV cache, batched"], rows["ours, uncached, one at a time"]
    assert cached[:2] == ("3", "15") and uncached[:2] == ("2", "10")
    assert uncached[4] == "1.0x"
    rate = float(cached[1]) / float(cached[2])
    assert float(cached[3]) == pytest.approx(rate, rel=0.01, abs=0.1)
    ratio = float(cached[3]) / float(uncached[3])
    assert float(cached[4][:-1]) == pytest.approx(ratio, rel=0.05, abs=0.1)
    assert "tokens: cached == uncached (2 rows): yes" in out
    hf = re.search(r"HF == cached: (\d+)/3 rows", out)
    if hf is not None:  # the export can generate: greedy tokens agree
        assert hf.group(1) == "3", out


def test_too_long_prompt_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script()
    flags = "--layers 1 --hidden 32 --heads 2 --vocab 64 --prompt 500 --new-tokens 64"
    assert bench.main(flags.split()) == 2
    assert "exceed the model's max_position_embeddings 512" in capsys.readouterr().err
