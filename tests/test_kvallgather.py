"""All-gather K/V attention (mindspeed_cp.kvallgather) on real gloo ranks against float64 full attention.

Every rank builds the same global q/k/v/dout, runs the algorithm on its zigzag (or per-document zigzag) shard and
compares out, dq, dk, dv with its shard of the float64 reference (tests/attention_ref.py): causal, general masks
(fully masked rows under both conventions), packed documents (one layout for the batch: mask-free run tiles;
layouts differing per sample: masked spans), GQA, MQA, MLA (dv != d), dropout (the reference drops what
AttentionDropout exports for the whole S x S), the KV-cache policies, overlap on and off, the math
kernel and row tiles smaller than a chunk. Many cases run inside one distributed call per group size.

Bytes sent per rank, forward + backward, must equal the formula exactly: the K/V all-gather and the dK/dV
reduce-scatter ``(P-1) s b hk (d + dv) e`` each, plus what backward gathers again (no policy: K and V, "half": V).
"""

from __future__ import annotations

import pytest
import torch

from tests.attention_ref import reference_attention, reference_attention_dropout
from tests.dist import expect_error_on_every_rank, run_on_ranks

# max |error| / max |reference| over the whole tensor. float32: the worst measured over every case here is 7.2e-7
# (P=2 dq, ATEN_CPU_CAPABILITY avx512; avx2: 4.8e-7), so 1e-5 leaves 14x; bfloat16: inputs, output and the dK/dV
# reduce-scatter are bf16 (8 bits of mantissa, 2^-8 = 3.9e-3 per rounding), measured worst 1.6e-2.
TOL = {"float32": 1e-5, "bfloat16": 5e-2}
# two float32 runs of one problem with other options (overlap off, math kernel, row tiles, a KV-cache policy):
# the merge order differs; measured at most 2.4e-7 relative to the largest output
SAME_TOL = 5e-6


# ------------------------------------------------------------------------------------------- worker side
def _global_data(cfg):
    """The same global q/k/v/dout ``[S, b, h, d|dv]`` (float32) on every rank, and the mask: None (causal or, with
    ``kind="none"``, full attention), "random" (rows 3 and S-2 fully masked), or the documents' dense mask."""
    S, b, n, nk, d, dv = cfg["S"], cfg["b"], cfg["n"], cfg["nk"], cfg["d"], cfg.get("dv", cfg["d"])
    g = torch.Generator().manual_seed(cfg["seed"])
    q, k = torch.randn(S, b, n, d, generator=g), torch.randn(S, b, nk, d, generator=g)
    v, dout = torch.randn(S, b, nk, dv, generator=g), torch.randn(S, b, n, dv, generator=g)
    mask, kind = None, cfg.get("mask")
    if kind == "random":
        mask = torch.rand(cfg["mask_shape"], generator=g) < 0.3
        mask[..., 3, :] = True
        mask[..., S - 2, :] = True
    elif kind == "documents":
        rows = []
        for lengths in cfg["lengths"]:
            ids = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)])
            pos = torch.arange(S)
            rows.append((ids[:, None] != ids[None, :]) | (pos[None, :] > pos[:, None]))
        mask = torch.stack(rows)[:, None]
    return q, k, v, dout, mask


def _dropout(case, n):
    from mindspeed_cp.dropout import AttentionDropout

    p = case.get("p")
    return None if p is None else AttentionDropout(p, torch.tensor(case["data"]["seed"] * 7919 + 1), torch.arange(n))


def _reference(case, dtype):
    cfg = case["data"]
    q, k, v, dout, mask = _global_data(cfg)
    leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    drop, dead = _dropout(case, cfg["n"]), case.get("dead", "zero")
    causal = cfg.get("mask") is None
    if drop is not None or dead == "uniform":
        S, b = cfg["S"], cfg["b"]
        keep = (
            torch.ones(b, cfg["n"], S, S, dtype=torch.bool)
            if drop is None
            else drop.block(torch.arange(S), torch.arange(S)).keep(b)
        )
        out = reference_attention_dropout(*leaves, keep, 0.0 if drop is None else drop.p, causal, mask, dead)
    else:
        out = reference_attention(*leaves, causal=causal, mask=mask)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype).double())
    return out.detach(), grads


def _shard(case, P, r):
    """(q, k, v, dout, mask, documents, (the rank's compared rows of its own results, of a global reference)) of r."""
    from mindspeed_cp.layout.packing import Documents
    from mindspeed_cp.layout.sharding import zigzag_index

    cfg = case["data"]
    dtype = getattr(torch, case["dtype"])
    q, k, v, dout, mask = _global_data(cfg)
    if cfg.get("mask") == "documents":
        docs = Documents(cfg["lengths"], P, P)
        q_l, k_l, v_l, do_l = (docs.shard(t.to(dtype), r) for t in (q, k, v, dout))
        real = docs.real(r).T  # [s_local, b]: the rank's real tokens (pads have no reference)
        return q_l, k_l, v_l, do_l, None, docs, (lambda x: x[real], lambda x: docs.shard(x, r)[real])
    idx = zigzag_index(cfg["S"], P, r)
    if mask is not None and case.get("mask_rows") == "local":
        mask = mask[..., idx, :]  # what get_batch_on_this_cp_rank hands over: local rows, global columns
    return (*(t[idx].to(dtype) for t in (q, k, v, dout)), mask, None, (lambda x: x, lambda x: x[idx]))


def _run_case(case, group, P, r, ref):
    import mindspeed_cp.kvallgather as kvag
    from mindspeed_cp.stats import count_blocks, count_bytes, count_saved

    q, k, v, dout, mask, docs, (mine, ref_rows) = _shard(case, P, r)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    tile, kvag.TILE = kvag.TILE, case.get("tile", kvag.TILE)
    try:
        with count_bytes() as comm, count_blocks() as blocks:
            with count_saved() as saved:
                out = kvag.kvallgather_attention(
                    q,
                    k,
                    v,
                    group,
                    causal=case["data"].get("mask") in (None, "documents"),
                    attention_mask=mask,
                    overlap=case.get("overlap", True),
                    kernel=case.get("kernel"),
                    dropout=_dropout(case, q.shape[2]),
                    dead_rows=case.get("dead", "zero"),
                    documents=docs,
                    kv_cache_policy=case.get("policy"),
                    gather_groups=case.get("groups"),
                )
            out.backward(dout)
    finally:
        kvag.TILE = tile
    got = (out, q.grad, k.grad, v.grad)
    full = (ref[0], *ref[1])
    return {
        "errors": {
            n: ((mine(a.detach().double()) - ref_rows(want)).abs().max() / want.abs().max()).item()
            for n, a, want in zip(("out", "dq", "dk", "dv"), got, full)
        },
        "finite": all(torch.isfinite(t).all().item() for t in got),
        "dtypes": [str(t.dtype) for t in got],
        "out": out.detach().double(),
        "bytes": dict(comm.by_kind),
        "messages": dict(comm.messages),
        "blocks": blocks.as_dict(),
        "saved": saved.total,
    }


def _kvag_cases(ranks, cases):
    """Run every case on this rank (members of ``ranks``; None elsewhere)."""
    import torch.distributed as dist

    group = dist.new_group(ranks)
    results = None
    if dist.get_rank() in ranks:
        P, r = len(ranks), ranks.index(dist.get_rank())
        refs, results = {}, []
        for case in cases:
            key = repr((sorted(case["data"].items()), case["dtype"], case.get("p"), case.get("dead")))
            if key not in refs:
                refs[key] = _reference(case, getattr(torch, case["dtype"]))
            results.append(_run_case(case, group, P, r, refs[key]))
    dist.destroy_process_group(group)
    return results


def _collect(world, ranks, cases):
    per_rank = run_on_ranks(world, _kvag_cases, ranks, cases)
    per_pos = [per_rank[g] for g in ranks]
    return [[per_pos[r][i] for r in range(len(ranks))] for i in range(len(cases))]


def _data(P, c=2, b=2, n=4, nk=2, d=8, seed=0, **extra):
    return dict(S=2 * P * c, b=b, n=n, nk=nk, d=d, seed=seed, **extra)


def _docs(P, lengths, seed, **extra):
    return dict(
        S=sum(lengths[0]), b=len(lengths), n=4, nk=2, d=8, seed=seed, mask="documents", lengths=lengths, **extra
    )


def _case(data, dtype="float32", **extra):
    return dict(data=data, dtype=dtype, **extra)


def _cases(P, c):
    S = 2 * P * c
    mha, gqa = _data(P, c, nk=4, seed=1), _data(P, c, nk=2, seed=2)
    mla = _data(P, c, nk=2, d=12, dv=8, seed=3)
    rand = _data(P, c, seed=4, mask="random", mask_shape=(2, 1, S, S))
    heads = _data(P, c, b=1, seed=5, mask="random", mask_shape=(1, 4, S, S))
    docs = _docs(P, [[1, 2 * S // 3, S - 1 - 2 * S // 3], [S // 2, S - S // 2]], seed=6)  # masked span tiles
    same = _docs(P, [[3, S - 3 - S // 4, S // 4]] * 2, seed=9)  # one layout for both samples: mask-free run tiles
    return [  # groups: the gather split by KV heads, as on an accelerator (a CPU's rule is one group)
        _case(mha),
        _case(mha, groups=4),
        _case(gqa, groups=2),
        _case(gqa, overlap=False),
        _case(gqa, kernel="math", tile=3, groups=2),
        _case(gqa, policy="full", groups=2),
        _case(gqa, policy="half", overlap=False),
        _case(mla),
        _case(mla, policy="half", groups=2),
        _case(_data(P, c, nk=1, seed=7)),  # MQA: one KV head, one gather
        _case(_data(P, c, nk=4, seed=8, mask="none")),  # full attention, no mask
        _case(rand, mask_rows="local"),
        _case(rand, mask_rows="full", dead="uniform", tile=5, groups=2),
        _case(heads, mask_rows="local", dead="uniform", policy="full"),
        _case(docs, groups=2),
        _case(docs, tile=3, policy="half"),
        _case(same),
        _case(same, kernel="math", tile=3, policy="full", groups=2),
        _case(same, p=0.5, tile=4, overlap=False),
        _case(gqa, p=0.3),
        _case(docs, p=0.5, tile=4),
        _case(rand, mask_rows="local", dead="uniform", p=0.2),
        _case(gqa, dtype="bfloat16"),
    ]


# group -> (world size, its ranks, chunk size). "P3" is a group of 3 in a 4-rank world (rank 0 idles).
CONFIGS = {"P2": (2, [0, 1], 4), "P3": (4, [1, 2, 3], 2), "P4": (4, [0, 1, 2, 3], 3), "P8": (8, list(range(8)), 1)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def kvag_run(request):
    world, ranks, c = CONFIGS[request.param]
    cases = _cases(len(ranks), c)
    return len(ranks), cases, _collect(world, ranks, cases)


# ------------------------------------------------------------------------------------------- tests
def test_matches_float64_full_attention(kvag_run):
    P, cases, results = kvag_run
    worst = {}
    for case, per_rank in zip(cases, results):
        tol = TOL[case["dtype"]]
        for r, res in enumerate(per_rank):
            assert res["finite"], f"P={P} rank {r}: NaN/inf in {case}"
            assert res["dtypes"] == [f"torch.{case['dtype']}"] * 4
            for name, err in res["errors"].items():
                worst[(case["dtype"], name)] = max(worst.get((case["dtype"], name), 0.0), err)
                assert err <= tol, f"P={P} rank {r} {name}: relative error {err:.2e} > {tol} in {case}"
    print(f"\nP={P}, {len(cases)} cases, max relative errors: {sorted(worst.items())}")


def test_options_agree_with_each_other(kvag_run):
    """Overlap, the math kernel, row tiles and the KV-cache policies change only the schedule."""
    P, cases, results = kvag_run
    by_data = {}
    for case, per_rank in zip(cases, results):
        if case["dtype"] == "float32":
            key = repr((sorted(case["data"].items()), case.get("p"), case.get("dead", "zero")))
            by_data.setdefault(key, []).append(per_rank)
    assert any(len(runs) > 2 for runs in by_data.values())
    for runs in by_data.values():
        for other in runs[1:]:
            for r in range(P):
                scale = runs[0][r]["out"].abs().max()
                assert (other[r]["out"] - runs[0][r]["out"]).abs().max() <= SAME_TOL * scale


def _expected_bytes(case, P):
    """(kind -> bytes, kind -> messages) of one rank, forward + backward, from the formula."""
    from mindspeed_cp.options import KVAllGatherOptions

    data = case["data"]
    e = torch.tensor([], dtype=getattr(torch, case["dtype"])).element_size()
    d, dv = data["d"], data.get("dv", data["d"])
    s = data["S"] // P
    if data.get("mask") == "documents":
        from mindspeed_cp.layout.packing import Documents

        s = Documents(data["lengths"], P, P).padded_len // P
    head = (P - 1) * s * data["b"] * data["nk"] * e  # one head size of K or V, (P-1) shards
    again = {None: d + dv, "half": dv, "full": 0}[case.get("policy")]
    options = KVAllGatherOptions(overlap=case.get("overlap", True), gather_groups=case.get("groups"))
    groups = options.head_groups(data["nk"], "cpu")  # the runtime's rule
    gathers = groups * (1 if case.get("policy") == "full" else 2)
    return {"all_gather": head * (d + dv + again), "reduce_scatter": head * (d + dv)}, {
        "all_gather": gathers,
        "reduce_scatter": groups,
    }


def test_bytes_equal_the_formula(kvag_run):
    from mindspeed_cp.agreement import KVAllGatherRow

    P, cases, results = kvag_run
    for case, per_rank in zip(cases, results):
        want, messages = _expected_bytes(case, P)
        for r, res in enumerate(per_rank):
            got, sent = dict(res["bytes"]), dict(res["messages"])
            meta = got.pop("metadata")  # the input agreement: one all-gather of one row (+ 2 ints)
            assert meta == (P - 1) * 8 * (KVAllGatherRow.width() + 2) and sent.pop("metadata") == 1
            assert got == want, (P, r, case, got, want)
            assert sent == messages, (P, r, case, sent)


def test_policies_cost_what_the_cost_model_says(kvag_run):
    """Bytes and kept memory per policy equal :func:`kvallgather_kv_cache`: the ring's volume policy by policy (no
    policy: 3 (P-1) s b hk (d + dv) e); "full" keeps the gathered K/V (the gathered less the local ones) and sends the
    textbook all-gather + reduce-scatter 2 (P-1)/P S b hk (d + dv) e, 2/3 of the ring's default."""
    from mindspeed_cp.planner.costmodel import kvallgather_kv_cache, ring_bytes, ring_kv_cache

    P, cases, results = kvag_run
    base = {}  # the first float32 run of each problem without a policy
    for c, res in zip(cases, results):
        if c.get("policy") is None and c["dtype"] == "float32":
            base.setdefault(repr(sorted(c["data"].items())), res)
    checked = 0
    for case, per_rank in zip(cases, results):
        data, policy = case["data"], case.get("policy")
        if data.get("mask") == "documents" or case["dtype"] != "float32":
            continue
        shape = (data["S"], P, data["b"], data["nk"], data["d"], 4)
        dv = data.get("dv", data["d"])
        model = kvallgather_kv_cache(*shape, policy, dv=dv)
        assert model["sent"] == ring_kv_cache(*shape, policy, dv=dv)["sent"]
        if policy == "full":
            assert 3 * model["sent"] == 2 * ring_bytes(*shape, dv=dv)
        for r, res in enumerate(per_rank):
            assert sum(res["bytes"].values()) - res["bytes"]["metadata"] == model["sent"], (case, r)
            same = base.get(repr(sorted(data.items())))
            if policy is not None and same is not None and case.get("p") is None:
                assert res["saved"] - same[r]["saved"] == model["saved"], (case, r)
                checked += 1
    assert checked


def test_causal_work_balanced_and_exact(kvag_run):
    """Zigzag: every rank computes exactly the same causal pairs, the whole triangle once, nothing empty."""
    P, cases, results = kvag_run
    for case, per_rank in zip(cases, results):
        data = case["data"]
        if data.get("mask") is not None or "kernel" in case:
            continue
        S, bn = data["S"], data["b"] * data["n"]
        for phase in ("forward", "backward"):
            work = [res["blocks"]["scores"][phase] - res["blocks"]["masked"][phase] for res in per_rank]
            assert len(set(work)) == 1, f"unbalanced {phase} work {work} in {case}"
            assert sum(work) == bn * S * (S + 1) // 2
            assert all(res["blocks"]["empty"].get(phase, 0) == 0 for res in per_rank)


def test_document_work_balanced(kvag_run):
    """Per-document zigzag: the unmasked pairs of every rank are equal whatever the document lengths."""
    P, cases, results = kvag_run
    for case, per_rank in zip(cases, results):
        if case["data"].get("mask") != "documents":
            continue
        for phase in ("forward", "backward"):
            work = [res["blocks"]["scores"][phase] - res["blocks"]["masked"][phase] for res in per_rank]
            assert len(set(work)) == 1, f"unbalanced {phase} work {work} in {case}"


# ------------------------------------------------------------------------------------------- errors
def _bad_inputs(P, what):
    import torch.distributed as dist

    from mindspeed_cp.kvallgather import kvallgather_attention

    r = dist.get_rank()
    s = 4 + (2 if (what == "shape" and r == 0) else 0) + (1 if what == "odd" else 0)
    dtype = torch.bfloat16 if (what == "dtype" and r == P - 1) else torch.float32
    q = torch.randn(s, 1, 4, 8, dtype=dtype)
    kv = torch.randn(s, 1, 3 if what == "heads" else 2, 8, dtype=dtype)
    mask = torch.zeros(1, 1, s, s if what == "mask" else s * P, dtype=torch.bool) if what in ("mask", "both") else None
    policy = "full" if (what == "policy" and r == 1) else None
    groups = {"groups": 3, "split": 1 + (r == 2)}.get(what)  # 3 does not divide 2 KV heads; rank 2 splits alone
    kvallgather_attention(
        q, kv, kv, None, causal=what != "mask", attention_mask=mask, kv_cache_policy=policy, gather_groups=groups
    )


@pytest.mark.parametrize(
    "what,match",
    [
        ("shape", r"differ across the 4 ranks.*rank 0: q \[6, 1, 4, 8\].*rank 1: q \[4, 1, 4, 8\]"),
        ("dtype", r"differ across.*bfloat16"),
        ("odd", r"s_local 5 is odd.*divisible by 2 x --context-parallel-size 4"),
        ("heads", r"query heads 4 are not a multiple of key/value heads 3"),
        ("mask", r"attention_mask must be \[b\|1, heads\|1, s_local\|S, S\]"),
        ("both", r"attention_mask was given with causal=True"),
        ("policy", r"differ across.*rank 1: .*kv_cache_policy='full'"),
        ("groups", r"gather_groups=3 does not divide the 2 KV heads of k"),
        ("split", r"differ across.*rank 2: .*gather in 2 KV-head group"),
    ],
)
def test_bad_inputs_raise_on_every_rank(what, match):
    expect_error_on_every_rank(4, _bad_inputs, 4, what, match=match)


# ------------------------------------------------------------------------------------------- the plan (pure)
def _covered(tiles, s, S, positions):
    """[s, S] int: how often each (local row, global key) pair is computed (a diagonal tile: its triangle); an own
    tile's keys are local rows, at global ``positions``."""
    seen = torch.zeros(s, S, dtype=torch.int32)
    for t in tiles:
        n, m = t.rows[1] - t.rows[0], t.keys[1] - t.keys[0]
        block = torch.ones(n, m, dtype=torch.int32)
        cols = positions[t.key_slice] if t.own else torch.arange(*t.keys)
        seen[t.row_slice][:, cols] += block.tril() if t.causal else block
    return seen


@pytest.mark.parametrize("rows", [None, 1, 3])
def test_block_tiles_compute_every_visible_pair_once(rows):
    """The runtime's plan for causal and full attention (keys in rank blocks as the gather delivers them): every
    (query, key) pair the attention may see, each once, nothing else; at most P kernel calls; the same pairs on
    every rank."""
    from mindspeed_cp.layout.gather import block_tiles, tile_pairs
    from mindspeed_cp.layout.sharding import zigzag_index

    for P, c in ((2, 4), (3, 2), (4, 3), (8, 1)):
        S, pairs = 2 * P * c, []
        pos = [zigzag_index(S, P, j) for j in range(P)]
        for causal in (True, False):
            for r in range(P):
                want = (torch.arange(S)[None, :] <= pos[r][:, None]).int() if causal else torch.ones(2 * c, S).int()
                seen = torch.zeros(2 * c, S, dtype=torch.int32)
                tiles = block_tiles(P, r, 2 * c, causal, rows)
                for t in tiles:
                    n, m = t.rows[1] - t.rows[0], t.keys[1] - t.keys[0]
                    block = torch.ones(n, m, dtype=torch.int32)
                    seen[t.row_slice][:, pos[r if t.own else t.block][t.key_slice]] += (
                        block.tril() if t.causal else block
                    )
                assert torch.equal(seen, want), (P, r, causal, rows)
                assert rows is not None or len(tiles) <= P, tiles
                if causal:
                    pairs.append(tile_pairs(tiles))
        assert len(set(pairs)) == 1


@pytest.mark.parametrize("rows", [None, 1, 3])
def test_tiles_compute_every_visible_pair_once(rows):
    """Causal zigzag and packed documents (one layout, and per-sample layouts through masked spans): the tiles of
    every rank cover exactly the (query, key) pairs the attention may see, each once, and nothing else where no
    mask is applied; every rank the same number of pairs."""
    from mindspeed_cp.layout.gather import causal_tiles, document_span_tiles, document_tiles, tile_pairs
    from mindspeed_cp.layout.packing import Documents
    from mindspeed_cp.layout.sharding import zigzag_index

    for P, c in ((2, 4), (3, 2), (4, 3), (8, 1)):
        S, pairs = 2 * P * c, []
        for r in range(P):
            pos = zigzag_index(S, P, r)
            want = (torch.arange(S)[None, :] <= pos[:, None]).int()
            tiles = causal_tiles(P, r, 2 * c, rows)
            assert torch.equal(_covered(tiles, 2 * c, S, pos), want), (P, r, rows)
            assert rows is not None or len(tiles) <= 3, tiles  # at most three kernel calls per rank
            pairs.append(tile_pairs(tiles))
        assert len(set(pairs)) == 1
    for lengths in ([[1, 17, 3, 29]], [[50]], [[9, 31, 3, 1, 6], [9, 31, 3, 1, 6]], [[1] * 6 + [37], [20, 23]]):
        for P in (2, 4):
            docs = Documents.from_lengths(lengths, cp=P, ring=P)
            n, T = docs.padded_len // P, docs.padded_len
            allowed = ~docs.block_mask(docs.order, torch.arange(T).expand(len(lengths), -1))[:, 0]  # [b, T, T]
            pairs = []
            for j in range(P):
                visible = allowed[:, j * n : (j + 1) * n].any(0).int()  # [n, T] over the samples
                if docs.same_layout:
                    tiles = document_tiles(docs, j, rows)
                    pos = docs.ring_positions(j)[0]
                    assert torch.equal(_covered(tiles, n, T, pos), visible), (lengths, P, j, rows)
                    pairs.append(tile_pairs(tiles))
                else:  # spans: every visible pair inside some tile once, the rest masked
                    tiles = document_span_tiles(docs, j, rows or 4)
                    seen = _covered(tiles, n, T, None)
                    assert seen.max() == 1 and bool((seen >= visible).all()), (lengths, P, j, rows)
            assert len(set(pairs)) <= 1, (lengths, P, pairs)
