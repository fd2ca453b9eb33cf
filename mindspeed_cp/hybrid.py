"""Hybrid context parallelism (``hybrid_cp_algo``): Ulysses inside x Ring (or Double Ring) outside (USP).

    out = hybrid_attention(q, k, v, ulysses_group, ring_group, causal=True)   # [s/CP, b, h, d] in and out

CP = U x R. Each CP rank holds ``S/CP`` tokens laid out by :func:`mindspeed_cp.sharding.token_indices`:
zigzag over the R ring ranks, then each ring rank's chunk pair split contiguously among its U Ulysses
ranks. So the Ulysses all-to-all inside a group re-assembles exactly one ring rank's zigzag pair::

    [S/CP, b, h, d] --a2a(ulysses)--> [S/R, b, h/U, d] --ring(ring)--> [S/R, b, h/U, d] --a2a--> [S/CP, b, h, d]

The ring level is :func:`mindspeed_cp.ring.ring_attention` unchanged (causal zigzag or general mask,
overlap, BNSD, Double Ring window); the Ulysses level is :class:`mindspeed_cp.ulysses.
UlyssesContextAttention` unchanged (GQA replication rules apply within the Ulysses group). Nothing of
either algorithm is re-implemented here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .ring import DoubleRingWindow, ring_attention
from .ulysses import UlyssesContextAttention

Tensor = torch.Tensor


def gather_mask_rows(mask: Optional[Tensor], group, seq_len: int) -> Optional[Tensor]:
    """``[b, 1, s_local, S]`` -> ``[b, 1, S_group, S]``: the mask rows of every rank of ``group``, in group order.

    Masks are not differentiable; ranks may hold different row counts (unaligned Ulysses). A mask that
    already has ``seq_len`` rows is returned as is.
    """
    if mask is None or mask.shape[2] == seq_len:
        return mask
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([mask.shape[2]], dtype=torch.long), group=group)
    most = max(int(c) for c in counts)
    padded = mask.new_zeros(*mask.shape[:2], most, mask.shape[3])
    padded[:, :, : mask.shape[2]] = mask
    rows = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(rows, padded.contiguous(), group=group)
    return torch.cat([r[:, :, : int(c)] for r, c in zip(rows, counts)], dim=2)


class _RingLevel:
    """The local attention that Ulysses calls: ring attention over the ring group on ``h/U`` heads."""

    def __init__(self, ulysses_group, ring_group, **ring_kwargs):
        self.ulysses_group, self.ring_group, self.ring_kwargs = ulysses_group, ring_group, ring_kwargs

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor] = None,
                 dropout=None) -> Tensor:
        # [S/R, b, h/U, d]; the mask rows of the Ulysses group's tokens = this ring rank's pair
        mask = gather_mask_rows(attention_mask, self.ulysses_group, q.shape[0])
        if dropout is not None:  # this Ulysses rank computes global heads u*h/U .. (u+1)*h/U - 1
            dropout = dropout.for_rank(dist.get_rank(self.ulysses_group), q.shape[2])
        return ring_attention(q, k, v, self.ring_group, attention_mask=mask, dropout=dropout, **self.ring_kwargs)


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, ulysses_group, ring_group, *, causal: bool = True,
                     attention_mask: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                     bnsd: bool = False, overlap_group=None, window: Optional[DoubleRingWindow] = None,
                     kernel=None, dropout=None, dead_rows: str = "zero") -> Tensor:
    """Ulysses over ``ulysses_group`` around ring attention over ``ring_group``.

    q ``[s/CP, b, h, d]``, k/v ``[s/CP, b, hk, d]`` -> ``[s/CP, b, h, d]``. ``attention_mask`` (general,
    with ``causal=False``): bool ``[b|1, 1, s/CP, S]`` rows of this rank's tokens, True = masked. The ring
    options (``bnsd``, ``overlap_group``, ``window``, ``kernel``, ``dead_rows``) apply at the ring level;
    ``dropout`` (:class:`mindspeed_cp.dropout.AttentionDropout` over the ``h`` heads given here) too, on the
    heads each Ulysses rank computes.
    """
    ring_level = _RingLevel(ulysses_group, ring_group, causal=causal, softmax_scale=softmax_scale,
                            bnsd=bnsd, overlap_group=overlap_group, window=window, kernel=kernel,
                            dead_rows=dead_rows)
    return UlyssesContextAttention(ring_level, ulysses_group)(q, k, v, attention_mask, dropout=dropout)
