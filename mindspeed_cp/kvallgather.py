"""All-gather K/V context parallelism (``--context-parallel-algo kvallgather_cp_algo``) over any process group.

    out = kvallgather_attention(q, k, v, group, causal=True)     # q/k/v/out [s_local, b, n, d] (sbhd)

Every rank all-gathers K and V once per call (its queries stay local), computes its queries against exactly the
keys they may see, and reduce-scatters dK/dV in backward: Llama 3's context parallelism, Megatron/Transformer
Engine's ``cp_comm_type=all_gather``, MindSpeed's ``kvallgather_cp_algo``, PyTorch's all-gather rotater and
ring-flash-attn's "llama3" function. With few KV heads it sends little (GQA 8:1 at CP 4: 4/9 of Ulysses' bytes,
which also moves Q and the output), and documents and arbitrary masks are simple: each query tile attends to one
contiguous range of the gathered keys (:mod:`mindspeed_cp.layout.gather`, a pure plan).

Per rank, forward + backward, with blocks ``s b hk (d + dv) e`` (``s = S/P``): the K/V all-gather sends ``(P-1)``
blocks and the dK/dV reduce-scatter ``(P-1)``; without a KV-cache policy backward gathers K/V again, ``(P-1)``
more - ``3 (P-1) s b hk (d + dv) e``, the ring's volume; with ``kv_cache_policy="full"`` it keeps the gathered K/V
and sends the textbook all-gather + reduce-scatter ``2 (P-1)/P S b hk (d + dv) e``, 2/3 of the ring's
(``"half"``: K kept, V gathered again; :mod:`mindspeed_cp.planner.costmodel`).

Decisions
- Layout: Megatron's zigzag (``2P`` chunks, rank ``r`` holds chunks ``r`` and ``2P-1-r``), not the contiguous split
  Megatron/TE also allow: with it every rank computes exactly ``(2P-1) c^2 + c (c+1)`` causal pairs per head
  (``c = S/2P``), so no rank waits for a slower one at the reduce-scatter, and the batch split, RoPE positions,
  padding to any length and the per-document zigzag of packed documents are the ring's, unchanged.
- Gathered K/V in global order (``[b, hk, S, d]``, placed by :func:`mindspeed_cp.layout.gather.gather_order` or the
  documents' order): a tile's keys are one slice, so a causal chunk needs one full tile and one diagonal tile,
  and so does each run of a packed document's chunk when every sample has the same layout (no mask at all);
  layouts differing per sample: one range per row tile, masked by document ids.
- A sliding window (``window_size``): the rank needs only the keys its windows reach - the halo exchange of
  :mod:`mindspeed_cp.window_ring` (each key from its owner, dK/dV straight back), which is what an all-gather
  restricted to the reach of the windows amounts to; the layer runs it on the same zigzag layout. Sinks
  (``softmax_offset``): one more term of every row's float32 merge, after the last tile (:func:`mindspeed_cp.
  blocks.add_sink`), its gradient summed over the rank's rows.
- Overlap: the gather is split by KV heads into G groups (:meth:`KVAllGatherOptions.head_groups`: up to 4, a
  divisor of hk); group g+1 travels while group g computes, and the tiles on the rank's own keys (the two diagonal
  ones) run before the first group arrives. In backward, group g's dK/dV reduce-scatter travels while group g+1
  computes. Async collectives (work handles): the same code overlaps on gloo's threads and on NCCL's stream.
  ``overlap=False`` (``--no-cp-allgather-overlap``): one gather of every head waited for before any compute, one
  reduce-scatter after it. One KV head (MQA at TP = hk) cannot be split: then it is one gather. (Transformer
  Engine's and PyTorch's all-gather CP expose their gather; ring-flash-attn 0.1.8's splits it by
  ``heads_k_stride`` and gathers the next stride during this one's compute, its reduce-scatters synchronous.)
- KV-cache policies: none gathers K/V again in backward (what Transformer Engine, MindSpeed and ring-flash-attn
  do: autograd keeps only the local q/k/v/out/lse, as the ring's); ``"full"`` keeps the gathered K/V instead of the
  local ones (``(P-1)`` more blocks per layer); ``"half"`` keeps the gathered K and the local V.
- dK/dV accumulate in float32 over the gathered positions and are reduce-scattered in the input dtype, as the
  ring sends its dK/dV accumulators.
- General masks: every row tile against every key with its slice of the mask (columns are global) - no host
  synchronisation to find empty ranges. Fully masked rows follow ``dead_rows`` (:mod:`mindspeed_cp.local`).
- Dropout: the masks of :mod:`mindspeed_cp.dropout`, keyed by global (documents: original) positions, so they
  equal one device's.

Every input check runs before the first collective and is agreed through one small all-gather
(:func:`mindspeed_cp.agreement.agree_kvallgather`), so a bad input raises the same error on every rank.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .agreement import KVAllGatherError, agree_kvallgather
from .blocks import add_sink, sink_input_grad, sink_logits
from .comm import PendingExchange, start_all_gather, start_reduce_scatter
from .kernels import acc_dtype, get_kernel, merge_
from .layout.gather import Tile, causal_tiles, document_span_tiles, document_tiles, full_tiles, gather_order
from .layout.sharding import zigzag_index
from .local import add_uniform_grad, uniform_rows
from .options import CallInputs, KVAllGatherOptions, RingOptions
from .stats import note_held, record_block
from .window_ring import window_ring_attention_with

Tensor = torch.Tensor

__all__ = [
    "kvallgather_attention",
    "kvallgather_attention_with",
    "KVAllGatherFunction",
    "KVAllGatherOptions",
    "KVAllGatherError",
    "TILE",
]

TILE = 256  # rows per tile where a per-score object is built (a mask's bias, dropout's keep mask, the math kernel)


# ------------------------------------------------------------------------------------------ plan
class _Plan:
    """Everything fixed for one call: geometry, KV-head groups, the tiles, kernel, masks, dropout positions."""

    def __init__(self, group, inputs: CallInputs, options: KVAllGatherOptions, q: Tensor, k: Tensor, v: Tensor, scale):
        P, r, s = dist.get_world_size(group), dist.get_rank(group), q.shape[0]
        n, hk = q.shape[2], k.shape[2]
        self.group, self.P, self.r, self.s, self.S = group, P, r, s, s * P
        self.d, self.dv, self.scale, self.kv_cache = q.shape[3], v.shape[3], scale, options.kv_cache_policy
        self.G = options.head_groups(hk)
        self.hg, self.ng = hk // self.G, n // self.G  # KV and query heads per group
        self.early = options.overlap  # the tiles on the rank's own keys run before the first gather arrives
        self.kernel = get_kernel(options.kernel, q.device)
        self.dropout, self.documents, self.mask = inputs.dropout, inputs.documents, inputs.attention_mask
        self.device = q.device
        self.sink = sink_logits(inputs.softmax_offset, n, acc_dtype(q.dtype), q.device)  # [1, n, 1] or None
        docs = self.documents
        blocked = self.dropout is not None or getattr(self.kernel, "name", None) == "math"
        self.doc_masks = False  # documents laid out differently per sample: masked span tiles
        if docs is not None:
            self.qpos = docs.ring_positions(r)  # [b, s] padded positions of this rank's rows
            if docs.same_layout:  # one order, mask-free run tiles
                self.tiles, self.order = document_tiles(docs, r, TILE if blocked else None), docs.order[0]
            else:
                self.tiles, self.order, self.doc_masks = document_span_tiles(docs, r, TILE), docs.order, True
        else:
            self.qpos = zigzag_index(self.S, P, r, q.device)  # [s]
            self.order = gather_order(self.S, P, q.device)
            if self.mask is not None:
                if self.mask.shape[-2] != s:  # the full [.., S, S] mask: this rank's rows
                    self.mask = self.mask.index_select(-2, self.qpos)
                self.tiles = full_tiles(s, self.S, TILE)
            elif inputs.causal:
                self.tiles = causal_tiles(P, r, s, TILE if blocked else None)
            else:
                self.tiles = full_tiles(s, self.S, TILE if blocked else None)
        self.dead = self.mask.all(-1) if self.mask is not None and options.dead_rows == "uniform" else None
        self.keyed = None  # the positions dropout is keyed by: global (documents: in the unpadded sample)
        if self.dropout is not None:
            self.keyed = docs.original(self.qpos) if docs is not None else self.qpos

    def kv_heads(self, g: int) -> slice:
        return slice(g * self.hg, (g + 1) * self.hg)

    def q_heads(self, g: int) -> slice:
        return slice(g * self.ng, (g + 1) * self.ng)

    def _heads(self, x: Optional[Tensor], g: int) -> Optional[Tensor]:
        """``x`` ``[B|1, N|1, ...]`` (a mask, dead rows) for group g's query heads."""
        return x if x is None or x.shape[1] == 1 else x[:, self.q_heads(g)]

    def tile_mask(self, t: Tile, g: int, b: int) -> Optional[Tensor]:
        """The tile's mask (bool, True = masked): a slice of the general mask, or from document ids."""
        if self.doc_masks:
            keys = torch.arange(*t.keys, device=self.device).expand(b, -1)
            return self.documents.block_mask(self.qpos[:, t.row_slice], keys)  # [b, 1, rows, keys]
        return self._heads(None if self.mask is None else self.mask[..., t.row_slice, t.key_slice], g)

    def tile_dropout(self, t: Tile, g: int, b: int):
        if self.dropout is None:
            return None
        cols = torch.arange(*t.keys, device=self.device)
        if self.documents is not None:
            cols = self.documents.original(cols.expand(b, -1))
        return self.dropout.block(self.keyed[..., t.row_slice], cols, self.dropout.heads[self.q_heads(g)])

    def dead_rows(self, g: int) -> Optional[Tensor]:
        return self._heads(self.dead, g)

    def place(self, gathered: Tensor, widths: Sequence[int]) -> List[Tensor]:
        """``[P*s, b, hg, sum(widths)]`` in rank order -> one ``[b, hg, S, w]`` tensor per width, in global order."""
        out, start = [], 0
        for w in widths:
            part = gathered[..., start : start + w].permute(1, 2, 0, 3)  # [P*s, b, hg, w] -> [b, hg, P*s, w]
            whole = note_held(part.new_empty(part.shape))
            if self.order.dim() == 1:
                whole.index_copy_(2, self.order, part)
            else:  # documents laid out differently per sample
                for i in range(part.shape[0]):
                    whole[i].index_copy_(1, self.order[i], part[i])
            out.append(whole)
            start += w
        return out

    def rank_order(self, parts: Sequence[Tensor], dtype) -> Tensor:
        """The inverse of :meth:`place`: ``[b, hg, S, w]`` tensors in global order -> ``[P*s, b, hg, sum(w)]`` in rank
        order and ``dtype`` (what the reduce-scatter takes)."""
        b, hg, S = parts[0].shape[:3]
        out = note_held(torch.empty((S, b, hg, sum(p.shape[3] for p in parts)), dtype=dtype, device=parts[0].device))
        start = 0
        for p in parts:
            dst = out[..., start : start + p.shape[3]].permute(1, 2, 0, 3)  # [b, hg, P*s, w] view
            if self.order.dim() == 1:
                dst.copy_(p.index_select(2, self.order))
            else:
                for i in range(b):
                    dst[i].copy_(p[i].index_select(1, self.order[i]))
            start += p.shape[3]
        return out


class _Gathers:
    """The all-gathers of one pass, one per KV-head group, each posted one group ahead of the compute that needs
    it: ``parts[g]`` ``[s, b, hg, sum(widths)]`` (this rank's), :meth:`get` -> ``[b, hg, S, w]`` per width."""

    def __init__(self, plan: _Plan, parts: List[Tensor], widths: Sequence[int]) -> None:
        self.plan, self.parts, self.widths = plan, parts, widths
        self.pending: dict = {}
        self._post(0)

    def _post(self, g: int) -> None:
        if g < len(self.parts) and self.parts[g] is not None:
            self.pending[g] = start_all_gather(self.parts[g], self.plan.group)
            self.parts[g] = None  # the pending gather holds it until it has left

    def get(self, g: int) -> List[Tensor]:
        self._post(g)
        self._post(g + 1)  # travels while group g computes
        return self.plan.place(self.pending.pop(g).wait(), self.widths)


def _pack(k: Tensor, v: Tensor, plan: _Plan) -> List[Tensor]:
    """This rank's K and V per KV-head group, side by side: ``[s, b, hg, d + dv]`` each (what one gather sends)."""
    return [note_held(torch.cat([k[:, :, plan.kv_heads(g)], v[:, :, plan.kv_heads(g)]], -1)) for g in range(plan.G)]


def _gathered(t: Tile, kv: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """The tile's (K, V) ``[b, hg, keys, d|dv]`` from its group's gathered ``[b, hg, S, d|dv]`` tensors."""
    return tuple(x[:, :, t.key_slice] for x in kv)


def _own(t: Tile, g: int, plan: _Plan, parts: Sequence[Tuple[Optional[Tensor], Optional[Tensor]]]):
    """An own-key tile's (K, V) ``[b, hg, keys, d|dv]``, contiguous: per tensor from this rank's local ``[b, hk, s, .]``
    one when given, else from the group's gathered one kept for backward. Contiguous copies (``c`` keys), so the
    kernel sees the same layout whichever holds them: the KV-cache policies compute exactly the same."""
    out = []
    for local, gathered in parts:
        x = local[:, plan.kv_heads(g), t.local_slice] if local is not None else gathered[:, :, t.key_slice]
        out.append(x.contiguous())
    return tuple(out)


# ------------------------------------------------------------------------------------------ forward
def _forward_tile(plan: _Plan, t: Tile, g: int, qb: Tensor, kv: Tuple[Tensor, Tensor], out, lse) -> None:
    qs = plan.q_heads(g)
    b, q_ = qb.shape[0], qb[:, qs, t.row_slice]
    mask = plan.tile_mask(t, g, b)
    record_block("forward", b * plan.ng, q_.shape[2], kv[0].shape[2], t.causal, mask)
    bo, bl = plan.kernel.forward(
        q_, *kv, scale=plan.scale, causal=t.causal, mask=mask, dropout=plan.tile_dropout(t, g, b)
    )
    merge_(out[:, qs, t.row_slice], lse[:, qs, t.row_slice], bo, bl)


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """q/k ``[s, b, n|hk, d]``, v ``[s, b, hk, dv]`` -> out ``[b, n, s, dv]``, lse ``[b, n, s]`` (float32/float64) and
    what the KV-cache policy keeps of the gathered K/V (per group: K and V for "full", K for "half")."""
    s, b, n = q.shape[:3]
    dt = acc_dtype(q.dtype)
    qb = q.permute(1, 2, 0, 3).contiguous()  # [s, b, n, d] -> [b, n, s, d], once
    out = torch.zeros((b, n, s, plan.dv), dtype=dt, device=q.device)
    lse = torch.full((b, n, s), -math.inf, dtype=dt, device=q.device)
    gathers = _Gathers(plan, _pack(k, v, plan), (plan.d, plan.dv))
    own = [t for t in plan.tiles if plan.early and t.local is not None]
    local = ((k.permute(1, 2, 0, 3), None), (v.permute(1, 2, 0, 3), None))  # [s, b, hk, d] -> [b, hk, s, d] views
    for g in range(plan.G):  # the rank's own keys while the first group travels
        for t in own:
            _forward_tile(plan, t, g, qb, _own(t, g, plan, local), out, lse)
    kept: List[Tensor] = []
    for g in range(plan.G):
        K, V = gathers.get(g)  # [b, hg, S, d], [b, hg, S, dv]
        for t in plan.tiles:
            if t not in own:
                _forward_tile(plan, t, g, qb, _gathered(t, (K, V)), out, lse)
        qs = plan.q_heads(g)
        if plan.dead is not None:  # Megatron's mean of V over every key on fully masked rows
            out[:, qs] = uniform_rows(out[:, qs], plan.dead_rows(g), V.sum(2), plan.S)
        kept += {"full": [K, V], "half": [K]}.get(plan.kv_cache, [])
    if plan.sink is not None:  # the sink's term, once per row (mindspeed_cp.blocks)
        out, lse = add_sink(out, lse, plan.sink)
    return out, lse, kept


# ------------------------------------------------------------------------------------------ backward
class _Source:
    """Where backward finds each group's gathered K/V: kept by the KV-cache policy, or gathered again (one group
    ahead of the compute); and the K/V of the tiles on the rank's own keys, which need no gather (:meth:`own`)."""

    def __init__(self, plan: _Plan, saved: List[Tensor]) -> None:
        self.plan, policy = plan, plan.kv_cache
        bnsd = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731 - [s, b, hk, d] -> [b, hk, s, d] view
        if policy == "full":  # saved: K0, V0, K1, V1, ...
            self.kept, self.gathers = [saved[2 * g : 2 * g + 2] for g in range(plan.G)], None
            self.local = (None, None)
        elif policy == "half":  # saved: v, K0, K1, ...
            v, *ks = saved
            self.kept = [[K] for K in ks]
            self.gathers = _Gathers(plan, [v[:, :, plan.kv_heads(g)] for g in range(plan.G)], (plan.dv,))
            self.local = (None, bnsd(v))
        else:  # saved: k, v
            k, v = saved
            self.kept = [[] for _ in range(plan.G)]
            self.gathers = _Gathers(plan, _pack(k, v, plan), (plan.d, plan.dv))
            self.local = (bnsd(k), bnsd(v))

    def get(self, g: int) -> Tuple[Tensor, Tensor]:
        return tuple(self.kept[g] + (self.gathers.get(g) if self.gathers is not None else []))

    def own(self, t: Tile, g: int) -> Tuple[Tensor, Tensor]:
        kept = self.kept[g] + [None] * (2 - len(self.kept[g]))
        return _own(t, g, self.plan, list(zip(self.local, kept)))


def _backward_tile(plan: _Plan, t: Tile, g: int, tensors, kv, dq: Tensor, dK: Tensor, dV: Tensor) -> None:
    """Gradients of one tile: dq accumulated on its rows, dK / dV ``[b, hg, S, d|dv]`` on its keys."""
    qb, dob, ob, lse = tensors
    qs, rows, b = plan.q_heads(g), t.row_slice, qb.shape[0]
    mask = plan.tile_mask(t, g, b)
    record_block("backward", b * plan.ng, rows.stop - rows.start, kv[0].shape[2], t.causal, mask)
    gq, gk, gv = plan.kernel.backward(
        dob[:, qs, rows],
        qb[:, qs, rows],
        *kv,
        ob[:, qs, rows],
        lse[:, qs, rows],
        scale=plan.scale,
        causal=t.causal,
        mask=mask,
        dropout=plan.tile_dropout(t, g, b),
    )
    dq[:, qs, rows] += gq
    dK[:, :, t.key_slice] += gk
    dV[:, :, t.key_slice] += gv


def _backward(plan: _Plan, dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, saved: List[Tensor]):
    """-> dq ``[b, n, s, d]`` (float32/float64), dk ``[s, b, hk, d]`` and dv ``[s, b, hk, dv]`` (q's dtype)."""
    s, b, n, d = q.shape
    tensors = tuple(x.permute(1, 2, 0, 3).contiguous() for x in (q, dout, out)) + (lse,)  # [b, n, s, .], once
    dq = torch.zeros((b, n, s, d), dtype=lse.dtype, device=q.device)
    source = _Source(plan, saved)
    own = [t for t in plan.tiles if plan.early and t.local is not None]
    scatters: List[PendingExchange] = []
    for g in range(plan.G):
        dK = note_held(torch.zeros((b, plan.hg, plan.S, plan.d), dtype=lse.dtype, device=q.device))
        dV = note_held(torch.zeros((b, plan.hg, plan.S, plan.dv), dtype=lse.dtype, device=q.device))
        for t in own:  # the rank's own keys while the group's gather travels
            _backward_tile(plan, t, g, tensors, source.own(t, g), dq, dK, dV)
        K, V = source.get(g)
        for t in plan.tiles:
            if t not in own:
                _backward_tile(plan, t, g, tensors, _gathered(t, (K, V)), dq, dK, dV)
        add_uniform_grad(dV, tensors[1][:, plan.q_heads(g)], plan.dead_rows(g), plan.S)
        scatters.append(start_reduce_scatter(plan.rank_order((dK, dV), q.dtype), plan.group))  # travels meanwhile
        del dK, dV
    parts = [x.wait() for x in scatters]  # [s, b, hg, d + dv] each
    dk = torch.cat([p[..., : plan.d] for p in parts], dim=2)
    dv = torch.cat([p[..., plan.d :] for p in parts], dim=2)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------ autograd
class KVAllGatherFunction(torch.autograd.Function):
    """``apply(q, k, v, sink, plan)`` (``sink``: ``[n]`` logits or None); build the plan with
    :func:`kvallgather_attention` (which validates)."""

    @staticmethod
    def forward(ctx, q, k, v, sink, plan):
        out, lse, kept = _forward(plan, q, k, v)
        out = out.permute(2, 0, 1, 3).to(q.dtype).contiguous()  # [b, n, s, dv] -> [s, b, n, dv], once
        ctx.plan = plan
        local = {None: [k, v], "half": [v], "full": []}[plan.kv_cache]  # what backward gathers again
        ctx.save_for_backward(q, out, lse, sink, *local, *kept)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, sink, *saved = ctx.saved_tensors
        plan = ctx.plan
        bnsd = (x.permute(1, 2, 0, 3) for x in (dout, out))  # [s, b, n, d] -> [b, n, s, d] views
        dsink = sink_input_grad(sink, plan.sink, *bnsd, lse, ctx.needs_input_grad[3])
        dq, dk, dv = _backward(plan, dout, q, out, lse, saved)
        return dq.permute(2, 0, 1, 3).to(q.dtype).contiguous(), dk, dv, dsink, None


def kvallgather_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group=None,
    *,
    causal: bool = True,
    attention_mask: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    overlap: bool = True,
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
    """Attention over the sequence shared by the ranks of ``group`` (zigzag layout), K/V all-gathered.

    q ``[s_local, b, n, d]``, k ``[s_local, b, nk, d]``, v ``[s_local, b, nk, dv]`` (``n % nk == 0``; MLA: ``dv`` its
    own) -> out ``[s_local, b, n, dv]``. ``group``: the CP ranks in zigzag order (None = the default group).
    ``causal``: zigzag causal; ``attention_mask`` (with ``causal=False``): bool ``[b|1, n|1, s_local|S, S]``, True =
    masked, columns in global order. ``softmax_scale``: default ``1/sqrt(d)``. ``overlap``: split the gather by
    KV heads and overlap it with compute (see the module docstring). ``kernel``: a name of
    :data:`mindspeed_cp.kernels.KERNELS`, a kernel object, or None (by device). ``dropout``: a
    :class:`mindspeed_cp.dropout.AttentionDropout`. ``dead_rows``: fully masked rows give 0 (``"zero"``) or the mean
    of V over every key (``"uniform"``, Megatron's local attention). ``check_inputs``: agree on every rank's inputs
    first (:mod:`mindspeed_cp.agreement`); ``agree_group``: where (default ``group``; a gloo twin keeps it off the
    device). ``documents``: a :class:`mindspeed_cp.layout.packing.Documents` with ``ring`` = the group's size
    (document-causal attention, ``causal=True``, no mask). ``kv_cache_policy``: None, ``"full"`` or ``"half"``.
    ``window_size``: Megatron's ``(left, right)`` sliding window - only the keys the windows reach are gathered, from
    their owners (the halo exchange of :mod:`mindspeed_cp.window_ring`). ``softmax_offset``: ``[n]`` sink logits
    (off-by-one: zeros; learnable: the parameter), one more term of every row's softmax.
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
    options = KVAllGatherOptions(overlap=overlap, kernel=kernel, dead_rows=dead_rows, kv_cache_policy=kv_cache_policy)
    return kvallgather_attention_with(
        q, k, v, group, inputs, options, check_inputs=check_inputs, agree_group=agree_group
    )


def kvallgather_attention_with(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group,
    inputs: CallInputs,
    options: KVAllGatherOptions = KVAllGatherOptions(),
    *,
    check_inputs: bool = True,
    agree_group=None,
) -> Tensor:
    """:func:`kvallgather_attention` with its options as objects (what the Megatron glue calls)."""
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise KVAllGatherError("this rank is not a member of the all-gather process group it was given")
    scale = inputs.scale(q.shape[-1])
    if check_inputs:
        agree_kvallgather(q, k, v, inputs, options, group, scale, agree_group)
    if inputs.window is not None:  # gather only what the windows reach: the halo exchange, from each key's owner
        ring = RingOptions(kernel=options.kernel, dead_rows=options.dead_rows, kv_cache_policy=options.kv_cache_policy)
        return window_ring_attention_with(q, k, v, group, inputs, ring, check_inputs=False)
    return KVAllGatherFunction.apply(q, k, v, inputs.softmax_offset, _Plan(group, inputs, options, q, k, v, scale))
