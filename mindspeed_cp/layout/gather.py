"""Which keys each query tile of an all-gather CP rank attends to: the plan of ``kvallgather_cp_algo``. Pure.

After the all-gather every rank holds the K/V of the whole sequence in *global order* (padded positions
``0..S-1``); its own queries stay where the layout put them (Megatron's zigzag, or the per-document zigzag of
:mod:`mindspeed_cp.layout.packing`). A plan is a list of :class:`Tile`: local query rows x one contiguous range of
keys, computed with no communication from the layout alone - either global positions of the gathered K/V, or
(``own``) local rows of the rank's own K/V, which need no gather. Worked example, S = 16, P = 2 (zigzag chunks of
c = 4: rank 0 holds positions 0-3 and 12-15, rank 1 holds 4-7 and 8-11)::

    causal_tiles(P=2, r=0, s=8)  rows 4-7 x gathered keys 4-12   full                         32 pairs
                                 rows 0-7 x own keys 0-8         causal (positions 0-3, 12-15) 36 pairs   = 68
    causal_tiles(P=2, r=1, s=8)  rows 0-7 x gathered keys 0-4    full                         32 pairs
                                 rows 0-7 x own keys 0-8         causal (positions 4-11)       36 pairs   = 68

Every rank computes the same number of pairs - ``(2P-1) c^2 + c (c+1)`` per head, independent of r - so no rank
waits for another at the reduce-scatter; and in at most three kernel calls (rank 0 and the middle rank: two): the
rank's two chunks together against its own keys (one causal square, top-left aligned: the later chunk sees the
earlier fully, each itself causally), all rows against the keys before its first chunk, and the second chunk's rows
against the keys between its chunks.

* :func:`run_tiles` - the rule behind both causal plans: a rank's tokens of one document are consecutive local rows
  in increasing position order, in runs of consecutive positions; the rows see their own tokens of the document
  causally (one own tile) and, from the gather, the document's keys before their first run fully and each gap
  between two runs from the later run's first row on. ``rows`` cuts tiles to at most that many rows (where a
  per-score object is built: dropout masks, the math kernel), a diagonal tile becoming a full part and a smaller
  diagonal.
* :func:`causal_tiles` - causal attention in the zigzag layout (above: one document, two runs per rank).
* :func:`document_tiles` - packed documents (the per-document zigzag: two runs per document per rank), when every
  sample has the same layout: no mask at all, only full and diagonal tiles, and every rank the same pairs.
* :func:`document_span_tiles` - packed documents laid out differently per sample: each row tile sees one range, from
  the start of the document of its first row to its last row in any sample (:meth:`Documents.gather_spans`); the
  block mask inside it comes from document ids.
* :func:`full_tiles` - every row tile against every key (a general mask: its columns are global, so a tile's mask
  is a slice of it; no mask and not causal: full attention).
* :func:`gather_order` - where each rank's tokens go in the gathered sequence (rank order -> global positions);
  :func:`order_runs` / :func:`zigzag_runs` - the same as runs of consecutive positions (one strided copy each).

A sliding window does not come here: a windowed layer gathers only what its windows reach, which is the halo
exchange of :mod:`mindspeed_cp.window_ring` (its plan: :func:`mindspeed_cp.layout.window.plan_halo`); a sink is one
more term of the float32 merge of a row (:mod:`mindspeed_cp.blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch

from .sharding import zigzag_index

__all__ = [
    "Tile",
    "run_tiles",
    "causal_tiles",
    "block_tiles",
    "document_tiles",
    "document_span_tiles",
    "full_tiles",
    "gather_order",
    "order_runs",
    "zigzag_runs",
    "tile_pairs",
    "document_scores",
]


@dataclass(frozen=True)
class Tile:
    """Local query rows ``[rows[0], rows[1])`` x keys ``[keys[0], keys[1])``: global positions of the gathered K/V;
    when ``own``, local rows of the rank's own K/V (computed before, and without, the gather); with ``block`` = j,
    local rows of rank j's gathered K/V (its tokens in its own order: no reordering of what the gather delivered).

    ``causal``: a square tile on the diagonal, row ``i`` of it sees keys ``keys[0] .. keys[0] + i`` (top-left, the
    kernels' causal).
    """

    rows: Tuple[int, int]
    keys: Tuple[int, int]
    causal: bool = False
    own: bool = False
    block: Optional[int] = None

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)

    @property
    def key_slice(self) -> slice:
        return slice(*self.keys)


def _cut(tile: Tile, rows: Optional[int]) -> List[Tile]:
    """``tile`` in pieces of at most ``rows`` rows. A piece of a diagonal tile that starts ``o`` rows in sees the
    first ``o`` keys fully and the next ones causally: a full tile and a smaller diagonal one."""
    a, e = tile.rows
    if rows is None or e - a <= rows:
        return [tile]
    out = []
    for i in range(a, e, rows):
        j = min(i + rows, e)
        if not tile.causal:
            out.append(replace(tile, rows=(i, j)))
            continue
        o, k0 = i - a, tile.keys[0]
        if o:
            out.append(replace(tile, rows=(i, j), keys=(k0, k0 + o), causal=False))
        out.append(replace(tile, rows=(i, j), keys=(k0 + o, k0 + o + j - i)))
    return out


def run_tiles(positions: Sequence[int], starts: Sequence[int], rows: Optional[int] = None) -> List[Tile]:
    """Causal tiles of a rank whose row ``i`` is the token at global position ``positions[i]``, in a document starting
    at ``starts[i]``; a document's tokens are consecutive rows in increasing position order. Per document (rows
    ``a..e``, in runs of consecutive positions ``x_k .. x_k + n_k`` from row ``a_k``): one own causal tile on the
    rows themselves, a full tile of every row on the document's keys before the first run (``starts .. x_0``, if
    any), and one of the rows from ``a_k`` on for each gap ``x_(k-1) + n_(k-1) .. x_k`` between runs."""
    tiles, a, n = [], 0, len(positions)
    for e in range(1, n + 1):
        if e < n and starts[e] == starts[a]:
            continue
        for i in range(a, e):
            if i == a or positions[i] != positions[i - 1] + 1:  # a run starts at row i: the keys before it
                gap = (starts[a], positions[a]) if i == a else (positions[i - 1] + 1, positions[i])
                if gap[1] > gap[0]:
                    tiles.append(Tile((i, e), gap))
        tiles.append(Tile((a, e), (a, e), True, True))
        a = e
    return [piece for t in tiles for piece in _cut(t, rows)]


def causal_tiles(P: int, r: int, s: int, rows: Optional[int] = None) -> List[Tile]:
    """Causal attention of rank ``r`` of ``P`` holding ``s`` tokens in the zigzag layout (chunks ``r`` and
    ``2P-1-r`` of ``c = s/2``): all rows against the keys ``0 .. r c`` (rank 0: none), the second chunk's rows against
    ``(r+1) c .. (2P-1-r) c`` (the middle rank: none), and both chunks against themselves causally (own keys)."""
    return run_tiles(zigzag_index(s * P, P, r).tolist(), [0] * s, rows)


def block_tiles(P: int, r: int, s: int, causal: bool = True, rows: Optional[int] = None) -> List[Tile]:
    """Rank ``r``'s tiles against every rank's block of gathered keys as delivered (zigzag layout, ``c = s/2``): its
    own block first (causal: top-left over its two chunks, the later seeing the earlier fully), then per rank ``j``:
    ``j < r`` all rows against j's first chunk, ``j > r`` the second chunk's rows against both of j's chunks (causal);
    every rank against every block (not causal). ``P`` kernel calls, each the same ``2c^2`` pairs when causal: the
    ring's steps, on keys gathered at once. Worked example, P = 2, s = 8: rank 0 - rows 0-8 x own 0-8 causal, rows
    4-8 x block 1 keys 0-8; rank 1 - rows 0-8 x own 0-8 causal, rows 0-8 x block 0 keys 0-4 (68 pairs each)."""
    c = s // 2
    tiles = [Tile((0, s), (0, s), causal, True)]
    for j in range(P):
        if j != r:
            rows_, keys = ((0, s), (0, c)) if causal and j < r else ((c, s) if causal else (0, s), (0, s))
            tiles.append(Tile(rows_, keys, block=j))
    return [piece for t in tiles for piece in _cut(t, rows)]


def document_tiles(documents, j: int, rows: Optional[int] = None) -> List[Tile]:
    """Packed documents of one layout for every sample (:attr:`Documents.same_layout`), ring position ``j``: the runs
    of the per-document zigzag (each document's chunks ``j`` and ``2R-1-j``) by :func:`run_tiles` - no mask; pads sit
    at their document's end and are a part of it, as :meth:`Documents.block_mask` has them."""
    positions, inside, _ = documents.host_positions(j)
    return run_tiles(positions, [p - i for p, i in zip(positions, inside)], rows)


def document_span_tiles(documents, j: int, rows: int) -> List[Tile]:
    """Packed documents laid out differently per sample, ring position ``j`` (its ``T/R`` tokens): tiles of ``rows``
    rows, each against the one key range its documents reach in any sample (:meth:`Documents.gather_spans`), with the
    block mask from document ids."""
    n = documents.padded_len // documents.ring
    spans = documents.gather_spans(j, rows)
    return [Tile((i * rows, min((i + 1) * rows, n)), span) for i, span in enumerate(spans)]


def full_tiles(s: int, S: int, rows: Optional[int] = None) -> List[Tile]:
    """Every row (in tiles of ``rows``, default all) against all ``S`` keys."""
    step = rows or s
    return [Tile((i, min(i + step, s)), (0, S)) for i in range(0, s, step)]


def gather_order(S: int, P: int, device=None) -> torch.Tensor:
    """``[S]``: the global position of every token of the gathered buffer in rank order (rank 0's ``S/P`` zigzag
    tokens, then rank 1's, ...): ``gathered[i]`` belongs at position ``order[i]``."""
    return torch.cat([zigzag_index(S, P, j, device) for j in range(P)])


def order_runs(order: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``order`` (:func:`gather_order`: the global position of every row of the gathered buffer) as runs ``(src, dst,
    n)``: gathered rows ``src .. src+n`` are global positions ``dst .. dst+n``. Worked example, S = 8, P = 2 (zigzag
    chunks of 2): order ``[0, 1, 6, 7, 2, 3, 4, 5]`` -> ``[(0, 0, 2), (2, 6, 2), (4, 2, 4)]`` (rank 1's two chunks
    are adjacent: one run)."""
    runs: List[Tuple[int, int, int]] = []
    for i, p in enumerate(order):
        if runs and runs[-1][1] + runs[-1][2] == p:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, p, 1))
    return runs


def zigzag_runs(S: int, P: int) -> List[Tuple[int, int, int]]:
    """:func:`order_runs` of the zigzag :func:`gather_order` in O(P): rank ``j``'s chunks ``j`` and ``2P-1-j``."""
    c = S // (2 * P)
    runs = []
    for j in range(P):
        runs += [(2 * j * c, j * c, c), ((2 * j + 1) * c, (2 * P - 1 - j) * c, c)]
    return _join_runs(runs)


def _join_runs(runs: List[Tuple[int, int, int]]) -> List[Tuple[int, int, int]]:
    """Adjacent runs that continue each other (in the gathered buffer and in global order) as one."""
    out: List[Tuple[int, int, int]] = []
    for src, dst, n in runs:
        if out and out[-1][0] + out[-1][2] == src and out[-1][1] + out[-1][2] == dst:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((src, dst, n))
    return out


def tile_pairs(tiles: List[Tile]) -> int:
    """Query-key pairs the tiles compute per head (a diagonal tile: its triangle with the diagonal)."""
    total = 0
    for t in tiles:
        n, m = t.rows[1] - t.rows[0], t.keys[1] - t.keys[0]
        total += n * (n + 1) // 2 if t.causal else n * m
    return total


def document_scores(documents, tile: int) -> dict:
    """What the all-gather hands its kernels with packed documents, per ring position: ``computed`` score elements
    (each tile's rows x its key range; a diagonal tile its triangle, as causal kernels skip the rest) and ``calls``
    (tiles, one kernel call each), with the
    tiles the algorithm uses (:func:`document_tiles`, or :func:`document_span_tiles` of ``tile`` rows when the
    samples' layouts differ). Per head; pads included. (The ring's: :func:`mindspeed_cp.layout.packing.
    computed_scores`.)"""
    computed, calls = [], []
    for r in range(documents.ring):
        same = documents.same_layout
        tiles = document_tiles(documents, r) if same else document_span_tiles(documents, r, tile)
        computed.append(tile_pairs(tiles))
        calls.append(len(tiles))
    return {"computed": computed, "calls": calls}
