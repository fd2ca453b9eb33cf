"""Instrumentation: what one rank sends, what autograd keeps, which attention blocks it computes, what it holds.

Four counters, each on only inside its ``with`` body (outside it a record costs one list check)::

    with count_bytes() as sent, count_saved() as saved, count_blocks() as blocks, count_held() as held:
        out = attention(q, k, v); out.backward(g)
    sent.total, sent.by_kind      # bytes this rank sent: {'all_to_all': ..., 'ring_kv': ..., 'ring_dkv': ...}
    saved.total                   # bytes of the distinct storages autograd kept for backward
    blocks.work("forward")        # unmasked (query, key) score elements the kernels computed
    held.peak                     # most bytes of noted buffers alive at once (the all-gather's gathered K/V, ...)

* **bytes** (:func:`record_bytes`): every collective and point-to-point call of the plugin reports what *this
  rank sends* (payload bytes that leave the rank; for an all-to-all, the chunks addressed to other ranks). Tests
  and benchmarks compare the totals with the textbook volumes (docs/design.md, "Conventions").
* **saved** (:func:`count_saved`): ``saved_tensors_hooks`` note every tensor autograd saves (a storage counts once
  however many views of it are saved). Code that installs its own hooks inside (the Ulysses KV cache,
  :mod:`mindspeed_cp.kv_cache`) reports what it does keep through :func:`note_saved`, so the count stays exact.
* **blocks** (:func:`record_block`, :func:`record_skip`): the ring and the whole-sequence attention record every
  block they hand to a kernel - the work counter behind the balance benchmarks.
* **held** (:func:`note_held`): buffers an algorithm allocates for its communication and holds for a while (the
  all-gather's receive buffers and gathered K/V, its dK/dV accumulators and reduce-scatter buffers), counted from
  allocation until the tensor object is freed (``weakref.finalize``); ``peak`` is the most alive at once - the
  memory beyond what autograd keeps that the all-gather needs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from typing import Dict, Iterator, List, Optional

import torch

__all__ = [
    "CommStats",
    "count_bytes",
    "record_bytes",
    "SavedStats",
    "count_saved",
    "note_saved",
    "BlockStats",
    "count_blocks",
    "record_block",
    "record_skip",
    "HeldStats",
    "count_held",
    "note_held",
]


@contextlib.contextmanager
def _counting(active: list, stats):
    active.append(stats)
    try:
        yield stats
    finally:
        active.remove(stats)


# ------------------------------------------------------------------------------------------ bytes sent
class CommStats:
    def __init__(self) -> None:
        self.by_kind: Counter = Counter()
        self.messages: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_kind": dict(self.by_kind), "messages": dict(self.messages)}


_BYTES: List[CommStats] = []


def record_bytes(kind: str, nbytes: int) -> None:
    """Report ``nbytes`` sent by this rank in one message of ``kind``."""
    for stats in _BYTES:
        stats.by_kind[kind] += int(nbytes)
        stats.messages[kind] += 1


def count_bytes() -> contextlib.AbstractContextManager:
    """Count the bytes this rank sends inside the ``with`` body (:class:`CommStats`)."""
    return _counting(_BYTES, CommStats())


# ------------------------------------------------------------------------------------------ saved for backward
class SavedStats:
    def __init__(self) -> None:
        self.storages: Dict[int, int] = {}  # storage address -> bytes

    @property
    def total(self) -> int:
        return sum(self.storages.values())


_SAVED: List[SavedStats] = []


def note_saved(t: torch.Tensor) -> None:
    """Report that ``t`` (its whole storage) is kept for backward."""
    if not _SAVED or t.layout != torch.strided:
        return
    st = t.untyped_storage()
    for stats in _SAVED:
        stats.storages.setdefault(st.data_ptr(), st.nbytes())


def _pack(t: torch.Tensor) -> torch.Tensor:
    note_saved(t)
    return t


@contextlib.contextmanager
def count_saved() -> Iterator[SavedStats]:
    """Count the bytes autograd keeps for backward inside the ``with`` body (:class:`SavedStats`)."""
    with _counting(_SAVED, SavedStats()) as stats:
        with torch.autograd.graph.saved_tensors_hooks(_pack, lambda t: t):
            yield stats


# ------------------------------------------------------------------------------------------ attention blocks
class BlockStats:
    """Attention blocks one rank computed, by phase (``"forward"``, ``"backward"``)."""

    def __init__(self) -> None:
        self.blocks: Counter = Counter()  # blocks handed to the kernel
        self.scores: Counter = Counter()  # (query, key) score elements of those blocks, b*n*sq*sk summed
        self.masked: Counter = Counter()  # of which masked (causal triangle, mask)
        self.computed: Counter = Counter()  # score elements a kernel computes: causal blocks skip their triangle
        self.skipped: Counter = Counter()  # blocks not computed because the mask hides all of them
        self.skipped_tiles: Counter = Counter()  # row tiles of a documents block that reach no key of it
        self.empty: Counter = Counter()  # blocks computed although every score was masked (should be 0)

    def work(self, phase: str) -> int:
        """Unmasked score elements: the useful work of a phase."""
        return self.scores[phase] - self.masked[phase]

    def as_dict(self) -> dict:
        return {
            k: dict(getattr(self, k))
            for k in ("blocks", "scores", "masked", "computed", "skipped", "skipped_tiles", "empty")
        }


_BLOCKS: List[BlockStats] = []


def count_blocks() -> contextlib.AbstractContextManager:
    """Count the attention blocks computed on this rank inside the ``with`` body (:class:`BlockStats`)."""
    return _counting(_BLOCKS, BlockStats())


def record_block(
    phase: str, bn: int, sq: int, sk: int, causal: bool, mask: Optional[torch.Tensor], new_block: bool = True
) -> None:
    """Count one computed block (``new_block=False``: one more row tile of the block counted last)."""
    if not _BLOCKS:
        return
    scores = bn * sq * sk
    if causal:
        masked = bn * sq * (sq - 1) // 2  # strict upper triangle of the square diagonal block
    elif mask is not None:
        masked = int(mask.sum()) * (bn // (mask.shape[0] * mask.shape[1]))
    else:
        masked = 0
    for st in _BLOCKS:
        st.blocks[phase] += int(new_block)
        st.scores[phase] += scores
        st.masked[phase] += masked
        st.computed[phase] += scores - (masked if causal else 0)
        st.empty[phase] += int(masked == scores and new_block)


def record_skip(phase: str, tile: bool = False) -> None:
    """Count one block (``tile=True``: one tile of a block) not computed."""
    for st in _BLOCKS:
        (st.skipped_tiles if tile else st.skipped)[phase] += 1


# ------------------------------------------------------------------------------------------ held buffers
class HeldStats:
    """Bytes of noted buffers alive now (``current``) and at most (``peak``)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def _add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes


_HELD: List[HeldStats] = []


def note_held(t: torch.Tensor) -> torch.Tensor:
    """Count ``t``'s bytes as held from now until the tensor object is freed (views keep it alive); returns ``t``."""
    if _HELD:
        nbytes = t.numel() * t.element_size()
        for stats in _HELD:
            stats._add(nbytes)
            weakref.finalize(t, stats._release, nbytes)
    return t


def count_held() -> contextlib.AbstractContextManager:
    """Track the buffers noted inside the ``with`` body (:class:`HeldStats`)."""
    return _counting(_HELD, HeldStats())
