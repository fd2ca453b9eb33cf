"""The options of an attention call, as small frozen objects: one per level, and one for the per-call inputs.

The public functions keep their keyword arguments (``ring_attention(q, k, v, group, causal=..., bnsd=...)``); they
build these objects once, and everything below them - Hybrid's ring level, the agreement, the Megatron glue -
passes the objects instead of re-spelling every option::

    ring = RingOptions(bnsd=True, window=DoubleRingWindow(2, intra, inter), kv_cache_policy="full")
    inputs = CallInputs(causal=True, dropout=drop)          # what changes from call to call
    out = ring_attention_with(q, k, v, ring_group, inputs, ring)

Values are checked where a wrong one would make ranks diverge: the agreement (:mod:`mindspeed_cp.agreement`)
encodes every option in its row, so one rank's bad value fails every rank. A KV-cache policy outside
``None | "full" | "half"`` is refused at once (it names no layout at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .config import KV_CACHE_POLICIES

__all__ = [
    "DEAD_ROWS",
    "KV_CACHE_POLICIES",
    "CallInputs",
    "DoubleRingWindow",
    "KVAllGatherOptions",
    "RingOptions",
    "UlyssesOptions",
    "check_policy",
    "policy_code",
]

DEAD_ROWS = ("uniform", "zero")  # a fully masked row: the mean of V (Megatron's local attention), or 0 (flash, TE)
GATHER_GROUPS = 4  # kvallgather_cp_algo: at most this many KV-head groups per gather (KVAllGatherOptions.head_groups)


def check_policy(policy: Optional[str], where: str) -> Optional[str]:
    """``policy`` if it is a KV-cache policy (or None), else ValueError naming ``where``."""
    if policy is not None and policy not in KV_CACHE_POLICIES:
        raise ValueError(f"{where}: kv_cache_policy must be None, 'full' or 'half', got {policy!r}")
    return policy


def policy_code(policy: Optional[str]) -> int:
    """The policy as an integer for the input agreement (ranks must agree: else one waits for a message)."""
    return -1 if policy is None else KV_CACHE_POLICIES.index(policy)


@dataclass(frozen=True)
class DoubleRingWindow:
    """Double Ring groups of this rank: for the ring list ``Rg`` and window ``size`` K,
    ``intra_group`` = ``Rg[x*K:(x+1)*K]`` (this rank's window), ``inter_group`` = ``Rg[a::K]`` (the same
    position in every window); the ``*_overlap_group`` twins (same ranks) enable send/recv overlap."""

    size: int
    intra_group: Any = None
    inter_group: Any = None
    intra_overlap_group: Any = None
    inter_overlap_group: Any = None


@dataclass(frozen=True)
class RingOptions:
    """The ring level's options (``ring_attention``'s keywords; Hybrid's ring level).

    ``bnsd``: compute in ``[b, n, s, d]`` (``--megatron-cp-in-bnsd``). ``overlap_group``: a second communicator over
    the ring's ranks (``--use-cp-send-recv-overlap``). ``window``: Double Ring groups (None or size 1: one ring).
    ``kernel``: a kernel name, object or None (by device). ``dead_rows``: fully masked rows give ``"zero"`` or
    ``"uniform"`` (Megatron's local attention). ``kv_cache_policy``: what backward keeps of the received blocks.
    """

    bnsd: bool = False
    overlap_group: Any = None
    window: Optional[DoubleRingWindow] = None
    kernel: Any = None
    dead_rows: str = "zero"
    kv_cache_policy: Optional[str] = None

    def __post_init__(self) -> None:
        check_policy(self.kv_cache_policy, "ring_attention")

    @property
    def double(self) -> bool:
        return self.window is not None and self.window.size != 1

    @property
    def window_size(self) -> int:
        """K of the Double Ring (1: a single ring)."""
        return self.window.size if self.double else 1

    @property
    def overlap(self) -> bool:
        """Send and receive on two communicators (the Double Ring's twins, or ``overlap_group``)."""
        return self.window.intra_overlap_group is not None if self.double else self.overlap_group is not None


@dataclass(frozen=True)
class UlyssesOptions:
    """The Ulysses level's options: ``kv_cache_policy`` (``--context-parallel-kv-cache-policy``) and
    ``allgather_kv`` (``--use-ulysses-allgather-kv``: K/V by all-gather, GQA with KV heads <= P)."""

    kv_cache_policy: Optional[str] = None
    allgather_kv: bool = False

    def __post_init__(self) -> None:
        check_policy(self.kv_cache_policy, "UlyssesContextAttention")


@dataclass(frozen=True)
class KVAllGatherOptions:
    """The all-gather level's options (``kvallgather_attention``'s keywords).

    ``overlap``: compute on the rank's own keys while the gather travels, and on an accelerator split the gather by
    KV heads so that computing one group overlaps the gathering of the next (in backward, the reduce-scatter of one
    group's dK/dV the computing of the next); False: one gather, one reduce-scatter (``--no-cp-allgather-overlap``).
    ``gather_groups``: the KV-head groups instead of that rule (a divisor of the KV heads; testing the split on a
    CPU, or tuning it). ``kernel``: a kernel name, object or None (by device). ``dead_rows``: fully masked rows give
    ``"zero"`` or ``"uniform"`` (Megatron's local attention). ``kv_cache_policy``: None gathers K/V again in
    backward, ``"full"`` keeps the gathered K/V, ``"half"`` keeps the gathered K and gathers V again.
    """

    overlap: bool = True
    kernel: Any = None
    dead_rows: str = "zero"
    kv_cache_policy: Optional[str] = None
    gather_groups: Optional[int] = None

    def __post_init__(self) -> None:
        check_policy(self.kv_cache_policy, "kvallgather_attention")
        if self.gather_groups is not None and (not isinstance(self.gather_groups, int) or self.gather_groups < 1):
            raise ValueError(f"kvallgather_attention: gather_groups must be a positive int, got {self.gather_groups!r}")

    def head_groups(self, kv_heads: int, device: str = "cuda") -> int:
        """How many KV-head groups the gather is split into: ``gather_groups`` when given (0 when it does not divide
        ``kv_heads``: the input agreement refuses it on every rank); without overlap, or on a CPU device, 1; else the
        largest divisor of ``kv_heads`` up to :data:`GATHER_GROUPS` (8 -> 4, 6 -> 3, 2 -> 2), or its smallest
        divisor (5 -> 5; one KV head cannot be split: 1). The first group's gather is exposed (but for the tiles on
        the rank's own keys), each later one travels while the previous group computes: more groups hide more,
        each costs one collective's latency and makes the kernel calls narrower. On a CPU (gloo) the transfers are
        copies on the same cores as the kernels, so a split hides nothing and only multiplies the calls: measured
        at S = 2048, 8 KV heads, fp32, 2 cores, 4 groups cost 1.05x (CP 2) and 1.21x (CP 4) the CPU time of one
        (Note [gloo collectives as point-to-point] in :mod:`mindspeed_cp.comm` for the transfers themselves)."""
        if self.gather_groups is not None:
            return self.gather_groups if kv_heads % self.gather_groups == 0 else 0
        if not self.overlap or kv_heads < 2 or device == "cpu":
            return 1
        small = [g for g in range(2, min(kv_heads, GATHER_GROUPS) + 1) if kv_heads % g == 0]
        return small[-1] if small else next(g for g in range(2, kv_heads + 1) if kv_heads % g == 0)


@dataclass(frozen=True)
class CallInputs:
    """What one attention call brings besides q/k/v: ``causal``; ``attention_mask`` (bool, True = masked; with
    ``causal=False``); ``softmax_scale`` (None: ``1/sqrt(d)``); ``dropout`` (:class:`mindspeed_cp.dropout.
    AttentionDropout`; p = 0 is none); ``documents`` (:class:`mindspeed_cp.layout.packing.Documents`:
    document-causal attention); ``window_size`` (Megatron's sliding window ``(left, right)``, ``-1`` unbounded;
    it replaces ``causal``); ``softmax_offset`` (``[n]`` sink logits of the call's query heads, softmax_type
    off-by-one / learnable: :mod:`mindspeed_cp.blocks`)."""

    causal: bool = True
    attention_mask: Any = None
    softmax_scale: Optional[float] = None
    dropout: Any = None
    documents: Any = None
    window_size: Any = None
    softmax_offset: Any = None

    def __post_init__(self) -> None:
        if self.dropout is not None and self.dropout.p == 0:
            object.__setattr__(self, "dropout", None)

    @property
    def window(self):
        """The sliding window as a :class:`mindspeed_cp.layout.window.Window`, or None (no window, or one that
        bounds no side: plain causal / full attention)."""
        from .layout.window import Window

        if self.window_size is None:
            return None
        w = Window.of(self.window_size, self.causal)
        if w.bounded:
            return w
        if (w.right == 0) != bool(self.causal):
            raise ValueError(f"window_size {tuple(self.window_size)} contradicts causal={self.causal}")
        return None

    def scale(self, head_dim: int) -> float:
        """The softmax scale for a query/key head size ``head_dim``."""
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def replace(self, **changes: Any) -> "CallInputs":
        import dataclasses

        return dataclasses.replace(self, **changes)
