"""The real batch source: tokenizer -> packed splits -> blank infilling -> per-rank DataLoaders.

Sizes: the train split is built for exactly ``train_iters * global_batch_size`` rows (the data
pipeline adds epochs as needed), the valid split for ``eval_iters * global_batch_size`` rows
(``eval_iters`` counts global batches, Megatron's meaning: every layout validates on the same
rows, so the figures are comparable across data-parallel sizes), and the *same* validation rows
are used at every validation, so validation losses over a run are comparable (the demo's
"validation loss fell by X%" is measured on identical rows).

Index caches are built by local rank 0 first; the other ranks wait at a barrier and then
memory-map the published files (the cache writes are atomic, so this only avoids duplicate work).
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterable, Iterator
from typing import Any

import torch.distributed as dist

from megatron_glm.config import ConfigError, RunConfig, parse_split
from megatron_glm.data.blank_infilling import BlankInfilling, SpecialIds
from megatron_glm.data.dataset_builder import build_pretrain_datasets
from megatron_glm.data.loader import GLMPretrainDataset, build_dataloader
from megatron_glm.data.tokenizer import Tokenizer
from megatron_glm.training.batches import Batch
from megatron_glm.training.signals import STOP_SIGNALS


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM/SIGINT/SIGUSR1 to the training process.

    A preemption signal often reaches the whole process group (SLURM, ``kill -- -PGID``, the
    deepspeed launcher's process-tree terminate). torch's worker handler exits on a SIGTERM not
    sent by its parent, and the trainer would then die on "worker killed" at its next fetch
    instead of finishing the step and saving. Workers still exit normally when the loader shuts
    down, and on their own when the parent process dies (torch's worker watchdog).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PretrainData:
    """:class:`megatron_glm.training.loop.BatchSource` over preprocessed corpora."""

    def __init__(
        self,
        cfg: RunConfig,
        tokenizer: Tokenizer,
        *,
        dp_rank: int,
        dp_size: int,
        local_rank: int,
    ) -> None:
        self.cfg = cfg
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        t, d = cfg.train, cfg.data
        infilling = BlankInfilling(
            cfg.objective,
            seq_length=d.seq_length,
            ids=SpecialIds.from_tokenizer(tokenizer),
            seed=t.seed,
        )
        num_valid = t.eval_iters * t.global_batch_size if t.eval_interval > 0 else 0
        num_samples = (t.train_iters * t.global_batch_size, num_valid, 0)

        def build() -> tuple[Any, Any, Any]:
            return build_pretrain_datasets(
                d.data_path,
                d.data_weights,
                parse_split(d.split),
                infilling.window_length,
                num_samples,
                t.seed,
                tokenizer.eos_id,
                d.cache_dir,
                vocab_size=tokenizer.vocab_size,  # every window served is range-checked
            )

        initialized = dist.is_initialized()
        if local_rank == 0:
            train, valid, _ = build()
        if initialized:
            dist.barrier()
        if local_rank != 0:
            train, valid, _ = build()
        if train is None:
            raise ConfigError("data.split", f"'{d.split}' leaves the training split empty")
        if t.eval_interval > 0 and valid is None:
            raise ConfigError(
                "data.split",
                f"'{d.split}' leaves the validation split without documents for this corpus but "
                f"train.eval_interval={t.eval_interval}",
            )
        self.train = GLMPretrainDataset(train, infilling)
        self.valid = GLMPretrainDataset(valid, infilling) if valid is not None else None
        self._valid_loader: Any = None

    def train_batches(self, consumed_samples: int) -> Iterator[Batch]:
        """This rank's micro-batches from global row ``consumed_samples`` on."""
        loader = build_dataloader(
            self.train,
            micro_batch_size=self.cfg.train.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            consumed_samples=consumed_samples,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed,
        )
        loader.worker_init_fn = ignore_stop_signals
        return iter(loader)

    def valid_batches(self) -> Iterable[Batch] | None:
        """``eval_iters`` global batches (this rank's micro-batches of them), the same rows at
        every call.

        Built in the main process (no workers): validation is short and infrequent, and extra
        worker processes per rank would compete with training for the CPU cores.
        """
        if self.valid is None:
            return None
        if self._valid_loader is None:
            self._valid_loader = build_dataloader(
                self.valid,
                micro_batch_size=self.cfg.train.micro_batch_size,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
                consumed_samples=0,
                num_workers=0,
                seed=self.cfg.train.seed,
            )
        t = self.cfg.train
        per_rank = t.eval_iters * t.global_batch_size // (t.micro_batch_size * self.dp_size)
        return itertools.islice(self._valid_loader, per_rank)
