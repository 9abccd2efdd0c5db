"""``python -m megatron_glm.pretrain``: config errors before any process group, dry runs of every
shipped recipe, and a real ``deepspeed`` launcher run (2 CPU ranks, ZeRO-1) on a tiny corpus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from megatron_glm import pretrain
from megatron_glm.config import load_config
from megatron_glm.planning.memory import estimate_memory
from megatron_glm.training.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def _run_yaml(
    tmp: Path, prefix: str, tok: str, *, logging: dict[str, object] | None = None, **train: object
) -> Path:
    cfg: dict[str, object] = {
        "model": yaml.safe_load((REPO / "configs" / "model" / "glm-tiny.yaml").read_text()),
        "data": {"data_path": [prefix], "tokenizer_model": tok, "seq_length": 64},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 4, **train},
    }
    if logging is not None:
        cfg["logging"] = logging
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _single_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def _no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reaching the training session (and its process group) a test failure."""
    import megatron_glm.training.session as session

    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("config error not caught before the run started")

    monkeypatch.setattr(session, "run_pretraining", fail)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ["model.num_attention_heads=3"],
            1,
            "config field 'model.hidden_size': must be divisible by num_attention_heads (3)",
        ),
        (
            ["train.micro_batch_size=2", "train.global_batch_size=6"],
            2,
            "config field 'train.global_batch_size': 6 is not micro_batch_size (2) x gradient "
            "accumulation x data-parallel size (2); use a multiple of 4",
        ),
        (
            ["train.micro_batch=2"],
            1,
            "unknown config key 'train.micro_batch'; did you mean 'train.micro_batch_size'?",
        ),
        (
            ["data.data_path=/nonexistent/corpus_text_sentence"],
            1,
            "config field 'data.data_path': /nonexistent/corpus_text_sentence.bin not found",
        ),
        (
            ["data.tokenizer_model=/nonexistent/tok.model"],
            1,
            "config field 'data.tokenizer_model': /nonexistent/tok.model not found",
        ),
        (
            ["model.vocab_size=30592"],
            1,
            "config field 'model.vocab_size': 30592 but the tokenizer's padded vocab is 1536",
        ),
        (
            ["optimizer.lr=.inf"],
            1,
            "config field 'optimizer.lr': must be a finite number, got inf",
        ),
        (
            ["optimizer.lr=1e999"],
            1,
            "config field 'optimizer.lr': must be a finite number, got '1e999'",
        ),
        (
            ["model.hidden_dropout=.nan"],
            1,
            "config field 'model.hidden_dropout': must be a finite number, got nan",
        ),
        (
            ["checkpoint.load=/nonexistent/ckpt"],
            1,
            "config field 'checkpoint.load': /nonexistent/ckpt has no 'latest' file",
        ),
    ],
)
def test_config_errors_named_before_any_process_group(
    tmp_path: Path,
    tiny_corpus: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    world: int,
    message: str,
) -> None:
    run = _run_yaml(tmp_path, *tiny_corpus)
    _single_process_env(monkeypatch)
    if world > 1:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "1")  # never contacted
    _no_run(monkeypatch)
    assert pretrain.main(["--config", str(run), *overrides]) == pretrain.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
    assert not dist.is_initialized()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads_and_dry_runs(
    recipe: Path,
    tiny_corpus: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each configs/*.yaml resolves, validates for its own launch shape and prints its
    DeepSpeed config; only the corpus and tokenizer are swapped for the test ones."""
    _single_process_env(monkeypatch)
    raw = yaml.safe_load(recipe.read_text())
    micro = raw["train"]["micro_batch_size"]
    dp = raw["train"]["global_batch_size"] // micro  # the largest DP size the recipe allows
    par = raw.get("parallel", {})
    world = dp * par.get("tp", 1) * par.get("pp", 1)
    prefix, tok = tiny_corpus
    _no_run(monkeypatch)
    args = [
        "--config",
        str(recipe),
        "--dry-run",
        "--world-size",
        str(world),
        f"data.data_path={prefix}",
        f"data.tokenizer_model={tok}",
        "model.vocab_size=0",
    ]
    assert pretrain.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"\nworld size {world}, data parallel {dp}," in out
    assert '"gradient_accumulation_steps": 1' in out
    assert f'"train_micro_batch_size_per_gpu": {micro}' in out
    assert not dist.is_initialized()


def _dry_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> dict[str, str]:
    """``--dry-run`` of glm-tiny with absent data and tokenizer, no launcher variables, in this
    process; its sections by title."""
    _single_process_env(monkeypatch)
    _no_run(monkeypatch)
    missing = ["data.data_path=[/nonexistent/corpus]", "data.tokenizer_model=/nonexistent/t.model"]
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--dry-run", *missing, *args]
    code = pretrain.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not dist.is_initialized()
    sections = {}
    for part in out.split("\n\n# "):
        title, _, body = part.removeprefix("# ").partition("\n")
        sections[title] = body
    return sections


def test_dry_run_plans_a_layout_without_data_tokenizer_or_process_group(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """8 ranks at tp 2 x pp 2 x dp 2, vocabulary from model.vocab_size; per-rank parameters
    against the model's formula (h = 64, f = 4h, vocab 1536, 512 positions, 2 layers)."""
    args = ["--world-size", "8", "model.vocab_size=1536", "parallel.tp=2", "parallel.pp=2"]
    args += ["parallel.partition_method=type:GLMBlock", "train.zero_stage=1"]
    sections = _dry_run(monkeypatch, capsys, *args)
    assert list(sections) == [
        "config", "layout", "parameters", "memory", "data", "checkpoint", "DeepSpeed config"
    ]  # fmt: skip
    assert sections["layout"].splitlines() == [
        "world size 8, data parallel 2, tensor parallel 2, pipeline parallel 2",
        "batch: micro batch 8 x gradient accumulation 1 x data parallel 2 = global batch 16 "
        "sequences of 256 tokens",
        "ZeRO-1, fp32, 600 steps",
    ]
    h, v, pos = 64, 1536, 512
    embedding = v * h // 2 + 2 * pos * h  # word embedding split over tp, positions replicated
    block = (3 * h * h + 3 * h + h * h + 4 * h * h + 4 * h + 4 * h * h) // 2 + 2 * h + 4 * h
    total = v * h + 2 * pos * h + 2 * (12 * h * h + 13 * h) + 2 * h
    lines = sections["parameters"].splitlines()
    assert (
        lines[0].startswith(f"total {total:,} ")
        and "vocabulary 1536 (model.vocab_size)" in lines[0]
    )
    # type:GLMBlock: one block per stage; the last stage has the final LayerNorm and the head
    assert lines[1] == f"per rank (pipeline stage 0, tp shard 1/2): {embedding + block:,} " + (
        f"({(embedding + block) / 1e6:.2f}M)"
    )
    last = block + 2 * h + v * h // 2
    assert lines[2].startswith(f"per rank (pipeline stage 1, tp shard 1/2): {last:,} ")
    cfg = load_config(REPO / "configs" / "demo.yaml", args[2:])
    est = estimate_memory(cfg, 8, device="cpu")  # the tests run with DS_ACCELERATOR=cpu
    total_line = [ln for ln in sections["memory"].splitlines() if ln.startswith("  total ")]
    assert total_line == [f"  total {est.total / 2**30:>17.3f} GiB {est.total:>16,d} B"]
    assert sections["memory"].startswith(
        f"memory per rank (worst rank: pipeline stage {est.stage})"
    )
    assert sections["data"].splitlines() == [
        "/nonexistent/corpus.bin/.idx: NOT FOUND (the launch needs it)",
        "tokenizer /nonexistent/t.model: NOT FOUND (the launch needs it)",
    ]
    assert sections["checkpoint"].startswith("none: a fresh start (checkpoints/demo has no")
    assert json.loads(sections["DeepSpeed config"])["gradient_accumulation_steps"] == 1


def test_dry_run_reports_a_checkpoint_of_another_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint written at tp 2 (its layout.json) planned at tp 1 x pp 2, and one written
    at ZeRO-1 x dp 4 planned at dp 2: reported with the convert command, not refused; the
    vocabulary unknown without tokenizer or model.vocab_size."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step10").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step10")
    layout = {"iteration": 10, "tp": 2, "pp": 1, "dp_size": 2, "zero_stage": 1}
    (ckpt / "global_step10" / "layout.json").write_text(json.dumps(layout))
    args = ["--world-size", "4", f"checkpoint.load={ckpt}", "parallel.pp=2", "train.zero_stage=1"]
    lines = _dry_run(monkeypatch, capsys, *args)["checkpoint"].splitlines()
    assert lines[:2] == [
        f"{ckpt}: global_step10 (step 10), written at tp 2, pp 1, data parallel 2, ZeRO-1",
        "this run: tp 1, pp 2, data parallel 2, ZeRO-1",
    ]
    assert lines[2] == (
        f"will not resume as is: checkpoint {ckpt}/global_step10 was written with tp 2, pp 1, "
        f"this run is tp 1, pp 2; convert it first with python tools/reshard_checkpoint.py "
        f"--load {ckpt} --tp 1 --pp 2 --save NEW_DIR (the optimizer state is carried over)"
    )
    layout.update(tp=1, dp_size=4)
    (ckpt / "global_step10" / "layout.json").write_text(json.dumps(layout))
    sections = _dry_run(monkeypatch, capsys, "--world-size", "2", f"checkpoint.load={ckpt}")
    verdict = sections["checkpoint"].splitlines()[2]
    assert (
        verdict.startswith("will not resume as is: checkpoint ")
        and "ZeRO-1 at data-parallel size 4" in verdict
    )
    assert "reshard_checkpoint.py" in verdict
    assert sections["parameters"].startswith("vocabulary unknown: model.vocab_size is 0 and the ")


def test_world_size_is_for_dry_runs_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _single_process_env(monkeypatch)
    _no_run(monkeypatch)
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--world-size", "2"]
    assert pretrain.main(argv) == pretrain.EXIT_CONFIG_ERROR
    assert capsys.readouterr().err == f"error: {pretrain.WORLD_SIZE_WITHOUT_DRY_RUN}\n"


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher_two_cpu_ranks(tmp_path: Path, tiny_corpus: tuple[str, str]) -> None:
    """The real launcher: ``deepspeed --num_gpus 2 --module megatron_glm.pretrain`` on CPU.

    On a machine without GPUs the launcher still needs ``--num_gpus`` (it sizes the local world
    from it) and passes ``--local_rank`` to each process; ``DS_ACCELERATOR=cpu`` selects gloo.
    """
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert deepspeed is not None, "the deepspeed launcher is not installed next to python"
    run = _run_yaml(
        tmp_path,
        *tiny_corpus,
        train_iters=6,
        zero_stage=1,
        eval_interval=3,
        eval_iters=2,
    )
    save = tmp_path / "ckpt"
    tb = tmp_path / "tb"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "megatron_glm.pretrain",
        "--config",
        str(run),
        f"checkpoint.save={save}",
        "checkpoint.save_interval=3",
        f"logging.tensorboard_dir={tb}",
        "logging.log_interval=3",
        "data.num_workers=1",
    ]
    proc = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "world 2, dp 2, grad accumulation 1, ZeRO-1, fp32" in log
    for needle in ("validation at step 0 |", "step 3/6 | samples 12 |", "step 6/6 | samples 24 |"):
        assert needle in log, needle
    assert "MFU n/a" in log
    assert "validation loss: " in log and "at step 0 -> " in log
    assert (save / "latest").read_text() == "global_step6"
    assert (save / "global_step3").is_dir() and (save / "global_step6").is_dir()
    assert list(tb.glob("events.out.tfevents.*")), "no TensorBoard event file"
    # eval_iters counts global batches: one process validates the same rows at step 0.
    one_proc = f"checkpoint.save={tmp_path / 'one'}", "train.exit_interval=1", "data.num_workers=0"
    single = _one_process(["--config", str(run), *one_proc], env, tmp_path)
    assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    assert "world 1, dp 1, grad accumulation 2" in single.stdout
    two_ranks, one_rank = (_validation_line(x, 0) for x in (log, single.stdout))
    assert two_ranks == one_rank, (two_ranks, one_rank)
    # Resuming this ZeRO-1 checkpoint with another data-parallel size is refused up front.
    again = _one_process(cmd[cmd.index("--config") :], env, tmp_path)
    assert again.returncode == pretrain.EXIT_CONFIG_ERROR, again.stdout + again.stderr
    assert again.stderr.startswith(
        f"error: config field 'train.zero_stage': checkpoint {save}/global_step6 was written "
        "with ZeRO-1 at data-parallel size 2, this run is ZeRO-1 at data-parallel size 1"
    ), again.stderr


def _one_process(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``python -m megatron_glm.pretrain ARGS`` as a world of one, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_glm.pretrain", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _validation_line(log: str, step: int) -> str:
    """The ``validation at step N | ...`` line of a run's output."""
    head = f"validation at step {step} |"
    return next(line for line in log.splitlines() if line.startswith(head))


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_zero(
    tmp_path: Path, tiny_corpus: tuple[str, str]
) -> None:
    """Plain ``python -m megatron_glm.pretrain`` (a world of one) with a DataLoader worker; the
    signal goes to the whole process group, workers included, as SLURM preemption does."""
    run = _run_yaml(tmp_path, *tiny_corpus, train_iters=1000)
    save = tmp_path / "ckpt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "megatron_glm.pretrain", "--config", str(run)]
    cmd += [f"checkpoint.save={save}", "logging.log_interval=1", "data.num_workers=1"]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/1000"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-4000:]
    stopped = [ln for ln in log.splitlines() if ln.startswith("stopping after step ")]
    assert len(stopped) == 1 and stopped[0].endswith(": SIGTERM"), log[-4000:]
    step = int(stopped[0].split()[3].rstrip(":"))
    assert 2 <= step < 1000
    assert (save / "latest").read_text() == f"global_step{step}"
    assert f"saved checkpoint {save}/global_step{step}" in log
