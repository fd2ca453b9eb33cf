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

Before the first all-to-all every rank shares a small metadata row (:func:`mindspeed_cp.agreement.agree_ulysses`,
one all-gather of ~30 integers on the CPU when the group is gloo): its local length, the shapes, dtypes, device
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

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
import torch.distributed as dist

from .agreement import UlyssesError, agree_ulysses, allgather_problem, kv_head_repeats  # noqa: F401 - public here
from .comm import all_gather, all_to_all
from .kv_cache import RecomputedKV
from .layout.sharding import split_sizes
from .options import UlyssesOptions

__all__ = [
    "UlyssesContextAttention",
    "DistributedAttention",
    "UlyssesError",
    "GatherSizeCalculator",
    "DefaultGatherSizeCalculator",
    "DynamicGatherSizeCalculator",
    "kv_head_repeats",
]


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

    def __init__(
        self,
        local_attention,
        sequence_process_group,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        gather_size_calculator: Optional[GatherSizeCalculator] = None,
        *,
        check_inputs: bool = True,
        agree_group=None,
        kv_cache_policy: Optional[str] = None,
        allgather_kv: bool = False,
    ) -> None:
        super().__init__()
        dims = {scatter_idx % 4, gather_idx % 4}
        if len(dims) != 2 or 3 in dims:
            raise UlyssesError(
                f"scatter_idx ({scatter_idx}) and gather_idx ({gather_idx}) must name two different "
                f"dims of the 4-D q/k/v other than the last (the head size)"
            )
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx % 4
        self.gather_idx = gather_idx % 4
        if gather_size_calculator is None:
            gather_size_calculator = DefaultGatherSizeCalculator()
        self.gather_size_calculator = gather_size_calculator
        self.check_inputs = check_inputs
        self.agree_group = agree_group
        self.options = UlyssesOptions(kv_cache_policy=kv_cache_policy, allgather_kv=bool(allgather_kv))

    @property
    def kv_cache_policy(self) -> Optional[str]:
        return self.options.kv_cache_policy

    @property
    def allgather_kv(self) -> bool:
        return self.options.allgather_kv

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        group, head_dim, seq_dim = self.spg, self.scatter_idx, self.gather_idx
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        gather_size = agree_ulysses(
            (query, key, value),
            seq_dim,
            head_dim,
            lambda: self.gather_size_calculator.calculate(*args, **kwargs),
            group,
            self.options,
            self.agree_group,
            self.check_inputs,
        )
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
            return all_to_all(
                t, group, head_dim, seq_dim, gather_sizes=seq_sizes, kind="all_to_all_again" if again else "all_to_all"
            )

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
            raise UlyssesError(
                f"local attention returned {got}; expected a tensor shaped like its query "
                f"{tuple(q.shape)} (sequence {total} at dim {seq_dim}, {q.shape[head_dim]} heads at "
                f"dim {head_dim}) or with its last two dims flattened"
            )
        return flat


DistributedAttention = UlyssesContextAttention
