"""Attention dropout and fully masked rows under every CP algorithm, on gloo ranks, against float64.

Each rank holds the tokens ``sharding.token_indices`` gives it (groups from the real runtime path: configure +
Megatron's initialize_model_parallel). The dropout masks are keyed by global (sample, head, query, key), so the
reference is single-device attention with the masks ``AttentionDropout`` exports for the whole S x S: every
algorithm at every CP size must drop exactly those probabilities. Fully masked rows (rows 3 and S-2 of a
general mask) follow ``dead_rows`` ("uniform": Megatron's local attention, -10000 fill).
Tolerance (fp32 inputs, float64 reference): 1e-5 relative to the largest reference value.
"""

import pytest

from tests.dist import run_on_ranks

TOL = 1e-5


def _cases(cases):
    import torch
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.dropout import AttentionDropout
    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention
    from tests.attention_ref import reference_attention_dropout

    out = []
    for case in cases:
        algo = case["algo"]
        cfg = adaptor.configure(
            context_parallel_size=case["cp"],
            context_parallel_algo=algo,
            ulysses_degree_in_cp=case.get("u"),
            cp_window_size=case.get("window", 1),
            use_cp_send_recv_overlap=case.get("overlap", False),
            attention_mask_type="general" if case.get("general") else "causal",
        )
        ps.initialize_model_parallel(context_parallel_size=case["cp"])
        S, b, h, hk, d, p = case["seq"], 2, 4, case.get("kv_heads", 2), 8, case.get("p", 0.3)
        g = torch.Generator().manual_seed(case.get("seed", 0))
        q, dout = (torch.randn(S, b, h, d, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(S, b, hk, d, generator=g, dtype=torch.float64) for _ in range(2))
        mask, dead, docs = None, case.get("dead", "zero"), None
        if case.get("lengths"):  # packed documents: the dense document-causal mask for the reference only
            from mindspeed_cp.layout.packing import Documents

            ring = 1 if algo == ULYSSES else case["cp"] // case.get("u", 1)
            docs = Documents(case["lengths"], case["cp"], ring)
            ids = [torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in case["lengths"]]
            pos = torch.arange(S)
            mask = torch.stack([(i[:, None] != i[None, :]) | (pos[None, :] > pos[:, None]) for i in ids])[:, None]
        elif case.get("general"):
            mask = torch.rand(b, 1, S, S, generator=g) < 0.3
            mask[:, :, [3, S - 2]] = True
        spec = AttentionDropout(p, torch.tensor(case.get("seed", 0) * 7919 + 1), torch.arange(h))
        keep = spec.block(torch.arange(S), torch.arange(S)).keep(b)  # the whole [b, h, S, S]
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention_dropout(*leaves, keep, p, causal=mask is None, mask=mask, dead=dead)
        ref.backward(dout)
        if docs is not None:
            out.append(_documents_case(case, algo, cfg, docs, (q, k, v), dout, spec, ref, leaves))
            ps.destroy_model_parallel()
            continue

        idx = token_indices(cfg, ps.get_context_parallel_rank(), S)
        local = [t[idx].float().clone().requires_grad_() for t in (q, k, v)]
        rows = None if mask is None else mask[:, :, idx]
        opts = dict(causal=mask is None, attention_mask=rows, dropout=spec, dead_rows=dead)
        if algo == "megatron_cp_algo":
            o = ring_attention(
                *local,
                STATE.group("ring"),
                window=STATE.double_ring_window(),
                overlap_group=STATE.overlap_group("ring") if cfg.use_cp_send_recv_overlap else None,
                **opts,
            )
        elif algo == "hybrid_cp_algo":
            o = hybrid_attention(
                *local, STATE.group("ulysses"), STATE.group("ring"), window=STATE.double_ring_window(), **opts
            )
        elif algo == KVALLGATHER:
            o = kvallgather_attention(*local, STATE.group("allgather"), kv_cache_policy=case.get("policy"), **opts)
        else:
            group = STATE.group("ulysses")

            def attend(q_, k_, v_, mask_rows, drop):
                return local_attention(
                    q_,
                    k_,
                    v_,
                    causal=mask is None,
                    attention_mask=mask,
                    tile=case.get("tile"),
                    dropout=drop.for_rank(group.rank(), q_.shape[2]),
                    dead_rows=dead,
                )

            o = UlyssesContextAttention(attend, group)(*local, rows, drop=spec)
        o.backward(dout[idx].float())
        errs = {}
        for name, got, want in (
            ("out", o, ref),
            ("dq", local[0].grad, leaves[0].grad),
            ("dk", local[1].grad, leaves[1].grad),
            ("dv", local[2].grad, leaves[2].grad),
        ):
            errs[name] = float((got.double() - want[idx]).abs().max() / want.abs().max())
        out.append(errs)
        ps.destroy_model_parallel()
    return out


def _documents_case(case, algo, cfg, docs, qkv, dout, spec, ref, leaves):
    """One case with packed documents: the per-document layout (pads at document ends), ``documents=``; errors
    on the rank's real tokens (pads have no counterpart in the unpacked reference)."""
    from megatron.core import parallel_state as ps

    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention

    rank = ps.get_context_parallel_rank()
    local = [docs.shard(t, rank).float().clone().requires_grad_() for t in qkv]
    opts = dict(causal=True, dropout=spec, documents=docs)
    if algo == "megatron_cp_algo":
        o = ring_attention(*local, STATE.group("ring"), window=STATE.double_ring_window(), **opts)
    elif algo == "hybrid_cp_algo":
        o = hybrid_attention(
            *local, STATE.group("ulysses"), STATE.group("ring"), window=STATE.double_ring_window(), **opts
        )
    elif algo == KVALLGATHER:
        o = kvallgather_attention(*local, STATE.group("allgather"), **opts)
    else:
        group = STATE.group("ulysses")

        def attend(q_, k_, v_, mask_rows, drop):
            return local_attention(
                q_,
                k_,
                v_,
                causal=True,
                tile=case.get("tile"),
                documents=docs,
                dropout=drop.for_rank(group.rank(), q_.shape[2]),
            )

        o = UlyssesContextAttention(attend, group)(*local, None, drop=spec)
    o.backward(docs.shard(dout, rank).float())
    real = docs.real(rank).T  # [s_local, b]
    errs = {}
    for name, got, want in (
        ("out", o, ref),
        ("dq", local[0].grad, leaves[0].grad),
        ("dk", local[1].grad, leaves[1].grad),
        ("dv", local[2].grad, leaves[2].grad),
    ):
        errs[name] = float((got.double() - docs.shard(want.detach(), rank))[real].abs().max() / want.abs().max())
    return errs


RING, HYBRID, ULYSSES, KVALLGATHER = "megatron_cp_algo", "hybrid_cp_algo", "ulysses_cp_algo", "kvallgather_cp_algo"
DOCS = [[1, 17, 3, 11], [20, 12]]  # two samples, different documents; S = 32
CASES = {
    2: [
        dict(algo=RING, cp=2, seq=32),
        dict(algo=ULYSSES, cp=2, seq=32, tile=8),
        dict(algo=ULYSSES, cp=2, seq=32),
        dict(algo=RING, cp=2, seq=32, general=True, dead="uniform", p=0.0),
        dict(algo=RING, cp=2, seq=32, general=True, dead="uniform", overlap=True),
        dict(algo=ULYSSES, cp=2, seq=32, general=True, dead="uniform", tile=8),
        dict(algo=RING, cp=2, seq=32, general=True, dead="zero", p=0.5),
        dict(algo=RING, cp=2, seq=32, lengths=DOCS),
        dict(algo=ULYSSES, cp=2, seq=32, lengths=DOCS, tile=8),
        dict(algo=KVALLGATHER, cp=2, seq=32),
        dict(algo=KVALLGATHER, cp=2, seq=32, general=True, dead="uniform", policy="full"),
    ],
    4: [
        dict(algo=RING, cp=4, seq=32, p=0.1),
        dict(algo=RING, cp=4, seq=32, window=2, overlap=True),
        dict(algo=HYBRID, cp=4, u=2, seq=32),
        dict(algo=HYBRID, cp=4, u=2, seq=32, kv_heads=1, general=True, dead="uniform"),
        dict(algo=ULYSSES, cp=4, seq=32, kv_heads=1, general=True, dead="uniform", p=0.5),
        dict(algo=RING, cp=4, seq=32, lengths=DOCS, window=2),
        dict(algo=HYBRID, cp=4, u=2, seq=32, lengths=DOCS),
        dict(algo=ULYSSES, cp=4, seq=32, lengths=DOCS),
        dict(algo=KVALLGATHER, cp=4, seq=32, kv_heads=1, general=True, dead="zero", p=0.5, policy="half"),
        dict(algo=KVALLGATHER, cp=4, seq=32, lengths=DOCS),
    ],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_every_algorithm_drops_what_one_device_drops(world):
    per_rank = run_on_ranks(world, _cases, CASES[world])
    for i, case in enumerate(CASES[world]):
        for rank, errs in enumerate(r[i] for r in per_rank):
            for name in ("out", "dq", "dk", "dv"):
                assert errs[name] <= TOL, (case, rank, name, errs[name])
