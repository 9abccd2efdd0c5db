"""Write safetensors files one tensor at a time, byte for byte what ``save_file`` writes.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte range in the data section) padded with spaces to a multiple of 8, then the data.
The header depends only on names, dtypes and shapes, all known before any weight is read (the
checkpoint's metadata), so a shard's header is written first and each tensor's bytes go to their
offset when the tensor arrives: the writer holds nothing but the tensor in hand, whatever the
shard size. Tensors and header follow safetensors' own layout (ordered by dtype, the wider
first, then by name; compact JSON with ``__metadata__`` first), so the files equal those of
``safetensors.torch.save_file`` (tests/unit/test_hf_streaming.py compares the bytes).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

SAFE_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
"""Our export dtypes -> safetensors' names, in safetensors' dtype order (it writes the last
first)."""


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor's header entry needs."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy shards in arrival order: a new shard when the next tensor would pass the limit
    (a tensor bigger than the limit gets a shard of its own), as ``transformers`` splits."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardWriter:
    """One safetensors file: header at open, tensors written at their offsets as they come."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str]) -> None:
        order = sorted(specs, key=lambda s: (-_dtype_rank(s.dtype), s.name))
        header: dict[str, object] = {"__metadata__": metadata}
        self._offsets: dict[str, tuple[int, TensorSpec]] = {}
        offset = 0
        for spec in order:
            header[spec.name] = {
                "dtype": SAFE_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self._offsets[spec.name] = (offset, spec)
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self.path = path
        self._data_start = 8 + len(text)
        self._file: BinaryIO = path.open("wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._file.truncate(self._data_start + offset)
        self._pending = set(self._offsets)

    def write(self, name: str, tensor: Tensor) -> None:
        """Write ``tensor``'s bytes at ``name``'s offset (it must match the planned spec)."""
        offset, spec = self._offsets[name]
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor '{name}' written twice")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, the "
                f"header says {spec.dtype} {spec.shape}"
            )
        self._file.seek(self._data_start + offset)  # safetensors is little-endian, as we are
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._pending.discard(name)

    @property
    def complete(self) -> bool:
        return not self._pending

    def close(self) -> None:
        """Close the file; ValueError naming a tensor that never came (the file is unusable)."""
        self._file.close()
        if self._pending:
            raise ValueError(f"{self.path}: tensors {sorted(self._pending)[:5]} were never written")


def _dtype_rank(dtype: torch.dtype) -> int:
    return list(SAFE_DTYPES).index(dtype)
