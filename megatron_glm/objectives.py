"""The pretraining objectives, named once.

A row's ``objective`` column (the batch contract) is an index into :data:`OBJECTIVES`; the data
pipeline writes it, ``glm_loss`` sums the loss per index and the trainer logs the sums under these
names. A leaf module (no imports) so that ``data``, ``model`` and ``training`` all read the same
tuple without depending on each other.
"""

from __future__ import annotations

OBJECTIVES: tuple[str, ...] = ("span", "sentence", "document")
"""Blank-infilling task names; a row's ``objective`` code is the index in this tuple."""
NUM_OBJECTIVES = len(OBJECTIVES)
"""Length of the per-objective loss sums."""
