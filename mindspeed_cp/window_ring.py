"""Sliding-window attention over a group of ranks: the window-aware ring (``megatron_cp_algo`` on a windowed
layer, Hybrid's ring level on one, ``--window-attn-cp-algo megatron_cp_algo`` under any layout).

    out = window_ring_attention(q, k, v, group, window_size=(128, 0))   # q/k/v/out [s_local, b, n, d], zigzag
    out = window_ring_attention_with(q, k, v, group, inputs, options, layout)   # any layout (layout_runs)

A query at position ``i`` sees only the keys at ``i - left .. i + right``. So instead of passing every K/V block
around the ring, each rank receives exactly the keys its queries' windows reach, directly from the rank holding
them, and returns exactly their dK/dV. :func:`mindspeed_cp.layout.window.plan_halo` plans it from the layout
alone (no communication): at step ``t`` every rank sends to the rank ``t`` places after it what that rank needs
and receives from the one ``t`` before; steps nobody needs are left out. A window shorter than a shard is a halo
exchange with the neighbours; a longer one reaches as many ranks as it must (a partial ring). Each piece is
attended in the blocks :func:`mindspeed_cp.layout.window.window_blocks` gives (full, causal and anti-causal
blocks - no mask: an edge a run of tokens cuts splits again), merged in float32 log-sum-exp form.

Worked example - Megatron's zigzag, S = 2048, P = 4 (chunks of c = 256; rank r holds chunks r and 7 - r), causal
window 64: chunk j needs the last 64 tokens of chunk j - 1. Rank 1 receives 64 tokens of chunk 0 from rank 0 and 64
of chunk 5 from rank 2 (step t = 3, i.e. -1); ranks 0 and 3 receive 64 each (rank 3's chunk 4 follows its own
chunk 3). Per rank and layer, forward + backward: ``3 H b hk (d + dv) e`` bytes with H the tokens received (K/V
forward, K/V again and dK/dV backward; ``kv_cache_policy`` ``"full"`` keeps the K/V: ``2 H``, ``"half"`` keeps K:
``2.5 H``) against the ring's ``3 (P-1) s_local b hk (d + dv) e``: here H = 128, s_local = 512, 0.083 of it.

Decisions
- Direct exchange at distance ``t`` rather than hop by hop: each token travels once, so the bytes are the halo's,
  whatever the layout (contiguous, zigzag, Hybrid's, per-document zigzag). The next step's exchange is posted
  before the current piece is computed; the dK/dV of a piece go back while the next one is computed.
- No balanced layout of its own: a windowed layer's work per query is bounded by the window, so every layout the
  batch already has (zigzag for Ring/Hybrid, contiguous for Ulysses) is balanced to within one window per rank
  (the first tokens of the sequence see fewer keys). A model mixing windowed and full layers keeps one layout.
- Double Ring's windows and the overlap communicator do not apply: a halo step is one batched send/receive pair.
- Rows never come out empty: a query always sees itself, so there are no dead rows to follow.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .agreement import RingAttentionError, agree_window_ring
from .blocks import PlannedBlocks, add_sink, sink_input_grad, sink_logits
from .comm import KVPair, PairExchanger
from .kernels import acc_dtype, get_kernel
from .layout.window import HaloPlan, Run, Window, layout_runs, plan_halo, window_blocks, zigzag_layout
from .local import DEFAULT_TILE, window_tile
from .options import CallInputs, RingOptions

Tensor = torch.Tensor

__all__ = ["window_ring_attention", "window_ring_attention_with", "WindowRingFunction", "zigzag_layout"]


def _bnsd(x: Tensor) -> Tensor:
    return x.permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d] (a view)


def _sbhd(x: Tensor) -> Tensor:
    return x.permute(2, 0, 1, 3)  # [b, h, s, d] -> [s, b, h, d] (a view)


# ------------------------------------------------------------------------------------------ plan
def documents_layout(documents, ring: bool) -> Tuple[Tuple[Run, ...], ...]:
    """The runs of packed documents: per ring position (``ring``: Ring/Hybrid's ring level) or per CP rank."""
    _, order, source = documents._host
    if bool((order != order[:1]).any()) or bool((source != source[:1]).any()):
        raise RingAttentionError(
            "a sliding window with packed documents laid out differently per sample: use --micro-batch-size 1"
        )
    ids = documents._host[0][0]
    count = documents.ring if ring else documents.cp
    pos = [(documents.ring_positions(j) if ring else documents.positions(j))[0].cpu() for j in range(count)]
    return layout_runs(pos, [ids.gather(0, p) for p in pos])


@functools.lru_cache(maxsize=256)
def _halo(layout: Tuple[Tuple[Run, ...], ...], rank: int, window: Window) -> HaloPlan:
    return plan_halo(layout, rank, window)


@functools.lru_cache(maxsize=1024)
def _blocks(q_runs: Tuple[Run, ...], k_runs: Tuple[Run, ...], window: Window) -> tuple:
    t = window_tile(window)
    return tuple(window_blocks(q_runs, k_runs, window, t, max(t, DEFAULT_TILE)))


def _positions(runs: Sequence[Run], device) -> Tensor:
    """``[n]`` global positions of a buffer described by ``runs`` (in buffer order)."""
    parts = [torch.arange(r.pos, r.pos + r.n) for r in sorted(runs, key=lambda r: r.index)]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)


def _index(ranges: Sequence[Tuple[int, int]], device) -> Tensor:
    parts = [torch.arange(a, b) for a, b in ranges]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)


class _Plan:
    """Everything fixed for one call: the halo steps, their blocks, index tensors and buffers' shapes."""

    def __init__(self, group, inputs: CallInputs, options: RingOptions, layout, q: Tensor, k: Tensor, v: Tensor):
        self.window, self.scale = inputs.window, inputs.scale(q.shape[-1])
        self.exchanger = PairExchanger(group)
        halo = _halo(layout, self.exchanger.pos, self.window)
        self.steps = halo.steps
        self.own_blocks = _blocks(halo.mine, halo.mine, self.window)
        self.step_blocks = [_blocks(halo.mine, st.recv, self.window) for st in self.steps]
        dev = q.device
        self.send_idx = [_index(st.send, dev) for st in self.steps]
        mine = _positions(halo.mine, dev)
        recv = [_positions(st.recv, dev) for st in self.steps]
        keyed = _keyed(inputs.documents, [mine] + recv)
        kernel = get_kernel(options.kernel, dev)
        drop = inputs.dropout
        self.own = PlannedBlocks(kernel, self.scale, self.window, mine, mine, drop, keyed[0], keyed[0])
        self.at = [
            PlannedBlocks(kernel, self.scale, self.window, mine, p, drop, keyed[0], kp)
            for p, kp in zip(recv, keyed[1:])
        ]
        b, hk, d, dv = k.shape[1], k.shape[2], k.shape[3], v.shape[3]
        self.recv_pairs = [KVPair((st.recv_count, b, hk, d), (st.recv_count, b, hk, dv), False) for st in self.steps]
        self.send_pairs = [KVPair((st.send_count, b, hk, d), (st.send_count, b, hk, dv), False) for st in self.steps]
        self.kv_cache = options.kv_cache_policy
        self.sink = sink_logits(inputs.softmax_offset, q.shape[2], acc_dtype(q.dtype), dev)

    def send_kv(self, i: int, k: Tensor, v: Tensor, v_only: bool = False):
        """Post step ``i``'s K/V (``v_only``: V alone, the ``"half"`` policy's backward)."""
        idx, pair = self.send_idx[i], self.recv_pairs[i]
        if v_only:
            payload = v.index_select(0, idx).reshape(-1)  # [n_send, b, hk, dv]
            recv = pair.numel - pair.nk
        else:
            payload = self.send_pairs[i].pack(k.index_select(0, idx), v.index_select(0, idx))
            recv = pair.numel
        return self.exchanger.start(payload, self.steps[i].t, recv, k, "halo_kv")

    def send_grads(self, i: int, gk: Tensor, gv: Tensor, dtype):
        """Post step ``i``'s dK/dV back to the keys' owner; receive the dK/dV of the keys this rank sent."""
        payload = self.recv_pairs[i].pack(_sbhd(gk).to(dtype), _sbhd(gv).to(dtype))
        return self.exchanger.start(payload, -self.steps[i].t, self.send_pairs[i].numel, payload, "halo_dkv")


def _keyed(documents, positions: List[Tensor]) -> List[Tensor]:
    """What attention dropout is keyed by: positions in the unpadded sample (documents: pads numbered after it)."""
    if documents is None:
        return positions
    return [documents.original(p[None].to(documents.source.device))[0].to(p.device) for p in positions]


# ------------------------------------------------------------------------------------------ forward / backward
def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """q ``[s, b, n, d]``, k/v ``[s, b, hk, d|dv]`` -> out ``[b, n, s, dv]``, lse ``[b, n, s]`` (float32/64) and the
    received pieces the KV-cache policy keeps."""
    s, b, n, dv = q.shape[:3] + v.shape[3:]
    dt = acc_dtype(q.dtype)
    out = torch.zeros((b, n, s, dv), dtype=dt, device=q.device)
    lse = torch.full((b, n, s), -math.inf, dtype=dt, device=q.device)
    qb = _bnsd(q)
    pending = plan.send_kv(0, k, v) if plan.steps else None
    plan.own.forward(qb, _bnsd(k), _bnsd(v), plan.own_blocks, out, lse)
    kept: List[Tensor] = []
    for i in range(len(plan.steps)):
        buf = pending.wait()
        pending = plan.send_kv(i + 1, k, v) if i + 1 < len(plan.steps) else None
        if plan.kv_cache == "full":
            kept.append(buf)
        elif plan.kv_cache == "half":
            kept.append(plan.recv_pairs[i].k_part(buf).clone())
        kb, vb = plan.recv_pairs[i].views(buf)
        plan.at[i].forward(qb, kb, vb, plan.step_blocks[i], out, lse)
    if plan.sink is not None:
        out, lse = add_sink(out, lse, plan.sink)
    return out, lse, kept


def _step_kv(plan: _Plan, i: int, kept: List[Tensor], pending) -> Tuple[Tensor, Tensor]:
    """(K, V) ``[b, hk, n, d|dv]`` of step ``i`` in backward: received again, kept, or K kept and V received."""
    pair = plan.recv_pairs[i]
    if plan.kv_cache == "full":
        return pair.views(kept[i])
    if plan.kv_cache == "half":
        return pair.k_view(kept[i]), pair.v_view(pending.wait())
    return pair.views(pending.wait())


def _backward(plan: _Plan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kept):
    """-> dq, dk, dv ``[b, heads, s, d|dv]`` (float32/64)."""
    dt = lse.dtype
    qb, dob, ob = _bnsd(q), _bnsd(dout), _bnsd(out)
    dq, dk, dv = (torch.zeros(_bnsd(x).shape, dtype=dt, device=q.device) for x in (q, k, v))
    moves = plan.kv_cache != "full"
    half = plan.kv_cache == "half"
    pending = plan.send_kv(0, k, v, half) if plan.steps and moves else None
    plan.own.backward(dob, qb, _bnsd(k), _bnsd(v), ob, lse, plan.own_blocks, dq, dk, dv)
    returns = []
    for i in range(len(plan.steps)):
        kb, vb = _step_kv(plan, i, kept, pending)
        pending = plan.send_kv(i + 1, k, v, half) if moves and i + 1 < len(plan.steps) else None
        gk = torch.zeros(kb.shape, dtype=dt, device=q.device)
        gv = torch.zeros(vb.shape, dtype=dt, device=q.device)
        plan.at[i].backward(dob, qb, kb, vb, ob, lse, plan.step_blocks[i], dq, gk, gv)
        returns.append(plan.send_grads(i, gk, gv, k.dtype))
    dk_s, dv_s = _sbhd(dk), _sbhd(dv)  # [s, b, hk, d] views of the accumulators
    for i, pending_grads in enumerate(returns):
        got = pending_grads.wait()
        gk, gv = plan.send_pairs[i].unpack(got)  # [n_send, b, hk, d|dv]
        dk_s.index_add_(0, plan.send_idx[i], gk.to(dt))
        dv_s.index_add_(0, plan.send_idx[i], gv.to(dt))
    return dq, dk, dv


class WindowRingFunction(torch.autograd.Function):
    """``apply(q, k, v, sink, plan)``; build the plan with :func:`window_ring_attention_with` (which validates)."""

    @staticmethod
    def forward(ctx, q, k, v, sink, plan):
        out, lse, kept = _forward(plan, q, k, v)
        out = _sbhd(out).to(q.dtype).contiguous()  # [b, n, s, dv] -> [s, b, n, dv]
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, sink, *kept)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink, *kept = ctx.saved_tensors
        plan = ctx.plan
        dsink = sink_input_grad(sink, plan.sink, _bnsd(dout), _bnsd(out), lse, ctx.needs_input_grad[3])
        dq, dk, dv = _backward(plan, dout.contiguous(), q, k, v, out, lse, kept)
        return (*(_sbhd(g).to(x.dtype).contiguous() for g, x in ((dq, q), (dk, k), (dv, v))), dsink, None)


# ------------------------------------------------------------------------------------------ public
def window_ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group=None,
    *,
    window_size,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    softmax_offset: Optional[Tensor] = None,
    kernel=None,
    dropout=None,
    documents=None,
    kv_cache_policy: Optional[str] = None,
    layout=None,
    check_inputs: bool = True,
    agree_group=None,
) -> Tensor:
    """Sliding-window attention of the sequence shared by ``group``'s ranks: q ``[s_local, b, n, d]``, k
    ``[s_local, b, nk, d]``, v ``[s_local, b, nk, dv]`` -> ``[s_local, b, n, dv]``.

    ``window_size``: Megatron's ``(left, right)`` (``-1``: unbounded side); query i sees keys i-left .. i+right.
    ``layout``: every rank's tokens (:func:`mindspeed_cp.layout.window.layout_runs` of their global positions);
    default Megatron's zigzag over ``s_local * P`` tokens, or with ``documents`` their per-document zigzag (a
    window then stays inside each document). ``softmax_offset``: ``[n]`` sink logits (gradients flow to them).
    ``kernel``, ``dropout``, ``kv_cache_policy``, ``check_inputs``, ``agree_group``: as for
    :func:`mindspeed_cp.ring.ring_attention`.
    """
    inputs = CallInputs(
        causal=causal,
        softmax_scale=softmax_scale,
        dropout=dropout,
        documents=documents,
        window_size=window_size,
        softmax_offset=softmax_offset,
    )
    options = RingOptions(kernel=kernel, kv_cache_policy=kv_cache_policy)
    return window_ring_attention_with(
        q, k, v, group, inputs, options, layout, check_inputs=check_inputs, agree_group=agree_group
    )


def window_ring_attention_with(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group,
    inputs: CallInputs,
    options: RingOptions = RingOptions(),
    layout=None,
    *,
    check_inputs: bool = True,
    agree_group=None,
) -> Tensor:
    """:func:`window_ring_attention` with its options as objects (the ring level, Hybrid, the Megatron glue)."""
    if group is None:
        group = dist.group.WORLD
    P = dist.get_world_size(group)
    if layout is None:
        docs = inputs.documents
        layout = zigzag_layout(q.shape[0] * P, P) if docs is None else documents_layout(docs, docs.ring == P)
    if check_inputs:
        agree_window_ring(q, k, v, inputs, options, layout, group, agree_group)
    plan = _Plan(group, inputs, options, layout, q, k, v)
    return WindowRingFunction.apply(q, k, v, inputs.softmax_offset, plan)
