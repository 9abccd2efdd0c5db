"""From packed windows to batches: the GLM pretraining dataset, collation, sampler, DataLoader.

Order and sharding follow Megatron-LM's ``MegatronPretrainingSampler``: the global order is
dataset index order (the packed dataset is already shuffled, seeded, and sized for the whole
run), starting at ``consumed_samples``; each global micro-batch is ``micro_batch_size *
dp_size`` consecutive indices, and data-parallel rank ``r`` takes the ``r``-th slice of
``micro_batch_size``. Resuming from a checkpoint therefore only needs ``consumed_samples``:
rows themselves are a pure function of (seed, epoch, sample index) (see blank_infilling), so
the resumed stream is exactly the tail of the uninterrupted one, for any worker count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_glm.config import ObjectiveConfig
from megatron_glm.data.blank_infilling import BlankInfilling, SpecialIds
from megatron_glm.data.dataset_builder import build_pretrain_datasets
from megatron_glm.objectives import OBJECTIVES

BATCH_KEYS: tuple[str, ...] = (
    "tokens",
    "targets",
    "loss_mask",
    "position_ids",
    "sep",
    "valid_len",
    "objective",
)
"""Keys of a pretraining micro-batch (docs/design.md, "Batch contract") plus ``objective``."""


class GLMPretrainDataset(Dataset):
    """Packed windows (``PackedDataset`` / blended) turned into blank-infilling rows.

    ``objective`` forces one task for every row (for inspection and per-task validation);
    None draws it per row from the objective config.
    """

    def __init__(
        self, windows: Any, infilling: BlankInfilling, objective: str | None = None
    ) -> None:
        self.windows = windows
        self.infilling = infilling
        self.objective = objective

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.infilling(self.windows[i], self.objective)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A DataLoader batch at once (torch calls this when it exists): blank infilling is
        vectorised across the rows of a batch, several times faster than row by row. Rows are
        identical to ``self[i]``; they are views into the batch arrays."""
        windows = [self.windows[i] for i in indices]
        out = self.infilling.batch(windows, [self.objective] * len(windows))
        return [{key: value[b] for key, value in out.items()} for b in range(len(windows))]


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows into the batch contract: ``[B, S]`` arrays, ``position_ids [B, 2, S]``,
    and ``sep`` / ``valid_len`` / ``objective`` as ``[B]`` int64.

    Id ranges are checked here, on the host, where it costs no device sync (the loss does not
    check them per micro-batch): ``objective`` against :data:`OBJECTIVES`; token ids (hence
    targets) are checked against the vocabulary per window by the packed dataset.
    """
    if not rows:
        raise ValueError("collate: empty list of rows")
    batch = {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}
    objective = batch["objective"]
    bad = np.flatnonzero((objective < 0) | (objective >= len(OBJECTIVES)))
    if bad.size:
        raise ValueError(
            f"collate: row {int(bad[0])} has objective id {int(objective[bad[0]])}, not in "
            f"[0, {len(OBJECTIVES)}) ({', '.join(OBJECTIVES)})"
        )
    return {key: torch.from_numpy(value) for key, value in batch.items()}


class PretrainingSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of indices (Megatron order, see the module docstring).

    With ``drop_last`` a final incomplete global micro-batch is skipped (as Megatron does:
    every rank must run the same number of steps); otherwise each rank gets its share of it,
    possibly empty for higher ranks, and then that rank yields nothing for it.
    """

    def __init__(
        self,
        total_samples: int,
        *,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"sampler: the dataset is empty (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"sampler: micro_batch_size must be > 0, got {micro_batch_size}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"sampler: need 0 <= dp_rank < dp_size, got {dp_rank}, {dp_size}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"sampler: consumed_samples={consumed_samples} must be in [0, {total_samples}) "
                "(the dataset is exhausted; build it with more samples for this run)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last

    def _global_starts(self) -> range:
        step = self.micro_batch_size * self.dp_size
        stop = self.total_samples - step + 1 if self.drop_last else self.total_samples
        return range(self.consumed_samples, max(stop, self.consumed_samples), step)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self._global_starts())
        # starts whose slice for this rank is non-empty: start + rank * mbs < total
        step = self.micro_batch_size * self.dp_size
        end = self.total_samples - self.dp_rank * self.micro_batch_size
        return len(range(self.consumed_samples, max(end, self.consumed_samples), step))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        for start in self._global_starts():
            lo = start + self.dp_rank * self.micro_batch_size
            hi = min(lo + self.micro_batch_size, start + step, self.total_samples)
            if lo < hi:
                yield list(range(lo, hi))


def build_dataloader(
    dataset: Any,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    num_workers: int,
    seed: int,
    drop_last: bool = True,
) -> DataLoader:
    """DataLoader over ``dataset`` (map-style, sized) for one data-parallel rank.

    Memory is pinned when CUDA is available; workers persist across epochs of iteration when
    ``num_workers > 0``. ``seed`` seeds torch's loader generator (worker base seeds) so that
    anything random outside blank infilling is reproducible too.
    """
    assert num_workers >= 0, f"num_workers {num_workers} < 0 (DataConfig checks data.num_workers)"
    sampler = PretrainingSampler(
        len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def inspection_dataset(
    data_prefix: str,
    tokenizer: Any,
    *,
    seq_length: int,
    num_samples: int,
    objective: str | None,
    seed: int,
    objective_config: ObjectiveConfig | None = None,
    cache_dir: str | None = None,
) -> GLMPretrainDataset:
    """The first ``num_samples`` training rows of one corpus, all documents in the train split.

    What ``tools/inspect_samples.py`` shows: the same packing (``build_pretrain_datasets``) and
    blank infilling as training with this seed and sequence length.
    """
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be in [0, 2**64), got {seed}")
    cfg = objective_config or ObjectiveConfig()
    infill = BlankInfilling(
        cfg, seq_length=seq_length, ids=SpecialIds.from_tokenizer(tokenizer), seed=seed
    )
    train, _, _ = build_pretrain_datasets(
        [data_prefix],
        None,
        (1.0, 0.0, 0.0),
        infill.window_length,
        (num_samples, 0, 0),
        seed,
        int(tokenizer.eos_id),
        cache_dir,
        vocab_size=int(tokenizer.vocab_size),
    )
    if train is None:
        raise ValueError(f"{data_prefix}: no documents to sample from")
    return GLMPretrainDataset(train, infill, objective)
