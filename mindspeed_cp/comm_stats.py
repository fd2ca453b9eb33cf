"""Bytes sent by this rank, counted where the plugin talks to torch.distributed.

Every collective/point-to-point call of the algorithms reports what *this rank sends* (payload bytes
that leave the rank; for an all-to-all, the chunks addressed to other ranks) with :func:`record`.
Tests and benchmarks compare the totals with the textbook volumes of DESIGN.md section 3::

    with count_bytes() as stats:
        out = attention(q, k, v); out.backward(g)
    stats.total, stats.by_kind   # {'all_to_all': ..., 'ring_kv': ..., 'ring_dkv': ...}

Counting costs one dict update per message and is always on.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, List


class CommStats:
    def __init__(self) -> None:
        self.by_kind: Counter = Counter()
        self.messages: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_kind": dict(self.by_kind), "messages": dict(self.messages)}


_ACTIVE: List[CommStats] = []


def record(kind: str, nbytes: int) -> None:
    """Report ``nbytes`` sent by this rank in one message of ``kind``."""
    for stats in _ACTIVE:
        stats.by_kind[kind] += int(nbytes)
        stats.messages[kind] += 1


@contextlib.contextmanager
def count_bytes() -> Iterator[CommStats]:
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)
