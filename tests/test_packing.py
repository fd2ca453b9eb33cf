"""Packed documents: document-causal attention from document boundaries, every algorithm vs float64.

Each case packs documents of random lengths (length-1 documents, documents longer than a CP shard, one
single document, lengths that do not divide 2 x CP) into one sequence per sample. The reference is float64
full attention with the dense document-causal mask (key in the query's document and not after it); the CP
run shards q/k/v by :class:`mindspeed_cp.packing.Documents` (per-document zigzag, pads at each document's
end), runs the algorithm with ``documents=`` and no mask, and brings the real tokens back in global order.
Tolerance (fp32 inputs): 1e-5 relative to the largest reference value, for out, dq, dk and dv.
"""
import random

import pytest
import torch

from mindspeed_cp.packing import Documents, layout_work, lengths_from_cu_seqlens, lengths_from_eod, \
    lengths_from_position_ids
from tests.dist import run_on_ranks

TOL = 1e-5
LENGTHS = [
    [[1, 17, 3, 29]],                    # S=50: unaligned, a length-1 document
    [[50]],                              # one single document (any length for Ring/Hybrid)
    [[1] * 6 + [37], [20, 23]],          # two samples, different documents; many length-1 documents
    [[9, 31, 3, 1, 6]],
]


def doc_mask(lengths):
    """[1, 1, S, S] dense document-causal mask (True = masked) - the reference only."""
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])
    S = len(ids)
    pos = torch.arange(S)
    return ((ids[:, None] != ids[None, :]) | (pos[None, :] > pos[:, None]))[None, None]


def _cases(world, cases):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.attention import _double_ring_window
    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.state import STATE
    from mindspeed_cp.ulysses import GatherSizeCalculator, UlyssesContextAttention
    from tests.attention_ref import reference_attention

    import mindspeed_cp.ring as ring_module

    rank, out, tile = dist.get_rank(), [], ring_module.TILE
    for case in cases:
        ring_module.TILE = case.get("tile", tile)  # row tiles of masked blocks (small here: several per block)
        algo, lengths = case["algo"], case["lengths"]
        u, window = case.get("u", 1), case.get("window", 1)
        ring = 1 if algo == "ulysses" else world // u
        flags = dict(ulysses=dict(context_parallel_algo="ulysses_cp_algo"),
                     ring=dict(context_parallel_algo="megatron_cp_algo", cp_window_size=window),
                     hybrid=dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=u,
                                 cp_window_size=window))[algo]
        cfg = adaptor.configure(context_parallel_size=world, **flags)
        ps.initialize_model_parallel(context_parallel_size=world)
        heads = {3: 6, 8: 8}.get(world, 4)  # Ulysses needs heads % CP == 0
        b, h, hk, d = len(lengths), case.get("heads", heads), case.get("kv_heads", heads), 8
        S = sum(lengths[0])
        g = torch.Generator().manual_seed(case.get("seed", 0))
        q, dout = (torch.randn(S, b, h, d, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(S, b, hk, d, generator=g, dtype=torch.float64) for _ in range(2))
        mask = torch.cat([doc_mask(row) for row in lengths])  # [b, 1, S, S]
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*leaves, causal=False, mask=mask)
        ref.backward(dout)
        docs = Documents.from_lengths(lengths, world, ring)
        local = [docs.shard(t, rank).float().requires_grad_() for t in (q, k, v)]
        if algo == "ulysses":
            class Size(GatherSizeCalculator):
                def calculate(self, *a, **kw):
                    return docs.padded_len

            attn = UlyssesContextAttention(lambda q_, k_, v_: local_attention(q_, k_, v_, documents=docs),
                                           STATE.group("ulysses"), gather_size_calculator=Size())
            o = attn(*local)
        elif algo == "ring" and case.get("dense"):  # the same attention from a general mask (rows of this rank)
            from mindspeed_cp.ring import zigzag_index

            idx = zigzag_index(S, world, rank)
            local = [t[idx].float().requires_grad_() for t in (q, k, v)]
            o = ring_attention(*local, STATE.group("ring"), causal=False, attention_mask=mask[:, :, idx])
            o.backward(dout[idx].float())
            errs = {}
            for name, got, want in (("out", o, ref), ("dq", local[0].grad, leaves[0].grad),
                                    ("dk", local[1].grad, leaves[1].grad), ("dv", local[2].grad, leaves[2].grad)):
                errs[name] = float((got.double() - want.detach()[idx]).abs().max() / want.abs().max())
            errs["finite"], errs["s_local"] = bool(torch.isfinite(o).all()), o.shape[0]
            out.append(errs)
            ps.destroy_model_parallel()
            continue
        elif algo == "ring":
            o = ring_attention(*local, STATE.group("ring"), documents=docs, window=_double_ring_window(cfg))
        else:
            o = hybrid_attention(*local, STATE.group("ulysses"), STATE.group("ring"), documents=docs,
                                 window=_double_ring_window(cfg))
        o.backward(docs.shard(dout, rank).float())
        errs = {}
        for name, got, want in (("out", o, ref), ("dq", local[0].grad, leaves[0].grad),
                                ("dk", local[1].grad, leaves[1].grad), ("dv", local[2].grad, leaves[2].grad)):
            parts = [None] * world
            dist.all_gather_object(parts, got.detach().double())
            full = docs.unshard(parts)
            errs[name] = float((full - want.detach()).abs().max() / want.abs().max())
        errs["finite"] = bool(torch.isfinite(o).all())
        errs["s_local"] = o.shape[0]
        out.append(errs)
        ps.destroy_model_parallel()
    ring_module.TILE = tile
    return out


def _plan(world):
    cases = []
    for i, lengths in enumerate(LENGTHS if world < 8 else LENGTHS[2:3]):  # 8 ranks on 2 cores: fewer
        cases += [dict(algo="ulysses", lengths=lengths, seed=i), dict(algo="ring", lengths=lengths, seed=i)]
        if world in (4, 8):
            cases += [dict(algo="ring", lengths=lengths, window=2, seed=i),
                      dict(algo="hybrid", lengths=lengths, u=2, seed=i)]
        if world == 8:
            cases += [dict(algo="hybrid", lengths=lengths, u=4, seed=i),
                      dict(algo="hybrid", lengths=lengths, u=2, window=2, seed=i)]
    cases.append(dict(algo="ring", lengths=[[13, 1, 30, 6]], heads=8, kv_heads=2, seed=9))  # GQA
    if world == 4:
        cases.append(dict(algo="hybrid", lengths=[[13, 1, 30, 6]], u=2, heads=8, kv_heads=2, seed=9))
        # masked blocks cut into row tiles of 4 (documents and a general mask), ragged last tile
        cases += [dict(algo="ring", lengths=[[1, 17, 3, 29]], tile=4, seed=3),
                  dict(algo="hybrid", lengths=[[1, 17, 3, 29]], u=2, tile=4, seed=3),
                  dict(algo="ring", lengths=[[16, 24, 8]], dense=True, tile=5, seed=4),
                  dict(algo="ring", lengths=[[16, 24, 8]], dense=True, seed=4)]
    return cases


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_documents_match_float64_document_causal_attention(world):
    cases = _plan(world)
    per_rank = run_on_ranks(world, _cases, world, cases)
    for i, case in enumerate(cases):
        for rank, errs in enumerate(r[i] for r in per_rank):
            assert errs["finite"], (case, rank)
            for name in ("out", "dq", "dk", "dv"):
                assert errs[name] <= TOL, (world, case, rank, name, errs[name])


# ----------------------------------------------------------------------------- the layout (pure)
def test_layout_is_a_balanced_permutation_with_pads_at_document_ends():
    docs = Documents.from_lengths([[1, 17, 3, 29], [25, 25]], cp=4, ring=4)
    T = docs.padded_len
    assert T % 8 == 0 and docs.padded == [[8, 24, 8, 32], [32, 32, 8]]  # tail pad document for sample 1
    held = torch.cat([docs.positions(r) for r in range(4)], dim=1)
    assert all(sorted(row) == list(range(T)) for row in held.tolist())  # every padded position exactly once
    for b, row in enumerate(docs.source.tolist()):  # pads only at document ends, real tokens in order
        assert [x for x in row if x >= 0] == list(range(50))
    work = layout_work(docs)
    assert max(work) == min(work)  # per-document zigzag: every ring position the same work, any lengths


def test_long_tailed_documents_balance_and_padding():
    """Lognormal document lengths (mean ~2k) at S=32k, CP=8: imbalance 1 exactly, padding <= 2 %."""
    rng = random.Random(0)
    lengths, left = [], 32768
    while left > 0:
        n = min(left, max(1, int(rng.lognormvariate(7.1, 1.0))))
        lengths.append(n)
        left -= n
    docs = Documents.from_lengths(lengths, cp=8, ring=8)
    work = layout_work(docs)
    assert max(work) / (sum(work) / len(work)) == 1.0
    assert docs.padding_overhead() <= 0.02, docs.padding_overhead()


def test_boundaries_from_the_batch():
    assert lengths_from_cu_seqlens([0, 5, 9, 12]) == [5, 4, 3]
    assert lengths_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [[3, 2, 1]]
    assert lengths_from_eod(torch.tensor([[5, 7, 2, 5, 2, 9]]), eod=2) == [[3, 2, 1]]
    assert lengths_from_eod(torch.tensor([[5, 2]]), eod=2) == [[2]]  # a final EOD ends the last document
    with pytest.raises(ValueError, match="same length"):
        Documents.from_lengths([[3, 4], [5]], cp=2)


def test_shard_unshard_roundtrip():
    docs = Documents.from_lengths([[3, 10, 1], [7, 7]], cp=4, ring=2)  # Hybrid: 2 ring positions x 2 Ulysses
    x = torch.arange(14 * 2, dtype=torch.float64).reshape(14, 2)[..., None]
    parts = [docs.shard(x, r) for r in range(4)]
    assert len({p.shape[0] for p in parts}) == 1 and parts[0].shape[0] * 4 == docs.padded_len
    assert torch.equal(docs.unshard(parts), x)
    assert sum(int(docs.real(r).sum()) for r in range(4)) == 28


# ----------------------------------------------------------------------------- megatron-core GPT
def _gpt_documents(case):
    import mindspeed_cp.megatron_adaptor as adaptor  # first, like a user's script
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from mindspeed_cp.state import STATE
    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel

    cp, lengths, b = case["cp"], case["lengths"], case.get("batch", 1)
    S = sum(lengths)
    batch = fixed_batch(batch=b, seq=S, seed=case.get("seed", 0))
    if not case.get("plain"):
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).expand(b, S).contiguous()  # resets
    heads, kv = case.get("heads", 4), case.get("kv_heads")

    def run(model, data):
        per_token = model(data["tokens"], data["position_ids"], data.get("attention_mask"), labels=data["labels"])
        (per_token * data["loss_mask"]).sum().div(b * S).backward()
        return per_token.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                    if p.grad is not None}

    # reference: CP = 1, Megatron's own attention with the dense document mask
    init_parallel(cp=1)
    ref_model = build_gpt(heads=heads, kv_heads=kv, seq=S, seed=7)
    ref_loss, ref_grads = run(ref_model, dict(batch) if case.get("plain") else
                              dict(batch, attention_mask=doc_mask(lengths).expand(b, 1, S, S)))
    state = ref_model.state_dict()
    ps.destroy_model_parallel()

    flags = {k: case[k] for k in ("context_parallel_algo", "ulysses_degree_in_cp", "cp_window_size",
                                  "use_cp_send_recv_overlap") if k in case}
    adaptor.configure(context_parallel_size=cp, documents=None if case.get("plain") else "position_ids", **flags)
    init_parallel(cp=cp)
    model = build_gpt(heads=heads, kv_heads=kv, seq=S, seed=11)
    model.load_state_dict(state)
    if case.get("before"):  # an earlier batch with other documents of the same padded length (RoPE's cache)
        other = fixed_batch(batch=b, seq=S, seed=5)
        other["position_ids"] = torch.cat([torch.arange(n) for n in case["before"]]).expand(b, S).contiguous()
        prev = get_batch_on_this_cp_rank(other)
        with torch.no_grad():
            model(prev["tokens"], prev["position_ids"], None, labels=prev["labels"])
    local = get_batch_on_this_cp_rank(dict(batch))
    loss, grads = run(model, local)
    docs, rank = STATE.documents, ps.get_context_parallel_rank()
    assert docs is not None and docs.padded_len > S or not case.get("plain"), "an unaligned batch is padded"
    src = docs.source.gather(1, docs.positions(rank))  # [b, s_local] global position, -1 = pad
    full, seen = torch.zeros(b, S), torch.zeros(b, S)
    for i in range(b):
        keep = src[i] >= 0
        full[i, src[i][keep]] = loss[i][keep]
        seen[i, src[i][keep]] = 1
    group = ps.get_context_parallel_group()
    for t in [full, seen] + list(grads.values()):
        dist.all_reduce(t, group=group)
    gmax = max(float(g.abs().max()) for g in ref_grads.values())
    return {"every_token_once": bool((seen == 1).all()), "loss_err": float((full - ref_loss).abs().max()),
            "grad_err": max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads) / gmax,
            "pads": int((src < 0).sum()), "s_local": int(src.shape[1])}


GPT_DOC_CASES = [
    pytest.param(4, dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="ulysses_cp_algo", batch=2),
                 id="ulysses-cp4"),
    pytest.param(4, dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="megatron_cp_algo", before=[33, 17]),
                 id="ring-cp4-after-another-batch"),
    pytest.param(4, dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="megatron_cp_algo", cp_window_size=2,
                         use_cp_send_recv_overlap=True), id="double-ring-cp4"),
    pytest.param(4, dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="hybrid_cp_algo",
                         ulysses_degree_in_cp=2), id="hybrid-cp4"),
    pytest.param(3, dict(cp=3, lengths=[1000 // 40, 15], context_parallel_algo="megatron_cp_algo",
                         heads=6), id="ring-cp3-one-long-document-unaligned"),
    pytest.param(4, dict(cp=4, lengths=[62], context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
                 id="hybrid-cp4-single-document-unaligned"),
    # no documents: causal batches whose length 2 x CP does not divide, padded at their end
    pytest.param(3, dict(cp=3, lengths=[1000], plain=True, context_parallel_algo="megatron_cp_algo", heads=6),
                 id="ring-cp3-S1000"),
    pytest.param(4, dict(cp=4, lengths=[254], plain=True, context_parallel_algo="hybrid_cp_algo",
                         ulysses_degree_in_cp=2), id="hybrid-cp4-S254"),
    pytest.param(4, dict(cp=4, lengths=[254], plain=True, context_parallel_algo="megatron_cp_algo", cp_window_size=2),
                 id="double-ring-cp4-S254"),
]


@pytest.mark.parametrize("world,case", GPT_DOC_CASES)
def test_gpt_with_packed_documents_matches_cp1(world, case):
    """Per-token losses (2e-6) and CP-summed gradients (1e-5 relative) equal the CP=1 model that applies the
    dense document mask, with position resets and no mask in the CP batch."""
    for rank, r in enumerate(run_on_ranks(world, _gpt_documents, case)):
        assert r["every_token_once"], (rank, r)
        assert r["loss_err"] <= 2e-6 * 5 and r["grad_err"] <= 1e-5, (rank, r)
