"""``tools/bench/bench_convert.py`` end to end on a small model (8 layers, h 384: 60 MB fp32).

The table must be consistent with itself, the conversions' outputs must be the checkpoint's
weights, and the memory columns must tell the two paths apart: the old path holds the model twice
over (``(peak-start)/size`` about 2), streaming well under one model (the largest tensor here is
2.4 MB, a layer 7 MB; the rest is lazy imports and allocator slack), so a regression to
loading everything fails this test. Four fresh Python processes: ~20 s on the 2-core machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_glm.config import ModelConfig
from megatron_glm.hf.export import convert_state
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.serialization import load_file
from megatron_glm.training.checkpoint import read_full_state

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "bench" / "bench_convert.py"
SHAPE = {
    "name": "bench-small",
    "num_layers": 8,
    "hidden_size": 384,
    "num_attention_heads": 6,
    "vocab_size": 2048,
    "max_position_embeddings": 256,
}
HEADER = re.compile(
    r"^conversion\s+path\s+wall s\s+peak RSS GB\s+start GB\s+fp32 GB\s+peak/size\s+"
    r"\(peak-start\)/size\s+target$",
    re.MULTILINE,
)
ROW = re.compile(
    r"^(to-hf|from-hf)\s+(old \(load all\)|streaming)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
    r"([\d.]+)\s+([\d.]+)x\s+([\d.]+)x\s+(-|< 1\.3x (?:met|MISSED))$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    work = tmp_path_factory.mktemp("bench")
    config = work / "bench-small.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in SHAPE.items()))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(config), "--workdir", str(work), "--keep"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, work


def _cfg() -> ModelConfig:
    return ModelConfig(**{k: v for k, v in SHAPE.items() if k != "name"})


@pytest.mark.slow
def test_table_is_consistent_and_tells_the_paths_apart(bench: tuple[str, Path]) -> None:
    out, _ = bench
    assert out.startswith("== bench_convert: bench-small, tp 2 x pp 2, fp32 ")
    assert HEADER.search(out), out
    rows = ROW.findall(out)
    assert [(r[0], r[1]) for r in rows] == [
        ("to-hf", "old (load all)"),
        ("to-hf", "streaming"),
        ("from-hf", "old (load all)"),
        ("from-hf", "streaming"),
    ], out
    params = sum(s.numel() for s in _shapes().values())
    for _, path, _wall, peak, start, size, ratio, added, target in rows:
        peak_gb, start_gb, size_gb = float(peak), float(start), float(size)
        assert size_gb == pytest.approx(params * 4 / 1e9, abs=5e-4)
        assert float(ratio) == pytest.approx(peak_gb / size_gb, abs=0.02 + 0.01 * float(ratio))
        assert float(added) == pytest.approx((peak_gb - start_gb) / size_gb, abs=0.05)
        assert (target == "-") == path.startswith("old")
        if path.startswith("old"):
            assert float(added) > 1.5, out  # merged model + its shards: twice the model
        else:
            assert float(added) < 0.75, out  # a layer and lazy imports, never the model


def _shapes() -> dict[str, torch.Size]:
    from megatron_glm.model import GLMModel

    with torch.device("meta"):
        model = GLMModel(_cfg(), _cfg().vocab_size)
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_outputs_hold_the_checkpoint(bench: tuple[str, Path]) -> None:
    """to-hf: the streaming file is byte for byte the old path's and holds the checkpoint's
    converted tensors; from-hf: back to the checkpoint's weights exactly, as the old path's
    layer files."""
    _, work = bench
    layout = tensor_parallel_layout(_cfg())
    source = read_full_state(work / "ckpt/global_step0", layout)
    hf = work / "hf/model.safetensors"
    assert hf.read_bytes() == (work / "hf_old/model.safetensors").read_bytes()
    want = dict(convert_state(source.items(), _cfg(), torch.float32))
    with safe_open(str(hf), "pt") as f:
        assert sorted(f.keys()) == sorted(want)
        for key in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(key), want[key]), key
    back = read_full_state(work / "from_hf/global_step0", layout)
    assert sorted(back) == sorted(source)
    assert all(torch.equal(back[k], v) for k, v in source.items())
    old_files = sorted((work / "from_hf_old").iterdir())
    assert len(old_files) == 2 * (_cfg().num_layers + 2)
    for path in old_files:
        new, old = load_file(work / "from_hf/global_step0" / path.name), load_file(path)
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
