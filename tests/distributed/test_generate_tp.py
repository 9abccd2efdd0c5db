"""``tools/generate.py --tp 2`` on 2 gloo processes gives tp 1's greedy tokens.

The checkpoint is saved at tp 2 x pp 2 (pipeline stages merged and the TP shards re-split by
the loader); the reference is the same tool in this process at tp 1. Both processes are started
the way ``torchrun`` starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.model import build_model
from megatron_glm.training.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
sys.path.insert(0, str(REPO / "tools"))

import generate  # noqa: E402
from test_generate_cli import FLAGS, TEXTS, tiny_cfg, write_prompts, write_run  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORLD = 2


def _launch(argv: list[str], out: Path) -> None:
    """Run ``tools/generate.py argv`` as ranks 0..WORLD-1 of one job; fail with their logs."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
        )
        log = (out / f"log{rank}.txt").open("w")
        cmd = [sys.executable, str(REPO / "tools" / "generate.py"), *argv]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            code = -1
        log.close()
        if code != 0:
            failed.append(f"rank {rank} exit {code}:\n{(out / f'log{rank}.txt').read_text()}")
    if failed:
        pytest.fail("\n".join(failed))


def test_tp2_greedy_fills_equal_tp1(
    tiny_tokenizer: GLMTokenizer,
    tiny_tokenizer_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = build_model(tiny_cfg(), vocab_size=tiny_tokenizer.padded_vocab_size, seed=3)
    ckpt = write_run(tmp_path / "ckpt", model, tiny_tokenizer_model, tp=2, pp=2)
    prompts = write_prompts(tmp_path / "in.jsonl", TEXTS)
    argv = ["--load", str(ckpt), "--input", str(prompts), *FLAGS]
    assert generate.main([*argv, "--output", str(tmp_path / "tp1.jsonl")]) == 0, capsys.readouterr()
    _launch([*argv, "--tp", "2", "--output", str(tmp_path / "tp2.jsonl")], tmp_path)
    tp1 = (tmp_path / "tp1.jsonl").read_text().splitlines()
    tp2 = (tmp_path / "tp2.jsonl").read_text().splitlines()
    assert tp2 == tp1
    fills = [f for line in tp1 for f in json.loads(line)["fills"]]
    assert len(fills) == 7 and len(set(fills)) > 1  # real, varied fills were compared
    assert "4 rows" in (tmp_path / "log0.txt").read_text()  # rank 0 reported
    assert "rows" not in (tmp_path / "log1.txt").read_text()  # rank 1 wrote nothing
