"""Import a GLM folder in THUDM's Hugging Face layout as a checkpoint of ours, at any (tp, pp).

The inverse of :mod:`.export`: the key table is built from our model's own parameter names
through :func:`.export.hf_key`, so the two directions cannot drift apart; a key is accepted with
or without THUDM's ``glm.`` prefix (their ``GLMModel`` saves without it, the seq2seq wrapper
with it). The fused QKV goes back from THUDM's ``[3, heads, d]`` rows to our per-head
``[heads, 3, d]`` (:func:`.export.qkv_from_thudm`). Weights are read from safetensors (one file
or sharded with its index) or from ``pytorch_model.bin`` (also sharded) through the restricted
unpickler (:func:`megatron_glm.serialization.load_file`): a published folder is user input.
Every tensor becomes fp32, the dtype our trainer keeps its master weights in.

A missing, unexpected or misshapen key is an error naming it, never a silent random init. The
folder is checked from its metadata before anything is written, then read one tensor at a time
as each output file is built (:mod:`.hf_weights`), so the model is never held whole.

The result is written with :func:`~megatron_glm.training.checkpoint.write_checkpoint` and
marked like a reshard with ``"optimizer_state": "dropped"``: ``pretrain`` loads the weights and
restarts Adam, at iteration 0, with the LR schedule at step 0 (docs/design.md, "Hugging Face
format").

GeLU: THUDM's HF code (a config without ``gelu_approximate``) computes the erf form, our exports
say ``"tanh"``; the imported ``ModelConfig.gelu`` is set to the folder's form, so the imported
model computes the folder's logits (and trains on with that form).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megatron_glm.config import GeLUForm, ModelConfig, RunConfig, load_config, to_dict
from megatron_glm.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from megatron_glm.hf.hf_weights import HFWeights, plan_weights, scan_weights
from megatron_glm.hf.thudm_tokenizer import convert_vocab_files, vocab_kind
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.training.checkpoint import (
    CLIENT_STATE_VERSION,
    write_checkpoint,
    write_latest,
)

logger = logging.getLogger(__name__)

TAG = "global_step0"


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_from_hf` wrote."""

    tag_dir: Path
    model: ModelConfig
    files: list[Path]
    num_parameters: int
    vocab_rows: tuple[int, int]
    """(rows in the folder, rows written): they differ when padding was added for tp."""
    warnings: list[str]
    tokenizer: Path | None = None
    """The folder's tokenizer as copied into the checkpoint (``data.tokenizer_model`` of its
    config snapshot), or None when the folder holds none that loads."""


def model_config_from_hf(raw: Mapping[str, Any], where: Path) -> tuple[ModelConfig, list[str]]:
    """Our ``ModelConfig`` from a THUDM ``config.json`` (and warnings about numerics)."""
    if raw.get("model_type") != "glm":
        raise ValueError(f"{where}: model_type {raw.get('model_type')!r} is not 'glm'")
    for field, want in (("block_position_encoding", True), ("relative_encoding", False)):
        if raw.get(field, want) != want:
            raise ValueError(f"{where}: {field}={raw[field]!r} is not supported (needs {want})")
    if float(raw.get("attention_scale", 1.0)) != 1.0:
        raise ValueError(f"{where}: attention_scale={raw['attention_scale']!r} is not supported")
    missing = [
        f
        for f in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
        if f not in raw
    ]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    cfg = ModelConfig(
        num_layers=int(raw["num_layers"]),
        hidden_size=int(raw["hidden_size"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        ffn_hidden_size=raw.get("intermediate_size"),
        vocab_size=int(raw["vocab_size"]),
        # THUDM's position tables have max_sequence_length + 1 rows (block_position_encoding)
        max_position_embeddings=int(raw.get("max_sequence_length", 512)) + 1,
        hidden_dropout=float(raw.get("output_dropout_prob", 0.1)),
        attention_dropout=float(raw.get("attention_dropout_prob", 0.1)),
        layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)),
        init_method_std=float(raw.get("initializer_range", 0.02)),
        gelu=_gelu_form(raw, where),
    )
    warnings = []
    embedding_dropout = raw.get("embedding_dropout_prob", cfg.hidden_dropout)
    if float(embedding_dropout) != cfg.hidden_dropout:
        warnings.append(
            f"{where}: embedding_dropout_prob {embedding_dropout} differs from "
            f"output_dropout_prob {cfg.hidden_dropout}; both use model.hidden_dropout"
        )
    return cfg, warnings


def _gelu_form(raw: Mapping[str, Any], where: Path) -> GeLUForm:
    """``ModelConfig.gelu`` from ``gelu_approximate``: absent or ``"none"`` is THUDM's erf."""
    approximate = raw.get("gelu_approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{where}: gelu_approximate={approximate!r} is not 'none' or 'tanh'")
    return "tanh" if approximate == "tanh" else "erf"


def _vocab_rows(rows: int, cfg: ModelConfig, tp: int) -> int:
    multiple = cfg.make_vocab_size_divisible_by * tp
    return -(-rows // multiple) * multiple


RUN_FIELDS = ("name", "kernels", "activation_checkpointing", "make_vocab_size_divisible_by")
"""Model fields that are choices of the run, not of the weights: taken from ``--config``."""


def _with_run_choices(cfg: ModelConfig, run: RunConfig | None) -> tuple[ModelConfig, list[str]]:
    """The folder's architecture with the run's choices; warnings where the run's own
    architecture differs (the folder's wins: it is what the weights are)."""
    if run is None:
        return cfg, []
    ours, theirs = to_dict(cfg), to_dict(run.model)
    differ = [
        f"{k}: --config {theirs[k]!r}, folder {ours[k]!r}"
        for k in ours
        if k not in RUN_FIELDS and k != "vocab_size" and ours[k] != theirs[k]
    ]
    warnings = [f"--config model differs from config.json ({'; '.join(differ)})"] if differ else []
    return replace(
        cfg,
        name=run.model.name,
        kernels=run.model.kernels,
        activation_checkpointing=run.model.activation_checkpointing,
        make_vocab_size_divisible_by=run.model.make_vocab_size_divisible_by,
    ), warnings


def _snapshot(cfg: ModelConfig, run: RunConfig | None, tokenizer: Path | None) -> dict[str, Any]:
    """The config snapshot: the run config's sections (if any) with the imported model, and
    ``data.tokenizer_model`` naming the copied tokenizer (what ``to-hf`` exports again)."""
    snapshot = {"model": to_dict(cfg)} if run is None else to_dict(replace(run, model=cfg))
    if tokenizer is not None:
        snapshot.setdefault("data", {})["tokenizer_model"] = str(tokenizer)
    return snapshot


def _client_base(snapshot: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed's bookkeeping and our client state of a run that has not started."""
    return {
        "version": CLIENT_STATE_VERSION,
        "iteration": 0,
        "consumed_samples": 0,
        "lr_scheduler": {"num_steps": 0},
        "config": snapshot,
        "valid_history": [],
        "global_steps": 0,
        "global_samples": 0,
        "skipped_steps": 0,
        "dp_world_size": 1,
    }


def import_from_hf(
    hf_dir: str | os.PathLike[str],
    save_dir: str | os.PathLike[str],
    *,
    tp: int = 1,
    pp: int = 1,
    run_config: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """Write the THUDM-layout folder ``hf_dir`` as ``save_dir/global_step0`` + ``latest``.

    Everything is read and checked before anything is written. ``run_config``: a run YAML
    whose sections go into the checkpoint's config snapshot and whose model choices (kernels,
    activation checkpointing, vocabulary padding multiple) apply; the architecture is the
    folder's.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got tp {tp}, pp {pp}")
    src = Path(hf_dir)
    raw = _read_hf_config(src)
    cfg, warnings = model_config_from_hf(raw, src / "config.json")
    run: RunConfig | None = load_config(Path(run_config)) if run_config is not None else None
    cfg, differ = _with_run_choices(cfg, run)
    warnings += differ
    if cfg.num_layers % pp:
        raise ValueError(f"--pp {pp} does not divide num_layers {cfg.num_layers}")
    planned = plan_weights(scan_weights(src), cfg, src)  # every check; no tensor read yet
    source_rows = cfg.vocab_size
    cfg, padded = _pad_vocab(cfg, tp)
    warnings += padded
    full = HFWeights(planned, cfg, cfg.vocab_size)
    full.check_splits(tensor_parallel_layout(cfg), tp)
    with tempfile.TemporaryDirectory(prefix="from-hf-tokenizer-") as scratch:
        tokenizer, tokenizer_notes = folder_tokenizer(src, cfg, tp, run, Path(scratch))
        warnings += tokenizer_notes
        for text in warnings:
            logger.warning("warning: %s", text)
        save = Path(save_dir)
        copied = _tokenizer_target(save, tokenizer) if tokenizer is not None else None
        result = _write(full, cfg, save, tp, pp, run, warnings, source_rows, src, copied)
        if tokenizer is not None and copied is not None:
            _copy_tokenizer(tokenizer, copied)
    return replace(result, tokenizer=copied)


def _read_hf_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise ValueError(f"{src}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be an object")
    return raw


def _pad_vocab(cfg: ModelConfig, tp: int) -> tuple[ModelConfig, list[str]]:
    """The vocabulary rows padded to ``make_vocab_size_divisible_by * tp`` (the last row copied,
    as :func:`~megatron_glm.training.checkpoint.reshard.repad_vocab`, when :class:`.HFWeights`
    reads it): equal TP shards."""
    rows = _vocab_rows(cfg.vocab_size, cfg, tp)
    if rows == cfg.vocab_size:
        return cfg, []
    warning = (
        f"vocabulary of {cfg.vocab_size} rows padded to {rows} (a multiple of "
        f"make_vocab_size_divisible_by {cfg.make_vocab_size_divisible_by} x tp {tp}) by "
        "copying the last row"
    )
    return replace(cfg, vocab_size=rows), [warning]


def _write(
    full: HFWeights,
    cfg: ModelConfig,
    save_dir: Path,
    tp: int,
    pp: int,
    run: RunConfig | None,
    warnings: list[str],
    source_rows: int,
    src: Path,
    tokenizer: Path | None = None,
) -> ImportResult:
    dst = save_dir / TAG
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} already exists and is not empty; choose another --save")
    dst.mkdir(parents=True, exist_ok=True)
    marker: dict[str, Any] = {
        "from_tp": 1,
        "to_tp": tp,
        "optimizer_state": "dropped",
        "source": f"hf:{src}",
        "warnings": list(warnings),
    }
    if pp > 1:
        marker.update(from_pp=1, to_pp=pp)
    layout = tensor_parallel_layout(cfg)
    num_parameters = full.num_parameters
    base = _client_base(_snapshot(cfg, run, tokenizer))
    files = write_checkpoint(full, layout, dst, tp=tp, pp=pp, base=base, marker=marker)
    write_latest(save_dir, TAG)
    logger.info("imported %s into %s (tp %d, pp %d)", src, dst, tp, pp)
    return ImportResult(dst, cfg, files, num_parameters, (source_rows, cfg.vocab_size), warnings)


TOKENIZER_DIR = "tokenizer"
"""Where the folder's tokenizer goes: ``CKPT_DIR/tokenizer/`` (next to ``latest``)."""
_VOCAB_ONLY_FILES = ("vocab.txt", "vocab.json", "merges.txt")
"""THUDM's slow-tokenizer files: converted to a ``tokenizer.json`` when complete."""


def folder_tokenizer(
    src: Path, cfg: ModelConfig, tp: int, run: RunConfig | None, scratch: Path | None = None
) -> tuple[Tokenizer | None, list[str]]:
    """The folder's own tokenizer, checked against the weights and ``--config``, and notes.

    Why: an imported model must train, preprocess and fill blanks on the vocabulary its
    embedding rows were trained with. Taken: a ``tokenizer.json`` (a Hugging Face folder, read
    by :class:`~megatron_glm.data.hf_tokenizer.HFTokenizer`), the SentencePiece
    ``tokenizer.model`` of an export of ours, or THUDM's ``vocab.txt`` / ``vocab.json`` +
    ``merges.txt`` converted into ``scratch`` (:mod:`.thudm_tokenizer`: GLM's specials at
    THUDM's ids). A tokenizer whose ids would fall outside the embedding is an error; so is a
    ``--config`` ``data.tokenizer_model`` with a different vocabulary: training the folder's
    weights on other ids would be silently wrong.
    """
    if (src / "tokenizer.json").is_file():
        path = src
    elif (src / "tokenizer.model").is_file():
        path = src / "tokenizer.model"
    elif scratch is not None and vocab_kind(src) is not None:
        try:
            path = convert_vocab_files(src, scratch / "converted")
        except TokenizerError as e:
            return None, [f"the folder's vocabulary files are not usable, not copied: {e}"]
        logger.info("converted %s's %s vocabulary files to a tokenizer.json", src, vocab_kind(src))
    else:
        return None, _no_tokenizer_notes(src)
    kw = {"make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by, "tp": tp}
    try:
        tok = load_tokenizer(path, **kw)
    except TokenizerError as e:
        return None, [f"the folder's tokenizer is not usable here, not copied: {e}"]
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{path}: tokenizer of {tok.vocab_size} tokens but the weights have only "
            f"{cfg.vocab_size} embedding rows (config.json vocab_size)"
        )
    notes = []
    if tok.padded_vocab_size != cfg.vocab_size:
        notes.append(
            f"the tokenizer {path} pads to {tok.padded_vocab_size} rows but the checkpoint has "
            f"{cfg.vocab_size}: pretrain builds the embedding from the tokenizer and will refuse it"
        )
    if run is not None and run.data.tokenizer_model:
        _check_same_vocabulary(tok, load_tokenizer(run.data.tokenizer_model, **kw))
    return tok, notes


def _no_tokenizer_notes(src: Path) -> list[str]:
    """A warning when the folder has a tokenizer we cannot take (THUDM's vocabulary files);
    none when it has no tokenizer at all (the tool's output line says so)."""
    vocab_only = [name for name in _VOCAB_ONLY_FILES if (src / name).is_file()]
    if not vocab_only:
        return []
    return [
        f"{src} holds {', '.join(vocab_only)} but no tokenizer.json and not a complete "
        "vocab.txt or vocab.json + merges.txt: no tokenizer copied; set data.tokenizer_model "
        "to the model's tokenizer folder"
    ]


def _check_same_vocabulary(folder: Tokenizer, configured: Tokenizer) -> None:
    """Refuse a ``--config`` tokenizer whose id -> token table differs from the folder's."""
    size = max(folder.vocab_size, configured.vocab_size)
    for i in range(size):
        a = folder.id_to_piece(i) if i < folder.vocab_size else None
        b = configured.id_to_piece(i) if i < configured.vocab_size else None
        if a != b:
            raise ValueError(
                f"--config data.tokenizer_model {configured.model_path} is not the vocabulary "
                f"of the folder's tokenizer {folder.model_path} (id {i}: {b!r} vs {a!r}; "
                f"{configured.vocab_size} vs {folder.vocab_size} tokens); the weights follow "
                "the folder's: drop data.tokenizer_model from --config or name that tokenizer"
            )


def _tokenizer_target(save_dir: Path, tok: Tokenizer) -> Path:
    """Absolute path the snapshot's ``data.tokenizer_model`` names: the copied folder (Hugging
    Face) or the copied ``tokenizer.model`` file (SentencePiece)."""
    root = save_dir.resolve() / TOKENIZER_DIR
    return root if tok.model_path.is_dir() else root / tok.model_path.name


def _copy_tokenizer(tok: Tokenizer, target: Path) -> None:
    if tok.model_path.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tok.model_path / "tokenizer.json", target / "tokenizer.json")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tok.model_path, target)
    logger.info("copied the folder's tokenizer to %s (data.tokenizer_model)", target)
