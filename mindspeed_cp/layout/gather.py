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

* :func:`causal_tiles` - causal attention in the zigzag layout (above); ``rows`` cuts tiles to at most that many rows
  (where a per-score object is built: dropout masks, the math kernel), a diagonal tile becoming a full part and a
  smaller diagonal.
* :func:`full_tiles` - every row tile against every key (a general mask: its columns are global, so a tile's mask
  is a slice of it; no mask and not causal: full attention).
* :func:`document_tiles` - packed documents: each row tile sees one contiguous range, from the start of the document
  of its first row to its last row (:meth:`Documents.gather_spans`); the block mask inside it comes from document ids.
* :func:`gather_order` - where each rank's tokens go in the gathered sequence (rank order -> global positions).

A tile whose keys are exactly a run of the rank's own tokens says where they are locally (``local``): it can be
computed before the gather arrives. Sliding windows and sinks (not yet supported by this algorithm, see
:meth:`mindspeed_cp.config.CPConfig.feature_problem`) fit this shape: a window restricts each tile's key range (and
the gather to the ranks a window reaches), a sink is one more term of the float32 merge of a row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

from .sharding import zigzag_index

__all__ = ["Tile", "causal_tiles", "full_tiles", "document_tiles", "gather_order", "tile_pairs"]


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


def causal_tiles(P: int, r: int, s: int, rows: Optional[int] = None) -> List[Tile]:
    """Causal attention of rank ``r`` of ``P`` holding ``s`` tokens in the zigzag layout (chunks ``r`` and
    ``2P-1-r`` of ``c = s/2``): per chunk ``x``, its rows see keys ``0 .. x c`` fully and their own chunk causally."""
    c = s // 2
    tiles = []
    for half, x in enumerate((r, 2 * P - 1 - r)):
        rows_ = (half * c, (half + 1) * c)
        if x:
            tiles.append(Tile(rows_, (0, x * c)))
        tiles.append(Tile(rows_, (x * c, (x + 1) * c), True, half * c))
    return [piece for t in tiles for piece in _cut(t, rows)]


def full_tiles(s: int, S: int, rows: Optional[int] = None) -> List[Tile]:
    """Every row (in tiles of ``rows``, default all) against all ``S`` keys."""
    step = rows or s
    return [Tile((i, min(i + step, s)), (0, S)) for i in range(0, s, step)]


def document_tiles(documents, j: int, rows: int) -> List[Tile]:
    """Packed documents, ring position ``j`` (its ``T/R`` tokens): tiles of ``rows`` rows, each against the one key
    range its documents reach (:meth:`mindspeed_cp.layout.packing.Documents.gather_spans`)."""
    n = documents.padded_len // documents.ring
    spans = documents.gather_spans(j, rows)
    return [Tile((i * rows, min((i + 1) * rows, n)), span) for i, span in enumerate(spans)]


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
