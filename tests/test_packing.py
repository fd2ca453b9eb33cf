"""Packed documents: document-causal attention from document boundaries, every algorithm vs float64.

Each case packs documents of random lengths (length-1 documents, documents longer than a CP shard, one
single document, lengths that do not divide 2 x CP) into one sequence per sample. The reference is float64
full attention with the dense document-causal mask (key in the query's document and not after it); the CP
run shards q/k/v by :class:`mindspeed_cp.layout.packing.Documents` (per-document zigzag, pads at each document's
end), runs the algorithm with ``documents=`` and no mask, and brings the real tokens back in global order.
Tolerance (fp32 inputs): 1e-5 relative to the largest reference value, for out, dq, dk and dv.
"""

import random

import pytest
import torch

from mindspeed_cp.layout.packing import (
    Documents,
    layout_work,
    lengths_from_cu_seqlens,
    lengths_from_eod,
    lengths_from_position_ids,
)
from tests import features
from tests.dist import run_on_ranks

TOL = 1e-5
GPT_LOSS_TOL = 1e-5  # per-token losses ~5 against CP=1, absolute
GPT_GRAD_TOL = 1e-5  # CP-summed gradients, relative to the largest reference gradient
LENGTHS = [
    [[1, 17, 3, 29]],  # S=50: unaligned, a length-1 document
    [[50]],  # one single document (any length for Ring/Hybrid)
    [[1] * 6 + [37], [20, 23]],  # two samples, different documents; many length-1 documents
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

    import mindspeed_cp.kvallgather as kvag_module
    import mindspeed_cp.megatron_adaptor as adaptor
    import mindspeed_cp.ring as ring_module
    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import GatherSizeCalculator, UlyssesContextAttention
    from tests.attention_ref import reference_attention

    rank, out, tile = dist.get_rank(), [], ring_module.TILE
    for case in cases:
        ring_module.TILE = kvag_module.TILE = case.get("tile", tile)  # row tiles of masked blocks (several per block)
        algo, lengths = case["algo"], case["lengths"]
        u, window = case.get("u", 1), case.get("window", 1)
        ring = 1 if algo == "ulysses" else world // u
        flags = dict(
            ulysses=dict(context_parallel_algo="ulysses_cp_algo"),
            ring=dict(context_parallel_algo="megatron_cp_algo", cp_window_size=window),
            hybrid=dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=u, cp_window_size=window),
            kvallgather=dict(context_parallel_algo="kvallgather_cp_algo"),
        )[algo]
        adaptor.configure(context_parallel_size=world, **flags)
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

            attn = UlyssesContextAttention(
                lambda q_, k_, v_: local_attention(q_, k_, v_, documents=docs),
                STATE.group("ulysses"),
                gather_size_calculator=Size(),
            )
            o = attn(*local)
        elif algo == "ring" and case.get("dense"):  # the same attention from a general mask (rows of this rank)
            from mindspeed_cp.ring import zigzag_index

            idx = zigzag_index(S, world, rank)
            local = [t[idx].float().requires_grad_() for t in (q, k, v)]
            o = ring_attention(*local, STATE.group("ring"), causal=False, attention_mask=mask[:, :, idx])
            o.backward(dout[idx].float())
            errs = {}
            for name, got, want in (
                ("out", o, ref),
                ("dq", local[0].grad, leaves[0].grad),
                ("dk", local[1].grad, leaves[1].grad),
                ("dv", local[2].grad, leaves[2].grad),
            ):
                errs[name] = float((got.double() - want.detach()[idx]).abs().max() / want.abs().max())
            errs["finite"], errs["s_local"] = bool(torch.isfinite(o).all()), o.shape[0]
            out.append(errs)
            ps.destroy_model_parallel()
            continue
        elif algo == "ring":
            o = ring_attention(*local, STATE.group("ring"), documents=docs, window=STATE.double_ring_window())
        elif algo == "kvallgather":
            o = kvallgather_attention(*local, STATE.group("allgather"), documents=docs)
        else:
            o = hybrid_attention(
                *local, STATE.group("ulysses"), STATE.group("ring"), documents=docs, window=STATE.double_ring_window()
            )
        o.backward(docs.shard(dout, rank).float())
        errs = {}
        for name, got, want in (
            ("out", o, ref),
            ("dq", local[0].grad, leaves[0].grad),
            ("dk", local[1].grad, leaves[1].grad),
            ("dv", local[2].grad, leaves[2].grad),
        ):
            parts = [None] * world
            dist.all_gather_object(parts, got.detach().double())
            full = docs.unshard(parts)
            errs[name] = float((full - want.detach()).abs().max() / want.abs().max())
        errs["finite"] = bool(torch.isfinite(o).all())
        errs["s_local"] = o.shape[0]
        out.append(errs)
        ps.destroy_model_parallel()
    ring_module.TILE = kvag_module.TILE = tile
    return out


def _plan(world):
    cases = []
    for i, lengths in enumerate(LENGTHS if world < 8 else LENGTHS[2:3]):  # 8 ranks on 2 cores: fewer
        cases += [dict(algo="ulysses", lengths=lengths, seed=i), dict(algo="ring", lengths=lengths, seed=i)]
        if i in (0, 2):  # the all-gather: one sample with a length-1 document, two samples of different documents
            cases.append(dict(algo="kvallgather", lengths=lengths, seed=i))
        if world in (4, 8):
            cases += [
                dict(algo="ring", lengths=lengths, window=2, seed=i),
                dict(algo="hybrid", lengths=lengths, u=2, seed=i),
            ]
        if world == 8:
            cases += [
                dict(algo="hybrid", lengths=lengths, u=4, seed=i),
                dict(algo="hybrid", lengths=lengths, u=2, window=2, seed=i),
            ]
    cases.append(dict(algo="ring", lengths=[[13, 1, 30, 6]], heads=8, kv_heads=2, seed=9))  # GQA
    cases.append(dict(algo="kvallgather", lengths=[[13, 1, 30, 6]], heads=8, kv_heads=2, seed=9))
    if world == 4:
        cases.append(dict(algo="hybrid", lengths=[[13, 1, 30, 6]], u=2, heads=8, kv_heads=2, seed=9))
        # masked blocks cut into row tiles of 4 (documents and a general mask), ragged last tile
        cases += [
            dict(algo="ring", lengths=[[1, 17, 3, 29]], tile=4, seed=3),
            dict(algo="kvallgather", lengths=[[1, 17, 3, 29]], tile=4, seed=3),
            dict(algo="hybrid", lengths=[[1, 17, 3, 29]], u=2, tile=4, seed=3),
            dict(algo="ring", lengths=[[16, 24, 8]], dense=True, tile=5, seed=4),
            dict(algo="ring", lengths=[[16, 24, 8]], dense=True, seed=4),
        ]
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
    for row in docs.source.tolist():  # pads only at document ends, real tokens in order
        assert [x for x in row if x >= 0] == list(range(50))
    work = layout_work(docs)
    assert max(work) == min(work)  # per-document zigzag: every ring position the same work, any lengths


def test_spans_are_the_tightest_ranges_of_visible_keys():
    """Every (row tile, KV owner) computes the key columns from the first to the last one any of its rows sees
    (same document, not later) in any sample, and skips the tile when it sees none."""
    for lengths, ring, cp in (
        ([[1, 17, 3, 29], [25, 25]], 4, 4),
        ([[9, 31, 3, 1, 6]], 2, 4),
        ([[50]], 1, 2),
        ([[1] * 6 + [37], [20, 23]], 1, 4),
    ):
        docs = Documents.from_lengths(lengths, cp=cp, ring=ring)
        n = docs.padded_len // ring
        for r in range(ring):
            for j in range(ring):
                seen = ~docs.block_mask(docs.ring_positions(r), docs.ring_positions(j))[:, 0]
                seen = seen.any(0)
                for tile in (1, 3, 8, n):
                    want = []
                    for i in range(0, n, tile):
                        cols = seen[i : i + tile].any(0).nonzero().flatten().tolist()
                        want.append((cols[0], cols[-1] + 1) if cols else None)
                    assert docs.spans(r, j, tile) == want, (lengths, ring, r, j, tile)
    docs = Documents.from_lengths([[1] * 8 + [24]], cp=4, ring=4)  # some tiles see nothing of an owner
    assert any(sp is None for r in range(4) for j in range(4) for sp in docs.spans(r, j, 1))


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
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    import mindspeed_cp.megatron_adaptor as adaptor  # first, like a user's script
    from mindspeed_cp.megatron.state import STATE
    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel

    cp, lengths, b = case["cp"], case["lengths"], case.get("batch", 1)
    S = sum(lengths)
    batch = fixed_batch(batch=b, seq=S, seed=case.get("seed", 0))
    if not case.get("plain"):
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).expand(b, S).contiguous()  # resets
    heads, kv = case.get("heads", 4), case.get("kv_heads")
    mask = None
    if case.get("general"):  # a general mask: documents and random holes, never a row without a key
        g = torch.Generator().manual_seed(3)
        mask = (doc_mask(lengths) | (torch.rand(b, 1, S, S, generator=g) < 0.3)) & ~torch.eye(S, dtype=torch.bool)
        batch["attention_mask"] = mask

    def run(model, data):
        per_token = model(data["tokens"], data["position_ids"], data.get("attention_mask"), labels=data["labels"])
        (per_token * data["loss_mask"]).sum().div(b * S).backward()
        return per_token.detach(), {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    # reference: CP = 1, Megatron's own attention with the dense document mask
    init_parallel(cp=1)
    ref_model = build_gpt(heads=heads, kv_heads=kv, seq=S, seed=7)
    ref_loss, ref_grads = run(
        ref_model,
        dict(batch) if case.get("plain") else dict(batch, attention_mask=doc_mask(lengths).expand(b, 1, S, S)),
    )
    if case.get("general"):
        dead = dict(batch, attention_mask=mask.clone())
        dead["attention_mask"][:, :, 5] = True  # a row without any key
    state = ref_model.state_dict()
    ps.destroy_model_parallel()

    flags = {
        k: case[k]
        for k in (
            "context_parallel_algo",
            "ulysses_degree_in_cp",
            "cp_window_size",
            "use_cp_send_recv_overlap",
            "context_parallel_kv_cache_policy",
        )
        if k in case
    }
    if case.get("general"):
        flags["attention_mask_type"] = "general"
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
    if case.get("plain"):  # an unaligned batch: padded at its end, then the algorithm's own split
        from mindspeed_cp.layout.sharding import token_indices

        assert docs is None and STATE.seq_len > S and STATE.seq_len % (2 * cp) == 0
        src = token_indices(STATE.config, rank, STATE.seq_len).expand(b, -1)
        src = torch.where(src < S, src, -1)  # [b, s_local] global position, -1 = pad
    else:
        src = docs.source.gather(1, docs.positions(rank))  # [b, s_local] global position, -1 = pad
    refused = None
    if case.get("general"):
        try:
            get_batch_on_this_cp_rank(dead)
        except Exception as e:  # noqa: BLE001 - the message is checked by the test
            refused = f"{type(e).__name__}: {e}"
    return dict(_against_cp1(src, loss, grads, ref_loss, ref_grads), pads=int((src < 0).sum()), refused=refused)


def _against_cp1(src, loss, grads, ref_loss, ref_grads) -> dict:
    """Per-token losses put back at their global positions (``src`` ``[b, s_local]``, -1 = pad) and CP-summed
    gradients, against the CP=1 run: every token seen once, max |loss error|, max gradient error relative."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, S = ref_loss.shape
    full, seen = torch.zeros(b, S), torch.zeros(b, S)
    for i in range(b):
        keep = src[i] >= 0
        full[i, src[i][keep]] = loss[i][keep]
        seen[i, src[i][keep]] = 1
    for t in [full, seen] + list(grads.values()):
        dist.all_reduce(t, group=ps.get_context_parallel_group())
    gmax = max(float(g.abs().max()) for g in ref_grads.values())
    return {
        "every_token_once": bool((seen == 1).all()),
        "loss_err": float((full - ref_loss).abs().max()),
        "grad_err": max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads) / gmax,
        "s_local": int(src.shape[1]),
    }


GPT_DOC_CASES = [
    pytest.param(
        4, dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="ulysses_cp_algo", batch=2), id="ulysses-cp4"
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="megatron_cp_algo", before=[33, 17]),
        id="ring-cp4-after-another-batch",
    ),
    pytest.param(
        4,
        dict(
            cp=4,
            lengths=[7, 1, 30, 12],
            context_parallel_algo="megatron_cp_algo",
            cp_window_size=2,
            use_cp_send_recv_overlap=True,
        ),
        id="double-ring-cp4",
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
        id="hybrid-cp4",
    ),
    pytest.param(
        3,
        dict(cp=3, lengths=[1000 // 40, 15], context_parallel_algo="megatron_cp_algo", heads=6),
        id="ring-cp3-one-long-document-unaligned",
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="kvallgather_cp_algo", before=[33, 17], batch=2),
        id="kvallgather-cp4-after-another-batch",
    ),
    pytest.param(
        3,
        dict(
            cp=3,
            lengths=[1000 // 40, 15],
            context_parallel_algo="kvallgather_cp_algo",
            heads=6,
            context_parallel_kv_cache_policy="full",
        ),
        id="kvallgather-cp3-one-long-document-unaligned-kv-full",
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[62], context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
        id="hybrid-cp4-single-document-unaligned",
    ),
    # no documents: causal batches whose length 2 x CP does not divide, padded at their end
    pytest.param(
        3,
        dict(cp=3, lengths=[1000], plain=True, context_parallel_algo="megatron_cp_algo", heads=6),
        id="ring-cp3-S1000",
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[254], plain=True, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
        id="hybrid-cp4-S254",
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[254], plain=True, context_parallel_algo="megatron_cp_algo", cp_window_size=2),
        id="double-ring-cp4-S254",
    ),
    pytest.param(
        3,
        dict(cp=3, lengths=[100], plain=True, context_parallel_algo="kvallgather_cp_algo", heads=6),
        id="kvallgather-cp3-S100",
    ),
    # general masks at unaligned lengths: pad columns masked, pad rows see themselves only
    pytest.param(
        3,
        dict(cp=3, lengths=[100], plain=True, general=True, context_parallel_algo="megatron_cp_algo", heads=6, batch=2),
        id="ring-cp3-S100-general",
    ),
    pytest.param(
        4,
        dict(
            cp=4, lengths=[62], plain=True, general=True, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2
        ),
        id="hybrid-cp4-S62-general",
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[62], plain=True, general=True, context_parallel_algo="kvallgather_cp_algo", batch=2),
        id="kvallgather-cp4-S62-general",
    ),
]


@pytest.mark.parametrize("world,case", GPT_DOC_CASES)
def test_gpt_with_packed_documents_matches_cp1(world, case):
    """Per-token losses (2e-6) and CP-summed gradients (1e-5 relative) equal the CP=1 model that applies the
    dense document mask, with position resets and no mask in the CP batch."""
    for rank, r in enumerate(run_on_ranks(world, _gpt_documents, case)):
        assert r["every_token_once"], (rank, r)
        assert r["loss_err"] <= GPT_LOSS_TOL and r["grad_err"] <= GPT_GRAD_TOL, (rank, r)
        if case.get("general"):
            assert r["refused"] and "masks every key" in r["refused"] and "--seq-length" in r["refused"], r


# ----------------------------------------------------------------------------- megatron-core THD batches
def _thd_batch(lengths, pad_to=None, seed=0, vocab=128):
    """One packed row of documents as megatron-core's THD path takes it: ``[1, T]`` tensors, ``cu_seqlens``
    and (``pad_to``: the dataloader padded every document to a multiple of it, pads out of the loss)
    ``cu_seqlens_padded``; positions restart at every document."""
    segments = lengths if pad_to is None else [-(-n // pad_to) * pad_to for n in lengths]
    T = sum(segments)
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab, (1, T + 1), generator=g)
    loss_mask = torch.cat([torch.cat([torch.ones(n), torch.zeros(p - n)]) for n, p in zip(lengths, segments)])
    cu = lambda ns: torch.tensor([0] + torch.tensor(ns).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    batch = {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": loss_mask[None],
        "position_ids": torch.cat([torch.arange(p) for p in segments])[None],
    }
    return batch, segments, cu(lengths), None if pad_to is None else cu(segments)


def _megatron_dense_for_packed(module, mask):
    """The CP=1 reference: Megatron's own local attention refuses ``packed_seq_params``, so a packed call
    ([t, heads, d]) runs through its dense-mask path as a batch of one with the document mask."""
    forward = module.forward

    def packed(q, k, v, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        return forward(
            q[:, None], k[:, None], v[:, None], mask, attn_mask_type=attn_mask_type, attention_bias=attention_bias
        )

    module.forward = packed


def _gpt_thd(case):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    import mindspeed_cp.megatron_adaptor as adaptor  # first, like a user's script
    from mindspeed_cp.megatron.state import STATE
    from tests.gpt_helpers import build_gpt, init_parallel

    cp, lengths = case["cp"], case["lengths"]
    batch, segments, cu, cu_padded = _thd_batch(lengths, case.get("pad_to"), case.get("seed", 0))
    T = sum(segments)
    max_seqlen = torch.tensor([case.get("max_seqlen", max(segments))], dtype=torch.int32)

    def run(model, data, params):
        per_token = model(data["tokens"], data["position_ids"], None, labels=data["labels"], packed_seq_params=params)
        (per_token * data["loss_mask"]).sum().div(T).backward()
        return per_token.detach(), {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    init_parallel(cp=1)
    ref_model = build_gpt(seq=T, seed=7)
    for m in ref_model.modules():
        if isinstance(m, DotProductAttention):
            _megatron_dense_for_packed(m, doc_mask(segments))
    ref_batch, ref_params = get_thd_batch_on_this_cp_rank(dict(batch), cu, cu_padded, max_seqlen)  # Megatron's
    ref_loss, ref_grads = run(ref_model, ref_batch, ref_params)
    state = ref_model.state_dict()
    ps.destroy_model_parallel()

    flags = {
        k: case[k]
        for k in ("context_parallel_algo", "ulysses_degree_in_cp", "cp_window_size", "use_cp_send_recv_overlap")
        if k in case
    }
    adaptor.configure(context_parallel_size=cp, **flags)
    init_parallel(cp=cp)
    model = build_gpt(seq=T, seed=11)
    model.load_state_dict(state)
    local, params = get_thd_batch_on_this_cp_rank(dict(batch), cu, cu_padded, max_seqlen)
    assert params is STATE.packed and torch.equal(params.cu_seqlens_q, cu) and params.max_seqlen_q == max_seqlen
    loss, grads = run(model, local, params)
    docs, rank = STATE.documents, ps.get_context_parallel_rank()
    errors = _thd_errors(model, local, params, batch, cu, cu_padded, max_seqlen)
    src = docs.source.gather(1, docs.positions(rank))  # [1, t] position in the packed row, -1 = a layout pad
    return dict(_against_cp1(src, loss, grads, ref_loss, ref_grads), errors=errors)


def _thd_errors(model, local, params, batch, cu, cu_padded, max_seqlen):
    """The refusals of the THD path (the same on every rank: they read the batch, which every rank shares)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    from mindspeed_cp.config import CPConfigError

    def message(fn):
        try:
            fn()
        except CPConfigError as e:
            return str(e)
        return None

    with torch.no_grad():
        out = {
            "not_from_split": message(
                lambda: model(
                    local["tokens"],
                    None,
                    None,
                    packed_seq_params=PackedSeqParams(
                        qkv_format="thd",
                        cu_seqlens_q=cu,
                        cu_seqlens_kv=cu,
                        max_seqlen_q=params.max_seqlen_q,
                        max_seqlen_kv=params.max_seqlen_kv,
                    ),
                )
            ),
            "no_params": message(lambda: model(local["tokens"], None, None)),
            "two_rows": message(
                lambda: get_thd_batch_on_this_cp_rank(
                    {k: v.expand(2, -1) for k, v in batch.items()}, cu, cu_padded, max_seqlen
                )
            ),
            "short_cu": message(
                lambda: get_thd_batch_on_this_cp_rank(
                    dict(batch), cu[:-1], None if cu_padded is None else cu_padded[:-1], max_seqlen
                )
            ),
            "short_max": message(lambda: get_thd_batch_on_this_cp_rank(dict(batch), cu, cu_padded, max_seqlen // 8)),
        }
    return out


THD_CASES = [
    pytest.param(
        4,
        dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="megatron_cp_algo", pad_to=8),
        id="ring-cp4-cu_seqlens_padded",
    ),
    pytest.param(4, dict(cp=4, lengths=[7, 1, 30, 13], context_parallel_algo="ulysses_cp_algo"), id="ulysses-cp4"),
    pytest.param(
        4,
        dict(cp=4, lengths=[7, 1, 30, 13], context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
        id="hybrid-cp4",
    ),
    pytest.param(
        4,
        dict(
            cp=4,
            lengths=[19, 1, 40],
            context_parallel_algo="megatron_cp_algo",
            cp_window_size=2,
            use_cp_send_recv_overlap=True,
            pad_to=2,
        ),
        id="double-ring-cp4",
    ),
    pytest.param(
        3,
        dict(cp=3, lengths=[20, 5, 25], context_parallel_algo="megatron_cp_algo", max_seqlen=50),
        id="ring-cp3-rope-through-the-row",
    ),
    pytest.param(
        4,
        dict(cp=4, lengths=[7, 1, 30, 12], context_parallel_algo="kvallgather_cp_algo", pad_to=8),
        id="kvallgather-cp4-cu_seqlens_padded",
    ),
]


@pytest.mark.skipif(not features.thd_split(), reason=features.WHY["thd_split"])
@pytest.mark.parametrize("world,case", THD_CASES)
def test_gpt_thd_batches_match_cp1(world, case):
    """megatron-core THD: ``get_thd_batch_on_this_cp_rank`` + ``PackedSeqParams`` through a GPT at CP > 1 give
    the per-token losses (1e-5) and CP-summed gradients (1e-5 relative) of the same model at CP=1 (Megatron's
    THD RoPE, its local attention with the document mask); misuse is refused on every rank."""
    for rank, r in enumerate(run_on_ranks(world, _gpt_thd, case)):
        assert r["every_token_once"], (rank, r)
        assert r["loss_err"] <= GPT_LOSS_TOL and r["grad_err"] <= GPT_GRAD_TOL, (rank, r)
        e = r["errors"]
        assert "did not come from megatron.core.utils.get_thd_batch_on_this_cp_rank" in e["not_from_split"], e
        assert "the model got no packed_seq_params" in e["no_params"], e
        assert "one packed row [1, T]" in e["two_rows"] and "(2, " in e["two_rows"], e
        assert "covers" in e["short_cu"] and "but the packed row has" in e["short_cu"], e
        assert "max_seqlen" in e["short_max"] and "shorter than a document" in e["short_max"], e
