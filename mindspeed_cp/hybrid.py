"""Hybrid context parallelism (``hybrid_cp_algo``): Ulysses inside x Ring (or Double Ring) outside (USP), or
Ulysses inside x the K/V all-gather outside.

    out = hybrid_attention(q, k, v, ulysses_group, ring_group, causal=True)   # [s/CP, b, h, d] in and out
    out = hybrid_attention(q, k, v, ulysses_group, ring_group, outer="kvallgather")   # the all-gather outside

CP = U x R. Each CP rank holds ``S/CP`` tokens laid out by :func:`mindspeed_cp.layout.sharding.token_indices`:
zigzag over the R ring ranks, then each ring rank's chunk pair split contiguously among its U Ulysses
ranks. So the Ulysses all-to-all inside a group re-assembles exactly one ring rank's zigzag pair::

    [S/CP, b, h, d] --a2a(ulysses)--> [S/R, b, h/U, d] --ring(ring)--> [S/R, b, h/U, d] --a2a--> [S/CP, b, h, d]

The ring level is :func:`mindspeed_cp.ring.ring_attention` unchanged (causal zigzag or general mask,
overlap, BNSD, Double Ring window), or with ``outer="kvallgather"`` (``--hybrid-outer-cp-algo
kvallgather_cp_algo``) :func:`mindspeed_cp.kvallgather.kvallgather_attention` over the same ring group: the
all-to-all leaves each ring rank exactly the zigzag pair the all-gather expects, on ``h/U`` heads and ``hk/U`` KV
heads (so the gather moves ``1/U`` of the KV heads: with GQA the outer level sends ``P hk / (h + hk)``-fewer
bytes than Ulysses would there, and, with ``kv_cache_policy="full"``, 2/3 of the ring's). The Ulysses level is
:class:`mindspeed_cp.ulysses.UlyssesContextAttention` unchanged (GQA replication rules apply within the Ulysses
group). Nothing of either algorithm is re-implemented here.

Agreement: before the first all-to-all every CP rank's row - its Ulysses-level inputs, the ring-level
inputs they imply (``[S/R, b, h/U, d]``) and the ring options - reaches every CP rank
(:func:`mindspeed_cp.agreement.agree_hybrid`: one all-gather over ``agree_group``, or two exchanges over the two
groups), and both levels then run unchecked. So a bad input on one rank of one Ulysses group stops the whole CP
group with one error naming global ranks in the user's terms (hybrid shapes, not ring-level ones).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .agreement import agree_hybrid
from .kvallgather import kvallgather_attention_with
from .layout.sharding import split_sizes
from .options import CallInputs, DoubleRingWindow, KVAllGatherOptions, RingOptions, UlyssesOptions, check_policy
from .ring import ring_attention_with
from .ulysses import UlyssesContextAttention

Tensor = torch.Tensor


def gather_mask_rows(mask: Optional[Tensor], group, seq_len: int) -> Optional[Tensor]:
    """``[b, 1, s_local, S]`` -> ``[b, 1, seq_len, S]``: the mask rows of every rank of ``group``, in group order.

    Rank i holds ``split_sizes(seq_len, P)[i]`` rows (the Ulysses layout, aligned or not; the agreement has
    checked every rank's length). Masks are not differentiable. A mask that already has ``seq_len`` rows, or
    every row (``[b, 1, S, S]``), is returned as is.
    """
    if mask is None or mask.shape[2] in (seq_len, mask.shape[3]):
        return mask
    counts = split_sizes(seq_len, dist.get_world_size(group))
    most = max(counts)
    padded = mask.new_zeros(*mask.shape[:2], most, mask.shape[3])
    padded[:, :, : mask.shape[2]] = mask
    rows = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(rows, padded.contiguous(), group=group)
    return torch.cat([r[:, :, :c] for r, c in zip(rows, counts)], dim=2)


class _RingLevel:
    """The local attention that Ulysses calls: ring attention (or, with ``gather`` options, the K/V all-gather)
    over the ring group on ``h/U`` heads."""

    def __init__(
        self, ulysses_group, ring_group, inputs: CallInputs, options: RingOptions, gather: KVAllGatherOptions = None
    ) -> None:
        self.ulysses_group, self.ring_group, self.inputs, self.options = ulysses_group, ring_group, inputs, options
        self.gather = gather

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        # [S/R, b, h/U, d]; the mask rows of the Ulysses group's tokens = this ring rank's pair (a full
        # [b, 1, S, S] mask goes as is: the ring level keeps its zigzag rows)
        mask = gather_mask_rows(attention_mask, self.ulysses_group, q.shape[0])
        dropout = self.inputs.dropout
        if dropout is not None:  # this Ulysses rank computes global heads u*h/U .. (u+1)*h/U - 1
            dropout = dropout.for_rank(dist.get_rank(self.ulysses_group), q.shape[2])
        sink = self.inputs.softmax_offset
        if sink is not None:  # the sink logits of the same heads
            sink = sink.narrow(0, dist.get_rank(self.ulysses_group) * q.shape[2], q.shape[2])
        inputs = self.inputs.replace(attention_mask=mask, dropout=dropout, softmax_offset=sink)
        if self.gather is not None:
            return kvallgather_attention_with(q, k, v, self.ring_group, inputs, self.gather, check_inputs=False)
        return ring_attention_with(q, k, v, self.ring_group, inputs, self.options, check_inputs=False)


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ulysses_group,
    ring_group,
    *,
    causal: bool = True,
    attention_mask: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    bnsd: bool = False,
    overlap_group=None,
    window: Optional[DoubleRingWindow] = None,
    kernel=None,
    dropout=None,
    dead_rows: str = "zero",
    check_inputs: bool = True,
    agree_group=None,
    documents=None,
    kv_cache_policy: Optional[str] = None,
    ring_kv_cache_policy: Optional[str] = "same",
    window_size=None,
    softmax_offset: Optional[Tensor] = None,
    outer: str = "ring",
) -> Tensor:
    """Ulysses over ``ulysses_group`` around ring attention (``outer="kvallgather"``: the K/V all-gather) over
    ``ring_group``.

    q ``[s/CP, b, h, d]``, k ``[s/CP, b, hk, d]``, v ``[s/CP, b, hk, dv]`` (MLA: ``dv`` its own) ->
    ``[s/CP, b, h, dv]``. ``attention_mask`` (general,
    with ``causal=False``): bool ``[b|1, 1, s/CP, S]`` rows of this rank's tokens, or the full
    ``[b|1, 1, S, S]``; True = masked. The ring options (``bnsd``, ``overlap_group``, ``window``,
    ``kernel``, ``dead_rows``) apply at the ring level; ``dropout`` (:class:`mindspeed_cp.dropout.
    AttentionDropout` over the ``h`` heads given here) too, on the heads each Ulysses rank computes.
    ``check_inputs``: agree on every CP rank's inputs first; ``agree_group``: a group over all CP ranks for
    that (one exchange instead of two; the Megatron path passes the CP group's gloo twin). ``documents``: a
    :class:`mindspeed_cp.layout.packing.Documents` with ``ring`` = the ring size (document-causal attention).
    ``kv_cache_policy``: None, ``"full"`` or ``"half"`` at the Ulysses level and, unless
    ``ring_kv_cache_policy`` says otherwise (default ``"same"``), at the ring level (:mod:`mindspeed_cp.kv_cache`).
    ``window_size``: a sliding window; the ring level runs the window-aware ring (:mod:`mindspeed_cp.window_ring`).
    ``softmax_offset``: ``[h]`` sink logits; each Ulysses rank merges those of its heads. ``outer``: ``"ring"`` or
    ``"kvallgather"`` (then ``bnsd``, ``overlap_group`` and ``window`` - the ring's own options - are refused).
    """
    if ring_kv_cache_policy == "same":
        ring_kv_cache_policy = kv_cache_policy
    check_policy(kv_cache_policy, "hybrid_attention")
    check_policy(ring_kv_cache_policy, "hybrid_attention (ring level)")
    inputs = CallInputs(
        causal=causal,
        attention_mask=attention_mask,
        softmax_scale=softmax_scale,
        dropout=dropout,
        documents=documents,
        window_size=window_size,
        softmax_offset=softmax_offset,
    )
    ring = RingOptions(
        bnsd=bnsd,
        overlap_group=overlap_group,
        window=window,
        kernel=kernel,
        dead_rows=dead_rows,
        kv_cache_policy=ring_kv_cache_policy,
    )
    return hybrid_attention_with(
        q,
        k,
        v,
        ulysses_group,
        ring_group,
        inputs,
        UlyssesOptions(kv_cache_policy),
        ring,
        check_inputs=check_inputs,
        agree_group=agree_group,
        gather=_outer(outer, ring),
    )


def _outer(outer: str, ring: RingOptions) -> Optional[KVAllGatherOptions]:
    """The all-gather options of the outer level (the ring's kernel, dead rows and KV-cache policy), or None (the
    ring); the ring's own options are refused with it."""
    if outer not in ("ring", "kvallgather"):
        raise ValueError(f"hybrid_attention: outer must be 'ring' or 'kvallgather', got {outer!r}")
    if outer == "ring":
        return None
    set_ = (("bnsd", ring.bnsd), ("overlap_group", ring.overlap_group is not None), ("window", ring.window))
    used = [name for name, value in set_ if value]
    if used:
        raise ValueError(
            f"hybrid_attention: {', '.join(used)} belong to the ring; the K/V all-gather outer level "
            "(outer='kvallgather') has none"
        )
    return KVAllGatherOptions(kernel=ring.kernel, dead_rows=ring.dead_rows, kv_cache_policy=ring.kv_cache_policy)


def hybrid_attention_with(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ulysses_group,
    ring_group,
    inputs: CallInputs,
    ulysses: UlyssesOptions = UlyssesOptions(),
    ring: RingOptions = RingOptions(),
    *,
    check_inputs: bool = True,
    agree_group=None,
    gather: Optional[KVAllGatherOptions] = None,
) -> Tensor:
    """:func:`hybrid_attention` with its options as objects (what the Megatron glue calls). ``gather``: the outer
    level is the K/V all-gather with these options (``ring`` then only carries what the agreement checks: kernel,
    dead rows, KV-cache policy)."""
    inputs = inputs.replace(softmax_scale=inputs.scale(q.shape[-1]))
    if check_inputs:
        agree_hybrid(q, k, v, inputs, ulysses, ring, inputs.softmax_scale, ulysses_group, ring_group, agree_group)
    level = _RingLevel(ulysses_group, ring_group, inputs.replace(attention_mask=None), ring, gather)
    attention = UlyssesContextAttention(
        level, ulysses_group, check_inputs=False, kv_cache_policy=ulysses.kv_cache_policy
    )
    return attention(q, k, v, inputs.attention_mask)
