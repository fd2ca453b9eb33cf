"""Reference attention for the CP tests: float64 full attention and naive/SDPA local attentions.

Conventions shared by every CP test:
* tensors are ``[S, b, h, d]`` (``layout="sbhd"``, Megatron) or ``[b, S, h, d]`` (``layout="bshd"``);
* GQA by head grouping: query head i uses key/value head ``i // (h // hk)`` (Megatron, SDPA ``enable_gqa``);
* ``causal``: key j is visible to query i iff ``j <= i`` (top-left aligned, as SDPA's ``is_causal``);
* ``mask``: boolean, **True = masked out** (Megatron's attention_mask), broadcastable to ``[b, h, Sq, Sk]``
  (e.g. ``[b, 1, S, S]``); combined with ``causal`` when both are given;
* a row with no visible key gives output 0 (and log-sum-exp -inf), never NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "sbhd":
        return x.permute(1, 2, 0, 3)
    if layout == "bshd":
        return x.permute(0, 2, 1, 3)
    raise ValueError(f"layout must be 'sbhd' or 'bshd', got {layout!r}")


def _from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.permute(2, 0, 1, 3) if layout == "sbhd" else x.permute(0, 2, 1, 3)


def _visible(sq: int, sk: int, causal: bool, mask: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Boolean [.., sq, sk] of allowed (query, key) pairs, or None when everything is visible."""
    allowed = None
    if causal:
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
    if mask is not None:
        allowed = ~mask.bool() if allowed is None else allowed & ~mask.bool()
    return allowed


def attention_bhsd(
    q,
    k,
    v,
    causal: bool = True,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
):
    """Plain softmax attention on ``[b, h, S, d]`` in ``compute_dtype``; returns ``(out, lse)`` in it.

    Differentiable (autograd through matmuls), GQA by grouping, safe for fully masked rows.
    """
    dtype = compute_dtype or q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query has {heads} heads, key/value {kv_heads}: not a GQA grouping")
    if kv_heads != heads:  # [b, hk, S, d] -> [b, h, S, d]
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, h, Sq, Sk]
    allowed = _visible(q.shape[2], k.shape[2], causal, mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # Softmax is shift invariant, so the (detached) row max only guards exp; -inf rows shift by 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (torch.log(denom) + row_max).squeeze(-1)  # [b, h, Sq]; -inf for fully masked rows
    return out, lse


def reference_attention(
    q,
    k,
    v,
    causal: bool = True,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    layout: str = "sbhd",
    return_lse: bool = False,
):
    """Full attention in float64 on the whole sequence: ``[S, b, h, d]`` (or bshd) -> same layout, float64.

    Differentiable: give it float64 leaf copies of the inputs to get reference gradients.
    ``return_lse=True`` also returns the log-sum-exp ``[b, h, S]`` (float64).
    """
    out, lse = attention_bhsd(
        *(_to_bhsd(t, layout) for t in (q, k, v)), causal=causal, mask=mask, scale=scale, compute_dtype=torch.float64
    )
    out = _from_bhsd(out, layout)
    return (out, lse) if return_lse else out


class NaiveLocalAttention:
    """A local attention for CP wrappers: ``(q, k, v, attention_mask=None, **ignored) -> out``.

    Does GQA by shape (whatever heads it is handed), computes in float32 for 16-bit inputs (like
    flash-attention's accumulators) and returns the input dtype, as ``[S, b, h, d]`` or flattened
    ``[S, b, h*d]`` (``flatten_output=True``); ``layout="bshd"`` for ``[b, S, h, d]``.
    """

    def __init__(
        self, causal: bool = True, scale: Optional[float] = None, layout: str = "sbhd", flatten_output: bool = False
    ):
        self.causal, self.scale, self.layout, self.flatten_output = causal, scale, layout, flatten_output

    def _finish(self, out_bhsd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = _from_bhsd(out_bhsd, self.layout).to(dtype)
        return out.flatten(-2) if self.flatten_output else out

    def __call__(self, q, k, v, attention_mask=None, *args, **kwargs):
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        out, _ = attention_bhsd(
            *(_to_bhsd(t, self.layout) for t in (q, k, v)),
            causal=self.causal,
            mask=attention_mask,
            scale=self.scale,
            compute_dtype=compute,
        )
        return self._finish(out, q.dtype)


class SDPALocalAttention(NaiveLocalAttention):
    """Same contract, computed by ``torch.nn.functional.scaled_dot_product_attention`` (GQA via repeat)."""

    def __call__(self, q, k, v, attention_mask=None, *args, **kwargs):
        q, k, v = (_to_bhsd(t, self.layout) for t in (q, k, v))
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        allowed = None
        if attention_mask is not None:  # SDPA wants True = attend, and no is_causal together with a mask
            allowed = _visible(q.shape[2], k.shape[2], self.causal, attention_mask, q.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.scale, is_causal=self.causal and allowed is None
        )
        return self._finish(out, q.dtype)


def reference_attention_dropout(q, k, v, keep, p, causal=True, mask=None, dead="zero"):
    """float64 attention on ``[s, b, h, d]`` with dropout keep masks ``[b, h, s, s]`` (True = kept) applied to
    the probabilities, scaled by 1/(1-p). ``mask`` ``[s, s]`` or ``[b|1, 1|h, s, s]``, True = masked.
    ``dead="uniform"``: masked scores are -10000 as in Megatron's local attention (a fully masked row averages
    V, undropped: mindspeed_cp.local's decision); ``"zero"``: -inf (such a row gives 0). Differentiable."""
    qb, kb, vb = (t.permute(1, 2, 0, 3).double() for t in (q, k, v))
    g = qb.shape[1] // kb.shape[1]
    kb, vb = kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1)
    scores = qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[0]
    masked = torch.zeros(s, s, dtype=torch.bool)
    if causal:
        masked = torch.ones(s, s, dtype=torch.bool).triu(1)
    if mask is not None:
        masked = masked | mask
    if dead == "uniform":  # Megatron: masked scores -10000, so a fully masked row is uniform
        probs = torch.softmax(scores.masked_fill(masked, -10000.0), -1)
    else:
        probs = torch.softmax(scores.masked_fill(masked, -math.inf), -1).nan_to_num(0.0)
    dropped = probs * keep.double() / (1 - p)
    probs = torch.where(masked.all(-1, keepdim=True), probs, dropped) if dead == "uniform" else dropped
    return (probs @ vb).permute(2, 0, 1, 3)
