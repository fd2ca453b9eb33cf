"""Attention blocks a rank computed: the work counter behind the balance benchmarks (``count_blocks``).

The ring (:mod:`mindspeed_cp.ring`) and the whole-sequence attention (:mod:`mindspeed_cp.local`) record every
block they hand to a kernel; nothing is counted (and nothing costs) outside a ``with count_blocks()`` body.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, List, Optional

import torch

__all__ = ["BlockStats", "count_blocks", "record", "record_skip"]


class BlockStats:
    """Attention blocks one rank computed, by phase (``"forward"``, ``"backward"``)."""

    def __init__(self) -> None:
        self.blocks: Counter = Counter()   # blocks handed to the kernel
        self.scores: Counter = Counter()   # (query, key) score elements of those blocks, b*n*sq*sk summed
        self.masked: Counter = Counter()   # of which masked (causal triangle, mask)
        self.skipped: Counter = Counter()  # blocks not computed because the mask hides all of them
        self.skipped_tiles: Counter = Counter()  # row tiles of a documents block that reach no key of it
        self.empty: Counter = Counter()    # blocks computed although every score was masked (should be 0)

    def work(self, phase: str) -> int:
        """Unmasked score elements: the useful work of a phase."""
        return self.scores[phase] - self.masked[phase]

    def as_dict(self) -> dict:
        return {k: dict(getattr(self, k)) for k in ("blocks", "scores", "masked", "skipped", "skipped_tiles",
                                                      "empty")}


_BLOCK_STATS: List[BlockStats] = []


@contextlib.contextmanager
def count_blocks() -> Iterator[BlockStats]:
    """Count the attention blocks computed on this rank inside the ``with`` body."""
    stats = BlockStats()
    _BLOCK_STATS.append(stats)
    try:
        yield stats
    finally:
        _BLOCK_STATS.remove(stats)


def record(phase: str, bn: int, sq: int, sk: int, causal: bool, mask: Optional[torch.Tensor],
           new_block: bool = True) -> None:
    """Count one computed block (``new_block=False``: one more row tile of the block counted last)."""
    if not _BLOCK_STATS:
        return
    scores = bn * sq * sk
    if causal:
        masked = bn * sq * (sq - 1) // 2  # strict upper triangle of the square diagonal block
    elif mask is not None:
        masked = int(mask.sum()) * (bn // (mask.shape[0] * mask.shape[1]))
    else:
        masked = 0
    for st in _BLOCK_STATS:
        st.blocks[phase] += int(new_block)
        st.scores[phase] += scores
        st.masked[phase] += masked
        st.empty[phase] += int(masked == scores and new_block)


def record_skip(phase: str, tile: bool = False) -> None:
    """Count one block (``tile=True``: one tile of a block) not computed."""
    for st in _BLOCK_STATS:
        (st.skipped_tiles if tile else st.skipped)[phase] += 1


# ------------------------------------------------------------------------------------------ layout
