"""Packed documents under CP: document-causal attention from document boundaries, never an S x S mask.

A packed sample is several documents one after the other; a token attends to the earlier tokens of its own
document only. :class:`Documents` holds the documents of a batch and the layout of their tokens over the
CP ranks; every algorithm takes it (``documents=``) in place of a mask and builds, per computed block, the
block's own mask from document ids and positions (the only O(s^2) object, one block at a time).

Layout: **per-document zigzag** (MindSpeed's EOD reset, Transformer Engine's THD), chosen because a global
zigzag is no longer balanced once documents cut the causal triangle, while this one is balanced for any
document lengths: every document is padded at its end to a multiple of ``2R`` (R = ring size) and cut into
``2R`` chunks; ring position ``j`` holds chunks ``j`` and ``2R-1-j`` of *every* document, so each rank gets
the same share of every document's triangle. Hybrid then splits a ring position's tokens contiguously among
its U Ulysses ranks (the sample is padded at its end to a multiple of ``2RU``), as for plain sequences.
Ulysses needs no padding and no reordering: its ranks hold contiguous slices and the all-to-all
re-assembles the whole sequence.

    docs = Documents.from_lengths([[700, 1, 300]], cp=4, ring=4)   # one sample of 3 documents, Ring CP=4
    x_local = docs.shard(x_full, rank)          # [S, b, ...] -> [s_local, b, ...], pads filled with 0
    out = ring_attention(q, k, v, ring_group, documents=docs)
    y_full = docs.unshard([y_rank0, y_rank1, ...])                 # the real tokens back in global order

Padding is exact for causal attention: pads sit at the end of their document, so no real token sees them;
pads attend within their document (never a fully masked row), are stripped by :meth:`unshard` and must be
left out of the loss (``Documents.real`` is False there). Coordinates: ``padded`` positions number the
tokens of the padded sample ``0..T-1`` (documents in order, each followed by its pads); a block's mask is
``ids[q] != ids[k] or pos[k] > pos[q]`` on padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "Documents",
    "lengths_from_cu_seqlens",
    "lengths_from_position_ids",
    "lengths_from_eod",
    "layout_work",
    "computed_scores",
]


def lengths_from_cu_seqlens(cu_seqlens: Sequence[int]) -> List[int]:
    """``[0, 5, 9, 12]`` -> ``[5, 4, 3]`` (megatron-core THD's cumulative lengths)."""
    cu = [int(x) for x in cu_seqlens]
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu}")
    return [b - a for a, b in zip(cu, cu[1:]) if b > a]


def lengths_from_position_ids(position_ids: Tensor) -> List[List[int]]:
    """Document lengths per sample from ``--reset-position-ids`` positions (a document starts where the position
    is 0). ``position_ids`` ``[b, S]``."""
    out = []
    for row in position_ids.detach().cpu().tolist():
        starts = [i for i, p in enumerate(row) if p == 0 or i == 0]
        out.append([b - a for a, b in zip(starts, starts[1:] + [len(row)])])
    return out


def lengths_from_eod(tokens: Tensor, eod: int) -> List[List[int]]:
    """Document lengths per sample from EOD tokens (Megatron's dataset: the EOD token ends its document)."""
    out = []
    for row in tokens.detach().cpu().tolist():
        ends = [i + 1 for i, t in enumerate(row) if t == eod and i + 1 < len(row)] + [len(row)]
        out.append([b - a for a, b in zip([0] + ends[:-1], ends)])
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class Documents:
    """The documents of a batch and where their tokens live on the CP ranks (see the module docstring).

    ``lengths[b]``: document lengths of sample b (sum = the sample's length S). ``cp`` ranks, ``ring`` of them
    per ring (``cp // ring`` Ulysses ranks per ring position; ``ring = 1``: Ulysses only, no padding).
    """

    lengths: List[List[int]]
    cp: int
    ring: int

    def __post_init__(self) -> None:
        if not self.lengths or any(not row or min(row) < 1 for row in self.lengths):
            raise ValueError(f"every sample needs documents of length >= 1, got {self.lengths}")
        if len({sum(row) for row in self.lengths}) != 1:
            raise ValueError(
                f"every sample of a batch must have the same length, got {[sum(row) for row in self.lengths]}"
            )
        if self.cp < 1 or self.ring < 1 or self.cp % self.ring:
            raise ValueError(f"ring size {self.ring} must divide the CP size {self.cp}")
        self.seq_len = sum(self.lengths[0])
        R, U = self.ring, self.cp // self.ring
        m = 2 * R if R > 1 else 1
        padded = [[_round_up(n, m) for n in row] for row in self.lengths]
        total = max(sum(row) for row in padded)
        self.padded_len = _round_up(total, m * U) if R > 1 else self.seq_len
        # the tail of every sample becomes one more (pad-only) document
        self.padded = [row + ([self.padded_len - sum(row)] if self.padded_len > sum(row) else []) for row in padded]
        ids, source, inside, order = [], [], [], []
        for row_len, row_pad in zip(self.lengths, self.padded):
            i_ids, i_src, i_in, start = [], [], [], 0
            for d, p in enumerate(row_pad):
                n = row_len[d] if d < len(row_len) else 0
                i_ids += [d] * p
                i_src += list(range(start, start + n)) + [-1] * (p - n)
                i_in += range(p)
                start += n
            ids.append(i_ids)
            source.append(i_src)
            inside.append(i_in)
            order.append(self._order(row_pad))
        self.ids = torch.tensor(ids, dtype=torch.int32)  # [b, T] document id of every padded position
        self.source = torch.tensor(source, dtype=torch.long)  # [b, T] original position, -1 for a pad
        self.order = torch.tensor(order, dtype=torch.long)  # [b, T] padded positions in rank order
        self.inside = torch.tensor(inside, dtype=torch.long)  # [b, T] position inside its document (pads count on)
        # CPU copies for planning (spans, the MTP shift), whatever device .to() moves to
        self._host = (self.ids, self.order, self.source)
        self._host_inside = self.inside
        self._rope, self._spans, self._shifts = {}, {}, {}

    def _order(self, row_pad: List[int]) -> List[int]:
        """Padded positions in CP rank order: ring position j's tokens (chunks j and 2R-1-j of every document),
        then j+1's; Ulysses ranks split each ring position's run contiguously."""
        R = self.ring
        if R == 1:
            return list(range(self.padded_len))
        runs = [[] for _ in range(R)]
        start = 0
        for p in row_pad:
            c = p // (2 * R)
            for j in range(R):
                runs[j] += list(range(start + j * c, start + (j + 1) * c))
                runs[j] += list(range(start + (2 * R - 1 - j) * c, start + (2 * R - j) * c))
            start += p
        return [x for run in runs for x in run]

    # ------------------------------------------------------------------ where tokens are
    @property
    def ulysses(self) -> int:
        return self.cp // self.ring

    def local_len(self, rank: int) -> int:
        if self.ring == 1:  # Ulysses: contiguous, possibly uneven
            return len(torch.tensor_split(torch.arange(self.padded_len), self.cp)[rank])
        return self.padded_len // self.cp

    def positions(self, rank: int) -> Tensor:
        """``[b, s_local]`` padded positions held by CP rank ``rank`` (ring position ``rank // U``)."""
        if self.ring == 1:
            return torch.tensor_split(self.order, self.cp, dim=1)[rank]
        n = self.padded_len // self.cp
        return self.order[:, rank * n : (rank + 1) * n]

    def ring_positions(self, j: int) -> Tensor:
        """``[b, T/R]`` padded positions of ring position ``j`` (its U Ulysses ranks' tokens, in order)."""
        n = self.padded_len // self.ring
        return self.order[:, j * n : (j + 1) * n]

    def rope_index(self, rank: int, table: int) -> Tensor:
        """``[s_local]`` rows of a RoPE table of ``table`` positions for rank ``rank``'s tokens of sample 0, as
        megatron-core's THD RoPE reads them: positions restart at every document, or, when the table covers the
        whole row (``table == seq_len``), run through it. Pads take the last row (no real token sees them)."""
        key = (rank, table)
        if key not in self._rope:
            pos = self.positions(rank)[0]
            if table == self.seq_len:
                idx = self.source[0].gather(0, pos).clamp(min=0)
            else:
                idx = self.inside[0].gather(0, pos).clamp(max=table - 1)
            self._rope[key] = idx
        return self._rope[key]

    def original(self, padded: Tensor) -> Tensor:
        """``[b, n]`` padded positions -> the tokens' positions in the unpadded sample, pads numbered after it
        (``seq_len + padded position``, all distinct): what attention dropout is keyed by, so a document's drops
        are those of the same tokens unpacked on one device."""
        src = self.source.gather(1, padded)
        return torch.where(src >= 0, src, padded + self.seq_len)

    def real(self, rank: int) -> Tensor:
        """``[b, s_local]`` bool: which of the rank's tokens are real (False: a pad, keep it out of the loss)."""
        return self.source.gather(1, self.positions(rank)) >= 0

    def shard(self, x: Tensor, rank: int, seq_dim: int = 0, fill: float = 0) -> Tensor:
        """This rank's tokens of ``x`` (the full sequence along ``seq_dim``, the batch at the other of dims 0/1),
        pads filled with ``fill``: ``[S, b, ...] -> [s_local, b, ...]`` (or ``[b, S, ...] -> [b, s_local, ...]``)."""
        batch_dim = 1 - seq_dim
        src = self.source.gather(1, self.positions(rank)).to(x.device)  # [b, s_local]
        xb = x.movedim(batch_dim, 0).movedim(seq_dim if seq_dim > batch_dim else seq_dim + 1, 1)  # [b, S, ...]
        idx = src.clamp(min=0).reshape(src.shape + (1,) * (xb.dim() - 2)).expand(-1, -1, *xb.shape[2:])
        out = xb.gather(1, idx)
        out = out.masked_fill((src < 0).reshape(idx.shape[:2] + (1,) * (xb.dim() - 2)), fill)
        return out.movedim(1, seq_dim if seq_dim > batch_dim else seq_dim + 1).movedim(0, batch_dim)

    def unshard(self, parts: Sequence[Tensor], seq_dim: int = 0) -> Tensor:
        """Every rank's tokens (``parts[rank]``, as :meth:`shard` gives them) -> the real tokens in global order."""
        batch_dim = 1 - seq_dim
        xs = [p.movedim(batch_dim, 0).movedim(seq_dim if seq_dim > batch_dim else seq_dim + 1, 1) for p in parts]
        b = xs[0].shape[0]
        full = xs[0].new_zeros((b, self.seq_len) + tuple(xs[0].shape[2:]))
        for rank, x in enumerate(xs):
            src = self.source.gather(1, self.positions(rank)).to(x.device)
            for i in range(b):
                keep = src[i] >= 0
                full[i, src[i][keep]] = x[i][keep]
        return full.movedim(1, seq_dim if seq_dim > batch_dim else seq_dim + 1).movedim(0, batch_dim)

    def spans(self, qj: int, kj: int, tile: int) -> List[Optional[Tuple[int, int]]]:
        """Which keys of ring position ``kj`` each row tile of ring position ``qj`` can see: per tile of ``tile``
        rows the column range ``(a, e)`` that holds every (same document, not later) key of any of its rows,
        over all samples, or None when it sees none. Both hold their tokens in document order, so the range is
        short (the tile's documents); outside it every score is masked and is never computed. Host work on
        the CPU copies, once per batch and (qj, kj, tile) - cached, never per layer."""
        key = (qj, kj, tile)
        if key not in self._spans:
            ids, order, _ = self._host
            n = self.padded_len // self.ring
            qpos, kpos = order[:, qj * n : (qj + 1) * n], order[:, kj * n : (kj + 1) * n]  # each increasing
            nt, D = -(-n // tile), int(ids.max()) + 1
            t = torch.arange(n) // tile
            first, last = torch.full((nt,), n), torch.full((nt,), -1)
            for b in range(ids.shape[0]):
                # latest[t, d]: the last row position of document d in tile t; the keys of d it sees are those
                # of d's keys not after it - a prefix of d's run of keys, since keys are in position order
                latest = torch.full((nt * D,), -1, dtype=torch.long)
                latest.scatter_reduce_(0, t * D + ids[b].gather(0, qpos[b]).long(), qpos[b], reduce="amax")
                latest = latest.view(nt, D)
                start = torch.zeros(D + 1, dtype=torch.long)
                start[1:] = torch.bincount(ids[b].gather(0, kpos[b]).long(), minlength=D).cumsum(0)
                seen = (torch.searchsorted(kpos[b], latest, right=True) - start[:-1]).clamp(min=0)
                seen = torch.minimum(seen, start[1:] - start[:-1])  # [tiles, documents]: keys seen
                hit = seen > 0
                first = torch.minimum(first, torch.where(hit, start[:-1], n).amin(1))
                last = torch.maximum(last, torch.where(hit, start[:-1] + seen - 1, -1).amax(1))
            self._spans[key] = [(a, e + 1) if e >= 0 else None for a, e in zip(first.tolist(), last.tolist())]
        return self._spans[key]

    def gather_spans(self, qj: int, tile: int) -> List[Tuple[int, int]]:
        """The keys each row tile of ring position ``qj`` can see once every rank's tokens are gathered in padded
        order (``kvallgather_cp_algo``): per tile of ``tile`` rows the range ``(a, e)`` of padded positions from the
        start of the document of its first row to its last row, over all samples. A rank holds its tokens in
        increasing position, so every (same document, not later) key of the tile's rows lies in that one range.
        Host work on the CPU copies, cached per (qj, tile)."""
        key = ("gather", qj, tile)
        if key not in self._spans:
            _, order, _ = self._host
            n = self.padded_len // self.ring
            qpos = order[:, qj * n : (qj + 1) * n]  # [b, n], increasing per sample
            starts = torch.arange(0, n, tile)
            ends = (starts + tile).clamp(max=n) - 1
            first, last = qpos[:, starts], qpos[:, ends]  # [b, tiles]
            a = (first - self._host_inside.gather(1, first)).amin(0)  # the first row's document start
            e = last.amax(0) + 1
            self._spans[key] = list(zip(a.tolist(), e.tolist()))
        return self._spans[key]

    @property
    def same_layout(self) -> bool:
        """Every sample has the same documents' layout (one gather order and one set of tiles serve the batch);
        from the CPU copies, once per batch."""
        if "same" not in self._spans:
            ids, order, _ = self._host
            self._spans["same"] = bool((order == order[:1]).all()) and bool((ids == ids[:1]).all())
        return self._spans["same"]

    def gather_runs(self) -> List[Tuple[int, int, int]]:
        """Where the rows of a K/V all-gather in CP rank order go, as runs ``(src, dst, n)`` of consecutive padded
        positions (:func:`mindspeed_cp.layout.gather.order_runs`; one order for the batch: :attr:`same_layout`),
        from the CPU copy, once per batch."""
        if "runs" not in self._spans:
            from .gather import order_runs

            self._spans["runs"] = order_runs(self._host[1][0].tolist())
        return self._spans["runs"]

    def host_positions(self, j: int) -> Tuple[List[int], List[int], List[int]]:
        """Ring position ``j``'s padded positions (sample 0), each one's position inside its document and the
        layout's chunk of its document it lies in (``0 .. 2R-1``), as host lists (planning, once per batch)."""
        key = ("host", j)
        if key not in self._spans:
            ids, order, _ = self._host
            n = self.padded_len // self.ring
            pos = order[0, j * n : (j + 1) * n]
            inside = self._host_inside[0].gather(0, pos)
            length = torch.tensor(self.padded[0])[ids[0].gather(0, pos).long()]  # padded length of each one's document
            chunk = inside // (length // (2 * self.ring)).clamp(min=1)
            self._spans[key] = (pos.tolist(), inside.tolist(), chunk.tolist())
        return self._spans[key]

    def shift_plan(self, rank: int, within_documents: bool):
        """The :class:`mindspeed_cp.layout.shift.ShiftPlan` of ``rank`` (cached): the one-position shift of multi-token
        prediction by original position, pads taking 0. ``within_documents``: every document's last token takes 0
        too (megatron-core's THD shift); else the shift runs through the whole sample (its ``[b, S]`` shift).
        Every sample must share the layout (Ring/Hybrid refuse different documents per sample; Ulysses keeps the
        order)."""
        from .shift import plan_shift

        key = (rank, within_documents)
        if key not in self._shifts:
            _, order, source = self._host
            if bool((order != order[:1]).any()) or bool((source != source[:1]).any()):
                raise ValueError(
                    "multi-token prediction with packed documents: the samples of the micro-batch are "
                    "laid out differently; use --micro-batch-size 1"
                )
            n = [self.local_len(q) for q in range(self.cp)]
            ranks = torch.split(source[0].gather(0, order[0]), n)  # original position of every rank's tokens
            ends = torch.tensor(self.lengths[0]).cumsum(0) - 1 if within_documents else None
            self._shifts[key] = plan_shift(list(ranks), rank, self.seq_len, ends)
        return self._shifts[key]

    # ------------------------------------------------------------------ masks, one block at a time
    def block_mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """``[b, 1, sq, sk]`` bool, True = masked: key not in the query's document, or after it."""
        ids = self.ids.to(q_pos.device)
        qi, ki = ids.gather(1, q_pos), ids.gather(1, k_pos)
        return ((qi[:, :, None] != ki[:, None, :]) | (k_pos[:, None, :] > q_pos[:, :, None]))[:, None]

    def to(self, device) -> "Documents":
        """The same documents with their index tensors on ``device`` (once per batch, not per layer)."""
        self.ids, self.source, self.order, self.inside = (
            t.to(device) for t in (self.ids, self.source, self.order, self.inside)
        )
        self._rope = {}
        return self

    @classmethod
    def from_lengths(cls, lengths, cp: int, ring: Optional[int] = None) -> "Documents":
        """``lengths``: per sample, or one list for a batch of one. ``ring`` defaults to ``cp`` (Ring)."""
        rows = [list(lengths)] if lengths and isinstance(lengths[0], int) else [list(r) for r in lengths]
        return cls(rows, cp, cp if ring is None else ring)

    # ------------------------------------------------------------------ accounting (benchmarks, docs)
    def padding_overhead(self) -> float:
        """Pad tokens / real tokens."""
        return (self.padded_len - self.seq_len) / self.seq_len


def layout_work(docs: Documents) -> List[int]:
    """Unmasked (query, key) pairs each *ring position* computes, summed over the batch: the attention work a
    document-causal ring does per rank (pads included, they are computed)."""
    R = docs.ring
    work = [0] * R
    for row in docs.padded:
        for p in row:
            c = p // (2 * R) if R > 1 else p
            if R == 1:
                work[0] += p * (p + 1) // 2
                continue
            for j in range(R):
                # rows: chunks j and 2R-1-j of this document; each row at chunk index x sees x*c + (1..c) keys
                for x in (j, 2 * R - 1 - j):
                    work[j] += c * x * c + c * (c + 1) // 2
    return work


def computed_scores(docs: Documents, tile: int) -> dict:
    """What a documents ring hands its kernels per ring position (the spans are the union over the batch's
    samples): ``computed`` score elements (tile rows x the key columns the tile's
    documents reach, over every KV owner), ``full`` (every block whole, as without spans) and ``skipped_tiles``
    (row tiles that reach no key of an owner). Per head; pads included."""
    R = docs.ring
    n = docs.padded_len // R
    computed, skipped = [0] * R, [0] * R
    for r in range(R):
        for j in range(R):
            for t, span in enumerate(docs.spans(r, j, tile)):
                rows = min(tile, n - t * tile)
                if span is None:
                    skipped[r] += 1
                else:
                    computed[r] += rows * (span[1] - span[0])
    return {"computed": computed, "full": [n * n * R] * R, "skipped_tiles": skipped}
