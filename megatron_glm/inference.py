"""Load a trained GLM for decoding: from any checkpoint layout or a Hugging Face export.

Like :mod:`megatron_glm.pretrain` this is an entry-level module (docs/design.md, "Layers"): it
joins ``training.checkpoint`` (our files), ``hf`` (THUDM's folder) and ``model``, which
``generation`` must not import. ``tools/generate.py`` and ``tools/fill_blank.py`` use it.

Every source is first read into the full (tp = 1, pp = 1) ``GLMModel`` state dict, then split
for the target tensor-parallel size with the reshard code's own rule
(:func:`~megatron_glm.training.checkpoint.split_state` over
:func:`~megatron_glm.model.tensor_parallel_layout`):

- a checkpoint of ours at any saved layout (tp shards, DeepSpeed's per-layer pipeline files,
  ZeRO 0-3) goes through :func:`~megatron_glm.training.checkpoint.read_full_state`, which merges
  pipeline stages and TP shards exactly as ``tools/reshard_checkpoint.py`` does, so a pipeline
  checkpoint is merged, not refused. The architecture and tokenizer come from the checkpoint's
  config snapshot (``saved_config``); ``model`` / ``tokenizer`` arguments stand in where the
  snapshot lacks them or its tokenizer path is elsewhere;
- a Hugging Face folder (``--hf``) goes through the importer's plan
  (:func:`megatron_glm.hf.hf_weights.plan_weights`: its key table and checks, every key checked
  before a tensor is read) in memory, without writing a checkpoint, with the folder's own
  tokenizer.

Why every rank reads the whole state: inference checkpoints are small next to training ones
(no optimizer state), and reading is simpler to trust than a broadcast of shards; each rank then
keeps only its slice. Weights become fp32 (a bf16 run's module weights included): decoding on
CPU, and the equality checks against tp = 1, are in fp32.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from megatron_glm.config import ModelConfig, from_dict
from megatron_glm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_glm.generation import FillResult, GenerationConfig, fill_blanks
from megatron_glm.model import GLMModel, tensor_parallel_layout
from megatron_glm.parallel.dims import ParallelDims
from megatron_glm.training.checkpoint import (
    read_full_state,
    resolve_tag,
    saved_config,
    split_state,
)
from megatron_glm.training.checkpoint.reshard import VOCAB_PARAM, repad_vocab

logger = logging.getLogger(__name__)

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
"""What an export holds for its tokenizer: a ``tokenizer.json`` (a Hugging Face tokenizer folder,
read by :func:`load_tokenizer` on the folder) or a SentencePiece ``tokenizer.model``."""


@dataclass(frozen=True)
class FullWeights:
    """A model as read from disk, before it is split for a tensor-parallel size."""

    model: ModelConfig
    state: dict[str, Tensor]
    """Full (tp = 1) ``GLMModel`` state dict, fp32."""
    tokenizer: Path | None
    """The tokenizer the source names (None: it names none)."""
    where: str
    """The source, for messages: a tag directory or an HF folder."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to decode (eval mode) and the tokenizer it was trained with."""

    model: GLMModel
    tokenizer: Tokenizer
    where: str


def checkpoint_weights(
    load_dir: str | os.PathLike[str],
    tag: str | None = None,
    *,
    model: ModelConfig | None = None,
) -> FullWeights:
    """The full state of checkpoint ``load_dir/<tag>`` (``latest`` when None), any layout.

    ``model`` is used only when the checkpoint holds no config snapshot (an error otherwise
    names the missing snapshot): the snapshot describes the weights, a config may not.
    """
    tag = resolve_tag(load_dir, tag)
    tag_dir = Path(load_dir) / tag
    if not tag_dir.is_dir():
        raise ValueError(f"{load_dir}: no checkpoint tag {tag!r} (no directory {tag_dir})")
    saved = saved_config(tag_dir) or {}
    if "model" in saved:
        model = from_dict(ModelConfig, dict(saved["model"]), prefix="model.")
    elif model is None:
        raise ValueError(f"{tag_dir}: the checkpoint holds no config snapshot; pass a run config")
    state = read_full_state(tag_dir, tensor_parallel_layout(model))
    tokenizer = saved.get("data", {}).get("tokenizer_model")
    return FullWeights(
        model, _fp32(state), Path(tokenizer) if tokenizer else None, where=str(tag_dir)
    )


def hf_weights(hf_dir: str | os.PathLike[str]) -> FullWeights:
    """The full state of a GLM folder in THUDM's Hugging Face layout (our export or theirs)."""
    from megatron_glm.hf.hf_weights import HFWeights, plan_weights, scan_weights
    from megatron_glm.hf.import_hf import model_config_from_hf

    folder = Path(hf_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON: {e}") from None
    model, warnings = model_config_from_hf(raw, folder)
    for warning in warnings:
        logger.warning("%s", warning)
    lazy = HFWeights(plan_weights(scan_weights(folder), model, folder), model, model.vocab_size)
    state = {name: lazy[name] for name in lazy}  # every key checked before a tensor is read
    return FullWeights(model, state, hf_tokenizer_path(folder), where=str(folder))


def hf_tokenizer_path(folder: Path) -> Path | None:
    """The path :func:`load_tokenizer` reads for an export's tokenizer (None: it has none)."""
    if (folder / HF_TOKENIZER_FILES[0]).is_file():
        return folder
    if (folder / HF_TOKENIZER_FILES[1]).is_file():
        return folder / HF_TOKENIZER_FILES[1]
    return None


def _fp32(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}


def build_for_inference(
    weights: FullWeights,
    *,
    dims: ParallelDims | None = None,
    device: str | torch.device = "cpu",
) -> GLMModel:
    """A ``GLMModel`` holding ``weights`` (this rank's shard under ``dims``), in eval mode.

    The vocabulary keeps the source's rows unless tp does not divide them; then padding rows
    are added as the reshard code adds them (copies of the last, a padding row), which the
    decoder never emits (it reads the tokenizer's real vocabulary only).
    """
    tp = 1 if dims is None else dims.tp
    layout = tensor_parallel_layout(weights.model)
    state = dict(weights.state)
    rows = _vocab_rows(state, tp)
    for name in [n for n in state if n.endswith(VOCAB_PARAM)]:
        state[name] = repad_vocab(state[name], rows)
    shard = split_state(state, layout, tp)[0 if dims is None else dims.tp_rank]
    cfg = replace(weights.model, vocab_size=rows, activation_checkpointing=False)
    with torch.device("meta"):
        model = GLMModel(cfg, rows, dims=dims)
    model.to_empty(device=device)
    model.rng.manual_seed(0)  # eval mode draws no dropout mask; fork only needs a seed
    try:
        model.load_state_dict(shard)
    except RuntimeError as e:  # missing/unexpected/misshapen: name the source
        raise ValueError(f"{weights.where}: weights do not fit the model: {e}") from None
    return model.eval()


def _vocab_rows(state: Mapping[str, Tensor], tp: int) -> int:
    names = [n for n in state if n.endswith(VOCAB_PARAM)]
    if not names:
        raise ValueError(f"no '{VOCAB_PARAM}' in the weights (not a GLM state dict)")
    rows = state[names[0]].shape[0]
    return -(-rows // tp) * tp


def inference_tokenizer(weights: FullWeights, override: str | os.PathLike[str] | None) -> Tokenizer:
    """The tokenizer to decode with: ``override`` or the one the source names.

    Its real vocabulary must fit the model's rows (a different tokenizer than the model was
    trained with would otherwise index past the embedding or decode garbage silently).
    """
    path = Path(override) if override is not None else weights.tokenizer
    if path is None:
        raise ValueError(f"{weights.where}: names no tokenizer; pass --tokenizer PATH")
    if not path.exists():
        raise ValueError(
            f"{weights.where}: tokenizer {str(path)!r} does not exist; pass --tokenizer PATH"
        )
    tok = load_tokenizer(
        path, make_vocab_size_divisible_by=weights.model.make_vocab_size_divisible_by
    )
    rows = _vocab_rows(weights.state, 1)
    if tok.vocab_size > rows:
        raise ValueError(
            f"tokenizer {path} has {tok.vocab_size} tokens but the model in {weights.where} "
            f"has {rows} vocabulary rows: not the tokenizer it was trained with"
        )
    return tok


def load_for_inference(
    *,
    load: str | os.PathLike[str] | None = None,
    hf: str | os.PathLike[str] | None = None,
    tag: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    model: ModelConfig | None = None,
    dims: ParallelDims | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Exactly one of ``load`` (our checkpoint dir) or ``hf`` (an HF folder), built for
    ``dims`` (None: tp = 1 in this process); see the module docstring."""
    if (load is None) == (hf is None):
        raise ValueError("pass exactly one of --load CKPT_DIR or --hf HF_DIR")
    if load is not None:
        weights = checkpoint_weights(load, tag, model=model)
    else:
        assert hf is not None
        weights = hf_weights(hf)
    tok = inference_tokenizer(weights, tokenizer)
    built = build_for_inference(weights, dims=dims, device=device)
    logger.info(
        "loaded %s: %d layers, hidden %d, %d vocabulary rows, tp %d",
        weights.where,
        weights.model.num_layers,
        weights.model.hidden_size,
        _vocab_rows(weights.state, 1),
        built.tp,
    )
    return LoadedModel(built, tok, weights.where)


def fill_texts(
    model: GLMModel,
    tok: Tokenizer,
    texts: Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    labels: Sequence[str] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[FillResult]:
    """Fill the blanks of ``texts`` batch by batch (:func:`megatron_glm.generation.fill_blanks`).

    ``on_batch(rows, new_tokens)`` is called after each batch (a progress bar's hook).
    ``labels`` name each text in errors (``file:line``): a batch the decoder refuses is
    re-run one text at a time to find the text to blame, so the message names it, not a
    position inside some batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[FillResult] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        try:
            done = fill_blanks(model, tok, chunk, config, batch_size=batch_size, first_row=start)
        except ValueError as e:
            names = labels[start : start + batch_size] if labels is not None else None
            raise _blame(model, tok, chunk, config, names, start) or e from None
        results.extend(done)
        if on_batch is not None:
            on_batch(len(done), sum(r.new_tokens for r in done))
    return results


def _blame(
    model: GLMModel,
    tok: Tokenizer,
    chunk: list[str],
    config: GenerationConfig,
    labels: Sequence[str] | None,
    start: int,
) -> ValueError | None:
    """The decoder's error for the first text of ``chunk`` that fails alone, named by label."""
    for i, text in enumerate(chunk):
        try:
            fill_blanks(model, tok, [text], config, batch_size=1)
        except ValueError as e:
            name = labels[i] if labels is not None else f"text {start + i}"
            return ValueError(f"{name}: {e}")
    return None
