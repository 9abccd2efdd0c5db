"""Per-layer key/value cache for GLM inference: part A encoded once, part B one token at a time.

GLM's mask (part A bidirectional, part B causal, see :mod:`megatron_glm.kernels.attention`) makes
caching exact: part A never attends to part B, so its keys and values do not change while part B
grows, and a part-B token only attends to part A and to earlier part-B tokens.

Slot layout, shared by every row of a batch::

    [ part A, right-padded to the longest row | part B: sop, t1, t2, ... ]
      slots 0 .. A-1 (row r real below sep_r)   slots A .. A + steps - 1

All rows of a batch decode in lock step, so the part-B slots are the same for every row and only
part A has per-row holes (``key_valid``). Rows that finish, or beams that are reordered, leave
or move with :meth:`KVCache.select`, so finished rows stop costing compute. The cache holds this
tensor-parallel rank's heads only (``heads / tp``), like the attention that fills it.

This is an inference-only path: :meth:`GLMModel.prefill` and :meth:`GLMModel.decode_step` use
it; ``GLMModel.forward`` (training, evaluation) never sees a cache and is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values ``[b, heads/tp, capacity, d]`` per transformer block, and which are real.

    ``key_valid`` (bool ``[b, capacity]``) is False for part A's right padding and for slots not
    filled yet; ``length`` is the number of filled slots (the same for every row).
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_valid: Tensor
    length: int = 0

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``capacity`` tokens (part A + part B)."""
        shape = (batch, heads, capacity, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            key_valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
        )

    @property
    def batch_size(self) -> int:
        return int(self.key_valid.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.key_valid.shape[1])

    def reserve(self, n: int, valid: Tensor | None = None) -> tuple[int, int]:
        """Claim the next ``n`` slots, marking them real (or per ``valid``, bool ``[b, n]``).

        Returns ``(start, end)``; ``length`` is advanced by :meth:`commit` once every layer has
        written its keys there.
        """
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise ValueError(
                f"KV cache full: {self.length} + {n} tokens exceed its capacity {self.capacity} "
                "(allocate it for part A + max_new_tokens)"
            )
        self.key_valid[:, start:end] = True if valid is None else valid
        return start, end

    def commit(self, end: int) -> None:
        """Mark the slots up to ``end`` as filled (after every layer wrote them)."""
        self.length = end

    def decode_mask(self, start: int, end: int) -> Tensor:
        """Bool ``[b, 1, n, end]``: new query ``start + i`` sees real keys up to its own slot."""
        keys = torch.arange(end, device=self.key_valid.device)  # [end]
        queries = torch.arange(start, end, device=self.key_valid.device)  # [n]
        causal = keys.view(1, -1) <= queries.view(-1, 1)  # [n, end]
        return (self.key_valid[:, None, None, :end] & causal).contiguous()  # [b, 1, n, end]

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` ``[b, heads, n, d]`` at slots ``start..``; the keys/values up to them."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder, repeat) rows: ``rows`` int64 ``[b']`` indexes the current batch.

        Used to drop finished rows (so they stop costing compute) and to follow beams.
        """
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.key_valid = self.key_valid.index_select(0, rows)
