"""Ulysses context parallelism: all-to-all from sequence shards to head shards and back.

Each of the P ranks of the Ulysses group holds a contiguous slice of the sequence with all heads. One
all-to-all per input trades that for the full sequence with h/P heads, any local attention runs on it,
and one all-to-all on the output trades back (DeepSpeed-Ulysses; MindSpeed's ``UlyssesContextAttention``)::

    # q, k, v: [s/P, b, h, d] -> [s, b, h/P, d]     (all-to-all: scatter heads, gather sequence)
    # out = local_attention(q, k, v, *args, **kwargs)      [s, b, h/P, d] or [s, b, h/P*d]
    # out:     [s, b, h/P, d] -> [s/P, b, h, d]     (all-to-all: scatter sequence, gather heads)

The backward of each all-to-all is its inverse (:mod:`mindspeed_cp.comm`).

Unaligned sequences (MindSpeed's "非对齐 Ulysses"): a :class:`GatherSizeCalculator` names the global length
S; rank r then holds tokens ``torch.tensor_split(torch.arange(S), P)[r]`` (the first S % P ranks one more
token) and the all-to-alls use those split sizes. Ranks may even hold no token (S < P).

Before the first all-to-all every rank shares a small metadata row (:mod:`mindspeed_cp.agree`, one
all-gather of ~22 integers on the CPU when the group is gloo): its local length, the shapes, dtypes, device
types and grad mode of q/k/v, the declared S and whether its own inputs were rejected. Every rank then runs
the same checks on the same table, so a bad input raises the same :class:`UlyssesError` on every rank
(naming global ranks) instead of hanging the others in an all-to-all or silently producing wrong rows.
``check_inputs=False`` skips that exchange (then only rank-local checks run; Hybrid does so after its own
agreement over the whole CP group).

KV cache (``kv_cache_policy``, MindSpeed's ``--context-parallel-kv-cache-policy``): ``"full"`` keeps the input
K/V for backward instead of what the all-to-all made of them and runs their all-to-all again in backward,
``"half"`` does so for K only (:mod:`mindspeed_cp.kv_cache`; any local attention). ``allgather_kv``
(``--use-ulysses-allgather-kv``): K/V are all-gathered over the sequence instead (every KV head, then each
rank keeps the one its query heads use; GQA with ``kv_heads <= P``, ``P % kv_heads == 0``) and backward
reduce-scatters dK/dV; Q and the output still go by all-to-all.
"""
from __future__ import annotations

import operator
import zlib
from abc import ABC, abstractmethod
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .agree import Table, agree, device_code, device_name
from .comm import all_gather, all_to_all, split_sizes
from .kv_cache import KV_CACHE_POLICIES, RecomputedKV, check_policy, policy_code

__all__ = [
    "UlyssesContextAttention", "DistributedAttention", "UlyssesError", "GatherSizeCalculator",
    "DefaultGatherSizeCalculator", "DynamicGatherSizeCalculator", "kv_head_repeats",
]


class UlyssesError(ValueError):
    """Inputs Ulysses cannot shard; raised on every rank of the group (the message names shapes/ranks)."""


# ----------------------------------------------------------------------------- gather size calculators
class GatherSizeCalculator(ABC):
    """Says how long the global sequence is (the size along ``gather_idx`` after the all-to-all).

    ``calculate`` receives the ``*args, **kwargs`` given to :meth:`UlyssesContextAttention.forward` after
    q, k, v. ``None`` means aligned: every rank holds the same number of tokens and S = s_local * P.
    """

    @abstractmethod
    def calculate(self, *args: Any, **kwargs: Any) -> Optional[int]:
        """The global sequence length S, or None for the aligned layout."""


class DefaultGatherSizeCalculator(GatherSizeCalculator):
    """Always aligned (None)."""

    def calculate(self, *args: Any, **kwargs: Any) -> Optional[int]:
        return None


class DynamicGatherSizeCalculator(GatherSizeCalculator):
    """S = last dim of the attention mask (first positional arg after q, k, v, or ``attention_mask=``).

    Returns None when that mask is not a tensor (e.g. no mask, or MindSpeed's list-of-masks form).
    """

    def calculate(self, *args: Any, **kwargs: Any) -> Optional[int]:
        mask = args[0] if args else kwargs.get("attention_mask")
        return int(mask.shape[-1]) if isinstance(mask, torch.Tensor) else None


# ----------------------------------------------------------------------------- GQA rule
def kv_head_repeats(heads: int, kv_heads: int, ranks: int) -> int:
    """How often each KV head is repeated before the all-to-all so every rank gets the KV its queries use.

    Query head i uses KV head ``i // (heads // kv_heads)`` (Megatron/SDPA grouping); rank r receives query
    heads ``[r*heads/P, (r+1)*heads/P)``.

    * ``kv_heads >= P``: KV heads are scattered like query heads (needs ``kv_heads % P == 0``); rank r's
      query heads use exactly KV heads ``[r*kv/P, (r+1)*kv/P)``. Returns 1.
    * ``kv_heads < P``: each KV head is repeated ``P // kv_heads`` times (needs ``P % kv_heads == 0``), so
      the all-to-all hands every rank exactly one KV head -- the one its query heads use. KV is never
      expanded to full multi-head. Example: h=8, kv=2, P=4 -> K becomes [k0, k0, k1, k1]; rank r gets query
      heads 2r, 2r+1 and KV head k_{r//2} (queries 0-3 use k0, 4-7 use k1). Gradients of the copies sum
      back into the original head (the repeat is part of the autograd graph).

    The local attention sees ``heads/P`` query heads and ``max(kv_heads, P)/P`` KV heads and groups them by
    shape. Raises :class:`UlyssesError` for combinations that cannot be split this way.
    """
    if heads % ranks:
        raise UlyssesError(f"query has {heads} heads, not divisible by the {ranks} ranks of the Ulysses group")
    if kv_heads < 1 or heads % kv_heads:
        raise UlyssesError(f"query has {heads} heads and key/value {kv_heads}: grouped-query attention needs "
                           f"the query heads to be a multiple of the key/value heads")
    if kv_heads >= ranks:
        if kv_heads % ranks:
            raise UlyssesError(f"key/value have {kv_heads} heads, not divisible by the {ranks} ranks of the "
                               f"Ulysses group (with {kv_heads} >= {ranks} KV heads are scattered like query "
                               f"heads)")
        return 1
    if ranks % kv_heads:
        raise UlyssesError(f"key/value have {kv_heads} heads, fewer than the {ranks} ranks of the Ulysses group "
                           f"and not a divisor of {ranks}: KV heads cannot be replicated so that every rank "
                           f"gets the one its query heads use")
    return ranks // kv_heads


# ----------------------------------------------------------------------------- input checks
_NAMES = ("query", "key", "value")
_COLS = 7  # metadata columns per tensor: 4 dims, dtype, needs grad, device type


def _signature(t: torch.Tensor) -> List[int]:
    # crc32 of the dtype name is stable across processes (unlike hash()); a rank whose tensor needs a
    # gradient while another's does not would wait forever in the backward all-to-all.
    return list(t.shape) + [zlib.crc32(str(t.dtype).encode()), int(t.requires_grad and torch.is_grad_enabled()),
                            device_code(t)]


def _as_length(size: Any) -> Optional[int]:
    """The calculator's answer as an int (None stays None); anything else is a TypeError."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise TypeError(f"gather size must be an int (the global sequence length), got {size!r}")
    try:
        return operator.index(size)
    except TypeError:
        raise TypeError(f"gather size must be an int (the global sequence length), got {size!r}") from None


def allgather_problem(heads: int, kv_heads: int, ranks: int) -> Optional[str]:
    """Why K/V cannot go by all-gather (``--use-ulysses-allgather-kv``) for these head counts, or None."""
    if kv_heads >= heads:
        return (f"--use-ulysses-allgather-kv needs grouped-query attention (fewer key/value heads than the {heads} "
                f"query heads), got {kv_heads} key/value heads")
    if kv_heads > ranks or ranks % kv_heads:
        return (f"--use-ulysses-allgather-kv gathers all {kv_heads} key/value heads on each of the {ranks} ranks: it "
                f"needs at most {ranks} of them, dividing {ranks} (with more, the all-to-all sends less)")
    return None


def _local_problem(qkv, seq_dim: int, head_dim: int, gather_size, ranks: int, rank: int,
                   allgather: bool = False) -> Optional[str]:
    """What is wrong with this rank's own inputs (None if nothing); needs no communication."""
    for name, t in zip(_NAMES, qkv):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return (f"{name} must be a 4-D tensor with the sequence at dim {seq_dim} and heads at dim "
                    f"{head_dim}, got {got}")
    q, k, v = qkv
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(_NAMES, qkv))
    if len({t.device for t in qkv}) > 1:
        return "query, key and value are on different devices (" + ", ".join(
            f"{n} {t.device}" for n, t in zip(_NAMES, qkv)) + ")"
    other = [d for d in range(3) if d not in (seq_dim, head_dim)]  # the batch dim(s)
    for d in [seq_dim] + other:
        if not q.shape[d] == k.shape[d] == v.shape[d]:
            return f"query, key and value differ at dim {d} ({shapes})"
    if k.shape[head_dim] != v.shape[head_dim] or q.shape[3] != k.shape[3]:
        return f"key and value need the same heads and query and key the same head size ({shapes})"
    try:
        kv_head_repeats(q.shape[head_dim], k.shape[head_dim], ranks)
    except UlyssesError as e:
        return str(e)
    if allgather:
        problem = allgather_problem(q.shape[head_dim], k.shape[head_dim], ranks)
        if problem:
            return problem
    s_local = q.shape[seq_dim]
    if gather_size is None:
        return None if s_local > 0 else (
            f"query holds 0 tokens along dim {seq_dim}: aligned Ulysses needs the same non-zero local "
            f"length on every rank")
    if gather_size < 1:
        return f"gather size must be a positive global sequence length, got {gather_size}"
    want = split_sizes(gather_size, ranks)
    if s_local != want[rank]:
        return (f"gather size {gather_size} over {ranks} ranks means rank {rank} holds {want[rank]} tokens "
                f"(torch.tensor_split: {want}), but its {_NAMES[0]} has {s_local} along dim {seq_dim}")
    return None


def _row(qkv, gather_size, ok: bool, options=(None, False)) -> List[int]:
    """This rank's metadata row: the gather size (-1 = aligned), then q/k/v signatures (zeros when this
    rank's inputs are unusable; then only its problem text matters), then the KV cache policy and the
    all-gather switch (a rank that differs would wait in backward for an exchange the others skip)."""
    row = [-1 if gather_size is None else int(gather_size)]
    for t in qkv:
        row += _signature(t) if ok else [0] * _COLS
    return row + [policy_code(options[0]), int(options[1])]


def _check(table: Table, seq_dim: int, where: str = "the Ulysses group") -> Optional[str]:
    """The same verdict on every rank: everything but the local sequence length must agree (else the
    all-to-all pieces would not match), and aligned lengths must be equal."""
    seq_cols = [1 + _COLS * i + seq_dim for i in range(3)]
    key = [[x for c, x in enumerate(r) if c not in seq_cols] for r in table.rows]
    if any(k != key[0] for k in key):
        return (f"q/k/v shapes, dtypes, devices, requires_grad or gather sizes differ across the ranks of {where} "
                f"(only the sequence dim may differ): " + table.listing(_describe))
    lengths = [r[seq_cols[0]] for r in table.rows]
    if table.rows[0][0] < 0 and len(set(lengths)) > 1:
        return (f"aligned Ulysses needs the same local sequence length on every rank, got {lengths} (ranks "
                f"{table.ranks}); for uneven lengths give UlyssesContextAttention a gather_size_calculator "
                f"(e.g. DynamicGatherSizeCalculator) that returns the global length")
    return None  # with a declared S each rank already checked its own length against tensor_split(S, P)


def _describe(row: List[int]) -> str:
    dtypes = {zlib.crc32(str(d).encode()): str(d).replace("torch.", "")
              for d in vars(torch).values() if isinstance(d, torch.dtype)}
    parts = []
    for i, name in enumerate(_NAMES):
        col = row[1 + _COLS * i: 1 + _COLS * (i + 1)]
        grad = " requires_grad" if col[5] else ""
        parts.append(f"{name} {tuple(col[:4])} {dtypes.get(col[4], '?')} {device_name(col[6])}{grad}")
    policy, gather = row[1 + 3 * _COLS:3 + 3 * _COLS]
    return (", ".join(parts) + (", aligned" if row[0] < 0 else f", gather size {row[0]}")
            + f", kv_cache_policy={None if policy < 0 else repr(KV_CACHE_POLICIES[policy])}"
            + (", allgather_kv" if gather else ""))


# ----------------------------------------------------------------------------- the module
class UlyssesContextAttention(torch.nn.Module):
    """Ulysses context-parallel attention around any local attention (DeepSpeed ``DistributedAttention``
    and MindSpeed ``UlyssesContextAttention`` compatible).

    Args:
        local_attention: callable ``local_attention(q, k, v, *args, **kwargs)`` on the full sequence and
            h/P heads, returning ``[S, b, h/P, d]`` or ``[S, b, h/P*d]`` (bshd: ``[b, S, ...]``).
        sequence_process_group: the Ulysses group (P ranks holding one sequence).
        scatter_idx: dim of the heads in q/k/v (2 for both sbhd and bshd).
        gather_idx: dim of the sequence: 0 for ``[s, b, h, d]`` (Megatron), 1 for ``[b, s, h, d]``.
        gather_size_calculator: gives the global length S for unaligned sequences
            (default :class:`DefaultGatherSizeCalculator`: aligned).
        check_inputs: exchange metadata before the first all-to-all so bad inputs fail on every rank
            (one small all-gather per forward). False trusts the caller.
        agree_group: where that exchange runs (default: ``sequence_process_group``); a gloo group over the
            same ranks keeps it off the device (the Megatron path passes the CP group's gloo twin).
        kv_cache_policy: None, ``"full"`` or ``"half"`` (see the module docstring).
        allgather_kv: K/V by all-gather instead of all-to-all (GQA with ``kv_heads <= P``).

    GQA/MQA: key/value may have fewer heads than query; see :func:`kv_head_repeats` for the rule (KV heads
    are scattered when there are at least P of them, otherwise each is repeated P/kv times, e.g. h=8, kv=2,
    P=4: every rank gets 2 query heads and 1 KV head).
    """

    def __init__(self, local_attention, sequence_process_group, scatter_idx: int = 2, gather_idx: int = 0,
                 gather_size_calculator: Optional[GatherSizeCalculator] = None, *,
                 check_inputs: bool = True, agree_group=None, kv_cache_policy: Optional[str] = None,
                 allgather_kv: bool = False) -> None:
        super().__init__()
        dims = {scatter_idx % 4, gather_idx % 4}
        if len(dims) != 2 or 3 in dims:
            raise UlyssesError(f"scatter_idx ({scatter_idx}) and gather_idx ({gather_idx}) must name two different "
                               f"dims of the 4-D q/k/v other than the last (the head size)")
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx % 4
        self.gather_idx = gather_idx % 4
        if gather_size_calculator is None:
            gather_size_calculator = DefaultGatherSizeCalculator()
        self.gather_size_calculator = gather_size_calculator
        self.check_inputs = check_inputs
        self.agree_group = agree_group
        self.kv_cache_policy = check_policy(kv_cache_policy, "UlyssesContextAttention")
        self.allgather_kv = bool(allgather_kv)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        group, head_dim, seq_dim = self.spg, self.scatter_idx, self.gather_idx
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        gather_size, problem, cause = None, None, None
        try:
            gather_size = _as_length(self.gather_size_calculator.calculate(*args, **kwargs))
            problem = _local_problem((query, key, value), seq_dim, head_dim, gather_size, ranks, rank,
                                     self.allgather_kv)
        except Exception as e:  # noqa: BLE001 - a failing calculator must fail every rank, not hang them
            gather_size, problem, cause = None, f"{type(e).__name__}: {e}", e
        if self.check_inputs:
            try:
                options = (self.kv_cache_policy, self.allgather_kv)
                agree(self.agree_group or group, _row((query, key, value), gather_size, problem is None, options),
                      problem,
                      check=lambda table: _check(table, seq_dim), error=UlyssesError, like=query,
                      prefix="Ulysses inputs rejected on ")
            except UlyssesError as e:
                raise e from cause
        elif problem is not None:
            raise UlyssesError(problem) from cause

        heads, s_local = query.shape[head_dim], query.shape[seq_dim]
        total = s_local * ranks if gather_size is None else gather_size
        seq_sizes = split_sizes(total, ranks)
        repeats = kv_head_repeats(heads, key.shape[head_dim], ranks)

        def kv_exchange(t: torch.Tensor, again: bool = False) -> torch.Tensor:
            if self.allgather_kv:
                # [s/P, b, kv, d] -> [s, b, kv, d] -> [s, b, 1, d]: the KV head this rank's query heads use
                whole = all_gather(t, group, seq_dim, seq_sizes, kind="all_gather_again" if again else "all_gather")
                return whole.narrow(head_dim, rank // (ranks // t.shape[head_dim]), 1).contiguous()
            if repeats > 1:
                # [s/P, b, kv, d] -> [s/P, b, P, d]: KV head j repeated for the P/kv ranks whose queries use it
                t = t.repeat_interleave(repeats, dim=head_dim)
            # [s/P, b, kv', d] -> [s, b, kv'/P, d]
            return all_to_all(t, group, head_dim, seq_dim, gather_sizes=seq_sizes,
                              kind="all_to_all_again" if again else "all_to_all")

        # [s/P, b, h, d] -> [s, b, h/P, d]
        q = all_to_all(query, group, head_dim, seq_dim, gather_sizes=seq_sizes)
        k, v = kv_exchange(key), kv_exchange(value)
        kept = RecomputedKV()  # the policy's K/V: rebuilt in backward from the input instead of saved
        again = lambda t: kv_exchange(t, again=True)  # noqa: E731
        if self.kv_cache_policy is not None and ranks > 1:
            kept.add(k, key, again)
            if self.kv_cache_policy == "full":
                kept.add(v, value, again)
        with kept.hooks():
            out = self.local_attn(q, k, v, *args, **kwargs)
        flat = self._check_output(out, q, total)
        if flat:  # [s, b, h/P*d] -> [s, b, h/P, d]
            out = out.unflatten(-1, (heads // ranks, -1))
        # [s, b, h/P, d] -> [s/P, b, h, d]
        out = all_to_all(out, group, seq_dim, head_dim, scatter_sizes=seq_sizes)
        return out.flatten(-2) if flat else out  # [s/P, b, h*d] if the local attention flattened

    def _check_output(self, out, q: torch.Tensor, total: int) -> bool:
        """Whether ``out`` is the flattened form; raise if it is neither ``q``-shaped nor its flattening."""
        head_dim, seq_dim = self.scatter_idx, self.gather_idx
        ok = isinstance(out, torch.Tensor)
        flat = ok and out.dim() == 3
        if ok and flat:
            ok = head_dim == 2 and out.shape[:2] == q.shape[:2] and out.shape[2] % q.shape[2] == 0
        elif ok:
            ok = out.dim() == 4 and out.shape[:3] == q.shape[:3]
        if not ok:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UlyssesError(f"local attention returned {got}; expected a tensor shaped like its query "
                               f"{tuple(q.shape)} (sequence {total} at dim {seq_dim}, {q.shape[head_dim]} heads at "
                               f"dim {head_dim}) or with its last two dims flattened")
        return flat


DistributedAttention = UlyssesContextAttention
