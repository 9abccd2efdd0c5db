"""Export a checkpoint of ours as a Hugging Face folder in THUDM's GLM layout.

Any (tp, pp) layout is read back to full (tp = 1) tensors one at a time
(:class:`~megatron_glm.training.checkpoint.stream.StreamingState`: memory-mapped files, one
pipeline layer at a time, merged over TP per parameter; ZeRO-3's data-parallel partitions are
gathered whole), each tensor renamed to THUDM's key (``layers.0.word_embeddings.weight`` ->
``glm.word_embeddings.weight``, block ``i`` of ours is ``layers.i`` and THUDM's
``layers.(i-1)``), the fused QKV permuted from our per-head ``[heads, 3, d]`` rows to THUDM's
``[3, heads, d]``, cast, and written straight to its place in a safetensors file
(:mod:`.safetensors_stream`: the shards are planned from the checkpoint's shapes, so headers come
first) of at most ``max_shard_bytes`` (one file, or ``model-0000k-of-0000n.safetensors`` with
``model.safetensors.index.json``, as ``transformers`` names them). Peak memory is about one merged
tensor (and the pages of the layer being read), neither the model nor a shard.

The folder holds our ``configuration_glm.py`` and ``modeling_glm.py`` (copied from this package,
referenced by ``auto_map``), so ``transformers`` loads it with ``trust_remote_code=True``. The
padded vocabulary is kept (every row of the embedding, as trained): ``config.vocab_size`` is the
padded size, ``config.real_vocab_size`` the tokenizer's (docs/design.md, "Hugging Face format").
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_glm.config import ModelConfig, from_dict
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.hf.configuration_glm import GLMConfig
from megatron_glm.hf.safetensors_stream import ShardWriter, TensorSpec, plan_shards
from megatron_glm.hf.tokenizer_export import AUTO_MAP as TOKENIZER_AUTO_MAP
from megatron_glm.hf.tokenizer_export import export_tokenizer
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.serialization import load_file
from megatron_glm.training.checkpoint import model_state_files, resolve_tag, saved_config
from megatron_glm.training.checkpoint.stream import StreamingState

logger = logging.getLogger(__name__)

HF_DIR = Path(__file__).parent
REMOTE_CODE = ("configuration_glm.py", "modeling_glm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"10KB"`` or a byte count -> bytes (decimal units, as HF's)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 1000000")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(match.group(1)) * scale[unit])


def hf_key(name: str, num_layers: int) -> str:
    """THUDM's key of our ``GLMModel`` parameter ``name`` (module docstring)."""
    index_text, _, inner = name.partition(".")[2].partition(".")
    index = int(index_text)
    if index == 0:
        prefix = "glm." if inner.startswith("word_embeddings") else "glm.transformer."
        return prefix + inner
    if index == num_layers + 1:
        return f"glm.transformer.{inner}"
    return f"glm.transformer.layers.{index - 1}.{inner}"


def qkv_to_thudm(tensor: Tensor, num_heads: int) -> Tensor:
    """Our fused QKV rows ``[heads, 3, d]`` -> THUDM's ``[3, heads, d]`` (weight or bias)."""
    rest = tensor.shape[1:]
    grouped = tensor.reshape(num_heads, 3, -1, *rest)  # [heads, 3, d, ...]
    return grouped.transpose(0, 1).reshape(tensor.shape).contiguous()


def qkv_from_thudm(tensor: Tensor, num_heads: int) -> Tensor:
    """THUDM's fused QKV rows ``[3, heads, d]`` -> ours ``[heads, 3, d]`` (inverse of
    :func:`qkv_to_thudm`)."""
    rest = tensor.shape[1:]
    grouped = tensor.reshape(3, num_heads, -1, *rest)  # [3, heads, d, ...]
    return grouped.transpose(0, 1).reshape(tensor.shape).contiguous()


def convert_state(
    tensors: Iterable[tuple[str, Tensor]], cfg: ModelConfig, dtype: torch.dtype
) -> Iterator[tuple[str, Tensor]]:
    """``(THUDM key, tensor)`` pairs from ``(our name, tensor)`` pairs, one at a time."""
    for name, tensor in tensors:
        if name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
            tensor = qkv_to_thudm(tensor, cfg.num_attention_heads)
        yield hf_key(name, cfg.num_layers), tensor.to(dtype).contiguous()


def hf_config(cfg: ModelConfig, vocab_rows: int, real_vocab: int | None) -> GLMConfig:
    """The exported ``config.json``: THUDM's fields from our ``ModelConfig``."""
    config = GLMConfig(
        num_layers=cfg.num_layers,
        vocab_size=vocab_rows,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        embedding_dropout_prob=cfg.hidden_dropout,
        attention_dropout_prob=cfg.attention_dropout,
        output_dropout_prob=cfg.hidden_dropout,
        max_sequence_length=cfg.max_position_embeddings - 1,  # THUDM's tables: this + 1 rows
        initializer_range=cfg.init_method_std,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gelu_approximate="none" if cfg.gelu == "erf" else "tanh",
        intermediate_size=cfg.ffn_hidden_size,
        real_vocab_size=real_vocab,
        architectures=["GLMForConditionalGeneration"],
    )
    config.auto_map = dict(AUTO_MAP)
    return config


@dataclass(frozen=True)
class Checkpoint:
    """What the export takes from a checkpoint tag besides the weights."""

    tag_dir: Path
    model: ModelConfig
    iteration: int | None
    consumed_samples: int | None
    tokenizer_model: Path | None

    @classmethod
    def read(cls, load_dir: str | os.PathLike[str], tag: str | None) -> Checkpoint:
        """Resolve the tag (``latest`` when None) and read its client state and config."""
        tag = resolve_tag(load_dir, tag)
        tag_dir = Path(load_dir) / tag
        if not tag_dir.is_dir():
            raise ValueError(f"{load_dir}: no checkpoint tag {tag!r} (no directory {tag_dir})")
        saved = saved_config(tag_dir)
        if saved is None or "model" not in saved:
            raise ValueError(f"{tag_dir}: the checkpoint holds no config snapshot ('config')")
        blob = load_file(model_state_files(tag_dir)[0], mmap=True)
        tokenizer = saved.get("data", {}).get("tokenizer_model")
        return cls(
            tag_dir,
            from_dict(ModelConfig, saved["model"], prefix="model."),
            _int_or_none(blob.get("iteration")),
            _int_or_none(blob.get("consumed_samples")),
            Path(tokenizer) if tokenizer else None,
        )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_to_hf` wrote."""

    save_dir: Path
    weight_files: list[Path]
    num_parameters: int
    vocab_rows: int
    real_vocab_size: int | None
    tokenizer: str
    """``"exported"`` (the tokenizer's files and, for SentencePiece, its AutoTokenizer class) or
    ``"none"`` (the checkpoint's config names no tokenizer, or it is missing: logged)."""


def export_to_hf(
    load_dir: str | os.PathLike[str],
    save_dir: str | os.PathLike[str],
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_bytes: int = 5 * 10**9,
) -> ExportResult:
    """Write the checkpoint ``load_dir/<tag>`` as a Hugging Face folder ``save_dir``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    src = Checkpoint.read(load_dir, tag)
    dst = Path(save_dir)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} already exists and is not empty; choose another --save")
    state = StreamingState(src.tag_dir, tensor_parallel_layout(src.model))  # errors first
    vocab_rows = state.shapes["layers.0.word_embeddings.weight"][0]
    num_parameters = sum(shape.numel() for shape in state.shapes.values())
    files = _write_weights(state, src.model, dst, DTYPES[dtype], max_shard_bytes)
    real_vocab, tokenizer = _write_tokenizer(src, dst)
    config = hf_config(src.model, vocab_rows, real_vocab)
    if (
        tokenizer == "exported"
        and src.tokenizer_model is not None
        and src.tokenizer_model.is_file()
    ):
        config.auto_map["AutoTokenizer"] = TOKENIZER_AUTO_MAP  # SentencePiece: our remote code
    config.to_json_file(dst / "config.json", use_diff=False)
    for name in REMOTE_CODE:
        shutil.copyfile(HF_DIR / name, dst / name)
    _write_generation_config(src, dst, vocab_rows)
    (dst / "README.md").write_text(model_card(src, config, num_parameters, dtype))
    logger.info("exported %s to %s (%d weight files)", src.tag_dir, dst, len(files))
    return ExportResult(dst, files, num_parameters, vocab_rows, real_vocab, tokenizer)


def _write_weights(
    state: StreamingState, cfg: ModelConfig, dst: Path, dtype: torch.dtype, max_shard_bytes: int
) -> list[Path]:
    """The converted weights into ``dst`` (created); a failure removes what was written."""
    specs = hf_specs(state.shapes, cfg, dtype)
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return write_safetensors(convert_state(state, cfg, dtype), specs, dst, max_shard_bytes)
    except BaseException:
        _remove_partial(dst, created)  # e.g. replicated TP pieces that differ: no half folder
        raise


def hf_specs(
    shapes: Mapping[str, torch.Size], cfg: ModelConfig, dtype: torch.dtype
) -> list[TensorSpec]:
    """The exported tensors' keys, dtype and shapes, in the order :func:`convert_state` yields
    them (the QKV permutation keeps the shape)."""
    return [TensorSpec(hf_key(n, cfg.num_layers), dtype, tuple(s)) for n, s in shapes.items()]


def write_safetensors(
    tensors: Iterable[tuple[str, Tensor]],
    specs: list[TensorSpec],
    dst: Path,
    max_shard_bytes: int,
) -> list[Path]:
    """Shards of at most ``max_shard_bytes`` (a bigger tensor gets its own), plus the index when
    there are several; each tensor is written as it arrives (:mod:`.safetensors_stream`)."""
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = (
        [SAFE_WEIGHTS]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    shard_of = {spec.name: k for k, shard in enumerate(shards) for spec in shard}
    writers: dict[int, ShardWriter] = {}
    for key, tensor in tensors:
        if key not in shard_of:
            raise ValueError(f"{dst}: tensor '{key}' is not in the planned export")
        k = shard_of[key]
        if k not in writers:
            writers[k] = ShardWriter(dst / names[k], shards[k], {"format": "pt"})
        writers[k].write(key, tensor)
        if writers[k].complete:
            writers.pop(k).close()
    for writer in writers.values():
        writer.close()  # raises: a planned tensor never came
    missing = [name for name in names if not (dst / name).exists()]
    if missing:
        raise ValueError(f"{dst}: no tensor arrived for shard(s) {missing}")
    if n > 1:
        index = {
            "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
            "weight_map": {key: names[k] for key, k in sorted(shard_of.items())},
        }
        (dst / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [dst / name for name in names]


def _remove_partial(dst: Path, created: bool) -> None:
    """Remove what a failed export wrote (the folder was new or empty)."""
    if created:
        shutil.rmtree(dst, ignore_errors=True)
        return
    for path in dst.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_tokenizer(src: Checkpoint, dst: Path) -> tuple[int | None, str]:
    """The tokenizer into the folder (:func:`.tokenizer_export.export_tokenizer`: a SentencePiece
    model with our remote tokenizer class, or a tokenizer folder's ``tokenizer.json``); returns
    (its vocabulary size or None, ``"exported"`` or ``"none"``)."""
    path = src.tokenizer_model
    if path is None:
        return None, "none"
    if not path.exists():
        logger.warning(
            "tokenizer %s named by the checkpoint's config is missing: not exported", path
        )
        return None, "none"
    export_tokenizer(path, dst)
    return load_tokenizer(path).vocab_size, "exported"


def _write_generation_config(src: Checkpoint, dst: Path, vocab_rows: int) -> None:
    """``generation_config.json``: generation stops at GLM's eop, which ends a generated span
    (as our decoder does for [MASK]/[sMASK]; a [gMASK] continuation also stops at eos: the card
    says to pass both), and the padding rows of the vocabulary are suppressed: no tokenizer id,
    so ``generate`` never picks one (our decoder does the same)."""
    values: dict[str, Any] = {"_from_model_config": False}
    if src.tokenizer_model is not None and src.tokenizer_model.exists():
        tok = load_tokenizer(src.tokenizer_model)
        values.update(
            bos_token_id=tok.sop_id,
            eos_token_id=tok.eop_id,
            pad_token_id=tok.pad_id,
            decoder_start_token_id=tok.sop_id,
        )
        if vocab_rows > tok.vocab_size:
            values["suppress_tokens"] = list(range(tok.vocab_size, vocab_rows))
    (dst / "generation_config.json").write_text(json.dumps(values, indent=2) + "\n")


def model_card(src: Checkpoint, config: GLMConfig, num_parameters: int, dtype: str) -> str:
    """A short README.md: what the model is, where it came from, how to load it."""
    cfg = src.model
    return f"""---
library_name: transformers
tags: [glm, megatron_glm]
---
# GLM ({cfg.num_layers} layers, hidden {cfg.hidden_size})

A GLM (General Language Model, blank infilling) trained with megatron_glm and exported by
`tools/convert_checkpoint.py to-hf` from `{src.tag_dir}`.

| | |
|---|---|
| architecture | pre-LN transformer, {cfg.num_layers} layers, hidden {cfg.hidden_size}, \
{cfg.num_attention_heads} heads, MLP {config.intermediate_size}, {cfg.gelu}-GeLU, 2D positions, \
tied head |
| parameters | {num_parameters:,} |
| vocabulary | {config.vocab_size} rows (padded; `vocab_size`), {config.real_vocab_size} real \
tokens (`real_vocab_size`) |
| position rows | {cfg.max_position_embeddings} (`max_sequence_length` + 1, as THUDM's) |
| weights | {dtype} |
| training iterations | {src.iteration} |
| consumed samples | {src.consumed_samples} |

## Load
```python
from transformers import AutoModelForSeq2SeqLM
model = AutoModelForSeq2SeqLM.from_pretrained("PATH", trust_remote_code=True)
out = model(input_ids, position_ids=position_ids, attention_mask=sep)  # THUDM's inputs
out.logits  # [batch, seq, {config.vocab_size}]
```
`position_ids` is `[batch, 2, seq]` (position, position inside a span); `attention_mask` the
length of part A per row, or a full `[batch, seq, seq]` mask.

## Generate (fill a blank)
```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)
model = AutoModelForSeq2SeqLM.from_pretrained("PATH", trust_remote_code=True)
inputs = tokenizer.build_inputs_for_generation(["Return a [MASK] of the list."])
out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
```
Each text holds a `[MASK]`, `[sMASK]` (a sentence) or `[gMASK]` (continue the text, at its
end); the prompt is the text and `[sop]`, and generation stops at `[eop]`
(`generation_config.json`); for a `[gMASK]` continuation pass
`eos_token_id=[tokenizer.eop_token_id, tokenizer.eos_token_id]` to stop at the end of the text
too. Texts of different lengths are left-padded in one
batch and decode as they would alone; a KV cache is used unless `use_cache=False`. Without the
tokenizer, `modeling_glm.build_inputs_for_generation(token_ids, mask_token_ids=...,
sop_token_id=..., pad_token_id=...)` builds the same inputs from ids.
"""
