"""Attention over a whole local sequence with the plugin's kernels: what Ulysses runs after its all-to-all.

    out = local_attention(q, k, v, causal=True)   # q [s, b, n, d], k [s, b, nk, d], v [s, b, nk, dv] -> [s, b, n, dv]

The same shape as the ring (forward, backward, autograd.Function, a thin wrapper), on one rank: the kernels
of :mod:`mindspeed_cp.kernels` (causal, general mask, GQA by shape, dropout from :mod:`mindspeed_cp.dropout`),
and autograd saves only q, k, v, the output and the float32 log-sum-exp - what flash attention saves, never
the S x S scores or probabilities.

Decisions
- One kernel call over the whole sequence when the kernel is a fused one and nothing forces it to build a
  block (no mask, no dropout): its own tiling keeps memory linear. Otherwise (a general mask becomes an
  additive bias per block, dropout a keep mask, the math kernel a score block) the work is cut into
  ``tile`` x ``tile`` blocks merged in float32 log-sum-exp form, exactly as ring blocks are; causal skips
  the blocks above the diagonal.
- Fully masked query rows follow the attention being replaced (``dead_rows``): ``"uniform"`` is Megatron's
  local attention (it fills masked scores with -10000, so such a row averages V over every key, and its
  gradient reaches V only), ``"zero"`` gives 0 (flash attention, Transformer Engine). No host
  synchronisation decides it: the uniform rows are selected with ``torch.where``. With dropout, the uniform
  average of such a row is not dropped (a row that sees nothing carries no signal either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import torch

from .blocks import PlannedBlocks, add_sink, sink_input_grad, sink_logits
from .kernels import acc_dtype, dead_rows, get_kernel, merge_
from .layout.window import Window, runs_of, window_blocks
from .options import DEAD_ROWS
from .stats import record_block, record_skip

Tensor = torch.Tensor

__all__ = ["local_attention", "LocalAttentionFunction", "DEAD_ROWS", "uniform_rows", "add_uniform_grad"]

DEFAULT_TILE = 2048


@dataclass
class _Plan:
    causal: bool
    mask: Optional[Tensor]  # bool [B|1, N|1, S, S], True = masked
    scale: float
    kernel: Any
    dropout: Any  # mindspeed_cp.dropout.AttentionDropout or None
    tile: Optional[int]  # None: one kernel call
    dead: str
    documents: Any = None  # mindspeed_cp.layout.packing.Documents: document-causal masks per block
    positions: Optional[Tensor] = None  # [b, s] padded positions of the sequence's tokens (with documents)
    keyed: Optional[Tensor] = None  # [s] or [b, s]: the positions attention dropout is keyed by
    planned: Optional[PlannedBlocks] = None  # a sliding window: its blocks (layout.window) instead of tiles
    window_blocks: Any = None

    def blocks(self, s: int, phase: str) -> Iterator[Tuple[slice, slice, bool]]:
        """(query rows, key cols, causal) of every block to compute. With documents a row tile starts at the
        first key its documents reach (:meth:`Documents.spans`): the tiles before it are skipped."""
        if self.tile is None:
            yield slice(None), slice(None), self.causal
            return
        spans = None if self.documents is None else self.documents.spans(0, 0, self.tile)
        for i in range(0, s, self.tile):
            rows = slice(i, min(i + self.tile, s))
            start = 0 if spans is None else spans[i // self.tile][0]  # never None: a row sees itself
            for j in range(0, i + 1 if self.causal else s, self.tile):
                if j + self.tile <= start:
                    record_skip(phase, tile=True)
                    continue
                yield rows, slice(j, min(j + self.tile, s)), self.causal and i == j

    def block_args(self, rows: slice, cols: slice, s: int, device) -> dict:
        mask = None if self.mask is None else self.mask[..., rows, cols]
        if self.documents is not None:
            mask = self.documents.block_mask(self.positions[:, rows], self.positions[:, cols])
        drop = None
        if self.dropout is not None:
            drop = self.dropout.block(self.keyed[..., rows], self.keyed[..., cols])
        return dict(scale=self.scale, mask=mask, dropout=drop)


def _bnsd(x: Tensor) -> Tensor:
    return x.permute(1, 2, 0, 3)  # [s, b, n, d] -> [b, n, s, d] (a view)


def _sbhd(x: Tensor) -> Tensor:
    return x.permute(2, 0, 1, 3)  # [b, n, s, d] -> [s, b, n, d] (a view)


# ------------------------------------------------------------------------------------------ dead rows
def uniform_rows(out: Tensor, dead: Optional[Tensor], v_sum: Tensor, keys: int) -> Tensor:
    """Megatron's answer on fully masked rows: the mean of V over all ``keys``.

    ``out`` ``[b, n, s, d]`` (float32), ``dead`` ``[B|1, N|1, s]`` bool or None, ``v_sum`` ``[b, nk, d]`` the
    sum of V over every key (query head h uses KV head h // (n // nk)).
    """
    if dead is None:
        return out
    n, nk = out.shape[1], v_sum.shape[1]
    mean = (v_sum.to(out.dtype) / keys).repeat_interleave(n // nk, dim=1)  # [b, n, d]
    return torch.where(dead[..., None], mean[:, :, None, :], out)


def add_uniform_grad(dv: Tensor, dout: Tensor, dead: Optional[Tensor], keys: int) -> None:
    """dV of the uniform rows: every key's ``dv`` ``[b, nk, sk, d]`` gains sum over dead rows of dO / keys."""
    if dead is None:
        return
    b, n = dout.shape[:2]
    nk = dv.shape[1]
    share = (dout.to(dv.dtype) * dead[..., None].to(dv.dtype)).sum(2) / keys  # [b, n, d]
    dv += share.reshape(b, nk, n // nk, -1).sum(2)[:, :, None, :]


# ------------------------------------------------------------------------------------------ forward / backward
def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """q/k ``[b, n|nk, s, d]``, v ``[b, nk, s, dv]`` -> out ``[b, n, s, dv]`` and lse ``[b, n, s]`` (float32/64)."""
    b, n, s, d = q.shape[:3] + v.shape[3:]
    if plan.planned is not None:
        out = torch.zeros((b, n, s, d), dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full((b, n, s), -math.inf, dtype=acc_dtype(q.dtype), device=q.device)
        plan.planned.forward(q, k, v, plan.window_blocks, out, lse)
        return out, lse
    if plan.tile is None:
        args = plan.block_args(slice(None), slice(None), s, q.device)
        record_block("forward", b * n, s, s, plan.causal, args["mask"])
        out, lse = plan.kernel.forward(q, k, v, causal=plan.causal, **args)
        out, lse = out.to(acc_dtype(q.dtype)), lse.to(acc_dtype(q.dtype))
    else:
        out = torch.zeros((b, n, s, d), dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full((b, n, s), -math.inf, dtype=acc_dtype(q.dtype), device=q.device)
        for rows, cols, causal in plan.blocks(s, "forward"):
            args = plan.block_args(rows, cols, s, q.device)
            record_block("forward", b * n, rows.stop - rows.start, cols.stop - cols.start, causal, args["mask"])
            bo, bl = plan.kernel.forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], causal=causal, **args)
            merge_(out[:, :, rows], lse[:, :, rows], bo, bl)
    if plan.dead == "uniform":
        out = uniform_rows(out, dead_rows(plan.mask, plan.causal, s, s), v.sum(2), s)
    return out, lse


def _backward(plan: _Plan, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
    b, n, s, d = q.shape
    dt = lse.dtype
    if plan.planned is not None:
        dq, dk, dv = (torch.zeros(x.shape, dtype=dt, device=q.device) for x in (q, k, v))
        plan.planned.backward(dout, q, k, v, out, lse, plan.window_blocks, dq, dk, dv)
        return dq, dk, dv
    if plan.tile is None:
        args = plan.block_args(slice(None), slice(None), s, q.device)
        record_block("backward", b * n, s, s, plan.causal, args["mask"])
        dq, dk, dv = (g.to(dt) for g in plan.kernel.backward(dout, q, k, v, out, lse, causal=plan.causal, **args))
    else:
        dq = torch.zeros(q.shape, dtype=dt, device=q.device)
        dk = torch.zeros(k.shape, dtype=dt, device=q.device)
        dv = torch.zeros(v.shape, dtype=dt, device=q.device)
        for rows, cols, causal in plan.blocks(s, "backward"):
            args = plan.block_args(rows, cols, s, q.device)
            record_block("backward", b * n, rows.stop - rows.start, cols.stop - cols.start, causal, args["mask"])
            gq, gk, gv = plan.kernel.backward(
                dout[:, :, rows],
                q[:, :, rows],
                k[:, :, cols],
                v[:, :, cols],
                out[:, :, rows],
                lse[:, :, rows],
                causal=causal,
                **args,
            )
            dq[:, :, rows] += gq
            dk[:, :, cols] += gk
            dv[:, :, cols] += gv
    if plan.dead == "uniform":
        add_uniform_grad(dv, dout, dead_rows(plan.mask, plan.causal, s, s), s)
    return dq, dk, dv


class LocalAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, sink, plan)`` on ``[s, b, n, d]`` (``sink``: ``[n]`` or None); build the plan with
    :func:`local_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, sink, plan):
        out, lse = _forward(plan, _bnsd(q), _bnsd(k), _bnsd(v))
        logits = sink_logits(sink, q.shape[2], lse.dtype, q.device)
        if logits is not None:  # the sink's term, once per row (mindspeed_cp.blocks)
            out, lse = add_sink(out, lse, logits)
        out = _sbhd(out).to(q.dtype).contiguous()  # [b, n, s, d] -> [s, b, n, d], once
        ctx.plan, ctx.sink = plan, logits
        ctx.save_for_backward(q, k, v, out, lse, sink)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink = ctx.saved_tensors
        dob, ob = _bnsd(dout), _bnsd(out)
        dsink = sink_input_grad(sink, ctx.sink, dob, ob, lse, ctx.needs_input_grad[3])
        dq, dk, dv = _backward(ctx.plan, dob, _bnsd(q), _bnsd(k), _bnsd(v), ob, lse)
        return (
            _sbhd(dq).to(q.dtype).contiguous(),
            _sbhd(dk).to(k.dtype).contiguous(),
            _sbhd(dv).to(v.dtype).contiguous(),
            dsink,
            None,
        )


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    attention_mask: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    dropout=None,
    kernel=None,
    tile: Optional[int] = None,
    dead_rows: str = "zero",
    documents=None,
    window_size=None,
    softmax_offset: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> Tensor:
    """Attention of ``q`` ``[s, b, n, d]`` over ``k`` ``[s, b, nk, d]`` / ``v`` ``[s, b, nk, dv]`` (``n % nk == 0``;
    MLA: ``dv`` its own) -> ``[s, b, n, dv]``.

    ``causal``: query i sees keys 0..i. ``attention_mask``: bool ``[b|1, n|1, s, s]``, True = masked (with
    ``causal`` both apply). ``dropout``: a :class:`mindspeed_cp.dropout.AttentionDropout` (positions are
    0..s-1). ``kernel``: a name of :data:`mindspeed_cp.kernels.KERNELS`, a kernel object, or None (by device).
    ``tile``: block size when blocks are needed (default 2048). ``dead_rows``: ``"zero"`` or ``"uniform"``
    (Megatron's local attention), see the module docstring. ``documents``: a
    :class:`mindspeed_cp.layout.packing.Documents` whose whole (padded) sequence this is, in its rank order (what the
    Ulysses all-to-all assembles): document-causal attention, each tile's mask built from document ids.
    ``window_size``: Megatron's sliding window ``(left, right)`` (``-1``: unbounded side); it replaces ``causal``
    (query i sees keys i-left .. i+right; with documents, of its document) and is computed block by block, only
    inside the window (:mod:`mindspeed_cp.layout.window`). ``softmax_offset``: ``[n]`` sink logits
    (``softmax_type`` off-by-one: zeros, learnable: the parameter; gradients flow to it), see
    :mod:`mindspeed_cp.blocks`. ``positions``: ``[s]`` global positions of the sequence's tokens when they are
    not ``0..s-1`` in order (a Ulysses all-to-all over a zigzag layout); with a window only.
    """
    if (
        q.dim() != 4
        or k.dim() != 4
        or v.dim() != 4
        or k.shape[:3] != v.shape[:3]
        or q.shape[0] != k.shape[0]
        or q.shape[3] != k.shape[3]
    ):
        raise ValueError(
            f"local_attention takes q [s, b, n, d], k [s, b, nk, d] and v [s, b, nk, dv] of the same s, "
            f"got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
        )
    if dead_rows not in DEAD_ROWS:
        raise ValueError(f"dead_rows must be one of {DEAD_ROWS}, got {dead_rows!r}")
    s = q.shape[0]
    mask = attention_mask
    if mask is not None:
        mask = mask[None, None] if mask.dim() == 2 else mask
        if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[-2:]) != (s, s):
            raise ValueError(
                f"attention_mask must be bool [b|1, n|1, {s}, {s}] (True = masked), got {mask.dtype} {list(mask.shape)}"
            )
    if dropout is not None and dropout.p == 0:
        dropout = None
    given, positions = positions, None
    if given is not None and (window_size is None or documents is not None or len(given) != s):
        raise ValueError(f"positions= ([{s}] global positions) goes with window_size, without documents")
    if documents is not None:
        if not causal or mask is not None:
            raise ValueError("documents= gives document-causal attention: causal=True and no attention_mask")
        if documents.ring != 1 and window_size is None:
            raise ValueError(
                f"local_attention takes the Ulysses layout of documents (ring 1), got ring {documents.ring}"
            )
        if documents.padded_len != s:
            raise ValueError(f"documents describe a sequence of {documents.padded_len} tokens, q has {s}")
        positions = documents.order.to(q.device)  # rank order = padded order for Ulysses (ring = 1)
    kern = get_kernel(kernel, q.device)
    window = Window.of(window_size, causal) if window_size is not None else None
    if window is not None and mask is not None:
        raise ValueError("local_attention: window_size with an attention_mask (a window replaces the mask)")
    blocked = mask is not None or dropout is not None or documents is not None or getattr(kern, "name", None) == "math"
    plan = _Plan(
        causal=causal,
        mask=mask,
        scale=softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5,
        kernel=kern,
        dropout=dropout,
        tile=(tile or DEFAULT_TILE) if blocked else None,
        dead=dead_rows,
        documents=documents,
        positions=positions,
    )
    if dropout is not None:  # keyed by position in the unpadded sample (documents: pads numbered after it)
        plan.keyed = torch.arange(s, device=q.device) if documents is None else documents.original(positions)
    if documents is None and window is not None:
        given = torch.arange(s) if given is None else torch.as_tensor(given, dtype=torch.long).cpu()
        if dropout is not None:
            plan.keyed = given.to(q.device)
    if softmax_offset is not None:  # a row that sees nothing gives 0: all its weight goes to the sink
        plan.dead = "zero"
    if window is not None:
        _plan_window(plan, window, given, documents, tile, q.device)
    return LocalAttentionFunction.apply(q, k, v, softmax_offset, plan)


WINDOW_TILE = 256  # rows per block of a windowed layer at most (fewer when the window is narrower)


def window_tile(window: Window, tile: Optional[int] = None) -> int:
    """Rows per block: the window's width (its edges then split exactly, see layout.window), within bounds."""
    return max(1, min(tile or WINDOW_TILE, window.width - 1))


def _plan_window(plan: _Plan, window: Window, given: Optional[Tensor], documents, tile: Optional[int], device) -> None:
    """The blocks of a windowed call on the whole sequence (positions ``given``, or the documents' order)."""
    if documents is None:
        pos, docs = given, None
    else:
        _, order, source = documents._host
        if bool((order != order[:1]).any()) or bool((source != source[:1]).any()):
            raise ValueError("window_size with packed documents laid out differently per sample: micro-batch 1")
        if window.right:
            raise ValueError(f"window_size with documents must look back only (right = 0), got {window}")
        pos, docs = order[0], documents._host[0][0].gather(0, order[0])
    runs = runs_of(pos.tolist(), None if docs is None else docs.tolist())
    t = window_tile(window, tile)
    plan.window_blocks = window_blocks(runs, runs, window, t, max(t, tile or DEFAULT_TILE))
    pos, keyed = pos.to(device), plan.keyed  # once per call: masks are built on the device
    plan.planned = PlannedBlocks(plan.kernel, plan.scale, window, pos, pos, plan.dropout, keyed, keyed)
