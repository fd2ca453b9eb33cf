"""Ring attention (mindspeed_cp.ring) on real gloo ranks against float64 full attention.

Every rank builds the same global q/k/v/dout, runs ring attention on its zigzag shard and compares
out, dq, dk, dv with its shard of the float64 reference (tests/attention_ref.py). Many option
combinations run inside one distributed call per ring; the tests then check the collected numbers.

Tolerances (max |error| / max |reference| of the whole tensor): float32 1e-5; bfloat16 5e-2 (inputs,
the output and the dK/dV accumulators in flight are bf16; the reference uses the same rounded inputs).
Communication: bytes sent per rank, forward + backward, must equal the textbook 3 (P-1) 2 s b hk d e
exactly (KV forward, KV and dKV backward), for the plain and the Double Ring.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.attention_ref import reference_attention
from tests.dist import expect_error_on_every_rank, run_on_ranks

TOL = {"float32": 1e-5, "bfloat16": 5e-2}
# two float32 runs of one problem (other options: merge orders differ; causal given as a mask), relative to the
# largest output: measured at most 2e-7 (an absolute 1e-6 sat within 2x of it)
SAME_TOL = 5e-6


# ------------------------------------------------------------------------------------------- worker side
def _groups(ring_ranks, windows, overlap):
    """The ring over ``ring_ranks``, its overlap twin and Double Ring windows, from the topology's rank
    lists (``layout_for`` numbers ring positions 0..P-1, mapped onto ``ring_ranks``). A collective: every
    rank of the world creates every group, in the same order."""
    import torch.distributed as dist

    from mindspeed_cp.config import CPConfig
    from mindspeed_cp.ring import DoubleRingWindow
    from mindspeed_cp.topology import layout_for

    me, made, P = dist.get_rank(), [], len(ring_ranks)

    def mine(position_lists):
        found = None
        for positions in position_lists:
            ranks = [ring_ranks[p] for p in positions]
            g = dist.new_group(ranks)
            made.append(g)
            if me in ranks:
                found = g
        return found

    def layout(K):
        return layout_for(
            CPConfig(context_parallel_size=P, context_parallel_algo="megatron_cp_algo", cp_window_size=K), P, 1, 1
        )

    out = {"ring": mine(layout(1)["ring"]), "ring_ov": mine(layout(1)["ring"]) if overlap else None, "windows": {}}
    for K in windows:
        lay = layout(K)
        parts = [mine(lay["ring_intra_window"]), mine(lay["ring_inter_window"])]
        twins = [mine(lay["ring_intra_window"]), mine(lay["ring_inter_window"])] if overlap else [None, None]
        out["windows"][K] = DoubleRingWindow(K, *parts, *twins)
    return out, made


def _global_data(cfg):
    """Same global tensors on every rank: q/k/v/dout [S, b, h, d] (float32) and the mask [B, N, S, S].

    ``cfg["mask"]``: None = causal; "none" = full attention without mask; "random" (some rows fully
    masked), "causal" (causal given as a general mask), "skip" (every key of ring position 1 masked)."""
    S, b, n, nk, d = cfg["S"], cfg["b"], cfg["n"], cfg["nk"], cfg["d"]
    g = torch.Generator().manual_seed(cfg["seed"])
    q, k, v = (torch.randn(S, b, h, d, generator=g) for h in (n, nk, nk))
    dout = torch.randn(S, b, n, d, generator=g)
    mask, kind = None, cfg.get("mask")
    if kind == "random":
        mask = torch.rand(cfg["mask_shape"], generator=g) < 0.3
        mask[..., 3, :] = True
        mask[..., S - 2, :] = True
    elif kind == "causal":
        mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
    elif kind == "skip":
        P = cfg["P"]
        c = S // (2 * P)
        mask = torch.rand(1, 1, S, S, generator=g) < 0.2
        mask[..., c : 2 * c] = True
        mask[..., (2 * P - 2) * c : (2 * P - 1) * c] = True
    return q, k, v, dout, mask


def _reference(cfg, dtype):
    q, k, v, dout, mask = _global_data(cfg)
    leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, causal=cfg.get("mask") is None, mask=mask)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype).double())
    return out.detach(), grads


def _rel(x, ref_shard, ref):
    # relative to the whole reference tensor (a rank's shard of dK/dV may be all zero)
    return ((x.double() - ref_shard).abs().max() / ref.abs().max()).item()


def _ring_cases(ring_ranks, cases):
    """Run every case on this rank; per case: errors, byte counts, block counts (None off the ring)."""
    import torch.distributed as dist

    from mindspeed_cp.ring import count_blocks, ring_attention, zigzag_index
    from mindspeed_cp.stats import count_bytes

    need_windows = sorted({c["window"] for c in cases if c["window"] > 1})
    groups, made = _groups(ring_ranks, need_windows, overlap=any(c["overlap"] for c in cases))
    results = None
    if dist.get_rank() in ring_ranks:
        P, r = len(ring_ranks), ring_ranks.index(dist.get_rank())
        refs, results = {}, []
        for case in cases:
            cfg, dtype = case["data"], getattr(torch, case["dtype"])
            key = (tuple(sorted(cfg.items())), case["dtype"])
            if key not in refs:
                refs[key] = _reference(cfg, dtype)
            ref_out, ref_grads = refs[key]
            q, k, v, dout, mask = _global_data(cfg)
            idx = zigzag_index(cfg["S"], P, r)
            q_l, k_l, v_l = (t[idx].to(dtype).requires_grad_() for t in (q, k, v))
            if mask is not None and case.get("mask_rows") == "local":
                mask = mask[..., idx, :]  # what get_batch_on_this_cp_rank hands over: local rows, global cols
            with count_bytes() as comm, count_blocks() as blocks:
                out = ring_attention(
                    q_l,
                    k_l,
                    v_l,
                    groups["ring"],
                    causal=cfg.get("mask") is None,
                    attention_mask=mask,
                    bnsd=case["bnsd"],
                    overlap_group=groups["ring_ov"] if case["overlap"] else None,
                    window=groups["windows"].get(case["window"]),
                    kernel=case.get("kernel"),
                )
                out.backward(dout[idx].to(dtype))
            got = (out, q_l.grad, k_l.grad, v_l.grad)
            full = (ref_out, *ref_grads)
            results.append(
                {
                    "errors": {n: _rel(a, ref[idx], ref) for n, a, ref in zip(("out", "dq", "dk", "dv"), got, full)},
                    "finite": all(torch.isfinite(t).all().item() for t in got),
                    "dtypes": [str(t.dtype) for t in got],
                    "out": out.detach().double(),
                    "bytes": dict(comm.by_kind),
                    "messages": dict(comm.messages),
                    "blocks": blocks.as_dict(),
                }
            )
    for g in made:
        if g is not None:
            dist.destroy_process_group(g)
    return results


def _collect(world, ring_ranks, cases):
    per_rank = run_on_ranks(world, _ring_cases, ring_ranks, cases)
    per_pos = [per_rank[g] for g in ring_ranks]  # ring position -> per-case results
    return [[per_pos[r][i] for r in range(len(ring_ranks))] for i in range(len(cases))]


def _data(P, c=2, b=2, n=4, nk=2, d=8, seed=0, **extra):
    return dict(P=P, S=2 * P * c, b=b, n=n, nk=nk, d=d, seed=seed, **extra)


def _case(data, dtype="float32", bnsd=False, overlap=False, window=1, **extra):
    return dict(data=data, dtype=dtype, bnsd=bnsd, overlap=overlap, window=window, **extra)


def _cases(P, windows, c, data_sets):
    mha, gqa = _data(P, c=c, nk=4, seed=1), _data(P, c=c, nk=2, seed=2)
    rand = _data(P, c=c, nk=2, seed=3, mask="random", mask_shape=(2, 1, 2 * P * c, 2 * P * c))
    rand_heads = _data(P, c=c, b=1, nk=2, seed=4, mask="random", mask_shape=(1, 4, 2 * P * c, 2 * P * c))
    causal_as_mask = _data(P, c=c, nk=2, seed=2, mask="causal")  # same tensors as gqa
    cases = []
    for bnsd, overlap, window in itertools.product((False, True), (False, True), windows):
        # causal zigzag and general mask under every layout / overlap / window combination
        for data in {"all": (mha, gqa), "gqa": (gqa,)}[data_sets]:
            cases.append(_case(data, bnsd=bnsd, overlap=overlap, window=window))
        cases.append(_case(rand, bnsd=bnsd, overlap=overlap, window=window, mask_rows="local"))
    cases += [
        _case(rand, mask_rows="full", window=windows[-1]),
        _case(rand_heads, mask_rows="local", overlap=True),
        _case(causal_as_mask, mask_rows="full", window=windows[-1]),
        _case(causal_as_mask, mask_rows="local", bnsd=True),
        _case(_data(P, c=c, nk=2, seed=5, mask="skip"), mask_rows="local", window=windows[-1], overlap=True),
        _case(_data(P, c=c, nk=1, seed=6, mask="none"), window=windows[-1], overlap=True),
        _case(gqa, dtype="bfloat16", overlap=True, window=windows[-1]),
        _case(rand, dtype="bfloat16", mask_rows="local", bnsd=True),
        _case(gqa, kernel="math", bnsd=True, window=windows[-1]),
    ]
    return cases


# ring -> (world size, ring ranks, case options). "P3" is a sub-ring of the 4-rank world (rank 0 idles):
# an odd ring, where under overlap position 0 sends and receives on one communicator.
CONFIGS = {
    "P2": (2, [0, 1], dict(windows=[1], c=4, data_sets="all")),
    "P3": (4, [1, 2, 3], dict(windows=[1], c=2, data_sets="gqa")),
    "P4": (4, [0, 1, 2, 3], dict(windows=[1, 2], c=3, data_sets="all")),
    "P8": (8, list(range(8)), dict(windows=[1, 2, 4], c=1, data_sets="gqa")),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ring_run(request):
    world, ring_ranks, options = CONFIGS[request.param]
    cases = _cases(len(ring_ranks), **options)
    return len(ring_ranks), cases, _collect(world, ring_ranks, cases)


# ------------------------------------------------------------------------------------------- tests
def test_matches_float64_full_attention(ring_run):
    P, cases, results = ring_run
    worst = {}
    for case, per_rank in zip(cases, results):
        tol = TOL[case["dtype"]]
        kind = case["data"].get("mask") or "causal"
        for r, res in enumerate(per_rank):
            assert res["finite"], f"P={P} rank {r}: NaN/inf in {case}"
            assert res["dtypes"] == [f"torch.{case['dtype']}"] * 4
            for name, err in res["errors"].items():
                key = (case["dtype"], "causal" if kind == "causal" else "mask", name)
                worst[key] = max(worst.get(key, 0.0), err)
                assert err <= tol, f"P={P} rank {r} {name}: relative error {err:.2e} > {tol} in {case}"
    print(
        f"\nP={P}, {len(cases)} cases, max relative errors: "
        + ", ".join(f"{'/'.join(k)}={v:.1e}" for k, v in sorted(worst.items()))
    )


def test_options_agree_with_each_other(ring_run):
    """bnsd, overlap, Double Ring and the kernel only change the schedule: outputs agree to fp32 rounding."""
    P, cases, results = ring_run
    by_data = {}
    for case, per_rank in zip(cases, results):
        if case["dtype"] == "float32":
            by_data.setdefault(repr(sorted(case["data"].items())), []).append(per_rank)
    for runs in by_data.values():
        for other in runs[1:]:
            for r in range(P):
                scale = runs[0][r]["out"].abs().max()
                assert (other[r]["out"] - runs[0][r]["out"]).abs().max() <= SAME_TOL * scale


def test_causal_as_general_mask_equals_causal(ring_run):
    P, cases, results = ring_run
    causal = [
        res
        for case, res in zip(cases, results)
        if case["data"]["seed"] == 2 and not case["data"].get("mask") and case["dtype"] == "float32"
    ]
    general = [res for case, res in zip(cases, results) if case["data"].get("mask") == "causal"]
    assert causal and len(general) == 2
    for g in general:
        for r in range(P):
            assert (g[r]["out"] - causal[0][r]["out"]).abs().max() <= SAME_TOL * causal[0][r]["out"].abs().max()


def test_bytes_equal_textbook_volume(ring_run):
    from mindspeed_cp.agreement import RingRow

    P, cases, results = ring_run
    for case, per_rank in zip(cases, results):
        data = case["data"]
        e = 4 if case["dtype"] == "float32" else 2
        s = data["S"] // P
        block = 2 * s * data["b"] * data["nk"] * data["d"] * e  # one K+V block
        for r, res in enumerate(per_rank):
            # the input agreement: one all-gather of the ring row (RingRow.width() ints) + problem length + rank
            meta = res["bytes"].pop("metadata")
            assert meta == (P - 1) * 8 * (RingRow.width() + 2) == (P - 1) * 8 * 55, (meta, res["messages"])
            assert res["messages"].pop("metadata") == 1, res["messages"]
            assert res["bytes"] == {"ring_kv": 2 * (P - 1) * block, "ring_dkv": (P - 1) * block}, (P, r, case)
            assert sum(res["bytes"].values()) == 3 * (P - 1) * block
            assert res["messages"] == {"ring_kv": 2 * (P - 1), "ring_dkv": P - 1}


def test_causal_blocks_balanced_and_never_fully_masked(ring_run):
    P, cases, results = ring_run
    for case, per_rank in zip(cases, results):
        if case["data"].get("mask") not in (None, "none"):
            continue
        data = case["data"]
        S, bn = data["S"], data["b"] * data["n"]
        causal = data.get("mask") is None
        for phase in ("forward", "backward"):
            blocks = [res["blocks"] for res in per_rank]
            assert all(bl["blocks"][phase] == P for bl in blocks)
            assert all(bl["empty"].get(phase, 0) == 0 and bl["skipped"].get(phase, 0) == 0 for bl in blocks)
            work = [bl["scores"][phase] - bl["masked"][phase] for bl in blocks]
            flops = [bl["scores"][phase] for bl in blocks]
            assert len(set(work)) == 1 and len(set(flops)) == 1, f"unbalanced {phase} work {work} / {flops}"
            # exactly the causal triangle (or the full square), nothing computed twice
            assert sum(work) == (bn * S * (S + 1) // 2 if causal else bn * S * S)


def test_general_mask_skips_fully_masked_blocks(ring_run):
    P, cases, results = ring_run
    for case, per_rank in zip(cases, results):
        if case["data"].get("mask") != "skip":
            continue
        for res in per_rank:
            for phase in ("forward", "backward"):
                assert res["blocks"]["skipped"][phase] == 1  # ring position 1's block
                assert res["blocks"]["blocks"][phase] == P - 1
                assert res["blocks"]["empty"].get(phase, 0) == 0


# ------------------------------------------------------------------------------------------- errors
def _bad_inputs(P, what):
    import torch.distributed as dist

    from mindspeed_cp.ring import DoubleRingWindow, ring_attention

    r = dist.get_rank()
    s = 4 + (2 if (what == "shape" and r == 0) else 0) + (1 if what == "odd" else 0)
    dtype = torch.bfloat16 if (what == "dtype" and r == P - 1) else torch.float32
    q = torch.randn(s, 1, 4, 8, dtype=dtype)
    kv = torch.randn(s, 1, 3 if what == "heads" else 2, 8, dtype=dtype)
    mask = torch.zeros(1, 1, s, s if what == "mask" else s * P, dtype=torch.bool) if what in ("mask", "both") else None
    window = DoubleRingWindow(3) if what == "window" else None
    ring_attention(q, kv, kv, None, causal=what != "mask", attention_mask=mask, window=window)


@pytest.mark.parametrize(
    "what,match",
    [
        ("shape", r"differ across the 4 ranks.*rank 0: q \[6, 1, 4, 8\].*rank 1: q \[4, 1, 4, 8\]"),
        ("dtype", r"differ across.*bfloat16"),
        ("odd", r"s_local 5 is odd"),
        ("heads", r"query heads 4 are not a multiple of key/value heads 3"),
        ("mask", r"attention_mask must be \[b\|1, heads\|1, s_local\|S, S\]"),
        ("both", r"attention_mask was given with causal=True"),
        ("window", r"--cp-window-size 3 must .* divide the ring size 4"),
    ],
)
def test_bad_inputs_raise_on_every_rank(what, match):
    expect_error_on_every_rank(4, _bad_inputs, 4, what, match=match)
