"""Which keys each query tile of an all-gather CP rank attends to: the plan of ``kvallgather_cp_algo``. Pure.

After the all-gather every rank holds the K/V of the whole sequence in *global order* (padded positions
``0..S-1``); its own queries stay where the layout put them (Megatron's zigzag, or the per-document zigzag of
:mod:`mindspeed_cp.layout.packing`). A plan is a list of :class:`Tile`: local query rows x one contiguous range of
global key positions, computed with no communication from the layout alone. Worked example, S = 16, P = 2 (zigzag
chunks of c = 4: rank 0 holds positions 0-3 and 12-15, rank 1 holds 4-7 and 8-11)::

    causal_tiles(P=2, r=0, s=8)  rows 0-3 x keys 0-4   causal (its own chunk 0)      10 pairs
                                 rows 4-7 x keys 0-12  full                          48 pairs
                                 rows 4-7 x keys 12-16 causal (its own chunk 3)      10 pairs   = 68
    causal_tiles(P=2, r=1, s=8)  rows 0-3 x keys 0-4 full, keys 4-8 causal           26 pairs
                                 rows 4-7 x keys 0-8 full, keys 8-12 causal          42 pairs   = 68

Every rank computes the same number of pairs - rank r: ``r c^2 + (2P-1-r) c^2`` full plus two triangles,
``(2P-1) c^2 + c (c+1)``, independent of r - so no rank waits for another at the reduce-scatter.

* :func:`run_tiles` - the rule behind both causal plans: a rank's tokens are runs of consecutive positions inside
  one chunk of one document; a run's rows see the keys of their document before the run fully and the run itself
  causally.
  ``rows`` cuts tiles to at most that many rows (where a per-score object is built: dropout masks, the math
  kernel), a diagonal tile becoming a full part and a smaller diagonal.
* :func:`causal_tiles` - causal attention in the zigzag layout (above: one document, two runs per rank).
* :func:`document_tiles` - packed documents (the per-document zigzag: two runs per document per rank), when every
  sample has the same layout: no mask at all, only full and diagonal tiles, and every rank the same tiles' sizes.
* :func:`document_span_tiles` - packed documents laid out differently per sample: each row tile sees one range, from
  the start of the document of its first row to its last row in any sample (:meth:`Documents.gather_spans`); the
  block mask inside it comes from document ids.
* :func:`full_tiles` - every row tile against every key (a general mask: its columns are global, so a tile's mask
  is a slice of it; no mask and not causal: full attention).
* :func:`gather_order` - where each rank's tokens go in the gathered sequence (rank order -> global positions).

A tile whose keys are exactly a run of the rank's own tokens says where they are locally (``local``): it can be
computed before the gather arrives. A sliding window does not come here: a windowed layer gathers only what its
windows reach, which is the halo exchange of :mod:`mindspeed_cp.window_ring` (its plan: :func:`mindspeed_cp.layout.
window.plan_halo`); a sink is one more term of the float32 merge of a row (:mod:`mindspeed_cp.blocks`).
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
    "document_tiles",
    "document_span_tiles",
    "full_tiles",
    "gather_order",
    "tile_pairs",
    "document_scores",
]


@dataclass(frozen=True)
class Tile:
    """Local query rows ``[rows[0], rows[1])`` x global key positions ``[keys[0], keys[1])``.

    ``causal``: a square tile on the diagonal, row ``i`` of it sees keys ``keys[0] .. keys[0] + i`` (top-left, the
    kernels' causal). ``local``: the local row where the tile's keys start when they are the rank's own tokens in
    the same order (then they need no gather), else None.
    """

    rows: Tuple[int, int]
    keys: Tuple[int, int]
    causal: bool = False
    local: Optional[int] = None

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)

    @property
    def key_slice(self) -> slice:
        return slice(*self.keys)

    @property
    def local_slice(self) -> Optional[slice]:
        """The local rows holding the tile's keys (None: they come from the gather)."""
        return None if self.local is None else slice(self.local, self.local + self.keys[1] - self.keys[0])


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
        local = None if tile.local is None else tile.local + o
        if o:
            out.append(Tile((i, j), (k0, k0 + o), False, tile.local))
        out.append(Tile((i, j), (k0 + o, k0 + o + j - i), True, local))
    return out


def run_tiles(
    positions: Sequence[int], starts: Sequence[int], chunks: Sequence, rows: Optional[int] = None
) -> List[Tile]:
    """Causal tiles of a rank whose row ``i`` is the token at global position ``positions[i]``, in a document starting
    at ``starts[i]``, in the layout's chunk ``chunks[i]``: per run of consecutive positions inside one chunk (rows
    ``a..e``, positions ``p..p+e-a``), a full tile on the document's keys before it (``starts .. p``, if any) and a
    diagonal tile on the run itself (its own keys: ``local`` = a). Runs stop at chunk borders even where the next
    chunk follows (the middle rank's two chunks): every rank then gets tiles of the same sizes."""
    tiles, a, n = [], 0, len(positions)
    for e in range(1, n + 1):
        if e < n and positions[e] == positions[e - 1] + 1 and chunks[e] == chunks[a]:
            continue
        p = positions[a]
        if p > starts[a]:
            tiles.append(Tile((a, e), (starts[a], p)))
        tiles.append(Tile((a, e), (p, p + e - a), True, a))
        a = e
    return [piece for t in tiles for piece in _cut(t, rows)]


def causal_tiles(P: int, r: int, s: int, rows: Optional[int] = None) -> List[Tile]:
    """Causal attention of rank ``r`` of ``P`` holding ``s`` tokens in the zigzag layout (chunks ``r`` and
    ``2P-1-r`` of ``c = s/2``): per chunk ``x``, its rows see keys ``0 .. x c`` fully and their own chunk causally."""
    c = s // 2
    return run_tiles(zigzag_index(s * P, P, r).tolist(), [0] * s, [0] * c + [1] * (s - c), rows)


def document_tiles(documents, j: int, rows: Optional[int] = None) -> List[Tile]:
    """Packed documents of one layout for every sample (:attr:`Documents.same_layout`), ring position ``j``: the runs
    of the per-document zigzag (each document's chunks ``j`` and ``2R-1-j``) by :func:`run_tiles` - no mask; pads sit
    at their document's end and are a part of it, as :meth:`Documents.block_mask` has them."""
    positions, inside, chunk = documents.host_positions(j)
    starts = [p - i for p, i in zip(positions, inside)]
    return run_tiles(positions, starts, list(zip(starts, chunk)), rows)


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
