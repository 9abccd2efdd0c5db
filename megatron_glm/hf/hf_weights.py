"""A Hugging Face folder's GLM weights as our full state dict, read one tensor per lookup.

The import checks the whole folder before it writes anything and then writes one checkpoint
file at a time, so the weights are read twice over, differently:

- :func:`scan_weights` reads metadata only: a safetensors file's header (``get_slice``: name,
  dtype, shape), a ``pytorch_model.bin`` memory-mapped through the restricted unpickler
  (:func:`megatron_glm.serialization.load_file`: a published folder is user input), whose
  tensors are not touched; :func:`plan_weights` turns that into our parameter -> (file, key),
  refusing a missing, unexpected, duplicated, misshapen or non-float key by name;
- :class:`HFWeights` is then a ``Mapping`` whose lookup reads one tensor (safetensors
  ``get_tensor``; the ``.bin`` memory-mapped), makes it fp32, permutes THUDM's fused QKV rows
  ``[3, heads, d]`` back to ours ``[heads, 3, d]`` (:func:`.export.qkv_from_thudm`) and pads the
  vocabulary; :func:`~megatron_glm.training.checkpoint.write_checkpoint` looks tensors up as it
  builds each output file, so peak memory is one output file plus one tensor. (A ``.bin`` file
  stays mapped while its tensors are read, so the pages read from it stay resident until the
  next file: pickles cannot be read per tensor. safetensors files are opened per lookup.)

The key table is built from our model's own parameter names through :func:`.export.hf_key`, so
the two directions cannot drift apart; a key is accepted with or without THUDM's ``glm.`` prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from megatron_glm.config import ModelConfig
from megatron_glm.hf.export import hf_key, qkv_from_thudm
from megatron_glm.model import tensor_parallel_layout
from megatron_glm.serialization import load_file
from megatron_glm.training.checkpoint.reshard import VOCAB_PARAM, check_splits, repad_vocab

PREFIX = "glm."
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of the folder, by metadata: where it is and what it is."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str
    """A torch dtype, or safetensors' name of one torch has no equivalent for here."""


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: an index's shards, or the one file (first of WEIGHT_FILES)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            break
    else:
        raise ValueError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")
    return _index_shards(path) if name.endswith(".index.json") else [path]


def _index_shards(index: Path) -> list[Path]:
    """The shard files an index names (each in the folder: a name with a path is refused)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ValueError(f"{index}: shard {shard!r} is not a file name in the folder")
    return [index.parent / shard for shard in shards]


def scan_weights(folder: Path) -> Iterator[StoredTensor]:
    """Every tensor of the folder by metadata only (no tensor data is read)."""
    for path in weight_files(folder):
        if not path.is_file():
            raise ValueError(f"{path}: weight file not found")
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    piece = f.get_slice(key)
                    dtype = piece.get_dtype()
                    shape = tuple(piece.get_shape())
                    yield StoredTensor(key, path, shape, _SAFE_DTYPES.get(dtype, dtype))
            continue
        for key, tensor in _bin_tensors(path).items():
            yield StoredTensor(key, path, tuple(tensor.shape), tensor.dtype)


def _bin_tensors(path: Path) -> dict[str, Tensor]:
    blob = load_file(path, mmap=True)  # restricted unpickler: the folder is user input
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return blob


def plan_weights(
    stored: Iterable[StoredTensor], cfg: ModelConfig, where: Path
) -> dict[str, StoredTensor]:
    """Our ``GLMModel`` name -> the folder's tensor, in our parameter order; errors name the key."""
    table = {
        hf_key(name, cfg.num_layers).removeprefix(PREFIX): name
        for name in tensor_parallel_layout(cfg)
    }
    expected = _expected_shapes(cfg)
    found: dict[str, StoredTensor] = {}
    for tensor in stored:
        key = tensor.key
        name = table.get(key.removeprefix(PREFIX))
        if name is None:
            raise ValueError(f"{where}: unexpected key '{key}' (not a parameter of GLM)")
        if name in found:
            raise ValueError(f"{where}: key '{key}' appears twice (with and without 'glm.')")
        if tensor.shape != expected[name]:
            raise ValueError(
                f"{where}: '{key}' has shape {tensor.shape}, config.json implies {expected[name]}"
            )
        if not isinstance(tensor.dtype, torch.dtype) or not tensor.dtype.is_floating_point:
            raise ValueError(f"{where}: '{key}' has dtype {tensor.dtype}, expected a float dtype")
        found[name] = tensor
    missing = [hf_key(n, cfg.num_layers) for n in table.values() if n not in found]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing[:5]} (no random init)")
    return {name: found[name] for name in table.values()}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the (tp = 1) model, read off a meta-device build."""
    from megatron_glm.model import GLMModel

    with torch.device("meta"):
        model = GLMModel(cfg, cfg.vocab_size)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


class HFWeights(Mapping[str, Tensor]):
    """Our full fp32 state dict over a planned folder; each lookup reads and converts one tensor
    (module docstring). ``vocab_rows``: the vocabulary tensors' rows after padding."""

    def __init__(self, planned: dict[str, StoredTensor], cfg: ModelConfig, vocab_rows: int) -> None:
        self._planned = planned
        self._heads = cfg.num_attention_heads
        self.vocab_rows = vocab_rows
        self._bin: tuple[Path, dict[str, Tensor]] | None = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._planned)

    def __len__(self) -> int:
        return len(self._planned)

    def __getitem__(self, name: str) -> Tensor:
        tensor = self._read(self._planned[name]).to(torch.float32)
        if name.endswith("query_key_value.weight") or name.endswith("query_key_value.bias"):
            tensor = qkv_from_thudm(tensor, self._heads)
        if name.endswith(VOCAB_PARAM) and tensor.shape[0] != self.vocab_rows:
            tensor = repad_vocab(tensor, self.vocab_rows)
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:  # a view: save only its bytes
            tensor = tensor.clone()
        return tensor

    def shape(self, name: str) -> torch.Size:
        """The looked-up tensor's shape, without reading it."""
        shape = self._planned[name].shape
        if name.endswith(VOCAB_PARAM):
            shape = (self.vocab_rows, *shape[1:])
        return torch.Size(shape)

    @property
    def num_parameters(self) -> int:
        return sum(self.shape(name).numel() for name in self)

    def check_splits(self, layout: Mapping[str, int | None], tp: int) -> None:
        """ValueError naming a tensor that cannot be cut into ``tp`` TP pieces (before writing)."""
        for name in self:
            check_splits(name, self.shape(name), layout[name], tp)

    def _read(self, stored: StoredTensor) -> Tensor:
        if stored.file.suffix == ".safetensors":
            with safe_open(str(stored.file), framework="pt") as f:
                return f.get_tensor(stored.key)
        if self._bin is None or self._bin[0] != stored.file:  # one .bin mapped at a time
            self._bin = (stored.file, _bin_tensors(stored.file))
        return self._bin[1][stored.key]
