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
- Gathered K/V as delivered: every rank packs its K and V into one flat buffer (``[b, hg, s, d]`` then
  ``[b, hg, s, dv]``, the kernels' layout), so after the gather rank j's K/V are views of row j - no reordering
  copy. Causal and full attention compute on those blocks (:func:`mindspeed_cp.layout.gather.block_tiles`: the
  rank's own block first, causal over its two chunks, then one tile per other rank, each ``2c^2`` pairs - the
  ring's steps on keys gathered at once), and dK/dV accumulate in the same flat layout, which is what the
  reduce-scatter sends. Packed documents and general masks need keys in global order (one contiguous range per
  tile): those K/V are copied into ``[b, hg, S, d]`` once per group (:class:`_Keys`), runs of a packed document's
  chunk then get one full tile per gap before them and one own tile (no mask at all) when every sample has the
  same layout; layouts differing per sample: one range per row tile, masked by document ids.
- A sliding window (``window_size``): the rank needs only the keys its windows reach - the halo exchange of
  :mod:`mindspeed_cp.window_ring` (each key from its owner, dK/dV straight back), which is what an all-gather
  restricted to the reach of the windows amounts to; the layer runs it on the same zigzag layout. Sinks
  (``softmax_offset``): one more term of every row's float32 merge, after the last tile (:func:`mindspeed_cp.
  blocks.add_sink`), its gradient summed over the rank's rows.
- Overlap: the tiles on the rank's own keys (its own block) run while the gather travels. On an accelerator the
  gather is also split by KV heads into G groups (:meth:`KVAllGatherOptions.head_groups`: up to 4, a divisor of
  hk; ``gather_groups`` sets it); group g+1 travels while group g computes, and in backward group g's dK/dV
  reduce-scatter while group g+1 computes. Async collectives (work handles): the same code overlaps on gloo's
  threads and on NCCL's stream. On a CPU one group: gloo's transfers are copies on the cores the kernels use, so a
  split hides nothing and multiplies the calls (measured: 4 groups 1.05-1.21x the CPU time of one), and gloo's
  all-gather / reduce-scatter become batches of isend/irecv (Note [gloo collectives as point-to-point] in
  :mod:`mindspeed_cp.comm`). ``overlap=False`` (``--no-cp-allgather-overlap``): one group, one reduce-scatter
  after the compute. One KV head (MQA at TP = hk) cannot be split: then it is one gather. (Transformer Engine's
  and PyTorch's all-gather CP expose their gather; ring-flash-attn 0.1.8's splits it by ``heads_k_stride`` and
  gathers the next stride during this one's compute, its reduce-scatters synchronous.)
- KV-cache policies: none gathers K/V again in backward (what Transformer Engine, MindSpeed and ring-flash-attn
  do: autograd keeps only the local q/k/v/out/lse, as the ring's); ``"full"`` keeps the gathered K/V instead of the
  local ones (``(P-1)`` more blocks per layer); ``"half"`` keeps the gathered K and the local V.
- dK/dV accumulate in float32 over the gathered positions and are reduce-scattered in the input dtype, as the
  ring sends its dK/dV accumulators (on a CPU the P parts are summed in float32 in rank order, then cast).
- General masks: every row tile against every key with its slice of the mask (columns are global) - no host
  synchronisation to find empty ranges. Fully masked rows follow ``dead_rows`` (:mod:`mindspeed_cp.local`).
- Dropout: the masks of :mod:`mindspeed_cp.dropout`, keyed by global (documents: original) positions, so they
  equal one device's.

Every input check runs before the first collective and is agreed through one small all-gather
(:func:`mindspeed_cp.agreement.agree_kvallgather`), so a bad input raises the same error on every rank.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .agreement import KVAllGatherError, agree_kvallgather
from .blocks import add_sink, sink_input_grad, sink_logits
from .comm import KVPair, PendingExchange, start_all_gather, start_reduce_scatter
from .kernels import acc_dtype, get_kernel, merge_
from .layout.gather import Tile, block_tiles, document_span_tiles, document_tiles, full_tiles, zigzag_runs
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
        self.G = options.head_groups(hk, q.device.type)
        self.hg, self.ng = hk // self.G, n // self.G  # KV and query heads per group
        self.kernel = get_kernel(options.kernel, q.device)
        self.dropout, self.documents, self.mask = inputs.dropout, inputs.documents, inputs.attention_mask
        self.device = q.device
        self.sink = sink_logits(inputs.softmax_offset, n, acc_dtype(q.dtype), q.device)  # [1, n, 1] or None
        docs = self.documents
        blocked = self.dropout is not None or getattr(self.kernel, "name", None) == "math"
        self.doc_masks = False  # documents laid out differently per sample: masked span tiles
        # where the gathered rows go in global order (for tiles in global order only): runs (src, dst, n) of one
        # order for the batch, or (per sample) an index
        self.runs, self.order = None, None
        if docs is not None:
            self.qpos = docs.ring_positions(r)  # [b, s] padded positions of this rank's rows
            if docs.same_layout:  # one order, mask-free run tiles
                self.tiles, self.runs = document_tiles(docs, r, TILE if blocked else None), docs.gather_runs()
            else:
                self.tiles, self.order, self.doc_masks = document_span_tiles(docs, r, TILE), docs.order, True
        else:
            self.qpos = zigzag_index(self.S, P, r, q.device)  # [s]
            self.runs = zigzag_runs(self.S, P)
            if self.mask is not None:
                if self.mask.shape[-2] != s:  # the full [.., S, S] mask: this rank's rows
                    self.mask = self.mask.index_select(-2, self.qpos)
                self.tiles = full_tiles(s, self.S, TILE)
            else:  # every rank's block as the gather delivers it
                self.tiles = block_tiles(P, r, s, inputs.causal, TILE if blocked else None)
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

    def block_of(self, t: Tile) -> Optional[int]:
        """The rank whose gathered block holds the tile's keys (its own: this rank), or None: global order."""
        return self.r if t.own else t.block

    def tile_dropout(self, t: Tile, g: int, b: int):
        if self.dropout is None:
            return None
        if t.own:
            cols = self.qpos[..., t.key_slice]
        elif t.block is not None:  # zigzag: rank j's positions
            cols = zigzag_index(self.S, self.P, t.block, self.device)[t.key_slice]
        else:
            cols = torch.arange(*t.keys, device=self.device)
        if self.documents is not None:
            cols = self.documents.original(cols if t.own else cols.expand(b, -1))
        return self.dropout.block(self.keyed[..., t.row_slice], cols, self.dropout.heads[self.q_heads(g)])

    def dead_rows(self, g: int) -> Optional[Tensor]:
        return self._heads(self.dead, g)

    # -------------------------------------------------------------- where K/V are: rank blocks, global order
    def kv_pair(self, b: int) -> KVPair:
        """One group's K and V in one flat buffer, each ``[b, hg, s, d|dv]`` (what one gather sends per rank)."""
        return KVPair((self.s, b, self.hg, self.d), (self.s, b, self.hg, self.dv), True)

    def pack(self, k: Optional[Tensor], v: Tensor, g: int) -> Tensor:
        """Group g's heads of this rank's ``[s, b, hk, .]`` K and V (``k`` None: V alone) -> one flat buffer."""
        kv = self.kv_pair(v.shape[1])
        if k is not None:
            return note_held(kv.pack(k[:, :, self.kv_heads(g)], v[:, :, self.kv_heads(g)]))
        return note_held(v[:, :, self.kv_heads(g)].permute(1, 2, 0, 3).contiguous().view(-1))

    def blocks(self, kf: Tensor, vf: Tensor) -> "_Keys":
        """Every rank's K and V of one group: ``kf`` ``[P, b*hg*s*d]`` and ``vf`` ``[P, b*hg*s*dv]`` (rows in rank
        order, views of what the gather delivered or the KV-cache policy kept)."""
        return _Keys(self, kf, vf)

    def packed_blocks(self, flat: Tensor) -> "_Keys":
        """:meth:`blocks` of a ``[P, numel]`` gather of packed K/V (each row K's elements, then V's)."""
        nk = flat.shape[1] // (self.d + self.dv) * self.d
        return _Keys(self, flat[:, :nk], flat[:, nk:])


class _Keys:
    """One group's K/V for the tiles: rank ``j``'s block ``[b, hg, s, d|dv]`` (a view, no copy) for the tiles in rank
    blocks (own tiles: this rank's), and - built once, only for tiles in global order (documents, masks) - the whole
    ``[b, hg, S, d|dv]`` in global order (:meth:`whole`: one strided copy per run of the gather order)."""

    def __init__(self, plan: _Plan, kf: Tensor, vf: Tensor) -> None:
        self.plan, self.kf, self.vf, self._whole = plan, kf, vf, None
        b = kf.shape[1] // (plan.hg * plan.s * plan.d)
        self.k_shape, self.v_shape = (b, plan.hg, plan.s, plan.d), (b, plan.hg, plan.s, plan.dv)

    def block(self, j: int) -> Tuple[Tensor, Tensor]:
        return self.kf[j].view(self.k_shape), self.vf[j].view(self.v_shape)

    def whole(self) -> Tuple[Tensor, Tensor]:
        if self._whole is None:
            self._whole = tuple(_to_global(self.plan, [self.block(j)[i] for j in range(self.plan.P)]) for i in (0, 1))
        return self._whole

    def tile(self, t: Tile) -> Tuple[Tensor, Tensor]:
        """The tile's (K, V) ``[b, hg, keys, d|dv]``."""
        j = self.plan.block_of(t)
        kv = self.whole() if j is None else self.block(j)
        return tuple(x[:, :, t.key_slice] for x in kv)


def _runs_by_block(plan: _Plan):
    """The gather order's runs ``(src, dst, n)`` split at rank blocks: ``(j, local row, global position, n)``."""
    for src, dst, n in plan.runs:
        while n:
            j, row = divmod(src, plan.s)
            m = min(n, plan.s - row)
            yield j, row, dst, m
            src, dst, n = src + m, dst + m, n - m


def _to_global(plan: _Plan, blocks: List[Tensor]) -> Tensor:
    """Every rank's ``[b, hg, s, w]`` block -> ``[b, hg, S, w]`` in global order (a copy)."""
    b, hg, s, w = blocks[0].shape
    whole = note_held(blocks[0].new_empty((b, hg, plan.S, w)))
    if plan.runs is not None:
        for j, row, dst, n in _runs_by_block(plan):
            whole[:, :, dst : dst + n].copy_(blocks[j][:, :, row : row + n])
    else:  # documents laid out differently per sample
        cat = torch.cat(blocks, 2)
        for i in range(b):
            whole[i].index_copy_(1, plan.order[i], cat[i])
    return whole


def _add_global(plan: _Plan, whole: Tensor, blocks: List[Tensor]) -> None:
    """The inverse of :func:`_to_global`, accumulating: ``[b, hg, S, w]`` (global order) added into the blocks."""
    if plan.runs is not None:
        for j, row, dst, n in _runs_by_block(plan):
            blocks[j][:, :, row : row + n] += whole[:, :, dst : dst + n]
        return
    for i in range(whole.shape[0]):
        part = whole[i].index_select(1, plan.order[i])  # [hg, P*s, w] in rank order
        for j in range(plan.P):
            blocks[j][i] += part[:, j * plan.s : (j + 1) * plan.s]


class _Grads:
    """One group's dK/dV: float32 (float64) accumulators in the gather's flat layout ``[P, b*hg*s*(d+dv)]`` (what
    the reduce-scatter sends, no reordering) for tiles in rank blocks; for tiles in global order a whole ``[b, hg,
    S, d|dv]`` pair, added into the blocks once at the end."""

    def __init__(self, plan: _Plan, b: int, dtype, device) -> None:
        self.plan, self.kv = plan, plan.kv_pair(b)
        self.flat = note_held(torch.zeros((plan.P, self.kv.numel), dtype=dtype, device=device))
        self.whole = None
        if any(plan.block_of(t) is None for t in plan.tiles):
            shape = (b, plan.hg, plan.S)
            self.whole = tuple(
                note_held(torch.zeros(shape + (w,), dtype=dtype, device=device)) for w in (plan.d, plan.dv)
            )

    def block(self, j: int) -> Tuple[Tensor, Tensor]:
        return self.kv.views(self.flat[j])

    def add(self, t: Tile, gk: Tensor, gv: Tensor) -> None:
        j = self.plan.block_of(t)
        dk, dv = self.whole if j is None else self.block(j)
        dk[:, :, t.key_slice] += gk
        dv[:, :, t.key_slice] += gv

    def dv_whole(self) -> Tensor:
        return self.whole[1]

    def send(self, dtype) -> Tensor:
        """``[P * numel]`` in ``dtype``: what the reduce-scatter takes."""
        if self.whole is not None:
            for i in (0, 1):
                _add_global(self.plan, self.whole[i], [self.block(j)[i] for j in range(self.plan.P)])
            self.whole = None
        return self.flat.view(-1).to(dtype)


class _Gathers:
    """The all-gathers of one pass, one per KV-head group, each posted one group ahead of the compute that needs
    it: ``parts[g]`` this rank's flat buffer; :meth:`get` -> ``[P, numel]`` in rank order."""

    def __init__(self, plan: _Plan, parts: List[Tensor]) -> None:
        self.plan, self.parts = plan, parts
        self.pending: dict = {}
        self._post(0)

    def _post(self, g: int) -> None:
        if g < len(self.parts) and self.parts[g] is not None:
            self.pending[g] = start_all_gather(self.parts[g], self.plan.group)
            self.parts[g] = None  # the pending gather holds it until it has left

    def get(self, g: int) -> Tensor:
        self._post(g)
        self._post(g + 1)  # travels while group g computes
        return self.pending.pop(g).wait().view(self.plan.P, -1)


# ------------------------------------------------------------------------------------------ forward
def _forward_tile(plan: _Plan, t: Tile, g: int, qb: Tensor, kv: Tuple[Tensor, Tensor], out, lse, first=False) -> None:
    """One tile's attention merged into ``out`` / ``lse`` (``first``: the group's first tile, on all its rows:
    written, not merged - the accumulators are empty)."""
    qs = plan.q_heads(g)
    b, q_ = qb.shape[0], qb[:, qs, t.row_slice]
    mask = plan.tile_mask(t, g, b)
    record_block("forward", b * plan.ng, q_.shape[2], kv[0].shape[2], t.causal, mask)
    bo, bl = plan.kernel.forward(
        q_, *kv, scale=plan.scale, causal=t.causal, mask=mask, dropout=plan.tile_dropout(t, g, b)
    )
    if first:
        out[:, qs].copy_(bo)
        lse[:, qs].copy_(bl)
    else:
        merge_(out[:, qs, t.row_slice], lse[:, qs, t.row_slice], bo, bl)


def _own_keys(plan: _Plan, packed: Tensor, b: int) -> Tuple[Tensor, Tensor]:
    """This rank's own K and V ``[b, hg, s, d|dv]`` of one group, views of its packed (sent) buffer."""
    return plan.kv_pair(b).views(packed)


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """q/k ``[s, b, n|hk, d]``, v ``[s, b, hk, dv]`` -> out ``[b, n, s, dv]``, lse ``[b, n, s]`` (float32/float64) and
    what the KV-cache policy keeps of the gathered K/V (per group: ``[P, numel]`` for "full", its K columns for
    "half")."""
    s, b, n = q.shape[:3]
    dt = acc_dtype(q.dtype)
    qb = q.permute(1, 2, 0, 3).contiguous()  # [s, b, n, d] -> [b, n, s, d], once
    packed = [plan.pack(k, v, g) for g in range(plan.G)]  # [b*hg*s*(d+dv)] each, K then V
    gathers = _Gathers(plan, list(packed))
    own = [t for t in plan.tiles if t.own]
    whole = bool(own) and own[0].rows == (0, s)  # the first own tile covers every row: it initialises the output
    out = (torch.empty if whole else torch.zeros)((b, n, s, plan.dv), dtype=dt, device=q.device)
    lse = (
        torch.empty((b, n, s), dtype=dt, device=q.device)
        if whole
        else torch.full((b, n, s), -math.inf, dtype=dt, device=q.device)
    )
    for g in range(plan.G):  # the rank's own keys while the first group travels
        kv = _own_keys(plan, packed[g], b)
        for i, t in enumerate(own):
            _forward_tile(plan, t, g, qb, tuple(x[:, :, t.key_slice] for x in kv), out, lse, whole and i == 0)
    del packed
    kept: List[Tensor] = []
    for g in range(plan.G):
        flat = gathers.get(g)  # [P, numel]
        keys = plan.packed_blocks(flat)
        for t in plan.tiles:
            if not t.own:
                _forward_tile(plan, t, g, qb, keys.tile(t), out, lse)
        qs = plan.q_heads(g)
        if plan.dead is not None:  # Megatron's mean of V over every key on fully masked rows
            out[:, qs] = uniform_rows(out[:, qs], plan.dead_rows(g), keys.whole()[1].sum(2), plan.S)
        kept += {"full": [flat], "half": [keys.kf.contiguous()]}.get(plan.kv_cache, [])
    if plan.sink is not None:  # the sink's term, once per row (mindspeed_cp.blocks)
        out, lse = add_sink(out, lse, plan.sink)
    return out, lse, kept


# ------------------------------------------------------------------------------------------ backward
class _Source:
    """Where backward finds each group's K/V: kept by the KV-cache policy, or gathered again (one group ahead of
    the compute); this rank's own block (for its own tiles) before any gather arrives (:meth:`own`)."""

    def __init__(self, plan: _Plan, saved: List[Tensor], b: int) -> None:
        self.plan, self.b, policy = plan, b, plan.kv_cache
        self.local: List[Optional[Tensor]] = [None] * plan.G
        if policy == "full":  # saved: [P, numel] per group
            self.kept, self.gathers = saved, None
        elif policy == "half":  # saved: v, then [P, nk] per group; V gathered again
            v, *self.kept = saved
            self.local = [plan.pack(None, v, g) for g in range(plan.G)]
            self.gathers = _Gathers(plan, list(self.local))
        else:  # saved: k, v
            k, v = saved
            self.kept = None
            self.local = [plan.pack(k, v, g) for g in range(plan.G)]
            self.gathers = _Gathers(plan, list(self.local))

    def own(self, g: int) -> Tuple[Tensor, Tensor]:
        """Group g's own K and V ``[b, hg, s, d|dv]``: views of this rank's packed buffer or of its row of the kept
        ones - the same values in the same layout, so every KV-cache policy computes exactly the same."""
        kv, r = self.plan.kv_pair(self.b), self.plan.r
        if self.plan.kv_cache == "full":
            return self.plan.packed_blocks(self.kept[g]).block(r)
        if self.plan.kv_cache == "half":
            return self.kept[g][r].view(kv.k_shape), self.local[g].view(kv.v_shape)
        return _own_keys(self.plan, self.local[g], self.b)

    def get(self, g: int) -> _Keys:
        self.local[g] = None
        if self.plan.kv_cache == "full":
            return self.plan.packed_blocks(self.kept[g])
        flat = self.gathers.get(g)
        if self.plan.kv_cache == "half":
            return self.plan.blocks(self.kept[g], flat)
        return self.plan.packed_blocks(flat)


def _backward_tile(plan: _Plan, t: Tile, g: int, tensors, kv, dq: Tensor, grads: _Grads) -> None:
    """Gradients of one tile: dq accumulated on its rows, dK / dV on its keys."""
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
    grads.add(t, gk, gv)


def _backward(plan: _Plan, dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, saved: List[Tensor]):
    """-> dq ``[b, n, s, d]`` (float32/float64), dk ``[s, b, hk, d]`` and dv ``[s, b, hk, dv]`` (q's dtype)."""
    s, b, n, d = q.shape
    tensors = tuple(x.permute(1, 2, 0, 3).contiguous() for x in (q, dout, out)) + (lse,)  # [b, n, s, .], once
    dq = torch.zeros((b, n, s, d), dtype=lse.dtype, device=q.device)
    source = _Source(plan, saved, b)
    own = [t for t in plan.tiles if t.own]
    scatters: List[PendingExchange] = []
    for g in range(plan.G):
        grads = _Grads(plan, b, lse.dtype, q.device)
        kv = source.own(g)
        for t in own:  # the rank's own keys while the group's gather travels
            _backward_tile(plan, t, g, tensors, tuple(x[:, :, t.key_slice] for x in kv), dq, grads)
        keys = source.get(g)
        for t in plan.tiles:
            if not t.own:
                _backward_tile(plan, t, g, tensors, keys.tile(t), dq, grads)
        if plan.dead is not None:
            add_uniform_grad(grads.dv_whole(), tensors[1][:, plan.q_heads(g)], plan.dead_rows(g), plan.S)
        scatters.append(start_reduce_scatter(grads.send(q.dtype), plan.group))  # travels meanwhile
        del grads, keys
    kv = plan.kv_pair(b)
    parts = [x.wait() for x in scatters]  # [numel] each: this rank's dK then dV of group g, [b, hg, s, .]
    dk = torch.cat([kv.unpack(p)[0] for p in parts], dim=2)  # [b, hg, s, d] -> [s, b, hg, d] per group -> hk
    dv = torch.cat([kv.unpack(p)[1] for p in parts], dim=2)
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
    gather_groups: Optional[int] = None,
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
    (off-by-one: zeros; learnable: the parameter), one more term of every row's softmax. ``gather_groups``: the
    KV-head groups of the gather (None: :meth:`KVAllGatherOptions.head_groups`' rule, by device).
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
    options = KVAllGatherOptions(
        overlap=overlap,
        kernel=kernel,
        dead_rows=dead_rows,
        kv_cache_policy=kv_cache_policy,
        gather_groups=gather_groups,
    )
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
