"""Hybrid (Ulysses inside x Ring outside) vs float64 full attention: output and dq, dk, dv.

Groups come from the real runtime path (configure + Megatron's initialize_model_parallel); each rank holds
the tokens ``sharding.token_indices`` gives it (zigzag over ring ranks, then contiguous among Ulysses ranks).
Tolerance (fp32 inputs, float64 reference): 1e-5 relative to the largest reference value.
"""

import pytest

from tests.dist import run_on_ranks

TOL = 1e-5


def _hybrid_cases(cases):
    import torch
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.stats import count_bytes
    from tests.attention_ref import reference_attention

    out = []
    for case in cases:
        cfg = adaptor.configure(
            context_parallel_size=case["cp"],
            context_parallel_algo="hybrid_cp_algo",
            ulysses_degree_in_cp=case["u"],
            cp_window_size=case.get("window", 1),
            use_cp_send_recv_overlap=case.get("overlap", False),
            megatron_cp_in_bnsd=case.get("bnsd", False),
            attention_mask_type="general" if case.get("general") else "causal",
        )
        ps.initialize_model_parallel(context_parallel_size=case["cp"])
        S, b, h, hk, d = case["seq"], 2, case["heads"], case.get("kv_heads", case["heads"]), 8
        g = torch.Generator().manual_seed(case.get("seed", 0))
        q, dout = (torch.randn(S, b, h, d, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(S, b, hk, d, generator=g, dtype=torch.float64) for _ in range(2))
        mask = None
        if case.get("general"):
            mask = torch.rand(b, 1, S, S, generator=g) < 0.3
            mask[:, :, 3] = True  # a fully masked row: 0, never NaN
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*leaves, causal=mask is None, mask=mask)
        ref.backward(dout)
        idx = token_indices(cfg, ps.get_context_parallel_rank(), S)
        local = [t[idx].float().clone().requires_grad_() for t in (q, k, v)]
        local_mask = None if mask is None else mask[:, :, idx]
        with count_bytes() as stats:
            o = hybrid_attention(
                *local,
                STATE.group("ulysses"),
                STATE.group("ring"),
                causal=mask is None,
                attention_mask=local_mask,
                bnsd=cfg.megatron_cp_in_bnsd,
                overlap_group=STATE.overlap_group("ring") if cfg.use_cp_send_recv_overlap else None,
                window=STATE.double_ring_window(),
                outer=case.get("outer", "ring"),
                kv_cache_policy=case.get("policy"),
            )
            o.backward(dout[idx].float())
        errs = {}
        for name, got, want in (
            ("out", o, ref),
            ("dq", local[0].grad, leaves[0].grad),
            ("dk", local[1].grad, leaves[1].grad),
            ("dv", local[2].grad, leaves[2].grad),
        ):
            want = want[idx] if name != "out" else want[idx]
            errs[name] = float((got.double() - want).abs().max() / want.abs().max())
        errs["finite"] = bool(torch.isfinite(o).all())
        errs["bytes"] = dict(stats.by_kind)
        out.append(errs)
        ps.destroy_model_parallel()
    return out


CASES_4 = [
    dict(cp=4, u=2, seq=32, heads=4),
    dict(cp=4, u=2, seq=32, heads=4, general=True),
    dict(cp=4, u=2, seq=32, heads=8, kv_heads=2),  # GQA: 1 KV head per Ulysses rank
    dict(cp=4, u=2, seq=32, heads=4, kv_heads=1, general=True),  # MQA, replicated to 2
    dict(cp=4, u=2, seq=16, heads=2, overlap=True, bnsd=True),
    dict(cp=4, u=2, seq=32, heads=8, kv_heads=2, outer="kvallgather"),  # the K/V all-gather outside
    dict(cp=4, u=2, seq=32, heads=4, kv_heads=1, general=True, outer="kvallgather", policy="full"),
]
CASES_8 = [
    dict(cp=8, u=2, seq=32, heads=4),
    dict(cp=8, u=4, seq=32, heads=4),
    dict(cp=8, u=2, seq=32, heads=4, window=2),
    dict(cp=8, u=2, seq=32, heads=4, window=2, general=True, overlap=True),
    dict(cp=8, u=4, seq=32, heads=8, kv_heads=2, general=True),
    dict(cp=8, u=2, seq=32, heads=8, kv_heads=4, outer="kvallgather"),
    dict(cp=8, u=2, seq=32, heads=4, general=True, outer="kvallgather", policy="half"),
]


@pytest.mark.parametrize("world,cases", [(4, CASES_4), (8, CASES_8)], ids=["cp4", "cp8"])
def test_hybrid_matches_full_attention(world, cases):
    per_rank = run_on_ranks(world, _hybrid_cases, cases)
    for i, case in enumerate(cases):
        for rank, errs in enumerate(r[i] for r in per_rank):
            assert errs["finite"], (case, rank)
            for name in ("out", "dq", "dk", "dv"):
                assert errs[name] <= TOL, (case, rank, name, errs[name])
            # both levels really communicated (the outer one by its own collectives)
            outer = ("all_gather", "reduce_scatter") if case.get("outer") == "kvallgather" else ("ring_kv",)
            assert errs["bytes"].get("all_to_all", 0) > 0 and all(errs["bytes"].get(x, 0) > 0 for x in outer), (
                case,
                errs["bytes"],
            )
            if case.get("outer") == "kvallgather":
                assert "ring_kv" not in errs["bytes"], errs["bytes"]
