"""Checkpoints and datasets as untrusted input (issue 11): bad files are named before launch.

One real checkpoint is written once (``python -m megatron_glm.pretrain``, one process, ZeRO-1,
so it has DeepSpeed's model-states and optimizer-states files and our RNG and layout files).
Each case damages a copy and runs ``pretrain.main`` with ``checkpoint.load`` on it: it must exit
2 with a message naming the file before any process group exists (``run_pretraining`` is
replaced by a failure), and a planted pickle must not run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_pretrain_cli import _no_run, _run_yaml, _single_process_env

from megatron_glm import pretrain
from megatron_glm.config import RunConfig
from megatron_glm.data.indexed import IndexedDatasetBuilder
from megatron_glm.serialization import CheckpointFileError, load_file

TAG = "global_step2"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def real_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_corpus: tuple[str, str],
) -> tuple[Path, Path]:
    """(run YAML, checkpoint directory) of a 2-step one-process ZeRO-1 run."""
    tmp = tmp_path_factory.mktemp("real_ckpt")
    run = _run_yaml(tmp, *tiny_corpus, train_iters=2, zero_stage=1)
    save = tmp / "ckpt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "megatron_glm.pretrain", "--config", str(run)]
    cmd += [f"checkpoint.save={save}", "data.num_workers=0", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (save / "latest").read_text() == TAG
    return run, save


@pytest.fixture
def ckpt_copy(real_checkpoint: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(run YAML, a private copy of the real checkpoint that a test may damage)."""
    run, source = real_checkpoint
    shutil.copytree(source, tmp_path / "ckpt")
    return run, tmp_path / "ckpt"


class Planted:
    """Pickles as a call of ``os.system``: what an attacker would plant in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _main(run: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    _single_process_env(monkeypatch)
    _no_run(monkeypatch)
    return pretrain.main(["--config", str(run), f"checkpoint.load={ckpt}", *extra])


Damage = Callable[[Path], None]
CASES: dict[str, tuple[Damage, str]] = {
    "truncated_model_states": (
        lambda d: _truncate(d / TAG / "mp_rank_00_model_states.pt"),
        f"{TAG}/mp_rank_00_model_states.pt: not a readable checkpoint file (truncated or corrupt)",
    ),
    "truncated_optimizer_states": (
        lambda d: _truncate(d / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        f"{TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt: not a readable checkpoint file",
    ),
    "truncated_rng": (
        lambda d: _truncate(d / TAG / "rng_rank00000.pt"),
        f"{TAG}/rng_rank00000.pt: not a readable checkpoint file (truncated or corrupt)",
    ),
    "empty_rng": (
        lambda d: (d / TAG / "rng_rank00000.pt").write_bytes(b""),
        f"{TAG}/rng_rank00000.pt: empty file (truncated checkpoint?)",
    ),
    "missing_rng": (
        lambda d: (d / TAG / "rng_rank00000.pt").unlink(),
        f"{TAG}: no RNG state for 1 of this run's 1 ranks (rng_rank00000.pt): resuming would",
    ),
    "latest_not_utf8": (
        lambda d: (d / "latest").write_bytes(b"global_step\xff2"),
        "latest: not UTF-8 text (invalid start byte at byte 11)",
    ),
    "latest_parent_dir": (
        lambda d: (d / "latest").write_text("../elsewhere"),
        "latest: '../elsewhere' is not a checkpoint tag (a plain directory name inside",
    ),
    "latest_absolute": (
        lambda d: (d / "latest").write_text("/etc"),
        "latest: '/etc' is not a checkpoint tag",
    ),
    "garbage_layout": (
        lambda d: (d / TAG / "layout.json").write_bytes(b"\x00\x01{not json"),
        f"{TAG}/layout.json: not a valid layout file",
    ),
    "layout_missing_field": (
        lambda d: (d / TAG / "layout.json").write_text('{"iteration": 2}'),
        f"{TAG}/layout.json: not a valid layout file (KeyError: 'dp_size')",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_checkpoint_is_named_before_launch(
    case: str,
    ckpt_copy: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, ckpt = ckpt_copy
    damage, message = CASES[case]
    damage(ckpt)
    assert _main(run, ckpt, monkeypatch) == pretrain.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt}/"), err
    assert message in err, err
    assert "Traceback" not in err
    assert not dist.is_initialized()


@pytest.mark.slow
def test_missing_rng_can_be_allowed_explicitly(
    ckpt_copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``checkpoint.allow_missing_rng=true`` lets the pre-launch check pass (the group warns)."""
    run, ckpt = ckpt_copy
    (ckpt / TAG / "rng_rank00000.pt").unlink()
    called: list[bool] = []
    import megatron_glm.training.session as session

    _single_process_env(monkeypatch)
    monkeypatch.setattr(session, "run_pretraining", _recorder(called))
    args = ["--config", str(run), f"checkpoint.load={ckpt}", "checkpoint.allow_missing_rng=true"]
    assert pretrain.main(args) == 0
    assert called == [True]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rng_rank00000.pt",
        "layer_01-model_00-model_states.pt",  # a pipeline layer file
    ],
)
def test_planted_pickle_is_refused_without_running(
    name: str,
    ckpt_copy: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file whose pickle calls ``os.system`` is refused naming it, and the call never runs
    (the same file does run under ``weights_only=False``: the plant is live)."""
    run, ckpt = ckpt_copy
    marker = tmp_path / "pwned"
    path = ckpt / TAG / name
    torch.save({"module": {"x": torch.zeros(2)}, "payload": Planted(marker)}, path)
    assert _main(run, ckpt, monkeypatch) == pretrain.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {path}: refused to load: it contains a pickled object of type posix.system,"
    ), err
    assert not marker.exists()
    with pytest.raises(CheckpointFileError, match="refused to load"):
        load_file(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what DeepSpeed and the old loader did
    assert marker.exists()


def _recorder(called: list[bool]) -> Callable[[RunConfig, object], SimpleNamespace]:
    """A stand-in for the training session: notes the call, returns a finished run's result."""

    def run(cfg: RunConfig, env: object) -> SimpleNamespace:
        called.append(True)
        return SimpleNamespace(iteration=cfg.train.train_iters)

    return run


@pytest.mark.slow
def test_valid_checkpoint_passes_the_checks(
    real_checkpoint: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The undamaged checkpoint passes every pre-launch check (the run would start)."""
    run, ckpt = real_checkpoint
    called: list[bool] = []
    import megatron_glm.training.session as session

    _single_process_env(monkeypatch)
    monkeypatch.setattr(session, "run_pretraining", _recorder(called))
    assert pretrain.main(["--config", str(run), f"checkpoint.load={ckpt}"]) == 0
    assert called == [True]


def _reshard_cli(load: Path, save: Path, tp: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools" / "reshard_checkpoint.py"), "--load", str(load)]
    cmd += ["--tp", str(tp), "--save", str(save), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


def _store(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    blob = load_file(ckpt / TAG / "optimizer_state.pt")
    return {k: blob[k] for k in ("fp32", "exp_avg", "exp_avg_sq")}


def test_reshard_repads_the_vocabulary_for_the_target_tp(
    real_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    """model.vocab_size=0: 1500 tokens are 1536 rows at tp 1 (and 2, 4) and 2048 at tp 8.
    tp 1 -> 8 adds padding rows copying the last one (weights and optimizer state); 8 -> 1 cuts
    them again and gives back exactly what a tp 1 -> 1 rewrite gives."""
    _, ckpt = real_checkpoint
    up = _reshard_cli(ckpt, tmp_path / "tp8", 8)
    assert up.returncode == 0, up.stderr[-3000:]
    assert "padded vocabulary 1536 -> 2048 rows for tp 8 (padding rows added" in up.stdout
    name = "layers.0.word_embeddings.weight"
    shards = [
        load_file(tmp_path / "tp8" / TAG / f"mp_rank_0{r}_model_states.pt")["module"][name]
        for r in range(8)
    ]
    assert [tuple(t.shape) for t in shards] == [(256, shards[0].shape[1])] * 8
    grown = torch.cat(shards)
    direct = _reshard_cli(ckpt, tmp_path / "tp1", 1)
    assert direct.returncode == 0 and "padded vocabulary" not in direct.stdout
    source = load_file(tmp_path / "tp1" / TAG / "mp_rank_00_model_states.pt")["module"]
    assert torch.equal(grown[:1536], source[name])
    assert torch.equal(grown[1536:], source[name][-1:].expand(512, -1))
    for kind, tensors in _store(tmp_path / "tp8").items():
        want = _store(tmp_path / "tp1")[kind][name]
        assert torch.equal(tensors[name][:1536], want) and tensors[name].shape[0] == 2048, kind
        assert torch.equal(tensors[name][1536:], want[-1:].expand(512, -1)), kind
    down = _reshard_cli(tmp_path / "tp8", tmp_path / "back", 1)
    assert "padded vocabulary 2048 -> 1536 rows for tp 1 (padding rows cut" in down.stdout
    back = load_file(tmp_path / "back" / TAG / "mp_rank_00_model_states.pt")["module"]
    assert back.keys() == source.keys()
    assert all(torch.equal(back[k], source[k]) for k in source)
    assert _store(tmp_path / "back").keys() == _store(tmp_path / "tp1").keys()
    for kind, tensors in _store(tmp_path / "back").items():
        assert all(torch.equal(t, _store(tmp_path / "tp1")[kind][k]) for k, t in tensors.items())


def test_reshard_without_the_tokenizer_names_the_flag(
    ckpt_copy: tuple[Path, Path], tmp_path: Path
) -> None:
    """The padded vocabulary at another tp needs the tokenizer: a missing one is named."""
    _, ckpt = ckpt_copy
    proc = _reshard_cli(ckpt, tmp_path / "out", 4, "--tokenizer", str(tmp_path / "gone.model"))
    assert proc.returncode == 2
    assert (
        f"model.vocab_size is 0 (the tokenizer's, padded for tp), so the padded vocabulary at "
        f"tp 4 needs the tokenizer; '{tmp_path / 'gone.model'}' is not a file: pass --tokenizer"
    ) in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- datasets


def _copy_dataset(prefix: str, dst: Path) -> Path:
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, str(dst) + suffix)
    return dst


def _write_dataset(dst: Path, docs: list[list[list[int]]]) -> Path:
    with IndexedDatasetBuilder(dst, dtype=np.uint16) as builder:
        for doc in docs:
            builder.add_document(doc)
    return dst


@pytest.mark.parametrize("case", ["truncated_bin", "id_beyond_vocab", "empty"])
def test_bad_dataset_is_named_before_launch(
    case: str,
    tmp_path: Path,
    tiny_corpus: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A truncated ``.bin``, token ids from another tokenizer and an empty corpus each stop the
    launch with exit 2 naming the file (before: an IndexError in the embedding after start-up,
    or a crash in the sample index)."""
    prefix, tok = tiny_corpus
    if case == "truncated_bin":
        bad = _copy_dataset(prefix, tmp_path / "bad")
        _truncate(Path(f"{bad}.bin"))
        message = f"{bad}.bin: size "
    elif case == "id_beyond_vocab":
        bad = _write_dataset(tmp_path / "bad", [[[5, 6, 7], [8, 1600]], [[9, 10]]])
        message = f"{bad}.bin: token id 1600 outside the vocabulary [0, 1500) at token 4"
    else:
        bad = _write_dataset(tmp_path / "bad", [])
        message = f"{bad}.idx: empty dataset: no documents"
    run = _run_yaml(tmp_path, str(bad), tok)
    _single_process_env(monkeypatch)
    _no_run(monkeypatch)
    assert pretrain.main(["--config", str(run)]) == pretrain.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
