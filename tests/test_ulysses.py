"""Ulysses context parallelism on real gloo ranks, against float64 full attention.

Every case builds the global q, k, v (and grad of the output) from a seed on every rank, computes the
float64 reference attention on the full sequence with autograd, runs UlyssesContextAttention on this rank's
``torch.tensor_split`` rows, and compares the forward output and dq, dk, dv with the reference rows.
Error = max |ours - ref rows| / max |whole ref| per tensor (absolute when the reference is all zeros, e.g.
dq with a single visible key). Inputs are rounded to the dtype first and the reference uses those rounded
values, so only the computation error counts. Tolerances:
* float32: 1e-5;
* bfloat16 with the naive local attention (float32 inside, like flash-attention): 2e-2;
* bfloat16 with torch's scaled_dot_product_attention: 5e-2 -- its CPU bf16 kernel alone, without any
  context parallelism, is up to 3.4e-2 off float64 on these tiny shapes (measured over 200 seeds).
Cases are batched: one pool call runs a whole list, on one pool of 4 gloo ranks for the whole file.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from mindspeed_cp.stats import count_bytes
from mindspeed_cp.ulysses import (
    DefaultGatherSizeCalculator,
    DistributedAttention,
    DynamicGatherSizeCalculator,
    GatherSizeCalculator,
    UlyssesContextAttention,
    UlyssesError,
    kv_head_repeats,
)
from tests.attention_ref import NaiveLocalAttention, SDPALocalAttention, reference_attention
from tests.dist import expect_error_on_every_rank, run_on_ranks

# float32: relative to the largest float64 reference value (measured at most 5.8e-7). bfloat16: the same local
# attention at CP=1 (the whole sequence and every head, in bfloat16) sets the bar - its own error reaches 2.9e-2
# (dk, SDPA), which a fixed bound of 5e-2 left within 1.7x, and bfloat16 kernels round differently from one CPU to
# another. CP must stay within twice CP=1's error plus four bfloat16 roundings (2^-6): with fewer KV heads than
# ranks the replicas' gradients are summed in bfloat16 (measured excess over 2 x CP=1 at most 3.2e-3).
TOL = {"float32": 1e-5}
BF16_TIMES_CP1, BF16_PLUS_TOL = 2.0, 2.0**-6
WORLD = 4  # one pool of 4 gloo ranks for the whole file (starting a pool costs seconds)
B, D = 2, 4  # batch, head size


class FixedGatherSize(GatherSizeCalculator):
    """A user-defined calculator (seed 002's CustomGatherSizeCalculator pattern)."""

    def __init__(self, size):
        self.size = size

    def calculate(self, *args, **kwargs):
        return self.size


# ----------------------------------------------------------------------------- one case, on one rank
def _rows(seq: int, ranks: int, rank: int) -> slice:
    part = torch.tensor_split(torch.arange(seq), ranks)[rank]
    start = int(part[0]) if len(part) else 0
    return slice(start, start + len(part))


def _run_case(c: dict, group) -> dict:
    """Ulysses vs float64 reference for case ``c`` on this rank of ``group``; returns relative errors."""
    import torch.distributed as dist

    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator().manual_seed(c["seed"])
    dtype = getattr(torch, c["dtype"])
    seq, heads, kv = c["S"], c["h"], c["kv"]
    q, k, v = (torch.randn(seq, B, n, D, generator=gen, dtype=torch.float64).to(dtype) for n in (heads, kv, kv))
    grad_out = torch.randn(seq, B, heads, D, generator=gen, dtype=torch.float64).to(dtype)
    mask = None
    if c["gather"] in ("mask_pos", "mask_kw"):  # general mask, True = masked; the diagonal stays visible
        mask = (torch.rand(B, 1, seq, seq, generator=gen) < 0.4) & ~torch.eye(seq, dtype=torch.bool)

    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal=c["causal"], mask=mask)
    ref.backward(grad_out.double())

    bshd = c["layout"] == "bshd"
    to_layout = (lambda t: t.transpose(0, 1)) if bshd else (lambda t: t)  # sbhd -> layout
    rows = _rows(seq, ranks, rank)
    local = [to_layout(t[rows]).clone().requires_grad_() for t in (q, k, v)]
    attn_cls = SDPALocalAttention if c["local"] == "sdpa" else NaiveLocalAttention
    attn = attn_cls(causal=c["causal"], layout=c["layout"], flatten_output=c["flat"])
    calc = {
        "default": None,
        "mask_pos": DynamicGatherSizeCalculator(),
        "mask_kw": DynamicGatherSizeCalculator(),
        "fixed": FixedGatherSize(seq),
    }[c["gather"]]
    module = UlyssesContextAttention(
        attn,
        group,
        scatter_idx=2,
        gather_idx=1 if bshd else 0,
        gather_size_calculator=calc,
        check_inputs=c.get("check", True),
    )
    args = (mask,) if c["gather"] == "mask_pos" else ()
    kwargs = {"attention_mask": mask} if c["gather"] == "mask_kw" else {}
    out = module(*local, *args, **kwargs)

    want = list(to_layout(ref[rows]).shape)
    if c["flat"]:
        want[-2:] = [heads * D]
    assert list(out.shape) == want and out.dtype == dtype, (c, tuple(out.shape), want)
    go = to_layout(grad_out[rows])
    out.backward(go.flatten(-2) if c["flat"] else go)

    def err(ours, full_ref):  # relative to the whole reference tensor: a shard's rows may all be 0
        if not ours.numel():
            return 0.0
        scale = full_ref.abs().max().item() or 1.0
        return (ours.double() - to_layout(full_ref[rows])).abs().max().item() / scale

    out4 = out.unflatten(-1, (heads, D)) if c["flat"] else out
    refs = [ref] + [t.grad for t in ref_in]
    errors = {
        name: err(ours, r) for name, ours, r in zip(("out", "dq", "dk", "dv"), [out4] + [t.grad for t in local], refs)
    }
    if dtype == torch.bfloat16:  # the same local attention at CP=1: the whole sequence, every head
        whole = [to_layout(t).clone().requires_grad_() for t in (q, k, v)]
        one = attn_cls(causal=c["causal"], layout=c["layout"])(*whole, mask)
        one.backward(to_layout(grad_out))
        errors.update(
            {
                f"{name}@cp1": err(to_layout(to_layout(ours)[rows]), r)
                for name, ours, r in zip(("out", "dq", "dk", "dv"), [one] + [t.grad for t in whole], refs)
            }
        )
    return errors


def _cases_body(cases, group_ranks=None):
    """Run ``cases`` on the world group, or on sub-groups ``group_ranks`` (list of rank lists); ranks in
    no group return None."""
    import torch.distributed as dist

    group = dist.group.WORLD
    if group_ranks is not None:
        group = None
        for ranks in group_ranks:  # new_group is collective: every rank creates every group
            g = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                group = g
    return None if group is None else [_run_case(c, group) for c in cases]


# ----------------------------------------------------------------------------- the case matrix
SHAPES = {  # P: (aligned S, unaligned S, S < P), kv head counts below / equal / above P with their h
    2: ((4, 5, 1), ((1, 4), (2, 4), (4, 8))),
    3: ((6, 7, 2), ((1, 6), (3, 6), (6, 12))),
    4: ((8, 13, 3), ((1, 8), (2, 8), (4, 8), (8, 16))),
}


def _cases(ranks: int):
    """Every S x KV heads x causal x layout x dtype; local attention, output form, how S is given and
    check_inputs drawn per case (seeded), then checked to cover every value."""
    pick = random.Random(ranks)
    seqs, heads = SHAPES[ranks]
    cases = []
    for i, (seq, (kv, h), causal, layout, dtype) in enumerate(
        itertools.product(seqs, heads, (True, False), ("sbhd", "bshd"), ("float32", "bfloat16"))
    ):
        gathers = ["mask_pos", "mask_kw", "fixed"] + (["default"] if seq % ranks == 0 else [])
        cases.append(
            dict(
                S=seq,
                h=h,
                kv=kv,
                causal=causal,
                layout=layout,
                dtype=dtype,
                seed=1000 * ranks + i,
                local=pick.choice(["naive", "sdpa"]),
                flat=pick.choice([False, True]),
                gather=pick.choice(gathers),
                check=pick.random() > 0.2,
            )
        )
    for key in ("local", "flat", "check"):
        assert len({c[key] for c in cases}) == 2, key
    assert {c["gather"] for c in cases} == {"mask_pos", "mask_kw", "fixed", "default"}
    return cases


def _check(cases, results, worst):
    results = [r for r in results if r is not None]
    assert results
    for c, per_rank in zip(cases, zip(*results)):
        for errors in per_rank:
            for name in ("out", "dq", "dk", "dv"):
                e, kind = errors[name], (c["dtype"], c["local"])
                worst[kind] = max(worst.get(kind, 0.0), e)
                bound = TOL.get(c["dtype"]) or BF16_TIMES_CP1 * errors[f"{name}@cp1"] + BF16_PLUS_TOL
                assert e <= bound, f"{name} error {e:.2e} > {bound:.2e} in {c}"


GROUPS = {2: [[0, 2], [1, 3]], 3: [[0, 1, 2]], 4: None}  # P=2 interleaved: group ranks are not global ranks


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_forward_and_grads_match_full_attention(ranks, capsys):
    cases = _cases(ranks)
    worst = {}
    _check(cases, run_on_ranks(WORLD, _cases_body, cases, group_ranks=GROUPS[ranks]), worst)
    with capsys.disabled():
        print(
            f"\n[ulysses P={ranks}] {len(cases)} cases, max relative error "
            + ", ".join(f"{d}/{local} {v:.2e}" for (d, local), v in sorted(worst.items()))
        )


def test_single_rank_group_is_plain_attention():
    cases = [
        dict(
            S=5,
            h=4,
            kv=2,
            causal=False,
            layout="sbhd",
            dtype="float32",
            seed=3,
            local="sdpa",
            flat=True,
            gather="mask_pos",
        )
    ]
    _check(cases, run_on_ranks(WORLD, _cases_body, cases, group_ranks=[[0], [1], [2], [3]]), {})


# ----------------------------------------------------------------------------- the all-to-all itself
def _a2a_body():
    """Uneven all-to-all on ranks [0, 1, 2], gather dim 0 (sizes 2, 0, 3), scatter dim 2 (sizes 1, 2, 3)."""
    import torch.distributed as dist

    from mindspeed_cp.comm import all_to_all

    group = dist.new_group([0, 1, 2])
    if dist.get_rank() == 3:
        return None
    rank = dist.get_rank(group)
    rows, cols = [2, 0, 3], [1, 2, 3]
    starts_r, starts_c = [0, 2, 2], [0, 1, 3]
    g = torch.arange(5 * 4 * 6, dtype=torch.float64).reshape(5, 4, 6)
    w = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mine_r = slice(starts_r[rank], starts_r[rank] + rows[rank])
    mine_c = slice(starts_c[rank], starts_c[rank] + cols[rank])
    x = g[mine_r].clone().requires_grad_()
    # [rows_r, 4, 6] -> [5, 4, cols_r]
    y = all_to_all(x, group, scatter_dim=2, gather_dim=0, scatter_sizes=cols, gather_sizes=rows)
    (y * w[:, :, mine_c]).sum().backward()
    return torch.equal(y, g[:, :, mine_c]), torch.equal(x.grad, w[mine_r])


def test_uneven_all_to_all_and_its_inverse_backward():
    assert run_on_ranks(WORLD, _a2a_body) == [(True, True)] * 3 + [None]


# ----------------------------------------------------------------------------- communication volume
def _bytes_body(seq, heads, kv):
    import torch.distributed as dist

    ranks, rank = dist.get_world_size(), dist.get_rank()
    rows = _rows(seq, ranks, rank)
    q, k, v = (torch.randn(rows.stop - rows.start, B, n, D, requires_grad=True) for n in (heads, kv, kv))
    module = UlyssesContextAttention(
        NaiveLocalAttention(causal=True), dist.group.WORLD, gather_size_calculator=FixedGatherSize(seq)
    )
    with count_bytes() as stats:
        out = module(q, k, v)
        out.backward(torch.ones_like(out))
    return rows.stop - rows.start, dict(stats.by_kind), dict(stats.messages)


@pytest.mark.parametrize("seq,heads,kv", [(8, 8, 8), (8, 8, 4), (8, 8, 2), (13, 8, 8), (3, 8, 1)])
def test_bytes_match_textbook_ulysses_volume(seq, heads, kv):
    """Per rank, forward+backward sends 8 all-to-alls: q, k, v and out forward; d_out, dq, dk, dv backward.

    Each a2a of a [s_r, b, n, d] sequence shard keeps 1/P of the heads and sends (P-1)/P * s_r*b*n*d
    elements; each a2a of an [S, b, n/P, d] head shard keeps its own s_r rows and sends (S - s_r)*b*n/P*d.
    Summed: b*d*e*(2h + 2hk')/P * ((P-2)*s_r + S), with hk' = max(hk, P) the KV heads after the GQA repeat.
    Aligned (s_r = s = S/P) this is 2*(P-1)/P * s*b*d*(2h + 2hk')*e: docs/design.md's textbook formula, which
    holds as written for MHA and GQA with hk >= P; with hk < P the replicated heads are sent, so hk' = P.
    Unaligned, the ranks differ but their sum is P times the formula with s = S/P.
    The one metadata all-gather of the input check is counted apart ("metadata").
    """
    ranks, e = WORLD, 4
    results = run_on_ranks(WORLD, _bytes_body, seq, heads, kv)
    kv_sent = max(kv, ranks)
    for s_r, by_kind, messages in results:
        assert messages["all_to_all"] == 8
        assert by_kind["all_to_all"] == B * D * e * (2 * heads + 2 * kv_sent) * ((ranks - 2) * s_r + seq) // ranks
        assert messages["metadata"] == 1 and by_kind["metadata"] < 1024
    total = sum(by_kind["all_to_all"] for _, by_kind, _ in results)
    textbook = 2 * (ranks - 1) / ranks * (seq / ranks) * B * D * (2 * heads + 2 * kv_sent) * e
    assert total == pytest.approx(ranks * textbook, rel=1e-12)
    if seq % ranks == 0:
        assert all(by_kind["all_to_all"] == pytest.approx(textbook, rel=1e-12) for _, by_kind, _ in results)


# ----------------------------------------------------------------------------- bad inputs fail everywhere
class _Boom(GatherSizeCalculator):
    def calculate(self, *args, **kwargs):
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise RuntimeError("boom")
        return None


def _bad_body(mode):
    import torch.distributed as dist

    rank = dist.get_rank()
    seq_local, heads, kv, batch, dtype, calc, grad = 2, 8, 8, B, torch.float32, None, True
    attn = NaiveLocalAttention()
    if mode == "gather_contradicts_rank0":  # S=13 needs [4, 3, 3, 3]: only rank 0 sees it locally
        seq_local, calc = 3, FixedGatherSize(13)
    elif mode == "gather_contradicts_rank3":  # S=12 needs [3, 3, 3, 3]: rank 3 holds 4
        seq_local, calc = (4 if rank == 3 else 3), FixedGatherSize(12)
    elif mode == "gather_differs":  # every rank consistent with its own S, but the S differ
        seq_local, calc = 2, FixedGatherSize(8 if rank == 0 else 9)  # [2, 2, 2, 2] vs [3, 2, 2, 2]
    elif mode == "gather_zero":
        seq_local, calc = 0, FixedGatherSize(0)
    elif mode == "aligned_empty":  # S < P must be declared: aligned means S = 0 here
        seq_local = 0
    elif mode == "aligned_lengths_differ":
        seq_local = 3 if rank == 2 else 2
    elif mode == "heads":
        heads = kv = 6
    elif mode == "heads_one_rank":
        heads = kv = 6 if rank == 1 else 8
    elif mode == "gqa_not_grouped":
        kv = 3
    elif mode == "gqa_kv_below_p":
        heads, kv = 12, 3
    elif mode == "gqa_kv_above_p":
        heads, kv = 24, 6
    elif mode == "batch_differs":
        batch = 3 if rank == 2 else B
    elif mode == "dtype_differs":
        dtype = torch.bfloat16 if rank == 1 else torch.float32
    elif mode == "grad_differs":
        grad = rank != 3
    elif mode == "calculator_raises":
        calc = _Boom()
    elif mode == "bad_output":
        attn = lambda q, k, v: q[:-1]  # noqa: E731 - drops a token
    q, k, v = (torch.randn(seq_local, batch, n, D, dtype=dtype, requires_grad=grad) for n in (heads, kv, kv))
    module = UlyssesContextAttention(attn, dist.group.WORLD, gather_size_calculator=calc)
    module(q, k, v).sum().backward()


BAD = {
    "gather_contradicts_rank0": r"gather size 13 over 4 ranks means rank 0 holds 4 tokens",
    "gather_contradicts_rank3": r"rank 3: gather size 12 over 4 ranks means rank 3 holds 3 tokens",
    "gather_differs": r"differ across the ranks of the Ulysses group",
    "gather_zero": r"positive global sequence length",
    "aligned_empty": r"query holds 0 tokens along dim 0: aligned Ulysses needs the same non-zero",
    "aligned_lengths_differ": r"same local sequence length on every rank, got \[2, 2, 3, 2\]",
    "heads": r"query has 6 heads, not divisible by the 4 ranks of the Ulysses group \(on every rank\)",
    "heads_one_rank": r"rank 1: query has 6 heads, not divisible by the 4 ranks",
    "gqa_not_grouped": r"query has 8 heads and key/value 3",
    "gqa_kv_below_p": r"key/value have 3 heads, fewer than the 4 ranks .* not a divisor of 4",
    "gqa_kv_above_p": r"key/value have 6 heads, not divisible by the 4 ranks",
    "batch_differs": r"differ across the ranks.*rank 2: query \(2, 3, 8, 4\)",
    "dtype_differs": r"differ across the ranks.*rank 1: query \(2, 2, 8, 4\) bfloat16",
    "grad_differs": r"requires_grad",
    "calculator_raises": r"rank 1: RuntimeError: boom",
    "bad_output": r"local attention returned \(7, 2, 2, 4\)",
}


@pytest.mark.parametrize("mode", sorted(BAD))
def test_bad_input_fails_on_every_rank(mode):
    errors = expect_error_on_every_rank(WORLD, _bad_body, mode, match=BAD[mode])
    assert all(e.type in ("UlyssesError", "ValueError") for e in errors), errors


# ----------------------------------------------------------------------------- pure parts
def test_public_api_and_calculators():
    assert DistributedAttention is UlyssesContextAttention
    with pytest.raises(TypeError):
        GatherSizeCalculator()
    mask = torch.zeros(2, 1, 9, 11, dtype=torch.bool)
    dyn = DynamicGatherSizeCalculator()
    assert dyn.calculate(mask) == 11 and dyn.calculate(attention_mask=mask) == 11
    assert dyn.calculate(mask, attention_mask=None) == 11
    assert dyn.calculate() is None and dyn.calculate(None) is None and dyn.calculate([mask]) is None
    assert DefaultGatherSizeCalculator().calculate(mask, attention_mask=mask) is None
    assert issubclass(UlyssesError, ValueError)
    with pytest.raises(UlyssesError, match="must name two different dims"):
        UlyssesContextAttention(NaiveLocalAttention(), None, scatter_idx=0, gather_idx=0)


@pytest.mark.parametrize(
    "heads,kv,ranks,repeats",
    [(8, 2, 4, 2), (8, 1, 4, 4), (8, 4, 4, 1), (8, 8, 4, 1), (16, 8, 4, 1), (6, 1, 3, 3), (4, 2, 2, 1)],
)
def test_kv_head_repeats_rule(heads, kv, ranks, repeats):
    assert kv_head_repeats(heads, kv, ranks) == repeats
    # Every rank's query heads use exactly the KV heads it receives (the rule's whole point).
    kv_sent = kv * repeats
    for r in range(ranks):
        q_heads = range(r * heads // ranks, (r + 1) * heads // ranks)
        received = [j // repeats for j in range(r * kv_sent // ranks, (r + 1) * kv_sent // ranks)]
        used = sorted({i // (heads // kv) for i in q_heads})
        assert sorted(set(received)) == used and len(received) == len(used)
