"""Sliding windows as plans: which keys a query sees, which blocks of scores to compute and in what shape, and
which tokens must cross which rank boundary - pure functions of positions, no communication.

A window is Megatron's ``window_size=(left, right)`` (``get_sliding_window_causal_mask``): the query at global
position ``i`` sees the keys at ``i - left .. i + right``; ``(W, 0)`` is a causal window of ``W + 1`` keys, ``-1`` (or
None) an unbounded side. With packed documents a query sees only keys of its own document too.

Worked example - a causal window ``(4, 0)``, queries at positions 8..11 (one tile of 4 rows), keys 0..11::

    keys      0 1 2 3 | 4 5 6 7 | 8 9 10 11
    query  8  . . . . | x x x x | x . .  .      x = seen
    query  9  . . . . | . x x x | x x .  .
    query 10  . . . . | . . x x | x x x  .
    query 11  . . . . | . . . x | x x x  x
                        ANTI      CAUSAL

Every tile of ``t <= left + right`` rows decomposes exactly into at most three blocks: an *anti-causal* ``t x t``
block at ``i - left`` (row ``r`` sees columns ``>= r``), a *full* block (every pair seen; empty here) and a
*causal* ``t x t`` block at ``i + right`` (row ``r`` sees columns ``<= r``). A fused causal kernel computes only the
seen half of each edge block (the anti-causal one on the tiles reversed), so the score elements computed equal the
pairs in the window: ``t (left + right + 1)`` per tile. Where an edge block is cut by the end of a run of keys (a
rank boundary, a document, the sequence start) it splits exactly again, into a smaller square of its shape and a
full block (:func:`_edge`): still no mask, still only seen pairs. Only a tile wider than the window (``t >
left + right``, tiny windows) is one *masked* block, its mask built from positions.

``Run`` is the unit every plan works on: ``n`` tokens of a buffer, from index ``index``, holding the consecutive
positions ``pos .. pos + n - 1`` of one document. A rank's tokens are a few runs (Ulysses: one; Megatron's zigzag:
two; per-document zigzag: two per document).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .runs import (  # noqa: F401 - re-exported: the plans' vocabulary
    UNBOUNDED,
    Run,
    Window,
    contiguous_layout,
    halo_tokens,
    hybrid_layout,
    run_pairs,
    zigzag_layout,
)

__all__ = [
    "Window",
    "Shape",
    "Run",
    "Block",
    "runs_of",
    "layout_runs",
    "layout_positions",
    "window_blocks",
    "HaloStep",
    "HaloPlan",
    "plan_halo",
    "window_pairs",
    "zigzag_layout",
    "contiguous_layout",
    "hybrid_layout",
    "halo_tokens",
    "run_pairs",
]


class Shape(Enum):
    """How a block's seen pairs lie (rows = queries, columns = keys, both in increasing position)."""

    FULL = "full"  # every pair seen
    CAUSAL = "causal"  # square, row r sees columns <= r (top-left)
    ANTI = "anti"  # square, row r sees columns >= r: causal on rows and columns reversed
    MASKED = "masked"  # anything else: a mask from positions (window and document)


@dataclass(frozen=True)
class Block:
    rows: slice  # query buffer indices
    cols: slice  # key buffer indices
    shape: Shape


def runs_of(positions, docs=None, start: int = 0) -> List[Run]:
    """A buffer's positions (and documents) -> its maximal runs; ``start``: the buffer index of ``positions[0]``.
    Host work, vectorised (a layout is planned once per batch, never per token in Python).

    >>> runs_of([4, 5, 6, 0, 1])
    [Run(index=0, pos=4, n=3, doc=0), Run(index=3, pos=0, n=2, doc=0)]
    """
    pos = torch.as_tensor(positions, dtype=torch.long).cpu().reshape(-1)
    if pos.numel() == 0:
        return []
    doc = torch.zeros_like(pos) if docs is None else torch.as_tensor(docs, dtype=torch.long).cpu().reshape(-1)
    cut = torch.ones_like(pos, dtype=torch.bool)
    cut[1:] = (pos[1:] != pos[:-1] + 1) | (doc[1:] != doc[:-1])
    first = cut.nonzero().flatten()
    lengths = torch.diff(first, append=torch.tensor([pos.numel()]))
    return [
        Run(start + i, p, n, d)
        for i, p, n, d in zip(first.tolist(), pos[first].tolist(), lengths.tolist(), doc[first].tolist())
    ]


def layout_runs(positions: Sequence, docs: Optional[Sequence] = None) -> Tuple[Tuple[Run, ...], ...]:
    """Every rank's runs: ``positions[r]`` the global positions rank ``r`` holds (in its order), ``docs[r]`` their
    documents (None: one document)."""
    return tuple(tuple(runs_of(p, None if docs is None else docs[r])) for r, p in enumerate(positions))


@functools.lru_cache(maxsize=64)
def layout_positions(layout: Tuple[Tuple[Run, ...], ...]) -> torch.Tensor:
    """``[S]`` global positions of every rank's tokens, rank after rank (what an all-to-all over the group gathers)."""
    parts = [torch.arange(x.pos, x.pos + x.n) for rank in layout for x in sorted(rank, key=lambda x: x.index)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _edge(shape: Shape, t: int, lo: int, hi: int, klo: int, khi: int) -> List[Tuple[int, int, int, int, Shape]]:
    """The segment ``[lo, hi)`` of key positions of a tile of ``t`` rows, clipped to the run ``[klo, khi)``, as
    ``(row_lo, row_hi, key_lo, key_hi, shape)`` pieces (rows relative to the tile). A clipped edge stays exact, no
    mask: with columns ``[x, y)`` of a causal square left, rows ``< x`` see none of them, rows ``x .. y-1`` a causal
    square and rows ``>= y`` all of them (a full block); an anti-causal square mirrors it.

    >>> _edge(Shape.CAUSAL, 4, 10, 14, 12, 20)      # keys 12, 13 of a causal square at 10..13
    [(2, 4, 12, 14, <Shape.CAUSAL: 'causal'>)]
    >>> _edge(Shape.ANTI, 4, 10, 14, 0, 12)         # keys 10, 11 of an anti-causal square at 10..13
    [(0, 2, 10, 12, <Shape.ANTI: 'anti'>)]
    """
    a, b = max(lo, klo), min(hi, khi)
    if a >= b:
        return []
    if shape in (Shape.FULL, Shape.MASKED) or (a, b) == (lo, hi):
        return [(0, t, a, b, shape)]
    x, y = a - lo, b - lo  # the columns left, relative to the square
    if shape is Shape.CAUSAL:
        pieces = [(x, y, a, b, Shape.CAUSAL), (y, t, a, b, Shape.FULL)]
    else:
        pieces = [(0, x, a, b, Shape.FULL), (x, y, a, b, Shape.ANTI)]
    return [p for p in pieces if p[0] < p[1]]


def _segments(w: Window, a: int, t: int) -> List[Tuple[int, int, Shape]]:
    """Key position segments of the query tile ``a .. a+t-1`` (see the module docstring)."""
    if t > w.width - 1:  # edges would overlap: one masked block
        lo, hi = w.reach(a, a + t - 1)
        return [(lo, hi, Shape.MASKED)]
    segs = []
    if w.left < UNBOUNDED:
        segs.append((a - w.left, a - w.left + t, Shape.ANTI))
    full_lo = a - w.left + t if w.left < UNBOUNDED else -UNBOUNDED
    full_hi = a + w.right if w.right < UNBOUNDED else UNBOUNDED
    segs.append((full_lo, full_hi, Shape.FULL))
    if w.right < UNBOUNDED:
        segs.append((a + w.right, a + w.right + t, Shape.CAUSAL))
    return segs


def window_blocks(q_runs: Sequence[Run], k_runs: Sequence[Run], window: Window, tile: int, wide: int) -> List[Block]:
    """The blocks to compute for queries ``q_runs`` against keys ``k_runs``: row tiles of at most ``tile`` rows,
    each against the shaped pieces of every key run of its document; a full piece is cut into ``wide`` columns at
    most (its dropout mask stays bounded). Nothing outside the window is ever listed."""
    out: List[Block] = []
    for qr in q_runs:
        for off in range(0, qr.n, tile):
            t = min(tile, qr.n - off)
            a = qr.pos + off
            for kr in k_runs:
                if kr.doc != qr.doc:
                    continue
                for seg in _segments(window, a, t):
                    for r0, r1, lo, hi, shape in _edge(seg[2], t, seg[0], seg[1], kr.pos, kr.pos + kr.n):
                        rows = slice(qr.index + off + r0, qr.index + off + r1)
                        step = wide if shape is Shape.FULL else hi - lo
                        for c in range(lo, hi, step):
                            e = min(hi, c + step)
                            cols = slice(kr.index + c - kr.pos, kr.index + e - kr.pos)
                            out.append(Block(rows, cols, shape))
    return out


def window_pairs(positions: Sequence[int], window: Window, docs: Optional[Sequence[int]] = None) -> int:
    """(query, key) pairs seen in a sequence: what a windowed layer must compute (benchmarks compare with it)."""
    pos = torch.as_tensor(list(positions))
    doc = torch.zeros_like(pos) if docs is None else torch.as_tensor(list(docs))
    total = 0
    for d in doc.unique().tolist():
        p = pos[doc == d].sort().values
        lo = torch.searchsorted(p, p - min(window.left, 1 << 40))
        hi = torch.searchsorted(p, p + min(window.right, 1 << 40), right=True)
        total += int((hi - lo).sum())
    return total


# ------------------------------------------------------------------------------------------ halo exchange
@dataclass(frozen=True)
class HaloStep:
    """Step ``t`` of the exchange: this rank sends the tokens ``send`` (buffer index ranges, in order) to the rank
    ``t`` places after it and receives ``recv`` (runs of the receive buffer, index 0 upwards) from the rank ``t``
    places before it. Either may be empty on a given rank; the step exists because some rank uses it."""

    t: int
    send: Tuple[Tuple[int, int], ...]
    recv: Tuple[Run, ...]

    @property
    def send_count(self) -> int:
        return sum(b - a for a, b in self.send)

    @property
    def recv_count(self) -> int:
        return sum(r.n for r in self.recv)


@dataclass(frozen=True)
class HaloPlan:
    """Everything one rank needs for a windowed layer: its own runs and the steps with traffic, in order."""

    rank: int
    size: int
    mine: Tuple[Run, ...]
    steps: Tuple[HaloStep, ...]

    def bytes_per_token(self) -> Dict[str, int]:
        """Tokens sent and received by this rank (one K/V token each)."""
        return {"sent": sum(s.send_count for s in self.steps), "received": sum(s.recv_count for s in self.steps)}


def _needed(want: Sequence[Run], have: Sequence[Run], window: Window) -> List[Tuple[int, int]]:
    """Index ranges of ``have``'s buffer (in order) holding a key some query of ``want`` sees."""
    spans = []
    for kr in have:
        hit = []
        for qr in want:
            if qr.doc != kr.doc:
                continue
            lo, hi = window.reach(qr.pos, qr.pos + qr.n - 1)
            a, b = max(lo, kr.pos), min(hi, kr.pos + kr.n)
            if a < b:
                hit.append((a, b))
        if hit:
            hit.sort()
            merged = [list(hit[0])]
            for a, b in hit[1:]:
                if a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            spans += [(kr.index + a - kr.pos, kr.index + b - kr.pos) for a, b in merged]
    return sorted(spans)


def _runs_at(have: Sequence[Run], ranges: Sequence[Tuple[int, int]]) -> List[Run]:
    """The runs (positions, documents) of ``have``'s buffer ranges, renumbered as a new buffer from index 0."""
    out, at = [], 0
    for a, b in ranges:
        for kr in have:
            lo, hi = max(a, kr.index), min(b, kr.index + kr.n)
            if lo < hi:
                out.append(Run(at, kr.pos + lo - kr.index, hi - lo, kr.doc))
                at += hi - lo
    return out


def plan_halo(rank_runs: Sequence[Sequence[Run]], rank: int, window: Window) -> HaloPlan:
    """The halo exchange of ``rank`` among ``len(rank_runs)`` ranks whose tokens are ``rank_runs[r]``.

    Step ``t`` pairs every rank ``r`` with ``r + t`` (sends) and ``r - t`` (receives), all mod ``P``: the keys of
    rank ``r - t`` that some query of ``r`` sees travel directly, once. Steps no rank uses are left out, so a
    window shorter than a shard exchanges with the neighbours only (a halo) and a longer one with as many ranks
    as it reaches (a partial ring).

    >>> zig = [runs_of([0, 1, 6, 7]), runs_of([2, 3, 4, 5])]       # zigzag, S = 8, P = 2
    >>> [(s.t, s.send, s.recv) for s in plan_halo(zig, 0, Window(1, 0)).steps]
    [(1, ((1, 2),), (Run(index=0, pos=5, n=1, doc=0),))]
    """
    P = len(rank_runs)
    steps = []
    for t in range(1, P):
        send = {r: _needed(rank_runs[(r + t) % P], rank_runs[r], window) for r in range(P)}
        if not any(send.values()):
            continue
        src = (rank - t) % P
        recv = _runs_at(rank_runs[src], send[src])
        steps.append(HaloStep(t, tuple(send[rank]), tuple(recv)))
    return HaloPlan(rank, P, tuple(rank_runs[rank]), tuple(steps))
