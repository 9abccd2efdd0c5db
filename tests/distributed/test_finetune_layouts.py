"""Finetuning at tp 2, pp 2, dp 2, ZeRO-3 and with sequence parallelism equals one process (fp32,
dropout 0), seq2seq decoding included, and resume is bitwise.

Two launches (start-up is most of the cost on 2 cores): 2 ranks run the parallel layouts and
the resume runs in turn inside one process group (``training.session.train_in_group`` with the
finetuning task, as ``glm-finetune`` runs it), then 1 rank runs the references. Tasks are small
synthetic JSONL files; the cloze task has multi-token verbalizers (part-B scoring, the head's
logits gathered over TP) and the seq2seq runs use label smoothing (the same gather).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("finetune")]

WORDS = ["data", "file", "list", "value", "name", "type", "object", "string"]


def _tiny(tok: str, task: str, tmp: Path) -> list[str]:
    return [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.max_position_embeddings=64",
        "model.kernels=torch",
        f"data.tokenizer_model={tok}",
        "data.seq_length=32",
        "optimizer.lr=0.003",
        "optimizer.warmup_iters=1",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.train_iters=4",
        "logging.log_interval=1",
        "logging.progress_bar=false",
        f"finetune.task={task}",
        f"finetune.task_dir={tmp / task}",
        "finetune.patterns=['{text} Package: [MASK].']",
        "finetune.verbalizers={'no': 'no', 'yes': 'yes please'}",
        "finetune.label_smoothing=0.1",
    ]


def _write_tasks(tmp: Path) -> None:
    rng = random.Random(0)
    for task in ("cloze", "seq2seq"):
        (tmp / task).mkdir()
        for split, n in (("train", 40), ("validation", 10), ("test", 6)):
            rows = []
            for _ in range(n):
                words = [rng.choice(WORDS) for _ in range(6)]
                has = rng.random() < 0.5
                if task == "cloze":
                    rows.append({"text": " ".join(words), "label": "yes" if has else "no"})
                else:
                    rows.append({"source": " ".join(words), "target": " ".join(words[:2])})
            (tmp / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _worker(spec: dict[str, Any]) -> int:
    """Each rank: one process group, every run in turn; rank 0 writes the results."""
    from megatron_glm.config import load_config
    from megatron_glm.finetune.run import check_finetune, finetune_task
    from megatron_glm.logs import setup_logging
    from megatron_glm.training.distributed import (
        destroy_distributed,
        init_distributed,
        read_dist_env,
    )
    from megatron_glm.training.preflight import validate_for_launch
    from megatron_glm.training.session import train_in_group

    env = read_dist_env()
    setup_logging(env.rank)
    configs = [load_config(None, run) for run in spec["runs"]]
    device = init_distributed(env)
    results = []
    try:
        for cfg in configs:  # checked in turn: a later run may start from an earlier one's save
            validate_for_launch(cfg, env.world_size, check_data=False)
            check_finetune(cfg)
            make_source, task = finetune_task(cfg)
            lines: list[str] = []
            decoder: list[list[float]] = []
            task = replace(task, after=_and_decoder_logits(cfg, task.after, decoder))
            res = train_in_group(cfg, env, device, make_source, task=task, log=_keep(lines))
            results.append(
                {
                    "losses": {str(k): v for k, v in res.step_losses.items()},
                    "valid": res.valid_history,
                    "exit_reason": res.exit_reason,
                    "lines": lines,
                    "decoder": decoder,
                }
            )
            if env.rank == 0:
                Path(spec["out"]).write_text(json.dumps(results))
    finally:
        destroy_distributed()
    return 0


def _and_decoder_logits(cfg: Any, after: Any, out: list[list[float]]) -> Any:
    """``after`` (the test evaluation), then the logits of the model the run decodes with
    (``finetune.run.decoding_model``) on two validation rows: the decodes of a tiny model are
    too flat to tell a slightly wrong copy of the weights apart, its logits are not."""
    import torch

    from megatron_glm.finetune.run import decoding_model, read_split, task_loss
    from megatron_glm.training.batches import MODEL_INPUTS
    from megatron_glm.training.preflight import load_tokenizer

    def run(runner: Any, trainer: Any) -> None:
        after(runner, trainer)
        tok = load_tokenizer(cfg)
        model = decoding_model(cfg, runner, tok)
        batch = task_loss(cfg, tok)[1](read_split(cfg, "validation")[:2])
        with torch.no_grad():
            logits = model.logits(model(*(batch[k] for k in MODEL_INPUTS)))
        out.append(logits[:, :, :64].flatten().tolist())

    return run


def _keep(lines: list[str]) -> Any:
    """The run's console lines (rank 0's), kept per run and printed as the loop would log."""

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    return log


def _run(nprocs: int, runs: list[list[str]], tmp: Path) -> tuple[list[dict[str, Any]], str]:
    from megatron_glm.training.distributed import free_port

    out = tmp / f"result_{time.monotonic_ns()}.json"
    spec_file = tmp / f"spec_{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps({"runs": runs, "out": str(out)}))
    port, procs = free_port(), []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, __file__, str(spec_file)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=60 + 40 * len(runs))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    codes = [p.returncode for p in procs]
    assert codes == [0] * nprocs and out.is_file(), f"exit codes {codes}:\n{logs[0][-4000:]}"
    return json.loads(out.read_text()), logs[0]


@pytest.fixture(scope="module")
def finetune_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path
) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("finetune_layouts")
    _write_tasks(tmp)
    tok = str(tiny_tokenizer_model)
    exact = ["model.hidden_dropout=0.0", "model.attention_dropout=0.0", "train.eval_interval=2"]
    cloze = _tiny(tok, "cloze", tmp) + exact
    s2s = [*_tiny(tok, "seq2seq", tmp), *exact, "finetune.metric=rougeL"]
    resume = [*_tiny(tok, "cloze", tmp), "train.train_iters=6", "train.eval_interval=3"]
    two = {  # dropout 0.1 in the resume runs: the RNG streams must resume too
        "cloze_tp2": [*cloze, "parallel.tp=2"],
        "cloze_pp2": [*cloze, "parallel.pp=2"],
        "cloze_dp2": cloze,
        "s2s_tp2": [*s2s, "parallel.tp=2"],
        # decoding from a whole-model copy: stages broadcast, ZeRO-3 gathered, SP off
        "s2s_pp2": [*s2s, "parallel.pp=2"],
        "s2s_zero3": [*s2s, "train.zero_stage=3"],
        "s2s_tp2_sp": [*s2s, "parallel.tp=2", "parallel.sequence_parallel=true"],
        "straight": [*resume, f"checkpoint.save={tmp / 'straight'}"],
        "stop": [*resume, f"checkpoint.save={tmp / 'stop'}", "train.exit_interval=3"],
        "resume": [*resume, f"checkpoint.save={tmp / 'stop'}"],
        # weights only from the finetuned checkpoint, into other layouts, at iteration 0
        "init_pp2": [*cloze, "parallel.pp=2", f"finetune.init={tmp / 'straight'}"],
        "init_tp2": [*cloze, "parallel.tp=2", f"finetune.init={tmp / 'straight'}"],
        "init_zero3": [*cloze, "train.zero_stage=3", f"finetune.init={tmp / 'straight'}"],
    }
    one = {"cloze_ref": cloze, "s2s_ref": s2s}
    res2, log2 = _run(2, list(two.values()), tmp)
    res1, log1 = _run(1, list(one.values()), tmp)
    out = dict(zip([*two, *one], [*res2, *res1], strict=True))
    return {**out, "dir": tmp, "log2": log2, "log1": log1}


def _rouge_lines(result: dict[str, Any]) -> list[str]:
    """A run's decoded figures (``| rouge1 ... | exact_match ...``): validations, then test."""
    lines = [
        x
        for x in result["lines"]
        if x.startswith(("validation at step", "test (")) and "| rouge1" in x
    ]
    return [x[x.index("| rouge1") :] for x in lines]


def test_seq2seq_decodes_at_every_layout_and_keeps_the_best_by_rouge(
    finetune_runs: dict[str, Any],
) -> None:
    """Seq2seq validation decodes the validation split greedily at every eval (ROUGE and exact
    match next to the loss) and the test split at the end; the figures at tp 2, pp 2, ZeRO-3
    dp 2 and tp 2 with sequence parallelism equal one process's, as do the logits of the model
    decoded with, and ``rougeL`` picks the best checkpoint."""
    r = finetune_runs
    one = _rouge_lines(r["s2s_ref"])
    assert len(one) == 4, one  # validation at steps 0, 2 and 4, then the test split
    for name in ("s2s_tp2", "s2s_pp2", "s2s_zero3", "s2s_tp2_sp"):
        assert _rouge_lines(r[name]) == one, (name, _rouge_lines(r[name]), one)
        got, want = r[name]["decoder"][0], r["s2s_ref"]["decoder"][0]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), name
    print("seq2seq test split, tp 2 / pp 2 / ZeRO-3 dp 2 / tp 2 + SP and one process:", one[-1])
    assert "validation at step 2 | rougeL " in finetune_runs["log1"]
    assert "skipped" not in r["log2"]


def _losses(result: dict[str, Any]) -> dict[int, float]:
    return {int(k): v for k, v in result["losses"].items()}


def test_tp2_pp2_dp2_zero3_and_sp_equal_one_process(finetune_runs: dict[str, Any]) -> None:
    r = finetune_runs
    for name, ref in (
        ("cloze_tp2", "cloze_ref"),
        ("cloze_pp2", "cloze_ref"),
        ("cloze_dp2", "cloze_ref"),
        ("s2s_tp2", "s2s_ref"),
        ("s2s_pp2", "s2s_ref"),
        ("s2s_zero3", "s2s_ref"),
        ("s2s_tp2_sp", "s2s_ref"),
    ):
        curve, want = _losses(r[name]), _losses(r[ref])
        assert sorted(curve) == [1, 2, 3, 4], name
        for step, loss in curve.items():
            assert loss == pytest.approx(want[step], rel=1e-5), (name, step, curve, want)
        worst = max(abs(curve[k] - want[k]) / abs(want[k]) for k in curve)
        print(f"{name} vs {ref}: steps 1-4, max relative loss difference {worst:.2e}")
        for (i, got), (j, exp) in zip(r[name]["valid"], r[ref]["valid"], strict=True):
            assert i == j and got == pytest.approx(exp, rel=1e-5), (name, i)
    log = r["log2"]
    for layout in ("tp 2 x pp 1 x dp 1", "tp 1 x pp 2 x dp 1", "tp 1 x pp 1 x dp 2"):
        assert f"parallel layout: world 2 = {layout}" in log
    assert "parallel layout: world 2 = tp 2 x pp 1 x dp 1, sequence parallel" in log
    assert "ZeRO-3" in "".join(r["s2s_zero3"]["lines"])
    assert "validation at step 2 | accuracy" in log
    assert "test (6 examples, final weights) | loss" in log  # no checkpoint.save: no best
    record = json.loads((r["dir"] / "straight" / "best" / "best.json").read_text())
    assert f"test (6 examples, best checkpoint, step {record['iteration']}) | loss" in log


def test_resume_mid_finetune_is_bitwise(finetune_runs: dict[str, Any]) -> None:
    r = finetune_runs
    straight, stopped, resumed = (_losses(r[k]) for k in ("straight", "stop", "resume"))
    assert r["stop"]["exit_reason"] == "exit_interval" and sorted(stopped) == [1, 2, 3]
    assert sorted(resumed) == [4, 5, 6]
    assert {**stopped, **resumed} == straight
    assert r["resume"]["valid"] == r["straight"]["valid"]
    best = r["dir"] / "straight" / "best"
    assert (best / "latest").is_file() and len([p for p in best.iterdir() if p.is_dir()]) == 1
    record = json.loads((best / "best.json").read_text())
    assert record["metric"] == "accuracy" and record["iteration"] in (3, 6)
    assert (best / (best / "latest").read_text()).is_dir()
    # the resumed run compared against the best kept before the stop: the same best
    assert json.loads((r["dir"] / "stop" / "best" / "best.json").read_text()) == record


def test_init_takes_weights_only_into_any_layout(finetune_runs: dict[str, Any]) -> None:
    """``finetune.init`` (a dp 2 checkpoint) into pp 2, tp 2 and ZeRO-3 dp 2: training starts
    at step 1 with a fresh optimizer, and the step-0 validation equals the saved model's last
    one."""
    r = finetune_runs
    saved = r["straight"]["valid"][-1]
    assert saved[0] == 6
    for name in ("init_pp2", "init_tp2", "init_zero3"):
        assert sorted(_losses(r[name])) == [1, 2, 3, 4], name
        step0 = r[name]["valid"][0]
        assert step0[0] == 0 and step0[1] == pytest.approx(saved[1], rel=1e-5), name
    for name in ("init_tp2", "init_zero3"):
        assert r["init_pp2"]["losses"] == pytest.approx(r[name]["losses"], rel=1e-5), name
    assert "finetune: weights from" in r["log2"]


if __name__ == "__main__":
    sys.exit(_worker(json.loads(Path(sys.argv[1]).read_text())))
