"""Sliding windows and attention sinks on every algorithm, on real gloo ranks, against float64 attention.

Every rank builds the same global q/k/v/dout (float64), runs one algorithm on its shard in float32 and compares
out, dq, dk, dv (and the sink logits' gradient, summed over the ranks as Megatron's gradient reduction sums it)
with the float64 reference: softmax over the keys a query sees - ``i - left <= j <= i + right``, of its document
- plus, with a sink, one more term ``exp(sink[h])`` in the denominator (Megatron's ``SoftmaxOne``).

Algorithms: Ulysses (the local attention after the all-to-all), Ring and Double Ring (the window-aware ring on the
zigzag layout; sinks without a window: the ring's own LSE merge), Hybrid (Ulysses x the ring level), the K/V
all-gather (a window: the halo exchange; sinks: its own merge) and the
window-aware ring on the contiguous layout (what ``--window-attn-cp-algo megatron_cp_algo`` runs under Ulysses,
unaligned lengths included). Features: a window shorter than a shard, one longer, a two-sided window, off-by-one
sinks (causal, no window), learnable sinks with a window; inputs: causal, packed documents, unaligned length,
GQA. Bounds: float32 against float64, relative to the largest reference value (``TOL``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.dist import run_on_ranks

# float32 against float64, max |error| / max |reference| per tensor: measured <= 1.1e-6 (AVX-512, AVX2, none)
TOL = 1e-5

FEATURES = {
    "short": dict(window=(3, 0)),  # shorter than every shard
    "long": dict(window="long"),  # 1.5 shards: a partial ring
    "two-sided": dict(window=(5, 4)),
    "off-by-one": dict(sink="zeros"),
    "learnable": dict(window=(6, 0), sink="learn"),
}
INPUTS = ("causal", "documents", "unaligned", "gqa")
ALGOS = ("ulysses", "ring", "double", "hybrid", "kvallgather", "contiguous")
DOC_LENGTHS = [[9, 31, 3, 1, 20]]  # S = 64


def _applies(algo: str, feature: str, kind: str, world: int) -> bool:
    if kind == "unaligned" and algo not in ("ulysses", "contiguous"):
        return False  # Ring and Hybrid: the batch split pads to the zigzag (tests of megatron/batch.py)
    if kind == "documents" and feature == "two-sided":
        return False  # refused: pads would be seen (test_bad_inputs)
    if algo in ("double", "hybrid") and world < 4:
        return False
    if algo == "contiguous" and "window" not in FEATURES[feature]:
        return False  # the window-aware ring needs a window
    return True


def reference(q, k, v, window, sink, docs=None):
    """float64 attention ``[S, b, h, d]`` with the window / documents / sink semantics above."""
    S, h, hk = q.shape[0], q.shape[2], k.shape[2]
    k, v = (x.repeat_interleave(h // hk, 2) for x in (k, v))
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    left, right = (10**9 if x < 0 else x for x in window)
    seen = (j >= i - left) & (j <= i + right)
    if docs is not None:
        seen &= docs[:, None] == docs[None]
    scores = scores.masked_fill(~seen, -math.inf)
    if sink is not None:
        col = sink.reshape(1, h, 1, 1).expand(scores.shape[0], h, S, 1)
        probs = torch.cat([scores, col], -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v)


def _doc_ids(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


# ------------------------------------------------------------------------------------------- worker side
def _setup(algo: str, world: int):
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor

    flags = dict(
        ulysses=dict(context_parallel_algo="ulysses_cp_algo"),
        contiguous=dict(context_parallel_algo="ulysses_cp_algo"),
        ring=dict(context_parallel_algo="megatron_cp_algo"),
        double=dict(context_parallel_algo="megatron_cp_algo", cp_window_size=2),
        kvallgather=dict(context_parallel_algo="kvallgather_cp_algo"),
        hybrid=dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
    )[algo]
    adaptor.configure(context_parallel_size=world, **flags)
    ps.initialize_model_parallel(context_parallel_size=world)


def _shards(algo: str, world: int, S: int, rank: int, docs):
    """(shard function, unshard function) of this algorithm's layout."""
    from mindspeed_cp.layout.sharding import zigzag_index
    from mindspeed_cp.megatron.state import STATE

    if docs is not None:
        return (lambda t: docs.shard(t, rank)), (lambda parts: docs.unshard(parts))
    if algo in ("ulysses", "contiguous"):
        idx = [torch.tensor_split(torch.arange(S), world)[r] for r in range(world)]
    else:
        u = STATE.config.ulysses_size
        idx = [zigzag_index(S, world // u, r // u).chunk(u)[r % u] for r in range(world)]

    def unshard(parts):
        full = parts[0].new_zeros((S,) + tuple(parts[0].shape[1:]))
        for r, p in enumerate(parts):
            full[idx[r]] = p
        return full

    return (lambda t: t[idx[rank]]), unshard


def _run(algo, local, window, sink, docs, S, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.layout.window import layout_runs
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import GatherSizeCalculator, UlyssesContextAttention
    from mindspeed_cp.window_ring import documents_layout, window_ring_attention

    if algo == "ulysses":
        group = STATE.group("ulysses")
        rank, heads = dist.get_rank(group), local[0].shape[2] // world
        part = None if sink is None else sink.narrow(0, rank * heads, heads)
        total = S if docs is None else docs.padded_len

        class Size(GatherSizeCalculator):
            def calculate(self, *a, **kw):
                return total

        def attend(q, k, v):
            return local_attention(q, k, v, window_size=window, softmax_offset=part, documents=docs)

        return UlyssesContextAttention(attend, group, gather_size_calculator=Size())(*local)
    kw = dict(window_size=window, softmax_offset=sink, documents=docs)
    if algo in ("ring", "double"):
        return ring_attention(*local, STATE.group("ring"), window=STATE.double_ring_window(), **kw)
    if algo == "hybrid":
        return hybrid_attention(*local, STATE.group("ulysses"), STATE.group("ring"), **kw)
    if algo == "kvallgather":
        return kvallgather_attention(*local, ps.get_context_parallel_group(), **kw)
    if docs is not None:
        layout = documents_layout(docs, ring=False)
    else:
        layout = layout_runs([torch.tensor_split(torch.arange(S), world)[r] for r in range(world)])
    return window_ring_attention(*local, ps.get_context_parallel_group(), layout=layout, **kw)


def _case(world: int, case: dict) -> dict:
    import torch.distributed as dist

    from mindspeed_cp.layout.packing import Documents

    algo, feature, kind = case["algo"], case["feature"], case["kind"]
    spec = FEATURES[feature]
    rank = dist.get_rank()
    S = {"unaligned": 16 * world + 5, "documents": sum(DOC_LENGTHS[0])}.get(kind, 16 * world)
    h, hk, d, dv, b = 2 * world, (world if kind == "gqa" else 2 * world), 8, 6, 1
    if kind == "gqa":
        h = 4 * world if algo != "hybrid" else 2 * world
        hk = max(1, h // 4) if algo in ("ring", "double", "kvallgather", "contiguous") else h // 2
    window = spec.get("window")
    if window == "long":
        window = (S // world * 3 // 2, 0)
    g = torch.Generator().manual_seed(7)
    q, dout = torch.randn(S, b, h, d, generator=g, dtype=torch.float64), None
    k = torch.randn(S, b, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(S, b, hk, dv, generator=g, dtype=torch.float64)
    dout = torch.randn(S, b, h, dv, generator=g, dtype=torch.float64)
    sink = {"zeros": torch.zeros(h, dtype=torch.float64), "learn": torch.randn(h, generator=g, dtype=torch.float64)}
    sink = sink.get(spec.get("sink"))
    ids = _doc_ids(DOC_LENGTHS[0]) if kind == "documents" else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_sink = None if sink is None else sink.clone().requires_grad_(spec.get("sink") == "learn")
    ref = reference(*leaves, window or (-1, 0), ref_sink, ids)
    ref.backward(dout)
    docs = None
    if kind == "documents":
        ring = {"ulysses": 1, "contiguous": 1, "hybrid": world // 2}.get(algo, world)
        docs = Documents.from_lengths(DOC_LENGTHS, world, ring)
    shard, unshard = _shards(algo, world, S, rank, docs)
    local = [shard(t).float().requires_grad_() for t in (q, k, v)]
    my_sink = None if sink is None else sink.float().requires_grad_(spec.get("sink") == "learn")
    out = _run(algo, local, window, my_sink, docs, S, world)
    out.backward(shard(dout).float())
    errs = {}
    for name, got, want in (
        ("out", out, ref),
        ("dq", local[0].grad, leaves[0].grad),
        ("dk", local[1].grad, leaves[1].grad),
        ("dv", local[2].grad, leaves[2].grad),
    ):
        parts = [None] * world
        dist.all_gather_object(parts, got.detach().double())
        errs[name] = float((unshard(parts) - want.detach()).abs().max() / want.abs().max())
    if my_sink is not None and my_sink.requires_grad:
        grad = my_sink.grad.double()
        dist.all_reduce(grad)
        errs["dsink"] = float((grad - ref_sink.grad).abs().max() / ref_sink.grad.abs().max())
    return errs


def _cases(world: int, cases):
    """Every case, the parallel state initialised once per algorithm (gloo groups are not freed by
    destroy_model_parallel: one initialisation per case would exhaust the sockets)."""
    from megatron.core import parallel_state as ps

    out, current = [], None
    for case in cases:
        if case["algo"] != current:
            if current is not None:
                ps.destroy_model_parallel()
            current = case["algo"]
            _setup(current, world)
        out.append(_case(world, case))
    ps.destroy_model_parallel()
    return out


def _plan(world: int):
    return [
        dict(algo=a, feature=f, kind=k)
        for a, f, k in itertools.product(ALGOS, FEATURES, INPUTS)
        if _applies(a, f, k, world)
    ]


@pytest.mark.parametrize("world", [2, 4])
def test_windows_and_sinks_match_float64(world):
    cases = _plan(world)
    results = run_on_ranks(world, _cases, world, cases, timeout=600)
    bad = []
    for case, errs in zip(cases, results[0]):
        worst = max(errs.values())
        if not worst <= TOL:
            bad.append(f"{case}: {errs}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------ the plans (pure)
def _positions(runs):
    return [p for x in sorted(runs, key=lambda x: x.index) for p in range(x.pos, x.pos + x.n)]


def test_layouts_in_closed_form_are_the_runtimes():
    """zigzag / contiguous / hybrid layouts built in O(P) for the planner hold exactly the tokens token_indices
    gives every CP rank (the batch split the runtime uses)."""
    from mindspeed_cp.config import CPConfig
    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.layout.window import contiguous_layout, hybrid_layout, zigzag_layout

    for S, U, R in ((48, 2, 2), (96, 3, 2), (64, 4, 2), (120, 3, 4)):
        cfg = CPConfig(context_parallel_size=U * R, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=U)
        for r in range(U * R):
            assert _positions(hybrid_layout(S, U, R)[r]) == token_indices(cfg, r, S).tolist(), (S, U, R, r)
    for S, P in ((30, 4), (32, 4), (7, 3)):
        cfg = CPConfig(context_parallel_size=P)
        for r in range(P):
            assert _positions(contiguous_layout(S, P)[r]) == token_indices(cfg, r, S).tolist()
    for S, P in ((32, 4), (24, 3)):
        cfg = CPConfig(context_parallel_size=P, context_parallel_algo="megatron_cp_algo")
        for r in range(P):
            assert _positions(zigzag_layout(S, P)[r]) == token_indices(cfg, r, S).tolist()


def test_halo_and_pairs_in_closed_form_equal_the_plans():
    """halo_tokens (the planner's H) = what plan_halo's steps bring a rank, and run_pairs = the window's pairs of
    the rank's queries counted from positions, for every layout, causal, two-sided and unbounded windows."""
    from mindspeed_cp.layout.window import (
        UNBOUNDED,
        Window,
        contiguous_layout,
        halo_tokens,
        hybrid_layout,
        plan_halo,
        run_pairs,
        zigzag_layout,
    )

    for P, c in ((2, 5), (3, 4), (4, 6), (8, 2)):
        S = 2 * P * c
        for left, right in ((0, 0), (1, 0), (3, 0), (c, 0), (2 * c + 1, 0), (5, 2), (UNBOUNDED, 0), (4, UNBOUNDED)):
            w = Window(left, right)
            for layout in (zigzag_layout(S, P), contiguous_layout(S + 1, P), hybrid_layout(2 * S, 2, P)):
                n = sum(x.n for rank in layout for x in rank)
                for r, runs in enumerate(layout):
                    got = halo_tokens(runs, w, n)
                    assert got == plan_halo(layout, r, w).bytes_per_token()["received"], (P, c, w, r)
                    q = torch.tensor(_positions(runs))
                    assert run_pairs(runs, w, n) == int(w.seen(q, torch.arange(n)).sum()), (P, c, w, r)
