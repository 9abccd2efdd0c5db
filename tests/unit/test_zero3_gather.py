"""ZeRO-3 weights gathered from data-parallel partitions, against DeepSpeed's own gathering.

Files shaped like DeepSpeed 0.19's ZeRO-3 checkpoint (``param_shapes`` in the model-states files,
``fp32_flat_groups`` in the optimizer-state files) at dp 3, with parameters whose sizes are not
multiples of 3 (padded partitions) in two flat groups per rank. The reference is
``deepspeed.utils.zero_to_fp32.GatheredTensor``, the class DeepSpeed's consolidation script uses.
The trained end-to-end case is ``tests/distributed/test_zero3_weights.py``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from megatron_glm.serialization import CheckpointFileError
from megatron_glm.training.checkpoint.deepspeed_files import read_zero3_weights

DP = 3
GROUPS = [
    OrderedDict(a=torch.Size([5, 7]), b=torch.Size([4])),
    OrderedDict(c=torch.Size([2, 3, 5]), d=torch.Size([1]), e=torch.Size([0])),
]


def _write(tag: Path, *, mp_rank: int = 0, partition_count: int = DP) -> dict[str, torch.Tensor]:
    """Partition random full tensors DeepSpeed's way; returns the full tensors."""
    g = torch.Generator().manual_seed(mp_rank)
    full = {n: torch.randn(s, generator=g) for group in GROUPS for n, s in group.items()}
    flats: list[list[torch.Tensor]] = [[] for _ in range(DP)]
    for group in GROUPS:
        pieces: list[list[torch.Tensor]] = [[] for _ in range(DP)]
        for name, shape in group.items():
            part = math.ceil(shape.numel() / DP)
            padded = torch.zeros(part * DP)
            padded[: shape.numel()] = full[name].flatten()
            for rank in range(DP):
                pieces[rank].append(padded[rank * part : (rank + 1) * part])
        for rank in range(DP):
            flats[rank].append(torch.cat(pieces[rank]))
    for rank in range(DP):
        stem = f"zero_pp_rank_{rank}_mp_rank_{mp_rank:02d}"
        model = {"module": {}, "buffer_names": [], "param_shapes": GROUPS}
        torch.save(model, tag / f"{stem}_model_states.pt")
        osd = {"fp32_flat_groups": flats[rank], "partition_count": partition_count}
        torch.save({"optimizer_state_dict": osd}, tag / f"{stem}_optim_states.pt")
    return full


def _deepspeed_gather(tag: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import GatheredTensor

    flats = [
        torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"][
            "fp32_flat_groups"
        ]
        for r in range(DP)
    ]
    bounds = [0, *torch.tensor([t.numel() for t in flats[0]]).cumsum(0).tolist()]
    out, offset = {}, 0
    for name, shape in ((n, s) for group in GROUPS for n, s in group.items()):
        part = math.ceil(shape.numel() / DP)
        if part:
            out[name] = GatheredTensor(flats, bounds, offset, part, shape).contiguous()
        offset += part
    return out


def test_gathered_weights_equal_deepspeed_consolidation(tmp_path: Path) -> None:
    full = _write(tmp_path)
    gathered = read_zero3_weights(tmp_path, 0)
    assert list(gathered) == ["a", "b", "c", "d", "e"]
    reference = _deepspeed_gather(tmp_path)
    for name, tensor in reference.items():
        assert torch.equal(gathered[name], tensor), name
    for name, tensor in full.items():
        assert torch.equal(gathered[name], tensor), name


def test_incomplete_or_inconsistent_partitions_are_named(tmp_path: Path) -> None:
    _write(tmp_path, partition_count=2)
    stem = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(CheckpointFileError, match=rf"{stem}: partitioned over \[2\] data-parallel"):
        read_zero3_weights(tmp_path, 0)
    (tmp_path / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointFileError, match="has 3 model-states and 2 optimizer-state"):
        read_zero3_weights(tmp_path, 0)
