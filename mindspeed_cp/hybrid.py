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

Agreement: before the first all-to-all every CP rank's row - its Ulysses-level inputs, the ring-level
inputs they imply (``[S/R, b, h/U, d]``) and the ring options - reaches every CP rank (one all-gather over
``agree_group``, or two exchanges over the two groups, :func:`mindspeed_cp.agree.agree_2d`), and both levels
then run unchecked. So a bad input on one rank of one Ulysses group stops the whole CP group with one error
naming global ranks in the user's terms (hybrid shapes, not ring-level ones).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from . import ring as _ring
from . import ulysses as _ulysses
from .agree import Table, agree, agree_2d
from .comm import split_sizes
from .kv_cache import check_policy
from .ring import DoubleRingWindow, RingAttentionError, TensorMeta, ring_attention
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
    """The local attention that Ulysses calls: ring attention over the ring group on ``h/U`` heads."""

    def __init__(self, ulysses_group, ring_group, **ring_kwargs):
        self.ulysses_group, self.ring_group, self.ring_kwargs = ulysses_group, ring_group, ring_kwargs

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor] = None,
                 dropout=None) -> Tensor:
        # [S/R, b, h/U, d]; the mask rows of the Ulysses group's tokens = this ring rank's pair (a full
        # [b, 1, S, S] mask goes as is: the ring level keeps its zigzag rows)
        mask = gather_mask_rows(attention_mask, self.ulysses_group, q.shape[0])
        if dropout is not None:  # this Ulysses rank computes global heads u*h/U .. (u+1)*h/U - 1
            dropout = dropout.for_rank(dist.get_rank(self.ulysses_group), q.shape[2])
        return ring_attention(q, k, v, self.ring_group, attention_mask=mask, dropout=dropout, check_inputs=False,
                              **self.ring_kwargs)


def _mask_problem(mask, s_local: int, b: int, S: int) -> Optional[str]:
    if not isinstance(mask, Tensor):
        return f"attention_mask must be a bool tensor, got {type(mask).__name__}"
    if mask.dtype != torch.bool:
        return f"attention_mask must be bool (True = masked), got {mask.dtype}"
    shape = tuple(mask.shape)
    if len(shape) != 4 or shape[0] not in (1, b) or shape[1] != 1 or shape[2] not in (s_local, S) or shape[3] != S:
        return (f"attention_mask must be [b|1, 1, s/CP|S, S] = [{b}|1, 1, {s_local}|{S}, {S}] (rows: this rank's "
                f"tokens or all, columns in global token order), got {list(shape)}")
    return None


def _agree(q, k, v, mask, causal, scale, bnsd, overlap_group, window, dropout, dead, ulysses_group, ring_group,
           agree_group, documents=None, policies=(None, None)) -> None:
    """One agreement over every CP rank for both levels (see the module docstring)."""
    U, R = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    problem = _ulysses._local_problem((q, k, v), 0, 2, None, U, dist.get_rank(ulysses_group))
    u_row = _ulysses._row((q, k, v), None, problem is None, (policies[0], False))
    metas = (None, None, None)
    if problem is None:
        s_local, b, h, d = q.shape
        S, hk = s_local * U * R, max(k.shape[2], U)  # KV heads after the Ulysses replication
        metas = (TensorMeta((s_local * U, b, h // U, d), q.dtype, q.requires_grad, q.device),
                 TensorMeta((s_local * U, b, hk // U, d), k.dtype, k.requires_grad, k.device),
                 TensorMeta((s_local * U, b, hk // U, v.shape[3]), v.dtype, v.requires_grad, v.device))
        if mask is not None and causal:
            problem = ("attention_mask was given with causal=True: pass causal=False for a general mask "
                       "(--attention-mask-type general), or no mask for causal")
        elif mask is not None:
            problem = _mask_problem(mask, s_local, b, S)
    ring_mask = None
    if problem is None and mask is not None:
        rows = metas[0].shape[0] if mask.shape[2] == q.shape[0] else mask.shape[2]
        ring_mask = TensorMeta((mask.shape[0], 1, rows, mask.shape[3]), mask.dtype, False, mask.device)
    r = dist.get_rank(ring_group)
    wcode, winfo = _ring._window_code(window, ring_group, R, r, overlap_group)
    K, overlap = _ring._options(window, overlap_group)
    r_row = _ring._row(*metas, ring_mask, causal and mask is None, bnsd, overlap, K, wcode, dropout, dead, scale,
                       documents, policies[1])
    if problem is None:
        level = _ring._problem(r_row, R, winfo)
        problem = None if level is None else f"ring level ({R} ranks, [S/R, b, h/U, d] per rank): {level}"
    n = len(u_row)

    def check(table: Table) -> Optional[str]:
        verdict = _ulysses._check(Table([x[:n] for x in table.rows], table.ranks, table.texts), 0,
                                  where="the CP group")
        return verdict or _ring._check(Table([x[n:] for x in table.rows], table.ranks, table.texts))

    kwargs = dict(check=check, error=RingAttentionError, like=q, prefix="hybrid attention inputs rejected on ")
    if agree_group is not None:
        agree(agree_group, u_row + r_row, problem, **kwargs)
    else:
        agree_2d(ulysses_group, ring_group, u_row + r_row, problem, **kwargs)


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, ulysses_group, ring_group, *, causal: bool = True,
                     attention_mask: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                     bnsd: bool = False, overlap_group=None, window: Optional[DoubleRingWindow] = None,
                     kernel=None, dropout=None, dead_rows: str = "zero", check_inputs: bool = True,
                     agree_group=None, documents=None, kv_cache_policy: Optional[str] = None,
                     ring_kv_cache_policy: Optional[str] = "same") -> Tensor:
    """Ulysses over ``ulysses_group`` around ring attention over ``ring_group``.

    q ``[s/CP, b, h, d]``, k ``[s/CP, b, hk, d]``, v ``[s/CP, b, hk, dv]`` (MLA: ``dv`` its own) ->
    ``[s/CP, b, h, dv]``. ``attention_mask`` (general,
    with ``causal=False``): bool ``[b|1, 1, s/CP, S]`` rows of this rank's tokens, or the full
    ``[b|1, 1, S, S]``; True = masked. The ring options (``bnsd``, ``overlap_group``, ``window``,
    ``kernel``, ``dead_rows``) apply at the ring level; ``dropout`` (:class:`mindspeed_cp.dropout.
    AttentionDropout` over the ``h`` heads given here) too, on the heads each Ulysses rank computes.
    ``check_inputs``: agree on every CP rank's inputs first; ``agree_group``: a group over all CP ranks for
    that (one exchange instead of two; the Megatron path passes the CP group's gloo twin). ``documents``: a
    :class:`mindspeed_cp.packing.Documents` with ``ring`` = the ring size (document-causal attention).
    ``kv_cache_policy``: None, ``"full"`` or ``"half"`` at the Ulysses level and, unless
    ``ring_kv_cache_policy`` says otherwise (default ``"same"``), at the ring level (:mod:`mindspeed_cp.kv_cache`).
    """
    if ring_kv_cache_policy == "same":
        ring_kv_cache_policy = kv_cache_policy
    check_policy(kv_cache_policy, "hybrid_attention")
    check_policy(ring_kv_cache_policy, "hybrid_attention (ring level)")
    if dropout is not None and dropout.p == 0:
        dropout = None
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if check_inputs:
        _agree(q, k, v, attention_mask, causal, scale, bnsd, overlap_group, window, dropout, dead_rows,
               ulysses_group, ring_group, agree_group, documents, (kv_cache_policy, ring_kv_cache_policy))
    ring_level = _RingLevel(ulysses_group, ring_group, causal=causal, softmax_scale=scale,
                            bnsd=bnsd, overlap_group=overlap_group, window=window, kernel=kernel,
                            dead_rows=dead_rows, documents=documents, kv_cache_policy=ring_kv_cache_policy)
    ulysses = UlyssesContextAttention(ring_level, ulysses_group, check_inputs=False, kv_cache_policy=kv_cache_policy)
    return ulysses(q, k, v, attention_mask, dropout=dropout)
