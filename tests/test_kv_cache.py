"""KV-cache policies (``--context-parallel-kv-cache-policy``, ``--use-ulysses-allgather-kv``) at the attention level.

For every algorithm (Ulysses aligned and unaligned, with the K/V all-gather; Ring; Double Ring; Hybrid;
kvallgather_cp_algo, its gather overlapped or not) x policy
(None, half, full) x {MHA, GQA, MLA (a value head size of its own)}, on gloo ranks with the runtime's groups:

* out, dq, dk, dv equal float64 full attention (1e-5 relative to the largest reference value, fp32 inputs), and
  equal the same call without a policy exactly (the policy changes what is kept, never what is computed);
* bytes sent per rank equal ``benchmarks.textbook``'s formula (exactly: the counts are integers);
* bytes saved for backward, minus those of the same call without a policy, equal the formula
  (:func:`mindspeed_cp.stats.count_saved`: distinct storages autograd keeps during the forward).
"""

import pytest

from tests import features
from tests.dist import run_on_ranks

TOL = 1e-5


def _run(case, q, k, v, policy):
    import torch.distributed as dist

    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention

    cfg = STATE.config
    algo = case["algo"]
    if algo == "ulysses":
        seq = case["seq"]

        class Size:
            def calculate(self, *a, **kw):
                return seq if case.get("unaligned") else None

        return UlyssesContextAttention(
            lambda q_, k_, v_: local_attention(q_, k_, v_, causal=True),
            STATE.group("ulysses"),
            gather_size_calculator=Size(),
            kv_cache_policy=policy,
            allgather_kv=case.get("allgather", False),
        )(q, k, v)
    if algo == "kvallgather":
        return kvallgather_attention(
            q, k, v, STATE.group("allgather"), kv_cache_policy=policy, overlap=cfg.cp_allgather_overlap
        )
    overlap = STATE.overlap_group("ring") if cfg.use_cp_send_recv_overlap else None
    if algo == "hybrid":
        return hybrid_attention(
            q,
            k,
            v,
            STATE.group("ulysses"),
            STATE.group("ring"),
            overlap_group=overlap,
            window=STATE.double_ring_window(),
            kv_cache_policy=policy,
            bnsd=case.get("bnsd", False),
        )
    assert algo == "ring"
    del dist
    return ring_attention(
        q,
        k,
        v,
        STATE.group("ring"),
        overlap_group=overlap,
        window=STATE.double_ring_window(),
        kv_cache_policy=policy,
        bnsd=case.get("bnsd", False),
    )


def _expected(case, rank):
    from benchmarks import textbook

    S, h, hk, b, d, e = case["seq"], case["heads"], case.get("kv_heads", case["heads"]), 2, 8, 4
    algo, cp, policy, dv = case["algo"], case["cp"], case["policy"], case.get("dv", 8)
    if algo == "ulysses":
        return textbook.ulysses_kv_cache(S, cp, b, h, hk, d, e, policy, case.get("allgather", False), rank, dv=dv)
    if algo == "ring":
        return textbook.ring_kv_cache(S, cp, b, hk, d, e, policy, dv=dv)
    if algo == "kvallgather":
        return textbook.kvallgather_kv_cache(S, cp, b, hk, d, e, policy, dv=dv)
    return textbook.hybrid_kv_cache(S, case["u"], cp // case["u"], b, h, hk, d, e, policy, rank=rank, dv=dv)


def _kv_cases(cases):
    import torch
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.stats import count_bytes, count_saved
    from tests.attention_ref import reference_attention

    out, built = [], None
    for case in cases:
        algo = {
            "ulysses": "ulysses_cp_algo",
            "ring": "megatron_cp_algo",
            "hybrid": "hybrid_cp_algo",
            "kvallgather": "kvallgather_cp_algo",
        }[case["algo"]]
        gather = case["algo"] == "kvallgather"
        flags = dict(
            context_parallel_size=case["cp"],
            context_parallel_algo=algo,
            ulysses_degree_in_cp=case.get("u"),
            cp_window_size=case.get("window", 1),
            use_cp_send_recv_overlap=case.get("overlap", False) and not gather,
            cp_allgather_overlap=case.get("overlap", True) or not gather,
        )
        if flags != built:  # groups once per layout: the cases of one layout run on the same groups
            if built is not None:
                ps.destroy_model_parallel()
            cfg, built = adaptor.configure(**flags), flags
            ps.initialize_model_parallel(context_parallel_size=case["cp"])
        rank = ps.get_context_parallel_rank()
        S, b, h, hk, d, dv = case["seq"], 2, case["heads"], case.get("kv_heads", case["heads"]), 8, case.get("dv", 8)
        g = torch.Generator().manual_seed(7)
        q, dout = (
            torch.randn(S, b, h, d, generator=g, dtype=torch.float64),
            torch.randn(S, b, h, dv, generator=g, dtype=torch.float64),
        )
        k, v = (
            torch.randn(S, b, hk, d, generator=g, dtype=torch.float64),
            torch.randn(S, b, hk, dv, generator=g, dtype=torch.float64),
        )
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*leaves, causal=True)
        ref.backward(dout)
        idx = token_indices(cfg, rank, S)
        runs = {}
        for policy in (None, case["policy"]):
            local = [t[idx].float().clone().requires_grad_() for t in (q, k, v)]
            with count_bytes() as sent:
                with count_saved() as saved:
                    o = _run(case, *local, policy)
                o.backward(dout[idx].float())
            runs[policy] = (o.detach(), [t.grad for t in local], sent, saved.total)
        o, grads, sent, saved = runs[case["policy"]]
        res = {"rank": rank}
        for name, got, want in zip(("out", "dq", "dk", "dv"), [o] + grads, [ref] + [t.grad for t in leaves]):
            res[name] = float((got.double() - want[idx]).abs().max() / want.abs().max())
        base = runs[None]
        res["same_as_none"] = all(torch.equal(a, b_) for a, b_ in zip([o] + grads, [base[0]] + base[1]))
        res["sent"] = sum(n for kind, n in sent.by_kind.items() if kind != "metadata")
        res["by_kind"] = dict(sent.by_kind)
        res["saved_delta"] = saved - base[3]
        res["want"] = _expected(case, rank)
        out.append(res)
    ps.destroy_model_parallel()
    return out


def _check(results):
    for res in results:
        assert res["same_as_none"], res
        for name in ("out", "dq", "dk", "dv"):
            assert res[name] <= TOL, (name, res)
        assert res["sent"] == pytest.approx(res["want"]["sent"], rel=1e-12), res
        assert res["saved_delta"] == pytest.approx(res["want"]["saved"], abs=0.5), res


U = "ulysses"
# MLA: the value head size its own (dv 4 or 12 against the qk head size 8), alone and with GQA
SETTINGS_4 = {  # name: cases of one group layout (heads, KV heads, options), each run with both policies
    "ulysses": [
        dict(algo=U, heads=4),
        dict(algo=U, heads=8, kv_heads=2),
        dict(algo=U, heads=4, unaligned=True, seq=30),
        dict(algo=U, heads=8, kv_heads=2, unaligned=True, seq=29),
        dict(algo=U, heads=8, kv_heads=1, allgather=True),
        dict(algo=U, heads=8, kv_heads=2, allgather=True, unaligned=True, seq=31),
        dict(algo=U, heads=4, dv=4),
        dict(algo=U, heads=8, kv_heads=2, dv=12, unaligned=True, seq=30),
        dict(algo=U, heads=8, kv_heads=1, dv=4, allgather=True),
    ],
    "ring": [
        dict(algo="ring", heads=4),
        dict(algo="ring", heads=4, bnsd=True),
        dict(algo="ring", heads=4, dv=4),
        dict(algo="ring", heads=8, kv_heads=2, dv=12, bnsd=True),
    ],
    "ring-overlap": [dict(algo="ring", heads=8, kv_heads=2, overlap=True)],
    "double-ring": [dict(algo="ring", heads=4, window=2), dict(algo="ring", heads=8, kv_heads=2, window=2, dv=4)],
    "double-ring-overlap": [dict(algo="ring", heads=8, kv_heads=2, window=2, overlap=True, bnsd=True)],
    "hybrid": [
        dict(algo="hybrid", heads=4, u=2),
        dict(algo="hybrid", heads=4, kv_heads=1, u=2),
        dict(algo="hybrid", heads=4, u=2, dv=4),
        dict(algo="hybrid", heads=8, kv_heads=2, u=2, dv=12),
    ],
    "hybrid-overlap": [dict(algo="hybrid", heads=8, kv_heads=2, u=2, overlap=True)],
    "kvallgather": [
        dict(algo="kvallgather", heads=4),
        dict(algo="kvallgather", heads=8, kv_heads=2, dv=12),
        dict(algo="kvallgather", heads=4, kv_heads=1, dv=4),
    ],
    "kvallgather-no-overlap": [dict(algo="kvallgather", heads=8, kv_heads=2, overlap=False)],
}


@pytest.mark.parametrize("name", list(SETTINGS_4))
def test_kv_cache_cp4(name):
    cases = [dict(dict(cp=4, seq=32, policy=p), **c) for c in SETTINGS_4[name] for p in ("full", "half")]
    _check([r for rank in run_on_ranks(4, _kv_cases, cases) for r in rank])


CASES_8 = [
    dict(algo="ring", cp=8, seq=32, heads=4, policy="full", window=2),
    dict(algo="ring", cp=8, seq=32, heads=4, policy="half", window=4, overlap=True),
    dict(algo="hybrid", cp=8, seq=32, heads=4, policy="full", u=2, window=2),
    dict(algo="hybrid", cp=8, seq=32, heads=8, kv_heads=2, policy="half", u=4),
    dict(algo="kvallgather", cp=8, seq=32, heads=4, kv_heads=2, policy="full"),
]


def test_kv_cache_cp8():
    _check([r for rank in run_on_ranks(8, _kv_cases, CASES_8) for r in rank])


# ----------------------------------------------------------------------------- megatron-core GPT = CP 1
def _gpt_cases(cases):
    from megatron.core import parallel_state as ps

    from tests.test_megatron_cp import _gpt_case

    out = []
    for case in cases:
        out.append(_gpt_case(case))
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        from mindspeed_cp.megatron.state import STATE

        STATE.reset()
    return out


def _gpt_check(world, cases):
    from tests.test_megatron_cp import GRAD_TOL, LOSS_TOL

    per_rank = run_on_ranks(world, _gpt_cases, cases)
    for rank, results in enumerate(per_rank):
        for case, r in zip(cases, results):
            assert r["every_token_once"], (rank, case, r)
            assert r["loss_err"] <= LOSS_TOL * max(1.0, r["loss_scale"]), (rank, case, r)
            assert r["grad_err"] <= GRAD_TOL, (rank, case, r)
    return per_rank


ALGOS = {  # name: (world, flags)
    "ulysses": (4, dict(tp=1, cp=4, seq=32, context_parallel_algo="ulysses_cp_algo")),
    "ulysses-unaligned": (4, dict(tp=1, cp=4, seq=30, context_parallel_algo="ulysses_cp_algo")),
    "ring": (4, dict(tp=1, cp=4, seq=32, context_parallel_algo="megatron_cp_algo", use_cp_send_recv_overlap=True)),
    "double-ring": (4, dict(tp=1, cp=4, seq=32, context_parallel_algo="megatron_cp_algo", cp_window_size=2)),
    "hybrid": (4, dict(tp=1, cp=4, seq=32, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)),
    "kvallgather": (4, dict(tp=1, cp=4, seq=32, context_parallel_algo="kvallgather_cp_algo")),
}


@pytest.mark.parametrize("name", list(ALGOS))
def test_gpt_matches_cp1_every_policy(name):
    """Per algorithm: {full, half} x {MHA 4 heads, GQA 8 heads / 2 KV heads} in one task."""
    world, flags = ALGOS[name]
    cases = [
        dict(flags, context_parallel_kv_cache_policy=p, **heads)
        for p in ("full", "half")
        for heads in (dict(heads=4), dict(heads=8, kv_heads=2))
    ]
    per_rank = _gpt_check(world, cases)
    for results in per_rank:
        for case, r in zip(cases, results):
            assert r["kv_cache_policies"] == [case["context_parallel_kv_cache_policy"]] * 2, r


def test_gpt_matches_cp1_ulysses_allgather_kv():
    cases = [
        dict(
            dict(
                tp=1,
                cp=4,
                seq=32,
                context_parallel_algo="ulysses_cp_algo",
                use_ulysses_allgather_kv=True,
                heads=8,
                kv_heads=kv,
            ),
            **extra,
        )
        for kv, extra in ((1, {}), (2, dict(context_parallel_kv_cache_policy="full")), (4, dict(seq=30)))
    ]
    per_rank = _gpt_check(4, cases)
    for results in per_rank:
        assert all(r["sent"].get("all_gather", 0) > 0 for r in results), results
        assert results[1]["sent"].get("all_gather_again", 0) > 0, results[1]


@pytest.mark.skipif(not features.local_sliding_window(), reason=features.WHY["local_sliding_window"])
def test_gpt_matches_cp1_ulysses_with_a_window():
    """A sliding window runs in the plugin's windowed kernel under Ulysses (not Megatron's S x S attention): the
    policies apply as without a window - the K/V all-to-all runs again in backward, MHA and GQA alike."""
    cases = [
        dict(
            tp=1,
            cp=4,
            seq=32,
            context_parallel_algo="ulysses_cp_algo",
            model=dict(window_size=(8, 0)),
            context_parallel_kv_cache_policy=p,
            **heads,
        )
        for p in ("full", "half")
        for heads in (dict(heads=4), dict(heads=8, kv_heads=2))
    ]
    per_rank = _gpt_check(4, cases)
    for results in per_rank:
        for case, r in zip(cases, results):
            assert r["sent"].get("all_to_all_again", 0) > 0, (case, r["sent"])
            assert r["kv_cache_policies"] == [case["context_parallel_kv_cache_policy"]] * 2, r


def test_cache_interval_picks_the_layers():
    """--context-parallel-cache-interval 1 on a 4-layer GPT: layers 1 and 3 cached (layer_number % 2 == 1), and the
    ring's bytes are those of two cached and two plain layers; the Ulysses one repeats the K/V all-to-all twice."""
    from benchmarks import textbook

    ring = dict(
        tp=1,
        cp=4,
        seq=32,
        num_layers=4,
        context_parallel_algo="megatron_cp_algo",
        context_parallel_kv_cache_policy="full",
        context_parallel_cache_interval=1,
    )
    ulysses = dict(
        ring,
        context_parallel_algo="ulysses_cp_algo",
        context_parallel_kv_cache_policy="half",
        context_parallel_cache_interval=2,
    )
    per_rank = _gpt_check(4, [ring, ulysses])
    b, hk, d, e = 2, 4, 16, 4  # gpt_helpers: batch 2, hidden 64 / 4 heads, fp32
    want = sum(textbook.ring_kv_cache(32, 4, b, hk, d, e, p)["sent"] for p in ("full", None, "full", None))
    for r_ring, r_uly in per_rank:
        assert r_ring["kv_cache_policies"] == ["full", None, "full", None], r_ring
        assert r_ring["sent"]["ring_kv"] + r_ring["sent"]["ring_dkv"] == want, r_ring
        assert r_uly["kv_cache_policies"] == ["half", None, None, "half"], r_uly  # 1 % 3 == 4 % 3 == 1
        s_local = 8  # 32 / 4; one K all-to-all again per cached layer: the others' 3/4 of its heads
        assert r_uly["sent"]["all_to_all_again"] == 2 * s_local * b * hk * d * e * 3 // 4, r_uly


# ----------------------------------------------------------------------------- bad input: an error on every rank
def _mismatch(which):
    import torch
    import torch.distributed as dist

    from mindspeed_cp.local import local_attention
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention

    r = dist.get_rank()
    q, k, v = (torch.randn(8, 1, 4, 8, requires_grad=True) for _ in range(3))
    if which == "ring":  # rank 0 alone keeps the blocks: it would wait for K/V sends that never come... or skip them
        return ring_attention(q, k, v, None, kv_cache_policy="full" if r == 0 else None)
    if which == "ulysses":
        return UlyssesContextAttention(local_attention, None, kv_cache_policy="half" if r == 1 else None)(q, k, v)
    # MHA with the all-gather (rank-local problem, agreed)
    return UlyssesContextAttention(local_attention, None, allgather_kv=True)(q, k, v)


@pytest.mark.parametrize(
    "which,match",
    [
        ("ring", r"ring attention inputs differ .*kv_cache_policy='full'"),
        ("ulysses", r"differ across the ranks .*kv_cache_policy='half'"),
        ("allgather", r"--use-ulysses-allgather-kv needs grouped-query attention"),
    ],
)
def test_bad_kv_cache_input_fails_every_rank(which, match):
    from tests.dist import expect_error_on_every_rank

    expect_error_on_every_rank(4, _mismatch, which, match=match)
