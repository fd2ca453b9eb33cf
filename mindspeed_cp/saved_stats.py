"""Bytes autograd keeps for backward, counted per distinct storage (the memory side of :mod:`comm_stats`).

    with count_saved() as saved:
        out = attention(q, k, v)          # the forward only
    saved.total                           # bytes of the distinct storages saved for backward

:func:`count_saved` installs ``torch.autograd.graph.saved_tensors_hooks`` that note every tensor autograd
saves (a storage counts once however many views of it are saved). Code that installs its own hooks inside
(the Ulysses KV cache, :mod:`mindspeed_cp.kv_cache`, which replaces some saved tensors by a way to rebuild
them) reports what it does keep through :func:`note`, so the count stays exact under it.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch


class SavedStats:
    def __init__(self) -> None:
        self.storages: Dict[int, int] = {}  # storage address -> bytes

    @property
    def total(self) -> int:
        return sum(self.storages.values())


_ACTIVE: List[SavedStats] = []


def note(t: torch.Tensor) -> None:
    """Report that ``t`` (its whole storage) is kept for backward."""
    if not _ACTIVE or t.layout != torch.strided:
        return
    st = t.untyped_storage()
    for stats in _ACTIVE:
        stats.storages.setdefault(st.data_ptr(), st.nbytes())


def _pack(t: torch.Tensor) -> torch.Tensor:
    note(t)
    return t


@contextlib.contextmanager
def count_saved() -> Iterator[SavedStats]:
    stats = SavedStats()
    _ACTIVE.append(stats)
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, lambda t: t):
            yield stats
    finally:
        _ACTIVE.remove(stats)
