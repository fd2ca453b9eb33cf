"""Attention over a planned list of blocks (:func:`mindspeed_cp.layout.window.window_blocks`), and attention sinks.

    att = PlannedBlocks(kernel, scale, window, q_pos, k_pos)       # positions: [sq] / [sk] (host or device)
    att.forward(q, k, v, blocks, out, lse)                         # merges every block into out / lse
    att.backward(dout, q, k, v, out, lse, blocks, dq, dk, dv)     # accumulates every block's gradients

Blocks come in four shapes (:class:`mindspeed_cp.layout.window.Shape`): *full* and *causal* go to the kernel as
they are; *anti-causal* (row ``r`` sees columns ``>= r``) goes as a causal block on rows and columns reversed (the
result reversed back), so a fused kernel computes only its seen half; *masked* carries a mask built from the
positions (the window; documents never meet in a block). Dropout keeps its convention: each block's keep mask is
keyed by the global positions of its rows and columns (reversed with them), so the drops equal one device's.

Sinks (``softmax_type`` ``off-by-one`` / ``learnable``, Megatron's ``SoftmaxOne``): the softmax of a row gets one
more term ``exp(sink[h])`` in its denominator, with no value. In log-sum-exp form that is one more merge, once per
row after all blocks: ``lse' = logaddexp(lse, sink)``, ``out' = out * exp(lse - lse')`` (:func:`add_sink`). Backward
then needs nothing new: the blocks' gradients computed with ``out'`` and ``lse'`` are those of the softmax with the
sink (``P' = exp(s - lse')``, ``delta = rowsum(dO * O')``), and the sink's own gradient is
``-sum_rows exp(sink - lse') * rowsum(dO * O')`` (:func:`sink_grad`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from .kernels import merge_
from .layout.window import Block, Shape, Window
from .stats import record_block

Tensor = torch.Tensor

__all__ = ["PlannedBlocks", "add_sink", "sink_grad", "sink_logits"]


def _flip(x: Optional[Tensor], dim: int) -> Optional[Tensor]:
    return None if x is None else x.flip(dim)


class PlannedBlocks:
    """One call's kernel, scale, window and positions; runs blocks of queries against keys.

    ``q_pos`` / ``k_pos``: global positions of the query / key buffer's tokens (``[sq]`` / ``[sk]``), for masked
    blocks. ``dropout``: a :class:`mindspeed_cp.dropout.AttentionDropout` or None, with ``q_keyed`` / ``k_keyed``
    the positions its masks are keyed by (``[s]`` or ``[b, s]``; default the positions themselves).
    """

    def __init__(
        self,
        kernel: Any,
        scale: float,
        window: Window,
        q_pos: Tensor,
        k_pos: Tensor,
        dropout=None,
        q_keyed: Optional[Tensor] = None,
        k_keyed: Optional[Tensor] = None,
    ) -> None:
        self.kernel, self.scale, self.window = kernel, scale, window
        self.q_pos, self.k_pos = q_pos, k_pos
        self.dropout = dropout
        self.q_keyed = q_pos if q_keyed is None else q_keyed
        self.k_keyed = k_pos if k_keyed is None else k_keyed

    def _args(self, blk: Block, device) -> dict:
        """Keyword arguments of the kernel for ``blk`` (in the orientation the kernel sees it)."""
        anti = blk.shape is Shape.ANTI
        mask = None
        if blk.shape is Shape.MASKED:
            q, k = self.q_pos[blk.rows].to(device), self.k_pos[blk.cols].to(device)
            mask = ~self.window.seen(q, k)[None, None]  # [1, 1, sq, sk], True = masked
        drop = None
        if self.dropout is not None:
            rows, cols = self.q_keyed[..., blk.rows], self.k_keyed[..., blk.cols]
            drop = self.dropout.block(_flip(rows, -1) if anti else rows, _flip(cols, -1) if anti else cols)
        causal = blk.shape in (Shape.CAUSAL, Shape.ANTI)
        return dict(scale=self.scale, causal=causal, mask=mask, dropout=drop)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, blocks: Sequence[Block], out: Tensor, lse: Tensor) -> None:
        """q ``[b, n, sq, d]``, k ``[b, nk, sk, d]``, v ``[b, nk, sk, dv]``; merges into ``out`` ``[b, n, sq, dv]`` /
        ``lse`` ``[b, n, sq]`` (float32 / float64 accumulators holding what was merged so far)."""
        bn = q.shape[0] * q.shape[1]
        for blk in blocks:
            args = self._args(blk, q.device)
            qb, kb, vb = q[:, :, blk.rows], k[:, :, blk.cols], v[:, :, blk.cols]
            record_block("forward", bn, qb.shape[2], kb.shape[2], args["causal"], args["mask"])
            if blk.shape is Shape.ANTI:
                bo, bl = self.kernel.forward(qb.flip(2), kb.flip(2), vb.flip(2), **args)
                bo, bl = bo.flip(2), bl.flip(-1)
            else:
                bo, bl = self.kernel.forward(qb, kb, vb, **args)
            merge_(out[:, :, blk.rows], lse[:, :, blk.rows], bo, bl)

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        blocks: Sequence[Block],
        dq: Tensor,
        dk: Tensor,
        dv: Tensor,
    ) -> None:
        """Accumulates every block's gradients into ``dq`` / ``dk`` / ``dv`` (``out`` / ``lse``: the final ones)."""
        bn = q.shape[0] * q.shape[1]
        for blk in blocks:
            args = self._args(blk, q.device)
            r, c = blk.rows, blk.cols
            parts = (dout[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r])
            record_block("backward", bn, parts[1].shape[2], parts[2].shape[2], args["causal"], args["mask"])
            if blk.shape is Shape.ANTI:
                gq, gk, gv = self.kernel.backward(*(x.flip(2) for x in parts), lse[:, :, r].flip(-1), **args)
                gq, gk, gv = gq.flip(2), gk.flip(2), gv.flip(2)
            else:
                gq, gk, gv = self.kernel.backward(*parts, lse[:, :, r], **args)
            dq[:, :, r] += gq
            dk[:, :, c] += gk
            dv[:, :, c] += gv


# ------------------------------------------------------------------------------------------ sinks
def sink_logits(sink: Optional[Tensor], n: int, dtype: torch.dtype, device) -> Optional[Tensor]:
    """``sink`` (``[n]`` per head, or None) as ``[1, n, 1]`` logits in the accumulators' dtype."""
    if sink is None:
        return None
    if sink.dim() != 1 or sink.shape[0] != n:
        raise ValueError(f"softmax offset (sink) must be [{n}] (one per local query head), got {list(sink.shape)}")
    return sink.detach().to(device=device, dtype=dtype).reshape(1, n, 1)


def add_sink(out: Tensor, lse: Tensor, sink: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge the sink term into a finished row: ``out`` ``[b, n, s, dv]``, ``lse`` ``[b, n, s]``, ``sink``
    ``[1, n, 1]`` -> (out', lse'). A row that saw no key gives 0 with ``lse' = sink``."""
    new_lse = torch.logaddexp(lse, sink)
    return out * torch.exp(lse - new_lse)[..., None], new_lse


def sink_grad(dout: Tensor, out: Tensor, lse: Tensor, sink: Tensor) -> Tensor:
    """d loss / d sink ``[n]`` from this rank's rows (``out`` / ``lse``: after :func:`add_sink`): the probability
    of the sink is ``exp(sink - lse')`` and d out'/d sink = -p_sink out'."""
    delta = (dout.to(out.dtype) * out).sum(-1)  # [b, n, s]
    return -(torch.exp(sink - lse) * delta).sum((0, 2))


def sink_input_grad(sink: Optional[Tensor], logits: Optional[Tensor], dout, out, lse, needed: bool) -> Optional[Tensor]:
    """What an autograd ``backward`` returns for the sink input: :func:`sink_grad` (``dout`` / ``out``
    ``[b, n, s, dv]``, ``logits`` from :func:`sink_logits`) in the sink's dtype, or None without a sink or its
    gradient."""
    if logits is None or not needed:
        return None
    return sink_grad(dout, out.to(lse.dtype), lse, logits).to(sink.dtype)
