"""The one-position shift of multi-token prediction under every CP layout.

Multi-token prediction (MTP, ``--mtp-num-layers``) shifts the tokens, labels, loss mask and position ids one
position to the left per MTP layer (megatron-core's ``roll_tensor``): the token at global position ``g`` takes the
value at ``g + 1``, the last position takes 0, and in a packed THD batch every document's last position takes 0.
Under CP a rank holds only some positions, and which ones depends on the layout::

    S = 16, CP = 4          rank 0         rank 1          rank 2          rank 3
    Ulysses (contiguous)    0-3            4-7             8-11            12-15
    Ring (zigzag)           0,1 + 14,15    2,3 + 12,13     4,5 + 10,11     6,7 + 8,9
    Hybrid U2 x R2          0-3            12-15           4-7             8-11

Megatron's own CP roll assumes the zigzag (each rank's two halves, the next rank's first token), so under the
other layouts it takes the wrong neighbour at every shard boundary. Here the successor of every token is found by
its global position, whatever the layout: :func:`plan_shift` (pure, from every rank's positions) says which of a
rank's shifted values come from its own tokens and which from another rank's, and :func:`shift_left` moves only
those - one value per shard boundary per sample, in one ``all_to_all_single`` with split sizes - never the sequence::

    plan = plan_shift([token_positions(r) for r in range(cp)], rank, length=S)
    rolled = shift_left(labels, dim=1, plan=plan, group=cp_group)     # [b, s_local] -> [b, s_local]

Positions are *original* positions: pads of a layout (Ring/Hybrid padding, the per-document zigzag's pads) have
position -1 and take 0; the token before a pad takes the value of the next real token, wherever it lives - so the
shift equals the one-device shift of the unpadded batch on every real token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["ShiftPlan", "plan_shift"]


@dataclass(frozen=True)
class ShiftPlan:
    """Where one rank's shifted values come from (host tensors, indices along the sequence dim).

    ``local_out[i]`` takes this rank's own token ``local_in[i]``; ``recv_out`` (grouped by source rank, in rank
    order, ``recv_counts`` per rank) take values other ranks send; ``send`` are this rank's tokens other ranks need
    (grouped by destination, ``send_counts`` per rank). Every other position takes 0.
    """

    local_out: Tensor
    local_in: Tensor
    send: Tensor
    send_counts: Tuple[int, ...]
    recv_out: Tensor
    recv_counts: Tuple[int, ...]
    _on: Dict[torch.device, Tuple[Tensor, ...]] = field(default_factory=dict, compare=False, repr=False)

    def on(self, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The index tensors on ``device`` (copied once per device)."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.local_out, self.local_in, self.send, self.recv_out))
        return self._on[device]


def _grouped(ranks: Tensor, key: Tensor, values: Tensor, world: int) -> Tuple[Tensor, Tuple[int, ...]]:
    """``values`` ordered by (``ranks``, ``key``), and how many there are per rank."""
    order = torch.argsort(ranks * (int(key.max()) + 1 if key.numel() else 1) + key)
    return values[order], tuple(torch.bincount(ranks, minlength=world).tolist())


def plan_shift(positions: Sequence[Tensor], rank: int, length: int, stops: Optional[Tensor] = None) -> ShiftPlan:
    """The :class:`ShiftPlan` of ``rank``.

    ``positions[q]``: 1-D original positions of rank ``q``'s tokens in its local order (-1: a pad), every
    position ``0..length-1`` held exactly once. ``stops``: original positions whose successor is cut (they take
    0, as the last position does), e.g. every document's last token of a packed THD batch.

    Example (Ulysses, S = 8, P = 2; rank 0 holds 0-3, rank 1 holds 4-7): rank 0 fills its positions 0-2 from
    itself and position 3 from rank 1's position 0 (global 4); rank 1 fills 0-2 from itself, its position 3 takes
    0, and it sends its position 0 to rank 0.
    """
    world = len(positions)
    src = torch.cat([p.reshape(-1).long() for p in positions])  # every token of the group, rank after rank
    owner = torch.cat([torch.full((p.numel(),), q, dtype=torch.long) for q, p in enumerate(positions)])
    local = torch.cat([torch.arange(p.numel()) for p in positions])
    real = src >= 0
    where = torch.full((length,), -1, dtype=torch.long)  # original position -> index into src
    where[src[real]] = torch.nonzero(real).reshape(-1)
    if bool((where < 0).any()) or int(real.sum()) != length:
        raise ValueError(f"the layout's positions do not hold every position 0..{length - 1} exactly once")
    cut = torch.zeros(length, dtype=torch.bool)
    cut[length - 1] = True
    if stops is not None:
        cut[stops.reshape(-1).long()] = True
    fed = real & ~cut[src.clamp(min=0)]  # tokens whose successor exists
    nxt = torch.zeros_like(src)
    nxt[fed] = where[src[fed] + 1]  # index into src of each token's successor
    by_me = fed & (owner[nxt] == rank)
    mine = owner == rank
    own, into_me, from_me = mine & by_me, mine & fed & ~by_me, by_me & ~mine
    recv_out, recv_counts = _grouped(owner[nxt[into_me]], local[into_me], local[into_me], world)
    send, send_counts = _grouped(owner[from_me], local[from_me], local[nxt[from_me]], world)
    return ShiftPlan(
        local_out=local[own],
        local_in=local[nxt[own]],
        send=send,
        send_counts=send_counts,
        recv_out=recv_out,
        recv_counts=recv_counts,
    )
