"""The cost model: every formula of bytes, work, memory and time, in one place (pure arithmetic, no torch).

The benchmarks compare measurements with these formulas (``benchmarks/textbook.py`` re-exports them) and
``mindspeed-cp plan`` (:mod:`mindspeed_cp.planner.plan`) ranks configurations with them, so a formula the benchmarks
check is the formula the planner uses.

Notation: ``S`` global tokens, ``P`` ranks of a CP level, ``s = S/P`` local tokens, ``b`` micro-batch, ``h``
query heads, ``hk`` KV heads, ``d`` head dim, ``e`` bytes per element.

**Bytes** one rank sends, forward + backward (docs/design.md, "Conventions"):

* Ulysses over P: ``2 (P-1)/P s b d (2h + 2hk) e`` - q, k, v, out each cross one all-to-all forward, their
  gradients the inverse one backward. With ``hk < P`` KV heads are replicated to P first.
* Ring over P (and Double Ring: inner + outer hops add up to the same P-1 per pass): ``3 (P-1) 2 s b hk d e``
  - K+V forward, K+V again and dK+dV backward (KV-cache policies remove some of the backward K/V).
* Hybrid U x R: Ulysses over U on the S/P local tokens plus Ring over R on ``h/U``, ``hk/U`` heads, S/R tokens.
* All-gather K/V over P (``kvallgather_cp_algo``): the K/V all-gather ``(P-1) s b hk (d + dv) e`` forward, the
  same again backward unless a KV-cache policy keeps the gathered K/V, and the dK/dV reduce-scatter as much:
  ``3 (P-1) s b hk (d + dv) e`` (the ring's volume), ``2 (P-1)/P S b hk (d + dv) e`` with ``full`` (the textbook
  all-gather + reduce-scatter: 2/3 of the ring's, ``P hk / (h + hk)`` of Ulysses').
* A sliding-window layer on the window-aware ring (:func:`window_ring_kv_cache`): ``(2 T_s + T_r) b hk (d + dv) e``
  with ``T_s`` the tokens a rank sends and ``T_r`` those it receives (its halo: K/V forward, K/V again and dK/dV
  backward); in the zigzag layout ``T_s = T_r = H``, ``3 H b hk (d + dv) e`` - e.g. S = 2048, P = 4, window 64:
  H = 128 of the ring's ``(P-1) s = 1536``.

**Work**: causal attention computes ``S (S+1) / 2`` query-key pairs per head (a full mask ``S^2``); forward
``4 d`` FLOPs per pair (``QK^T`` and ``PV``), backward ``10 d`` (flash attention's backward recomputes the
scores: ``QK^T``, ``dV``, ``dP``, ``dQ``, ``dK``). Zigzag gives every ring rank exactly the same pairs per step
(:func:`ring_step_pairs`); Ulysses gives every rank ``h/U`` whole heads.

**Memory** per device (Megatron's mixed precision): weights + gradients + optimizer = 18 bytes per parameter, or
``6 + 12/DP`` with the distributed optimizer (Megatron-LM's ``docs/source/api-guide/dist_optimizer.md``);
activations per layer ``s b H (34/t)`` bytes with TP ``t`` and sequence parallelism and flash attention
(Korthikanti et al. 2022, "Reducing Activation Recomputation", table 2, without the ``5 a s / h`` score term
that flash attention does not store), ``2 s b H`` with full recomputation (the layer input only).

**Time** (:func:`attention_time`): compute = FLOPs / (peak x efficiency(tokens per kernel call)), where
efficiency rises with the block length as ``eff_max x n / (n + n_half)`` (a short block cannot fill the
device: the reason MindSpeed asks for S/CP > 8k on NPUs); an all-to-all = latency + the bytes to each link
class / that class's bandwidth, the slowest class deciding, never overlapped; a ring step = max(compute,
transfer) + latency (every exchange is posted before the block it overlaps; on a CPU device compute + transfer:
gloo's copies run on the same cores); Double Ring's outer hop is hidden
behind a whole inner ring of compute. Links are classified per group from :func:`mindspeed_cp.topology.
rank_layout` (intra-node if both ranks share a node of ``gpus_per_node``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..layout.runs import (
    Window,
    contiguous_layout,
    halo_tokens,
    hybrid_layout,
    run_pairs,
    zigzag_layout,
)
from ..options import KVAllGatherOptions

# ============================================================================ bytes (textbook)


def _dv(d: int, dv: Optional[int]) -> int:
    return d if dv is None else dv


def ulysses_bytes(S: int, P: int, b: int, h: int, hk: int, d: int, e: int, dv: Optional[int] = None) -> float:
    s = S / P
    return 2 * (P - 1) / P * s * b * (h + hk) * (d + _dv(d, dv)) * e


def ring_bytes(S: int, P: int, b: int, hk: int, d: int, e: int, dv: Optional[int] = None) -> float:
    s = S / P
    return 3 * (P - 1) * s * b * hk * (d + _dv(d, dv)) * e


def hybrid_bytes(S: int, U: int, R: int, b: int, h: int, hk: int, d: int, e: int, dv: Optional[int] = None) -> float:
    # all-to-all among U ranks on the S/(U R) tokens each CP rank holds, then a ring of R ranks on S/R tokens
    # with h/U, hk/U heads
    return ulysses_bytes(S / R, U, b, h, hk, d, e, dv) + ring_bytes(S, R, b, hk / U, d, e, dv)


def textbook_bytes(
    algo: str, S: int, cp: int, b: int, h: int, hk: int, d: int, e: int, ulysses: int = 1, dv: Optional[int] = None
) -> float:
    """Textbook bytes per rank for ``algo`` in ``ulysses | ring | double_ring | hybrid | kvallgather`` (no KV-cache
    policy)."""
    if algo == "ulysses":
        return ulysses_bytes(S, cp, b, h, hk, d, e, dv)
    if algo in ("ring", "double_ring"):
        return ring_bytes(S, cp, b, hk, d, e, dv)
    if algo == "hybrid":
        return hybrid_bytes(S, ulysses, cp // ulysses, b, h, hk, d, e, dv)
    if algo == "kvallgather":
        return kvallgather_bytes(S, cp, b, hk, d, e, dv)
    raise ValueError(f"unknown algorithm {algo!r}")


# ---------------------------------------------------------------------------- KV-cache policies (issue 15)
# Exact per-rank figures (any length: rank r of a Ulysses level holds split_sizes(S, P)[r] tokens), forward +
# backward, for --context-parallel-kv-cache-policy None | half | full and --use-ulysses-allgather-kv. "sent" is
# what the rank sends; "saved" is how many more bytes than with no policy autograd keeps for backward (the
# input K/V kept, minus the all-to-all output or received blocks no longer kept; negative = less memory).
# K has the head size d, V its own dv (MLA), so "half" (K) is not half of "full" (K and V) when they differ.
_AGAIN = {None: 0, "half": 1, "full": 2}  # K/V tensors whose exchange runs again in backward (Ulysses)
RING_AGAIN = {None: 1.0, "half": 0.5, "full": 0.0}  # share of the K/V blocks a ring sends again in backward (d = dv)


def _again(policy, d: int, dv: int) -> int:
    """Head sizes whose K/V exchange runs again in backward (Ulysses) / that a ring keeps: half K, full K and V."""
    return {None: 0, "half": d, "full": d + dv}[policy]


def ulysses_kv_cache(
    S: int,
    P: int,
    b: int,
    h: int,
    hk: int,
    d: int,
    e: int,
    policy=None,
    allgather=False,
    rank: int = 0,
    dv: Optional[int] = None,
) -> dict:
    """Ulysses over P ranks: q/out all-to-alls, K/V all-to-alls (KV heads replicated to P when hk < P) or
    all-gathers (every KV head, padded to the longest shard) plus reduce-scatters, and the policy's repeats."""
    dv = _dv(d, dv)
    base, extra = divmod(S, P)
    s = base + (1 if rank < extra else 0)
    longest = base + (1 if extra else 0)
    a = (P - 1) / P
    qo = (s * h * a + (S - s) * h / P) * b * (d + dv) * e  # q and out forward, their gradients backward
    if allgather:
        one = (P - 1) * longest * b * hk * e  # one K or V all-gather per head size; its reduce-scatter as much
        kv, post = 2 * one * (d + dv), S * b * 1 * e
    else:
        hr = max(hk, P)  # heads after the replication
        one = s * hr * a * b * e
        kv, post = (one + (S - s) * hr / P * b * e) * (d + dv), S * b * hr / P * e
    n = _again(policy, d, dv)
    return {"sent": qo + kv + n * one, "saved": n * (s * b * hk * e - post), "again": n * one}


def ring_kv_cache(S: int, P: int, b: int, hk: float, d: int, e: int, policy=None, dv: Optional[int] = None) -> dict:
    """Ring (or Double Ring) over P ranks holding S/P tokens each: blocks ``(S/P) b hk (d + dv) e``."""
    dv = _dv(d, dv)
    head = (S / P) * b * hk * e  # one block per unit of head size
    hops = P - 1
    kept = _again(policy, d, dv)
    return {
        "sent": (3 * (d + dv) - kept) * hops * head,
        "saved": kept * hops * head,
        "kv": (2 * (d + dv) - kept) * hops * head,
        "dkv": (d + dv) * hops * head,
    }


def kvallgather_kv_cache(
    S: int, P: int, b: int, hk: float, d: int, e: int, policy=None, dv: Optional[int] = None
) -> dict:
    """All-gather K/V over P ranks holding S/P tokens each (``kvallgather_cp_algo``): the K/V all-gather sends
    ``(P-1)`` shards of ``(S/P) b hk (d + dv) e``, the dK/dV reduce-scatter as much, and backward gathers again what
    the policy does not keep (none: K and V; ``half``: V; ``full``: nothing). ``saved``: the gathered K/V kept less
    the local K/V no longer kept. Policy by policy these are the ring's numbers (:func:`ring_kv_cache`): an
    all-gather sends each shard to P-1 ranks as the ring's P-1 hops do; without a policy
    ``3 (P-1)/P S b hk (d + dv) e``, with ``full`` the textbook all-gather + reduce-scatter
    ``2 (P-1)/P S b hk (d + dv) e``."""
    ring = ring_kv_cache(S, P, b, hk, d, e, policy, dv)
    return {"sent": ring["sent"], "saved": ring["saved"], "gather": ring["kv"], "reduce_scatter": ring["dkv"]}


def kvallgather_bytes(S: int, P: int, b: int, hk: float, d: int, e: int, dv: Optional[int] = None) -> float:
    """Bytes per rank of ``kvallgather_cp_algo`` without a KV-cache policy (K/V gathered again in backward)."""
    return kvallgather_kv_cache(S, P, b, hk, d, e, None, dv)["sent"]


def hybrid_kv_cache(
    S: int,
    U: int,
    R: int,
    b: int,
    h: int,
    hk: int,
    d: int,
    e: int,
    policy=None,
    ring_policy="same",
    rank: int = 0,
    dv: Optional[int] = None,
) -> dict:
    """Ulysses over U on the S/R tokens of a ring rank, Ring over R on h/U, max(hk, U)/U heads."""
    ring_policy = policy if ring_policy == "same" else ring_policy
    u = ulysses_kv_cache(S // R, U, b, h, hk, d, e, policy, rank=rank % U, dv=dv)
    r = ring_kv_cache(S, R, b, max(hk, U) / U, d, e, ring_policy, dv=dv)
    return {"sent": u["sent"] + r["sent"], "saved": u["saved"] + r["saved"]}


def window_ring_kv_cache(
    sent: int, received: int, b: int, hk: float, d: int, e: int, policy=None, dv: Optional[int] = None
) -> dict:
    """The window-aware ring's bytes for one rank that sends ``sent`` and receives ``received`` K/V tokens per pass
    (:meth:`mindspeed_cp.layout.window.HaloPlan.bytes_per_token`): K/V forward, the K/V again backward (less what
    ``policy`` keeps: the receiver keeps them), dK/dV of what it received. ``saved``: bytes kept for backward."""
    dv = _dv(d, dv)
    unit = b * hk * e
    kept = _again(policy, d, dv)
    kv = (sent * (d + dv) + sent * (d + dv - kept)) * unit
    dkv = received * (d + dv) * unit
    return {"sent": kv + dkv, "kv": kv, "dkv": dkv, "saved": kept * received * unit}


@functools.lru_cache(maxsize=1024)
def window_halo(algo: str, S: int, cp: int, ulysses: int, window: Window) -> Dict[str, int]:
    """:func:`halo_of` the layout ``algo`` gives the batch (:func:`window_layout`), cached: O(CP) once."""
    return halo_of(window_layout(algo, S, cp, ulysses), window, S)


def window_layout(algo: str, S: int, cp: int, ulysses: int = 1):
    """The runs every rank of a windowed layer's halo group holds: the layout the batch has (``algo``: the
    configured algorithm's - Ring: zigzag over CP, Ulysses: contiguous, Hybrid: its ``U x R`` layout)."""
    if algo in ("ring", "kvallgather"):
        return zigzag_layout(S, cp)
    if algo == "ulysses":
        return contiguous_layout(S, cp)
    return hybrid_layout(S, ulysses, cp // ulysses)


def halo_of(layout, window: Window, S: int) -> Dict[str, int]:
    """The busiest rank of a layout under a window: its halo ``H`` (tokens received), its pairs (work per head) and
    the ranks it receives from (exchanges per pass)."""
    heavy = max(range(len(layout)), key=lambda r: (halo_tokens(layout[r], window, S), run_pairs(layout[r], window, S)))
    runs = layout[heavy]
    starts = sorted((x.pos, x.pos + x.n, r) for r, rank in enumerate(layout) for x in rank if x.n)
    sources = set()
    for x in runs:
        lo, hi = window.reach(x.pos, x.pos + x.n - 1)
        sources |= {r for a, b, r in starts if a < hi and b > lo and r != heavy}
    return {
        "halo": halo_tokens(runs, window, S),
        "pairs": max(run_pairs(rank, window, S) for rank in layout),
        "sources": len(sources),
        "tokens": sum(x.n for x in runs),
    }


# ============================================================================ work


def causal_pairs(S: int) -> int:
    """Query-key pairs of causal attention over S tokens (query i sees keys 0..i)."""
    return S * (S + 1) // 2


def ring_step_pairs(S: int, P: int, step: int) -> int:
    """Pairs one zigzag ring rank computes at ``step`` (0 = its own K/V), the same on every rank.

    Rank r holds chunks r and 2P-1-r of c = S/(2P) tokens. Its own step: chunk r with itself and chunk 2P-1-r
    with both (``2 c^2 + c``); any other step: exactly two of the four chunk pairs are fully visible (``2 c^2``).
    Summed over steps and ranks: ``S (S+1) / 2``."""
    c = S // (2 * P)
    return 2 * c * c + (c if step == 0 else 0)


def ring_steps(R: int, K: int) -> List[tuple]:
    """One ring pass over R >= 2 ranks (Double Ring: windows of K; K = R for a single ring) as (step, how many
    steps are like it, hop after it): step 0 (own K/V, an inner hop), the middle steps (``2 c^2`` pairs each; the
    hop after step s leaves its window - ``outer`` - when s + 1 is a multiple of K), the last step (no hop)."""
    outer = (R - 1) // K if R > K else 0
    steps = [(0, 1, "inner"), (1, outer, "outer"), (1, R - 2 - outer, "inner"), (R - 1, 1, None)]
    return [s for s in steps if s[1] > 0]


FWD_FLOPS_PER_PAIR = 4  # x d: QK^T and PV, 2 d each
BWD_FLOPS_PER_PAIR = 10  # x d: QK^T again, dV, dP, dQ, dK


def pair_flops(d: int, dv: Optional[int] = None) -> Dict[str, float]:
    """FLOPs of one query-key pair on one head: forward ``QK^T`` (2 d) and ``PV`` (2 dv); backward ``QK^T`` again,
    ``dQ``, ``dK`` (2 d each) and ``dV``, ``dP`` (2 dv each). ``4 d`` / ``10 d`` when ``dv = d``."""
    dv = _dv(d, dv)
    return {"forward": 2 * d + 2 * dv, "backward": 6 * d + 4 * dv}


def attention_flops(pairs: float, heads: float, d: int, b: int = 1, dv: Optional[int] = None) -> Dict[str, float]:
    """Forward and backward FLOPs of ``pairs`` query-key pairs on ``heads`` heads."""
    return {phase: f * pairs * heads * b for phase, f in pair_flops(d, dv).items()}


# ============================================================================ model and memory


@dataclass(frozen=True)
class Model:
    """What the cost model needs of a GPT: Megatron-LM's flag values."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: Optional[int] = None  # KV heads; None = num_attention_heads
    ffn_hidden_size: Optional[int] = None  # None = 4 x hidden
    vocab_size: int = 50304
    swiglu: bool = False
    name: str = ""
    kv_channels: Optional[int] = None  # the query / key head size; None = hidden / heads (MLA: qk + rope dims)
    v_head_dim: Optional[int] = None  # the value head size; None = the query / key one (MLA: its own)
    softmax_type: str = "vanilla"  # --softmax-type (sinks): not every algorithm computes it (CPConfig.feature_problem)
    window_size: Optional[str] = None  # --window-size "left,right" (sliding windows)
    window_attn_skip_freq: Optional[str] = None  # --window-attn-skip-freq: N (every N-th layer full) or a list

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def layer_params(self) -> int:
        H, d, dv = self.hidden_size, self.head_dim, self.v_dim
        attn = H * (self.num_attention_heads + self.kv_heads) * (d + dv)  # q and k (d), v and proj (dv)
        mlp = (3 if self.swiglu else 2) * H * self.ffn
        return attn + mlp + 4 * H  # + two layer norms

    def params(self) -> int:
        return self.num_layers * self.layer_params() + 2 * self.vocab_size * self.hidden_size  # untied in/out

    @property
    def window(self) -> Optional[Window]:
        """The sliding window (``--window-size``), or None."""
        if self.window_size is None:
            return None
        return Window.of(tuple(int(x) for x in str(self.window_size).strip("()").split(",")))

    def windowed_layers(self) -> int:
        """Layers with the window: Megatron's ``is_layer_window_attention`` (``--window-attn-skip-freq N``: every
        N-th layer full; a list ``[1, 0, ...]``: 1 = windowed)."""
        if self.window is None:
            return 0
        freq = self.window_attn_skip_freq
        if freq is None:
            return self.num_layers
        text = str(freq).strip()
        if set(text) - set("0123456789[]*+, "):
            raise ValueError(f"--window-attn-skip-freq {text!r}: an integer or a list such as [1,0]*2")
        if text.startswith("["):
            flags = eval(text, {"__builtins__": {}})  # noqa: S307 - Megatron-LM's moe_freq_type list expression
            return sum(bool(x) for x in flags[: self.num_layers])
        n = int(text)
        return sum(1 for layer in range(1, self.num_layers + 1) if layer % n)


def weight_bytes(params_per_device: float, dp: int, distributed_optimizer: bool) -> float:
    """bf16 weights, fp32 gradients, fp32 master + Adam moments: 18 bytes per parameter, 6 + 12/DP sharded."""
    return params_per_device * ((6 + 12 / dp) if distributed_optimizer else 18)


def activation_bytes_per_layer(tokens: int, b: int, H: int, tp: int, recompute: str) -> float:
    """Bytes one layer keeps for backward on one device for ``tokens`` local tokens (bf16, sequence
    parallelism with TP, flash attention): Korthikanti et al.'s ``34 s b H / t``, or ``2 s b H`` (its input)
    with full recomputation; ``selective`` is the same as none with flash attention (no score matrix to drop)."""
    if recompute == "full":
        return 2 * tokens * b * H / tp
    return 34 * tokens * b * H / tp


# ============================================================================ devices and time


@dataclass
class Device:
    """A device preset (``mindspeed_cp/planner/devices/*.json``; every number overridable on the plan command line).

    Bandwidths are GB/s per device and direction, latencies microseconds. ``attention_efficiency``: the fraction
    of ``peak_tflops`` a flash-attention forward + backward reaches on long blocks, ``attention_half_tokens`` the
    block length at which it reaches half of that; ``matmul_efficiency`` the same for the dense layers;
    ``link_efficiency`` / ``inter_link_efficiency`` the achieved fraction of a link's bandwidth inside / between
    fast domains. ``fast_domain``: devices sharing the fast links (default ``gpus_per_node``; e.g. a PCIe switch
    pair). ``intra_node_pair_gbps``: what one pair of devices gets when the fast links are a mesh rather than a
    switch (Ascend's HCCS: a ring hop uses one link, an all-to-all all of them); 0 = switched."""

    name: str
    peak_tflops: float
    hbm_gb: float
    intra_node_gbps: float
    inter_node_gbps: float
    intra_node_latency_us: float = 10.0
    inter_node_latency_us: float = 20.0
    attention_efficiency: float = 0.5
    attention_half_tokens: float = 512.0
    matmul_efficiency: float = 0.6
    link_efficiency: float = 0.8
    inter_link_efficiency: float = 0.9
    intra_node_pair_gbps: float = 0.0
    kernel_call_us: float = 0.0  # fixed cost of one attention kernel call (launch; CPU: dispatch)
    attention_call_us: float = 0.0  # fixed cost of one attention forward + backward beyond its kernel calls
    gpus_per_node: int = 8
    fast_domain: int = 0
    cores: int = 0  # a CPU "device": the cores its ranks share (0: an accelerator, one rank each)
    oversubscription: float = 1.0  # time multiplier: ranks per core when a CPU runs more ranks than cores
    description: str = ""
    sources: Dict[str, str] = field(default_factory=dict)

    @property
    def domain(self) -> int:
        return self.fast_domain or self.gpus_per_node

    def compute_s(self, flops: float, block_tokens: float, kind: str = "attention", calls: int = 1) -> float:
        if kind == "attention":
            eff = self.attention_efficiency * block_tokens / (block_tokens + self.attention_half_tokens)
            fixed = calls * self.kernel_call_us * 1e-6
        else:
            eff, fixed = self.matmul_efficiency, 0.0
        return self.oversubscription * (flops / (self.peak_tflops * 1e12 * eff) + fixed)

    def link(self, cls: str, peers: int = 1):
        """(bandwidth bytes/s, latency s) of link class ``intra`` or ``inter`` for traffic spread over ``peers``."""
        if cls == "intra":
            gbps = self.intra_node_gbps
            if self.intra_node_pair_gbps:  # a mesh: each peer over its own link
                gbps = min(gbps, self.intra_node_pair_gbps * peers)
            bw, us = gbps * self.link_efficiency, self.intra_node_latency_us
        else:
            bw, us = self.inter_node_gbps * self.inter_link_efficiency, self.inter_node_latency_us
        return bw * 1e9 / self.oversubscription, us * 1e-6

    def for_ranks(self, ranks: int) -> "Device":
        """This device with ``ranks`` ranks on it: a CPU's cores are shared by its ranks."""
        over = max(1.0, ranks / self.cores) if self.cores else 1.0
        return dataclasses.replace(self, oversubscription=over)


def link_classes(group: Sequence[int], gpus_per_node: int) -> Dict[str, int]:
    """A rank's peers in ``group`` on its own node and on other nodes, for the group's rank with the most
    off-node peers (the one an all-to-all waits for)."""
    nodes = [r // gpus_per_node for r in group]
    worst = {"intra": 0, "inter": 0}
    for n in nodes:
        inter = sum(1 for m in nodes if m != n)
        if inter >= worst["inter"]:
            worst = {"intra": len(nodes) - 1 - inter, "inter": inter}
    return worst


def ring_hops(group: Sequence[int], gpus_per_node: int) -> str:
    """``intra`` if every hop of the ring (each rank to the next, the last to the first) stays on a node."""
    nodes = [r // gpus_per_node for r in group]
    return "intra" if all(nodes[i] == nodes[(i + 1) % len(nodes)] for i in range(len(nodes))) else "inter"


def all_to_all_s(dev: Device, bytes_sent: float, peers: Dict[str, int], calls: int) -> Dict[str, float]:
    """Time of all-to-alls sending ``bytes_sent`` in total to ``peers`` (spread evenly), in ``calls`` calls."""
    total = peers["intra"] + peers["inter"]
    if total == 0 or bytes_sent == 0:
        return {"time": 0.0, "intra": 0.0, "inter": 0.0}
    out = {"intra": bytes_sent * peers["intra"] / total, "inter": bytes_sent * peers["inter"] / total}
    t, lat = 0.0, 0.0
    for cls in ("intra", "inter"):
        if peers[cls]:
            bw, latency = dev.link(cls, peers[cls])
            t = max(t, out[cls] / bw)
            lat = max(lat, latency)
    out["time"] = t + calls * lat
    return out


@dataclass
class Attention:
    """One attention configuration to cost: a CP layout for one model layer's core attention on one rank."""

    algo: str  # ulysses | ring | hybrid | kvallgather
    cp: int
    ulysses: int = 1  # U (hybrid); Ulysses = cp, Ring = 1
    window: int = 1  # Double Ring inner window (ring level)
    overlap: bool = False
    outer: str = "ring"  # hybrid: its level over the ring group, "ring" or "kvallgather" (--hybrid-outer-cp-algo)
    kv_cache: Optional[str] = None
    tp: int = 1
    ulysses_group: Sequence[int] = ()
    ring_group: Sequence[int] = ()  # the ring-level ranks in ring order (kvallgather: its all-gather group)
    cp_group: Sequence[int] = ()  # the whole CP group (a windowed layer's algorithm over it)


def attention_time(
    dev: Device, model: Model, S: int, b: int, a: Attention, e: int = 2, forward_only: bool = False
) -> Dict[str, float]:
    """Predicted forward + backward time of one core attention on one rank, and its parts (seconds, bytes).
    ``forward_only``: the forward pass alone (inference; published forward-only microbenchmarks)."""
    h, hk, d, G = model.num_attention_heads / a.tp, max(model.kv_heads / a.tp, 1), model.head_dim, dev.domain
    dv = model.v_dim
    U = a.cp if a.algo == "ulysses" else a.ulysses if a.algo == "hybrid" else 1
    R = a.cp // U
    # the fixed cost of one attention call beyond its kernel calls (wrappers, checks), whatever the algorithm
    out = {
        "compute": dev.oversubscription * dev.attention_call_us * 1e-6,
        "a2a": 0.0,
        "ring_exposed": 0.0,
        "ring_transfer": 0.0,
        "intra_bytes": 0.0,
        "inter_bytes": 0.0,
        "latency": 0.0,
    }
    # ---- Ulysses level (U > 1): 4 all-to-alls forward, 4 backward, never overlapped
    if U > 1:
        # under a policy the all-gather outer level keeps the gathered K/V, not the all-to-all's output: the
        # Ulysses level then has nothing to rebuild in backward (mindspeed_cp.kv_cache: an output the local
        # attention did not save is not kept either)
        policy = None if a.outer == "kvallgather" else a.kv_cache
        sent = ulysses_kv_cache(S // R, U, b, h, hk, d, e, policy, dv=dv)["sent"]
        calls = 8 + _AGAIN[policy]
        if forward_only:
            sent, calls = ulysses_kv_cache(S // R, U, b, h, hk, d, e, dv=dv)["sent"] / 2, 4
        peers = link_classes(a.ulysses_group or range(U), G)
        t = all_to_all_s(dev, sent, peers, calls=calls)
        out["a2a"] = t["time"]
        out["intra_bytes"] += t["intra"]
        out["inter_bytes"] += t["inter"]
    hu, hku = h / U, max(hk, U) / U  # heads each rank computes (KV heads replicated to U when fewer)
    if R == 1:
        fl = attention_flops(causal_pairs(S), hu, d, b, dv)
        out["compute"] += dev.compute_s(
            fl["forward"] + (0 if forward_only else fl["backward"]), S, calls=1 if forward_only else 2
        )
        out["total"] = out["compute"] + out["a2a"]
        return out
    if a.algo == "kvallgather" or a.outer == "kvallgather":  # over the R ranks, on the heads of this Ulysses rank
        return _kvallgather_time(dev, S, b, a, R, (hu, hku, d, dv, e), out, forward_only)
    # ---- ring level over R ranks (Double Ring: windows of K)
    K = a.window if a.window > 1 else R
    block = (S / R) * b * hku * (d + dv) * e  # one K+V block
    ring_group = a.ring_group or range(R)  # a sequence (a range from topology.groups_for)
    inner_cls = (
        "intra" if all(ring_hops(ring_group[x * K : (x + 1) * K], G) == "intra" for x in range(R // K)) else "inter"
    )
    outer_cls = ring_hops(ring_group[::K], G) if R > K else inner_cls
    c = S // (2 * R)
    again = 1 - _again(a.kv_cache, d, dv) / (d + dv)  # share of the blocks backward sends again
    # per step: (blocks sent, FLOPs per pair, exchanges posted); backward sends K/V again (policy) and dK/dV
    per_pair = pair_flops(d, dv)
    phases = {
        "forward": (1.0, per_pair["forward"], 1),
        "backward": (again + 1.0, per_pair["backward"], 1 if a.overlap or again == 0 else 2),
    }
    if forward_only:
        del phases["backward"]
    for blocks, flops, exchanges in phases.values():
        for step, count, hop in ring_steps(R, K):  # the steps of one pass, alike ones once: O(1) in R
            comp = dev.compute_s(flops * ring_step_pairs(S, R, step) * hu * b, 2 * c if step == 0 else c)
            out["compute"] += count * comp
            if hop is None:
                continue  # P-1 hops per pass: the last block needs no successor
            cls = outer_cls if hop == "outer" else inner_cls
            bw, lat = dev.link(cls)
            transfer = blocks * block / bw + exchanges * lat
            hide = comp * (K if hop == "outer" else 1)  # Double Ring: a whole inner ring of compute hides the outer hop
            if dev.cores:
                hide = 0.0  # CPU ranks: gloo's copies run on the same cores as the compute - nothing is hidden
            out["ring_exposed"] += count * max(0.0, transfer - hide)
            out["ring_transfer"] += count * transfer
            out["latency"] += count * exchanges * lat
            out[f"{cls}_bytes"] += count * blocks * block
    out["total"] = out["compute"] + out["a2a"] + out["ring_exposed"]
    return out


def head_groups(kv_heads: float, overlap: bool, cpu: bool = False) -> int:
    """The KV-head groups ``kvallgather_cp_algo`` splits its gather into: the runtime's rule
    (:meth:`mindspeed_cp.options.KVAllGatherOptions.head_groups`; ``cpu``: a CPU device)."""
    return KVAllGatherOptions(overlap=overlap).head_groups(int(kv_heads), "cpu" if cpu else "cuda")


def _kvallgather_time(dev: Device, S: int, b: int, a: Attention, P: int, shape, out: dict, forward_only: bool) -> dict:
    """The all-gather K/V algorithm over P ranks (the CP group, or Hybrid's ring group on ``h/U`` heads): every rank
    computes ``(2P-1) c^2 + c (c+1)`` causal pairs per head (``c = S/2P``, the zigzag) in ``P`` kernel calls per head
    group, the causal tile on its own block (``c (2c + 1)`` pairs) among them. The gather of head group 1 of G hides
    behind that own tile (its K/V are local, or kept), group g+1's behind group g's compute; in backward group g's
    dK/dV reduce-scatter behind group g+1's compute, the last one exposed. An all-gather / reduce-scatter is costed
    as NCCL's ring algorithm: the bytes over the slowest hop of the group's ring, P-1 latencies. On a CPU device
    nothing is hidden (gloo's copies run on the same cores)."""
    h, hk, d, dv, e = shape
    G = head_groups(hk, a.overlap, bool(dev.cores))
    c = S // (2 * P)
    pairs, own = (2 * P - 1) * c * c + c * (c + 1), c * (2 * c + 1)
    bw, lat = dev.link(ring_hops(a.ring_group or range(P), dev.domain))
    kv = kvallgather_kv_cache(S, P, b, hk, d, e, a.kv_cache, dv)
    first = (P - 1) * (S / P) * b * hk * (d + dv) * e  # the forward gather
    per_pair = pair_flops(d, dv)
    phases = {"forward": (first, 0.0), "backward": (kv["gather"] - first, kv["reduce_scatter"])}
    if forward_only:
        del phases["backward"]
    for phase, (gather, scatter) in phases.items():
        comp = dev.compute_s(per_pair[phase] * pairs * h * b, 2 * c, calls=P * G)
        early = comp * own / pairs  # the own tile runs before the first group arrives
        t_gather = gather / bw + (P - 1) * lat * G if gather else 0.0
        t_scatter = scatter / bw + (P - 1) * lat * G if scatter else 0.0
        rest = (comp - early) / G  # one group's compute
        hidden = not dev.cores
        exposed = 0.0
        if t_gather:
            exposed += max(0.0, t_gather / G - (early if hidden else 0.0))
            exposed += (G - 1) * max(0.0, t_gather / G - (rest if hidden else 0.0))
        if t_scatter:
            exposed += t_scatter / G + (G - 1) * max(0.0, t_scatter / G - (rest if hidden else 0.0))
        out["compute"] += comp
        out["ring_exposed"] += exposed
        out["ring_transfer"] += t_gather + t_scatter
        out["latency"] += (P - 1) * lat * G * (bool(gather) + bool(scatter))
        out[f"{ring_hops(a.ring_group or range(P), dev.domain)}_bytes"] += gather + scatter
    out["total"] = out["compute"] + out["a2a"] + out["ring_exposed"]
    return out


def window_attention_time(
    dev: Device, model: Model, S: int, b: int, a: Attention, algo: str, e: int = 2
) -> Dict[str, float]:
    """:func:`attention_time` of a sliding-window layer run by ``algo`` (``--window-attn-cp-algo``, default the
    configured one) on the layout ``a``'s algorithm gives the batch.

    Ulysses (over the CP group, or Hybrid's Ulysses level): the same all-to-alls, the window's pairs instead of the
    causal ones. The window-aware ring (over the CP group, or Hybrid's ring level on ``h/U`` heads): the busiest
    rank's halo (:func:`halo_of`, :func:`window_ring_kv_cache`) in one exchange per source rank and direction,
    posted before the rank's own block, whose compute hides it (not on a CPU: gloo's copies share its cores)."""
    window = model.window
    algo = "ring" if algo == "kvallgather" else algo  # a windowed layer's all-gather is the halo exchange
    h, hk, d, dv = model.num_attention_heads / a.tp, max(model.kv_heads / a.tp, 1), model.head_dim, model.v_dim
    if algo == "hybrid" and a.algo != "hybrid":
        raise ValueError("--window-attn-cp-algo hybrid_cp_algo needs --context-parallel-algo hybrid_cp_algo")
    U = {"ulysses": a.cp, "hybrid": a.ulysses, "ring": 1}[algo]
    R = a.cp // U
    out = {k: 0.0 for k in ("a2a", "ring_exposed", "ring_transfer", "intra_bytes", "inter_bytes", "latency")}
    out["compute"] = dev.oversubscription * dev.attention_call_us * 1e-6
    per_pair = pair_flops(d, dv)
    if U > 1:  # the all-to-alls of the Ulysses level
        sent = ulysses_kv_cache(S // R, U, b, h, hk, d, e, a.kv_cache, dv=dv)["sent"]
        group = a.ulysses_group if algo == "hybrid" else a.cp_group
        t = all_to_all_s(dev, sent, link_classes(group or range(U), dev.domain), calls=8 + _AGAIN[a.kv_cache])
        out["a2a"], out["intra_bytes"], out["inter_bytes"] = t["time"], t["intra"], t["inter"]
    hu, hku = h / U, max(hk, U) / U
    if R == 1:
        pairs = run_pairs(contiguous_layout(S, 1)[0], window, S)
        out["compute"] += dev.compute_s((per_pair["forward"] + per_pair["backward"]) * pairs * hu * b, S, calls=2)
        out["total"] = out["compute"] + out["a2a"]
        return out
    halo = window_halo("ring", S, R, 1, window) if algo == "hybrid" else window_halo(a.algo, S, a.cp, a.ulysses, window)
    flops = (per_pair["forward"] + per_pair["backward"]) * halo["pairs"] * hu * b
    out["compute"] += dev.compute_s(flops, halo["tokens"], calls=2 * (1 + halo["sources"]))
    sent = window_ring_kv_cache(halo["halo"], halo["halo"], b, hku, d, e, a.kv_cache, dv=dv)["sent"]
    group = a.ring_group if algo == "hybrid" else a.cp_group
    cls = ring_hops(group or range(R), dev.domain)
    bw, lat = dev.link(cls)
    calls = 3 * halo["sources"]  # forward K/V, backward K/V and dK/dV, per source
    transfer = sent / bw + calls * lat
    width = min(window.width, S)
    own = max(0.0, 1 - halo["halo"] * width / max(halo["pairs"], 1))  # the share of pairs on the rank's own keys
    hide = 0.0 if dev.cores else out["compute"] * own
    out["ring_exposed"], out["ring_transfer"], out["latency"] = max(0.0, transfer - hide), transfer, calls * lat
    out[f"{cls}_bytes"] += sent
    out["total"] = out["compute"] + out["a2a"] + out["ring_exposed"]
    return out


def layer_time(
    dev: Device,
    model: Model,
    S: int,
    b: int,
    a: Attention,
    tp_group: Sequence[int] = (),
    e: int = 2,
    window_algo: Optional[str] = None,
) -> Dict[str, float]:
    """One transformer layer forward + backward on one rank: the core attention (:func:`attention_time`), the
    dense layers (``2 x 3`` FLOPs per parameter per token: forward, backward of inputs and of weights) on the
    rank's ``S/CP`` tokens split over TP, and TP's sequence-parallel all-gathers / reduce-scatters (2 each way
    per layer forward, the same backward; not overlapped). ``window_algo``: a sliding-window layer run by that
    algorithm (:func:`window_attention_time`)."""
    att = (
        attention_time(dev, model, S, b, a, e)
        if window_algo is None
        else window_attention_time(dev, model, S, b, a, window_algo, e)
    )
    tokens = S // a.cp
    dense = 6 * (model.layer_params() - 4 * model.hidden_size) * tokens * b / a.tp
    out = dict(
        att,
        attention=att["total"],
        dense=dev.compute_s(dense, tokens, kind="dense"),
        tp_comm=0.0,
        tp_intra_bytes=0.0,
        tp_inter_bytes=0.0,
    )
    if a.tp > 1:
        sent = 4 * 2 * (a.tp - 1) / a.tp * tokens * b * model.hidden_size * e  # 4 collectives x fwd+bwd
        t = all_to_all_s(dev, sent, link_classes(tp_group or range(a.tp), dev.domain), calls=8)
        out["tp_comm"] = t["time"]
        out["intra_bytes"] += t["intra"]
        out["inter_bytes"] += t["inter"]
        out["tp_intra_bytes"], out["tp_inter_bytes"] = t["intra"], t["inter"]
    out["total"] = att["total"] + out["dense"] + out["tp_comm"]
    return out


def rank_correlation(xs: List[float], ys: List[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else 1.0
