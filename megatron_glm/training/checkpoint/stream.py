"""A checkpoint's full (tp = 1) model, one merged tensor at a time, never held whole.

:func:`.reshard.read_full_state` loads every TP shard whole and merges the whole model: right for
resharding (the optimizer state is rebuilt from all of it anyway), but twice the model in memory
for an export that converts each tensor and writes it out. :class:`StreamingState` instead

- opens the files memory-mapped through the restricted loader (only the pickled structure is
  read; tensor bytes stay on disk until touched), one pipeline layer at a time: a pipeline
  checkpoint's ``layer_II-model_TT`` files, or an unpipelined ``mp_rank_XX`` file's
  ``layers.II.*`` entries (the file is reopened for every layer, so the pages of the layers done
  are unmapped and leave the resident set);
- checks the whole checkpoint from that metadata before any tensor is read (:attr:`shapes`): the
  same names on every TP rank, each one a parameter of the layout, none missing, the TP pieces of
  a split tensor alike outside the split dimension and replicated ones alike in shape;
- yields each merged tensor (split ones concatenated in TP-rank order, replicated ones checked
  equal and copied out of the mapping), so the caller holds one tensor at a time.

ZeRO-3 checkpoints keep the weights as flat partitions over data-parallel ranks in the
optimizer-state files; they are gathered whole (:func:`.reshard.read_full_state`, as before) and
handed out one by one, released as they go.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from megatron_glm.serialization import load_file
from megatron_glm.training.checkpoint.deepspeed_files import (
    checkpoint_layout,
    is_zero3,
    layer_files,
    model_state_files,
    split_layer_name,
)
from megatron_glm.training.checkpoint.reshard import merge_tensor, read_full_state

Group = list[dict[str, Tensor]]
"""One pipeline layer's tensors on every TP rank (``GLMModel`` names), memory-mapped."""


class StreamingState:
    """Iterates ``(GLMModel name, full tensor)`` of a checkpoint tag once (module docstring)."""

    shapes: dict[str, torch.Size]
    """Every merged tensor's shape, in the order the iteration yields them."""

    def __init__(self, tag_dir: str | os.PathLike[str], layout: Mapping[str, int | None]) -> None:
        self.tag_dir = Path(tag_dir)
        self.layout = layout
        self._gathered: dict[str, Tensor] | None = None
        if is_zero3(self.tag_dir):
            self._gathered = read_full_state(self.tag_dir, layout)
            self.shapes = {n: t.shape for n, t in self._gathered.items()}
            return
        self._tp, _ = checkpoint_layout(self.tag_dir)
        self._layers = layer_files(self.tag_dir)
        self.shapes = self._check()

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        if self._gathered is not None:
            gathered, self._gathered = self._gathered, {}
            for name in list(gathered):
                yield name, gathered.pop(name)
            return
        for group in self._groups(reopen=True):
            for name in list(group[0]):
                parts = [rank.pop(name) for rank in group]
                merged = merge_tensor(name, parts, self.layout[name])
                yield name, merged.clone() if self.layout[name] is None else merged

    def _groups(self, *, reopen: bool) -> Iterator[Group]:
        """Each layer's group; ``reopen``: load the unpipelined files again for every layer."""
        if self._layers:
            for index, ranks in sorted(self._layers.items()):
                yield [
                    {f"layers.{index}.{k}": v for k, v in _tensors(ranks[rank]).items()}
                    for rank in range(self._tp)
                ]
            return
        files = model_state_files(self.tag_dir)
        modules = [_module(path) for path in files]
        indices = sorted({split_layer_name(name)[0] for name in modules[0]})
        for index in indices:
            if not modules:
                modules = [_module(path) for path in files]
            yield [{n: t for n, t in m.items() if split_layer_name(n)[0] == index} for m in modules]
            if reopen:
                modules = []  # unmap the files (and the pages read) before the next layer

    def _check(self) -> dict[str, torch.Size]:
        """Names and shapes of the whole checkpoint, from the pickled metadata only."""
        shapes: dict[str, torch.Size] = {}
        for group in self._groups(reopen=False):
            names = list(group[0])
            for rank, part in enumerate(group[1:], start=1):
                if list(part) != names:
                    raise ValueError(
                        f"{self.tag_dir}: mp_rank_{rank:02d} holds different tensors than "
                        "mp_rank_00"
                    )
            for name in names:
                if name not in self.layout:
                    raise ValueError(
                        f"checkpoint tensor '{name}' is not a parameter of the model described "
                        "by the config (different architecture?)"
                    )
                shapes[name] = merged_shape(name, [p[name].shape for p in group], self.layout[name])
        missing = sorted(set(self.layout) - set(shapes))
        if missing:
            raise ValueError(f"checkpoint lacks model parameters {missing[:5]}")
        return shapes


def merged_shape(name: str, shapes: list[torch.Size], dim: int | None) -> torch.Size:
    """The full tensor's shape from its TP pieces' shapes; ValueError naming the tensor if they
    cannot be the pieces of one tensor."""
    first = shapes[0]
    for rank, shape in enumerate(shapes[1:], start=1):
        alike = (
            shape == first
            if dim is None
            else len(shape) == len(first)
            and all(a == b for d, (a, b) in enumerate(zip(shape, first, strict=True)) if d != dim)
        )
        if not alike:
            raise ValueError(
                f"tensor '{name}' has shape {tuple(first)} on mp_rank_00 and {tuple(shape)} on "
                f"mp_rank_{rank:02d} (not pieces of one tensor)"
            )
    if dim is None:
        return first
    return torch.Size((sum(s[dim] for s in shapes) if d == dim else n) for d, n in enumerate(first))


def _tensors(path: Path) -> dict[str, Tensor]:
    blob = load_file(path, mmap=True)
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise ValueError(f"{path}: not a layer's state dict of tensors")
    return blob


def _module(path: Path) -> dict[str, Tensor]:
    """An unpipelined model-states file's weights, memory-mapped."""
    module = load_file(path, mmap=True).get("module")
    if not isinstance(module, dict):
        raise ValueError(f"{path}: no 'module' state dict (not an unpipelined model-states file)")
    return module
