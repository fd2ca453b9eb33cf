"""Ring attention (``--context-parallel-algo megatron_cp_algo``) over any ring process group.

    out = ring_attention(q, k, v, ring_group, causal=True)      # q/k/v/out [s_local, b, n, d] (sbhd)

Sequence layout: Megatron's zigzag. The global sequence of ``S`` tokens is cut into ``2P`` chunks of
``c = S / 2P`` tokens; ring position ``r`` holds chunks ``r`` and ``2P-1-r`` (``s_local = 2c``), see
:func:`zigzag_index`. KV blocks travel around the ring; each rank merges its partial results in float32
log-sum-exp form (:func:`mindspeed_cp.kernels.merge`).

* Causal: the block of the rank's own KV is causal (top-left on the concatenated chunks); a KV block
  from an earlier ring position needs only its first chunk (both local query chunks attend fully); from a
  later position only the second query chunk attends, to the whole block. No fully masked block is ever
  computed and every rank does the same work (:func:`count_blocks` measures it).
* General (``causal=False`` with ``attention_mask``, ``--attention-mask-type general``): every block is
  computed with its slice of the boolean mask (True = masked); blocks that are entirely masked are
  skipped. The mask is ``[b|1, 1|n, s_local, S]`` (rows: this rank's tokens in zigzag order, columns:
  global order, what Megatron's ``get_batch_on_this_cp_rank`` gives) or the full ``[b|1, 1|n, S, S]``.
* Backward recomputes every block with the global output/LSE; dQ stays local; each KV block's dK/dV
  accumulator follows the block and ends at its owner. The owner keeps its own block's share locally and
  the accumulator starts at the next rank, so it needs P-1 hops: per rank, forward + backward,
  ``3 (P-1) 2 s b hk d e`` bytes (KV forward, KV and dKV backward; docs/design.md, "Conventions").
* Every exchange is posted before the block it overlaps is computed (the next KV block, the previous dK/dV
  share) and waited for after it. ``overlap_group`` (``--use-cp-send-recv-overlap``) puts send and receive on
  separate communicators (:class:`mindspeed_cp.comm.RingExchanger`); without it both go batched on the ring group.
* ``bnsd=True`` (``--megatron-cp-in-bnsd``): q/k/v are converted once to ``[b, n, s, d]``, KV travels in
  that layout and the output is converted back once; otherwise blocks are handed to the kernel as
  ``[b, n, s, d]`` views of the ``[s, b, n, d]`` tensors.
* ``kv_cache_policy`` (``--context-parallel-kv-cache-policy``): ``"full"`` keeps every KV block received in
  forward (autograd saves them), so backward sends only dK/dV: ``2 (P-1)`` blocks in all; ``"half"`` keeps the
  K blocks and sends V again: ``2.5 (P-1)`` (:mod:`mindspeed_cp.kv_cache`). Blocks are kept in the order
  forward met them, which is the order backward meets them (also across the two rings of Double Ring).
* ``window`` (``--cp-window-size K > 1``, Double Ring / LoongTrain): an inner ring inside each window of
  K consecutive ring positions and an outer ring across the ``W = P/K`` windows (same position in every
  window). The outer exchange of the next window's KV overlaps the whole inner ring. Results equal the
  plain ring's; the volume too: per KV pass ``W (K-1)`` intra-window hops plus ``W-1`` inter-window hops
  ``= P-1``. dK/dV: summed over the window's inner ring (K-1 hops), then along the outer ring (W-1 hops).

Every input check runs before any point-to-point message and is agreed through one small all-gather
(:func:`mindspeed_cp.agreement.agree_ring`: shapes, dtypes, devices, grad mode, softmax scale, options and groups
of every rank), so a mismatch raises the same error on every rank, naming global ranks, instead of hanging.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .agreement import RingAttentionError, agree_ring
from .blocks import add_sink, sink_input_grad, sink_logits
from .comm import KVPair, RingExchanger
from .kernels import acc_dtype, get_kernel, merge_
from .layout.sharding import zigzag_index
from .local import add_uniform_grad, uniform_rows
from .options import CallInputs, DoubleRingWindow, RingOptions
from .stats import BlockStats, count_blocks, record_block, record_skip
from .window_ring import window_ring_attention_with

Tensor = torch.Tensor

__all__ = [
    "ring_attention",
    "ring_attention_with",
    "RingAttentionFunction",
    "DoubleRingWindow",
    "RingOptions",
    "RingAttentionError",
    "BlockStats",
    "count_blocks",
    "zigzag_index",
]


def _bnsd(x: Tensor) -> Tensor:
    return x.permute(1, 2, 0, 3)  # [s, b, n, d] -> [b, n, s, d] (view)


def _sbhd(x: Tensor) -> Tensor:
    return x.permute(2, 0, 1, 3)  # [b, n, s, d] -> [s, b, n, d] (view)


def _zigzag_cols(x: Tensor, j: int, c: int, ring_size: int) -> Tensor:
    # [..., S] -> [..., 2c]: the columns of the tokens ring position j holds
    return torch.cat([x[..., j * c : (j + 1) * c], x[..., (2 * ring_size - 1 - j) * c : (2 * ring_size - j) * c]], -1)


TILE = (
    256  # rows per tile of a masked block (general mask, documents): mask + bias <= 256 x s_local; tests set it small
)


# ------------------------------------------------------------------------------------------ plan
class _MaskBlocks:
    """A general mask cut per KV block owner: ``block(j)`` is ``[B, N, s_local, s_local]`` bool."""

    def __init__(self, mask: Tensor, P: int, r: int, s_local: int) -> None:
        c = s_local // 2
        if mask.shape[-2] != s_local:  # full [.., S, S]: keep this rank's zigzag rows
            mask = _zigzag_cols(mask.transpose(-1, -2), r, c, P).transpose(-1, -2)
        self.mask, self.c, self.P = mask, c, P
        B, N = mask.shape[:2]
        chunks = mask.reshape(B, N, s_local, 2 * P, c)
        every = chunks.all(-1).all(2).all(1).all(0)  # [2P]: chunk fully masked for every row
        some = chunks.any(-1).any(2).any(1).any(0)
        every, some = every.tolist(), some.tolist()  # one host sync for the whole call
        self.all_masked = [every[j] and every[2 * P - 1 - j] for j in range(P)]
        self.any_masked = [some[j] or some[2 * P - 1 - j] for j in range(P)]
        self.dead = mask.all(-1)  # [B, N, s_local]: this rank's rows that see no key at all

    def block(self, j: int, rows: slice = slice(None)) -> Optional[Tensor]:
        return _zigzag_cols(self.mask[..., rows, :], j, self.c, self.P) if self.any_masked[j] else None


class _DocBlocks:
    """Document-causal masks per KV block owner, built from :class:`mindspeed_cp.layout.packing.Documents` one block
    at a time (``[b, 1, s_local, s_local]``); the per-document zigzag leaves no block fully masked and no row dead."""

    def __init__(self, documents, P: int, r: int) -> None:
        self.documents, self.P, self.r = documents, P, r
        self.positions = [documents.ring_positions(j) for j in range(P)]  # [b, s_local] padded positions
        self.mine = self.positions[r]
        self.all_masked = [False] * P
        self.any_masked = [True] * P
        self.dead = None

    def span(self, j: int, tile: int) -> Optional[Tuple[int, int]]:
        """The key columns of owner ``j`` that row tile ``tile`` (of TILE rows) can see; None: none."""
        return self.documents.spans(self.r, j, TILE)[tile]

    def block(self, j: int, rows: slice = slice(None), cols: slice = slice(None)) -> Tensor:
        return self.documents.block_mask(self.mine[:, rows], self.positions[j][:, cols])


class _Plan:
    """Everything fixed for one call: ring geometry, exchangers, kernel, mask blocks."""

    def __init__(
        self, ring_group, inputs: CallInputs, options: RingOptions, q: Tensor, k: Tensor, v: Tensor, scale: float
    ) -> None:
        P, r, s_local = dist.get_world_size(ring_group), dist.get_rank(ring_group), q.shape[0]
        masks = None if inputs.attention_mask is None else _MaskBlocks(inputs.attention_mask, P, r, s_local)
        causal = inputs.causal and inputs.attention_mask is None
        if inputs.documents is not None:
            masks, causal = _DocBlocks(inputs.documents, P, r), False
        self.kv_cache = options.kv_cache_policy  # None | "full" | "half": what forward keeps of the received blocks
        self.pair = KVPair(k.shape, v.shape, options.bnsd)  # how K and V travel
        self.P, self.r, self.causal, self.bnsd, self.scale, self.masks = P, r, causal, options.bnsd, scale, masks
        self.kernel = get_kernel(options.kernel, q.device)
        self.dropout, self.seq_len = inputs.dropout, s_local * P
        # fully masked rows (general masks only) averaging V over all keys: Megatron's local attention (with a sink
        # such a row gives 0: all its weight goes to the sink)
        uniform = options.dead_rows == "uniform" and inputs.softmax_offset is None
        self.dead = masks.dead if uniform and masks is not None else None
        self.sink = sink_logits(inputs.softmax_offset, q.shape[2], acc_dtype(q.dtype), q.device)
        # global positions of every ring position's tokens (dropout masks are keyed by them): [s_local], or
        # [b, s_local] with documents (their positions in the unpadded sample)
        self.positions = None
        if self.dropout is not None:
            self.positions = (
                [masks.documents.original(p) for p in masks.positions]
                if isinstance(masks, _DocBlocks)
                else [zigzag_index(self.seq_len, P, j, q.device) for j in range(P)]
            )
        window = options.window
        if not options.double:  # plain ring = one inner ring over the whole group, no outer level
            self.K, self.W = P, 1
            self.inner = RingExchanger(ring_group, options.overlap_group) if P > 1 else None
            self.outer = None
        else:
            self.K, self.W = window.size, P // window.size
            self.inner = RingExchanger(window.intra_group, window.intra_overlap_group)
            self.outer = RingExchanger(window.inter_group, window.inter_overlap_group)
        self.x, self.a = divmod(r, self.K)

    def owner(self, o: int, i: int) -> int:
        """Ring position whose KV this rank holds at outer step ``o``, inner step ``i``."""
        return ((self.x - o) % self.W) * self.K + (self.a - i) % self.K

    def dropout_block(self, j: int, rows: slice, cols: slice):
        """The dropout of this rank's block with KV owner ``j`` (its ``rows`` x ``cols``), or None."""
        if self.dropout is None:
            return None
        return self.dropout.block(self.positions[self.r][..., rows], self.positions[j][..., cols])

    def block(self, j: int, c: int):
        """(query rows, key cols, causal, mask) of this rank's block with KV owner ``j``; None = skip."""
        whole = slice(None)
        if self.causal:
            if j == self.r:
                return whole, whole, True, None
            if j < self.r:  # earlier owner: only its first chunk precedes our tokens
                return whole, slice(0, c), False, None
            return slice(c, None), whole, False, None  # later owner: only our second chunk follows it
        if self.masks is None:
            return whole, whole, False, None
        if self.masks.all_masked[j]:
            return None
        return whole, whole, False, self.masks  # row tiles of it: _tiles

    def tiles(self, blk, j: int, s: int, phase: str):
        """The block as (rows, cols, causal, mask, first) row tiles: a masked block is cut into ``TILE`` rows so
        its mask (the fused kernel's additive bias) never exceeds TILE x s_local, whatever s_local is. With
        documents a tile computes only the key columns its documents reach (:meth:`Documents.spans`), and a
        tile that reaches none is skipped."""
        rows, cols, causal, masks = blk
        if not isinstance(masks, (_MaskBlocks, _DocBlocks)):
            yield rows, cols, causal, masks, True
            return
        first = True
        for i in range(0, s, TILE):
            tile = slice(i, min(i + TILE, s))
            if isinstance(masks, _DocBlocks):
                span = masks.span(j, i // TILE)
                if span is None:
                    record_skip(phase, tile=True)
                    continue
                keys = slice(*span)
                yield tile, keys, False, masks.block(j, tile, keys), first
            else:
                yield tile, cols, False, masks.block(j, tile), first
            first = False


def _as_bnsd(x: Tensor, bnsd: bool) -> Tensor:
    return _bnsd(x).contiguous() if bnsd else _bnsd(x)


# ------------------------------------------------------------------------------------------ forward
def _forward_block(plan: _Plan, qb: Tensor, kv: Tensor, j: int, out: Tensor, lse: Tensor, fresh: bool) -> None:
    """Attend to owner ``j``'s block and merge into ``out`` / ``lse``; ``fresh``: nothing merged there yet and
    the block covers every row (the rank's own block, causal or not), so its result is copied, not merged."""
    blk = plan.block(j, qb.shape[2] // 2)
    if blk is None:
        record_skip("forward")
        return
    kb, vb = plan.pair.views(kv)
    for rows, cols, causal, mask, first in plan.tiles(blk, j, qb.shape[2], "forward"):
        q_, k_ = qb[:, :, rows], kb[:, :, cols]
        record_block("forward", q_.shape[0] * q_.shape[1], q_.shape[2], k_.shape[2], causal, mask, first)
        bo, bl = plan.kernel.forward(
            q_,
            k_,
            vb[:, :, cols],
            scale=plan.scale,
            causal=causal,
            mask=mask,
            dropout=plan.dropout_block(j, rows, cols),
        )
        if fresh and rows == slice(None):
            out.copy_(bo)
            lse.copy_(bl)
        else:
            merge_(out[:, :, rows], lse[:, :, rows], bo, bl)


def _keep(plan: _Plan, kv: Tensor, kept: List[Tensor]) -> None:
    """What the KV-cache policy keeps of a received block for backward (travel layout)."""
    if plan.kv_cache == "full":
        kept.append(kv)
    elif plan.kv_cache == "half":
        kept.append(plan.pair.k_part(kv).clone())  # K alone: the clone lets V's part of the buffer go


def _ring_forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """q/k ``[s, b, n|hk, d]``, v ``[s, b, hk, dv]`` -> out ``[b, n, s, dv]``, lse ``[b, n, s]`` (float32/float64)
    and the received blocks the KV-cache policy keeps, in the order they were met."""
    s, b, n, d = q.shape[:3] + v.shape[3:]
    dt = acc_dtype(q.dtype)
    qb = _as_bnsd(q, plan.bnsd)
    out = torch.empty((b, n, s, d), dtype=dt, device=q.device)
    lse = torch.empty((b, n, s), dtype=dt, device=q.device)
    fresh = plan.masks is None  # the own block (step 0) covers every row: it writes out / lse
    if not fresh:  # masked blocks are tiled and may be skipped: start from the empty merge
        out.zero_()
        lse.fill_(-math.inf)
    outer_kv = plan.pair.pack(k, v)
    v_sum = None if plan.dead is None else torch.zeros((b, k.shape[2], d), dtype=dt, device=q.device)
    kept: List[Tensor] = []
    for o in range(plan.W):
        last_outer = o == plan.W - 1
        outer_next = None if last_outer else plan.outer.start(outer_kv, "ring_kv")  # travels during the inner ring
        kv = outer_kv
        for i in range(plan.K):
            last = i == plan.K - 1
            inner_next = None if last else plan.inner.start(kv, "ring_kv")  # travels during this block
            if o or i:
                _keep(plan, kv, kept)
            _forward_block(plan, qb, kv, plan.owner(o, i), out, lse, fresh and o == 0 and i == 0)
            if v_sum is not None:  # every KV block passes by, computed or skipped
                v_sum += plan.pair.views(kv)[1].sum(2)
            if not last:
                kv = inner_next.wait()
        if not last_outer:
            outer_kv = outer_next.wait()
    out = uniform_rows(out, plan.dead, v_sum, plan.seq_len) if v_sum is not None else out
    if plan.sink is not None:  # the sink's term, once per row (mindspeed_cp.blocks)
        out, lse = add_sink(out, lse, plan.sink)
    return out, lse, kept


# ------------------------------------------------------------------------------------------ backward
def _backward_block(plan: _Plan, qb, dob, ob, lse, kb, vb, j: int, dq: Tensor, dkv: Tensor) -> None:
    """Gradients of owner ``j``'s block: dq accumulated, ``dkv`` (uninitialised) written - copied from a single
    tile over every key, else zeroed and accumulated tile by tile."""
    blk = plan.block(j, qb.shape[2] // 2)
    if blk is None:
        record_skip("backward")
        dkv.zero_()
        return
    dk, dv = plan.pair.views(dkv)
    tiles = list(plan.tiles(blk, j, qb.shape[2], "backward"))
    whole = len(tiles) == 1 and tiles[0][1] == slice(None)
    if not whole:
        dkv.zero_()
    for rows, cols, causal, mask, first in tiles:
        q_, k_ = qb[:, :, rows], kb[:, :, cols]
        record_block("backward", q_.shape[0] * q_.shape[1], q_.shape[2], k_.shape[2], causal, mask, first)
        gq, gk, gv = plan.kernel.backward(
            dob[:, :, rows],
            q_,
            k_,
            vb[:, :, cols],
            ob[:, :, rows],
            lse[:, :, rows],
            scale=plan.scale,
            causal=causal,
            mask=mask,
            dropout=plan.dropout_block(j, rows, cols),
        )
        dq[:, :, rows] += gq
        if whole:
            dk.copy_(gk)
            dv.copy_(gv)
        else:
            dk[:, :, cols] += gk
            dv[:, :, cols] += gv


class _DkvTrail:
    """The dK/dV accumulator of one ring level, travelling with its KV block.

    Step 0 is the block's starting rank: it keeps its own share. From step 1 the running sum of shares
    moves one hop per step together with the block (P-1 hops in all) and, after the last step, arrives back
    at the starting rank, which adds it to its own share (:meth:`result`).
    """

    def __init__(self, exchanger, dtype: torch.dtype) -> None:
        self.exchanger, self.dtype = exchanger, dtype
        self.own: Optional[Tensor] = None
        self.pending = None

    def add(self, step: int, grad: Tensor) -> None:
        if step == 0:
            self.own = grad
            return
        if self.pending is not None:
            grad += self.pending.wait()  # the previous ranks' share of this block
        self.pending = self.exchanger.start(grad.to(self.dtype), "ring_dkv")  # travels during the next block

    def result(self) -> Tensor:
        if self.pending is not None:
            self.own += self.pending.wait()
        return self.own


class _BackwardKV:
    """Where backward finds each step's K/V block: its own (step 0), or - per KV-cache policy - received
    again (None: the whole block travels), kept (``"full"``: nothing travels), or K kept and V received
    (``"half"``: V travels). ``travelling`` is what one hop sends (None: nothing)."""

    def __init__(self, plan: _Plan, k: Tensor, v: Tensor, kept: List[Tensor]) -> None:
        self.plan, self.own, self.kept = plan, plan.pair.pack(k, v), iter(kept)
        self.travelling = {None: self.own, "half": plan.pair.v_part(self.own), "full": None}[plan.kv_cache]

    def block(self, step: int, travelling: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(K ``[b, hk, s, d]``, V ``[b, hk, s, dv]``) views of the block at (global) ``step``, ``travelling`` as it
        arrived."""
        pair, policy = self.plan.pair, self.plan.kv_cache
        if step == 0 or policy is None:
            return pair.views(self.own if step == 0 else travelling)
        if policy == "full":
            return pair.views(next(self.kept))
        return pair.k_view(next(self.kept)), pair.v_view(travelling)


def _inner_backward(plan: _Plan, o: int, travelling, source: _BackwardKV, qb, dob, ob, lse, dq: Tensor) -> Tensor:
    """One pass of the inner ring from outer step ``o``; returns the dK/dV of its first block summed over the
    ring."""
    trail = _DkvTrail(plan.inner, source.own.dtype)
    moves = travelling is not None
    for i in range(plan.K):
        last = i == plan.K - 1
        nxt = plan.inner.start(travelling, "ring_kv") if moves and not last else None
        kb, vb = source.block(o * plan.K + i, travelling)
        grad = plan.pair.empty(dq.dtype, dq.device)  # _backward_block writes all of it
        _backward_block(plan, qb, dob, ob, lse, kb, vb, plan.owner(o, i), dq, grad)
        add_uniform_grad(plan.pair.views(grad)[1], dob, plan.dead, plan.seq_len)
        trail.add(i, grad)
        if nxt is not None:
            travelling = nxt.wait()
    return trail.result()


def _ring_backward(
    plan: _Plan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kept: List[Tensor]
):
    """-> dq ``[b, n, s, d]`` and dK/dV (a :class:`KVPair` buffer), both float32/float64."""
    s, b, n, d = q.shape
    qb, dob, ob = (_as_bnsd(t, plan.bnsd) for t in (q, dout, out))
    dq = torch.zeros((b, n, s, d), dtype=lse.dtype, device=q.device)
    source = _BackwardKV(plan, k, v, kept)
    outer = source.travelling
    trail = _DkvTrail(plan.outer, k.dtype)  # the same scheme one level up, along the outer ring
    for o in range(plan.W):
        last_outer = o == plan.W - 1
        moves = outer is not None and not last_outer
        outer_next = plan.outer.start(outer, "ring_kv") if moves else None
        trail.add(o, _inner_backward(plan, o, outer, source, qb, dob, ob, lse, dq))
        if outer_next is not None:
            outer = outer_next.wait()
    return dq, trail.result()


# ------------------------------------------------------------------------------------------ autograd
class RingAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, sink, plan)`` (``sink``: ``[n]`` logits or None); build the plan with
    :func:`ring_attention` (which validates)."""

    @staticmethod
    def forward(ctx, q, k, v, sink, plan):
        out, lse, kept = _ring_forward(plan, q, k, v)
        out = _sbhd(out).to(q.dtype).contiguous()  # [b, n, s, dv] -> [s, b, n, dv], once
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, sink, *kept)  # kept blocks: autograd's own bookkeeping and hooks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink, *kept = ctx.saved_tensors
        plan = ctx.plan
        dsink = sink_input_grad(sink, plan.sink, _bnsd(dout), _bnsd(out), lse, ctx.needs_input_grad[3])
        dq, dkv = _ring_backward(plan, dout, q, k, v, out, lse, kept)
        dq = _sbhd(dq).to(q.dtype).contiguous()
        dk, dv = (x.to(k.dtype).contiguous() for x in plan.pair.unpack(dkv))
        return dq, dk, dv, dsink, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ring_group=None,
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
    window_size=None,
    softmax_offset: Optional[Tensor] = None,
) -> Tensor:
    """Attention over the sequence shared by the ranks of ``ring_group`` (zigzag layout).

    q ``[s_local, b, n, d]``, k ``[s_local, b, nk, d]``, v ``[s_local, b, nk, dv]`` (``n % nk == 0``; MLA: ``dv``
    its own) -> out ``[s_local, b, n, dv]``.
    ``ring_group``: the ring (None = the default group), ranks in ring order. ``causal``: zigzag causal;
    ``attention_mask`` (with ``causal=False``): bool ``[b|1, n|1, s_local|S, S]``, True = masked.
    ``softmax_scale``: default ``1/sqrt(d)``. ``bnsd``: compute in ``[b, n, s, d]`` (converted once).
    ``overlap_group``: a second communicator over the same ranks (send/recv overlap). ``window``:
    Double Ring groups (:class:`DoubleRingWindow`; size 1 or None = plain ring). ``kernel``: a name of
    :data:`mindspeed_cp.kernels.KERNELS`, a kernel object, or None (by device). ``dropout``: a
    :class:`mindspeed_cp.dropout.AttentionDropout` (its masks are keyed by global positions, so they do not
    depend on P). ``dead_rows``: fully masked rows give 0 (``"zero"``) or the mean of V over every key
    (``"uniform"``, Megatron's local attention; see :mod:`mindspeed_cp.local`). ``check_inputs``: agree on
    every rank's inputs first (one small all-gather, see :mod:`mindspeed_cp.agreement`); ``agree_group``: where
    (default ``ring_group``; a gloo group over the same ranks keeps it off the device). ``documents``: a
    :class:`mindspeed_cp.layout.packing.Documents` (packed documents, per-document zigzag; its ``ring`` is this
    ring's size): document-causal attention from document boundaries, ``causal=True``, no mask.
    ``kv_cache_policy``: None, ``"full"`` or ``"half"`` (see the module docstring; every rank must agree).
    ``window_size``: Megatron's sliding window ``(left, right)``: the call runs the window-aware ring
    (:mod:`mindspeed_cp.window_ring`: only the keys a window reaches travel). ``softmax_offset``: ``[n]`` sink
    logits (softmax_type off-by-one / learnable), merged once per row after every block; gradients flow to them.
    """
    inputs = CallInputs(
        causal=causal,
        attention_mask=attention_mask,
        softmax_scale=softmax_scale,
        dropout=dropout,
        documents=documents,
        window_size=window_size,
        softmax_offset=softmax_offset,
    )
    options = RingOptions(
        bnsd=bnsd,
        overlap_group=overlap_group,
        window=window,
        kernel=kernel,
        dead_rows=dead_rows,
        kv_cache_policy=kv_cache_policy,
    )
    return ring_attention_with(q, k, v, ring_group, inputs, options, check_inputs=check_inputs, agree_group=agree_group)


def ring_attention_with(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ring_group,
    inputs: CallInputs,
    options: RingOptions = RingOptions(),
    *,
    check_inputs: bool = True,
    agree_group=None,
) -> Tensor:
    """:func:`ring_attention` with its options as objects (what Hybrid's ring level and the Megatron glue call)."""
    if ring_group is None:
        ring_group = dist.group.WORLD
    if dist.get_rank(ring_group) < 0:
        raise RingAttentionError("this rank is not a member of the ring process group it was given")
    scale = inputs.scale(q.shape[-1])
    if check_inputs:
        agree_ring(q, k, v, inputs, options, ring_group, scale, agree_group)
    if inputs.window is not None:  # a windowed layer: only the keys its windows reach travel
        return window_ring_attention_with(q, k, v, ring_group, inputs, options, check_inputs=False)
    plan = _Plan(ring_group, inputs, options, q, k, v, scale)
    return RingAttentionFunction.apply(q, k, v, inputs.softmax_offset, plan)
