"""Bad inputs and failing ranks: the same clear error on every rank of the whole CP group, never a hang.

Every case runs on 4 real gloo ranks through the public API (or the Megatron path) and asserts that *every*
rank raised (the pool reports a rank still blocked after the others failed as a "Hang") with a message that
names the global rank and what it passed. Hybrid groups here: Ulysses [0, 1], [2, 3]; ring [0, 2], [1, 3]
(U=2 x R=2), so a mismatch inside one Ulysses group used to hang the other group in its ring.

Also: NaN propagation through the fused kernel and the ring merge (the NaN rows equal float64 dense
attention's exactly), strict configure() types, and fault handling (a rank raising mid-forward makes the
others stop with :class:`mindspeed_cp.comm.PeerFailure` within the configured group timeout).
"""

import math
import time

import pytest
import torch

from tests.dist import expect_error_on_every_rank, run_on_ranks, run_outcomes

TOL = 1e-5  # float32 attention against float64, relative / absolute as each test states

WORLD = 4


def _hybrid_groups():
    import torch.distributed as dist

    r = dist.get_rank()
    uly = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in one order
    ring = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return uly[r // 2], ring[r % 2]


# ----------------------------------------------------------------------------- hybrid: one error for all
def _hybrid_bad(mode, whole_group):
    import torch.distributed as dist

    from mindspeed_cp.hybrid import hybrid_attention

    r = dist.get_rank()
    ug, rg = _hybrid_groups()
    s, heads, grad, scale, mask, causal = 4, 4, True, None, None, True
    if mode == "heads" and r == 2:
        heads = 2
    if mode == "short" and r == 3:
        s = 3
    if mode == "no_grad" and r == 3:
        grad = False
    if mode == "scale" and r == 1:
        scale = 0.5
    if mode == "mask_shape":
        mask, causal = torch.zeros(1, 1, 8, 16, dtype=torch.bool), False  # neither s/CP = 4 nor S = 16 rows
    if mode == "mask_one_rank":
        mask, causal = torch.zeros(1, 1, 3 if r == 1 else 4, 16, dtype=torch.bool), False
    q, k, v = (torch.randn(s, 1, heads, 8, requires_grad=grad) for _ in range(3))
    out = hybrid_attention(
        q,
        k,
        v,
        ug,
        rg,
        causal=causal,
        attention_mask=mask,
        softmax_scale=scale,
        agree_group=dist.group.WORLD if whole_group else None,
    )
    out.sum().backward()


HYBRID_BAD = {
    "heads": r"differ across the ranks of the CP group.*rank 0: query \(4, 1, 4, 8\).*rank 2: query \(4, 1, 2, 8\)",
    "short": r"same local sequence length on every rank, got \[4, 4, 4, 3\] \(ranks \[0, 1, 2, 3\]\)",
    "no_grad": r"rank 2: query \(4, 1, 4, 8\) float32 cpu requires_grad.*rank 3: query \(4, 1, 4, 8\) float32 cpu,",
    "scale": r"ring attention inputs differ.*rank 0: .*softmax_scale=0.353553.*rank 1: .*softmax_scale=0.5",
    "mask_shape": r"attention_mask must be \[b\|1, 1, s/CP\|S, S\] = \[1\|1, 1, 4\|16, 16\].*got \[1, 1, 8, 16\] "
    r"\(on every rank\)",
    "mask_one_rank": r"^hybrid attention inputs rejected on rank 1: attention_mask must be .* got \[1, 1, 3, 16\]$",
}


@pytest.mark.parametrize("whole_group", [False, True], ids=["two-groups", "agree-group"])
@pytest.mark.parametrize("mode", sorted(HYBRID_BAD))
def test_hybrid_bad_input_stops_the_whole_cp_group(mode, whole_group):
    start = time.monotonic()
    errors = expect_error_on_every_rank(WORLD, _hybrid_bad, mode, whole_group, match=HYBRID_BAD[mode], timeout=60)
    assert {e.type for e in errors} == {"RingAttentionError"}, errors
    assert len({e.message for e in errors}) == 1, "every rank must raise the same message"
    assert time.monotonic() - start < 30


def _hybrid_full_mask():
    import torch.distributed as dist

    from mindspeed_cp.config import CPConfig
    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.layout.sharding import token_indices
    from tests.attention_ref import reference_attention

    ug, rg = _hybrid_groups()
    S, g = 16, torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(S, 2, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.rand(2, 1, S, S, generator=g) < 0.3
    mask[:, :, 6] = True
    ref = reference_attention(q, k, v, causal=False, mask=mask)
    cfg = CPConfig(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    idx = token_indices(cfg, dist.get_rank(), S)
    errs = []
    for m in (mask, mask[:, :, idx]):  # the full [b, 1, S, S] mask and this rank's rows give the same result
        out = hybrid_attention(q[idx].float(), k[idx].float(), v[idx].float(), ug, rg, causal=False, attention_mask=m)
        errs.append(float((out.double() - ref[idx]).abs().max()))
    return errs


def test_hybrid_takes_the_full_mask_like_ring():
    for errs in run_on_ranks(WORLD, _hybrid_full_mask):
        assert max(errs) < TOL, errs


# ----------------------------------------------------------------------------- ring: everything agreed
def _ring_bad(mode):
    import torch.distributed as dist

    from mindspeed_cp.ring import ring_attention

    r = dist.get_rank()
    s, grad, scale, overlap, device = 4, True, None, None, {}
    if mode == "empty":
        s = 0
    if mode == "empty_one" and r == 2:
        s = 0
    if mode == "scale":
        scale = 0.25 if r == 0 else 0.5
    if mode == "requires_grad" and r == 2:
        grad = False
    if mode == "device" and r == 1:
        device = dict(device="meta")
    if mode == "overlap_group":  # a second communicator, but over the wrong ranks
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        overlap = halves[r // 2]
    q, k, v = (torch.randn(s, 1, 4, 8, requires_grad=grad, **device) for _ in range(3))
    if mode == "mixed_device" and r == 0:
        k = torch.randn(s, 1, 4, 8, device="meta")
    ctx = torch.no_grad() if mode == "no_grad" and r == 1 else torch.enable_grad()
    with ctx:
        out = ring_attention(q, k, v, None, softmax_scale=scale, overlap_group=overlap)
    out.sum().backward()


RING_BAD = {
    "empty": r"q is \[0, 1, 4, 8\]: every ring rank needs a non-empty shard.*\(on every rank\)",
    "empty_one": r"^ring attention inputs rejected on rank 2: q is \[0, 1, 4, 8\]: every ring rank needs",
    "scale": r"differ across the 4 ranks.*rank 0: .*softmax_scale=0.25,.*rank 1: .*softmax_scale=0.5",
    "no_grad": r"differ.*rank 0: q \[4, 1, 4, 8\] float32 cpu requires_grad.*rank 1: q \[4, 1, 4, 8\] float32 cpu,",
    "requires_grad": r"differ.*rank 2: q \[4, 1, 4, 8\] float32 cpu,",
    "device": r"differ.*rank 0: q \[4, 1, 4, 8\] float32 cpu.*rank 1: q \[4, 1, 4, 8\] float32 meta",
    "mixed_device": r"rejected on rank 0: q, k, v and attention_mask must be on one device",
    "overlap_group": r"rank 0: overlap_group must be a second communicator over the ring group's ranks "
    r"\[0, 1, 2, 3\] in the same order, got \[0, 1\]",
}


@pytest.mark.parametrize("mode", sorted(RING_BAD))
def test_ring_bad_input_raises_on_every_rank(mode):
    errors = expect_error_on_every_rank(WORLD, _ring_bad, mode, match=RING_BAD[mode], timeout=60)
    assert {e.type for e in errors} == {"RingAttentionError"}, errors


def _ulysses_device():
    import torch.distributed as dist

    from mindspeed_cp.local import local_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention

    extra = dict(device="meta") if dist.get_rank() == 3 else {}
    q, k, v = (torch.randn(2, 1, 4, 8, requires_grad=True, **extra) for _ in range(3))
    UlyssesContextAttention(local_attention, dist.group.WORLD)(q, k, v).sum().backward()


def test_ulysses_agrees_on_the_device():
    expect_error_on_every_rank(
        WORLD,
        _ulysses_device,
        timeout=60,
        match=r"rank 0: query \(2, 1, 4, 8\) float32 cpu requires_grad.*"
        r"rank 3: query \(2, 1, 4, 8\) float32 meta requires_grad",
    )


# ----------------------------------------------------------------------------- NaN is never hidden
def _nan_case(kind):
    import torch.distributed as dist

    from mindspeed_cp.ring import ring_attention, zigzag_index
    from tests.attention_ref import reference_attention

    P, r, S = dist.get_world_size(), dist.get_rank(), 32
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(S, 1, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    if kind == "causal":
        k[0, 0, 1] = math.nan  # every row of head 1 sees key 0 (row 0 sees only it)
        k[17, 0, 0] = math.nan
    else:
        mask = torch.rand(1, 1, S, S, generator=g) < 0.5
        mask[:, :, 10] = True
        mask[:, :, 10, 20] = False  # row 10 sees only key 20, which is NaN
        k[20, 0, :] = math.nan
        mask[:, :, :, 20] |= torch.arange(S) > 12  # rows after 12 do not see it
    ref = reference_attention(q, k, v, causal=mask is None, mask=mask)
    idx = zigzag_index(S, P, r)
    out = ring_attention(
        q[idx].float(),
        k[idx].float(),
        v[idx].float(),
        None,
        causal=mask is None,
        attention_mask=None if mask is None else mask[:, :, idx],
        kernel="torch",
    )
    want, got = ref[idx].isnan(), out.isnan()
    return (
        int(want.sum()),
        int(got.sum()),
        bool((want == got).all()),
        float((out.double() - ref[idx])[~want].abs().max()),
    )


@pytest.mark.parametrize("kind", ["causal", "general"])
def test_nan_rows_propagate_like_dense_attention(kind):
    results = run_on_ranks(WORLD, _nan_case, kind)
    assert sum(w for w, *_ in results) > 0
    for want, got, same, err in results:
        assert same, f"NaN rows: expected {want} values, got {got}"
        assert err < TOL


def test_fused_kernel_returns_nan_where_the_math_kernel_does():
    from mindspeed_cp.kernels import MathKernel, TorchFusedKernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    k[0, 1, 0] = math.nan  # head 1's first key: row 0's only visible key under causal
    k[0, 0, 4] = math.inf
    for causal, mask in ((True, None), (False, None), (False, torch.rand(1, 1, 6, 6, generator=g) < 0.5)):
        fo, fl = TorchFusedKernel().forward(q, k, v, scale=0.3, causal=causal, mask=mask)
        mo, ml = MathKernel().forward(q, k, v, scale=0.3, causal=causal, mask=mask)
        rows = mo.isnan().all(-1)
        assert rows.any() and torch.equal(fo.isnan().all(-1), rows) and torch.equal(fl.isnan(), rows), (causal, mask)
        assert torch.allclose(fo[~rows], mo[~rows].to(fo.dtype), atol=1e-6)
    # A non-finite value reaches the rows that see its key, and only those (dense math would also turn the
    # masked rows' 0 * inf into NaN; the contract is the rows that attend to it).
    v = torch.randn(1, 1, 6, 8, generator=g)
    v[0, 0, 3, 1] = math.inf
    fo, _ = TorchFusedKernel().forward(q[:, :1], k[:, :1].nan_to_num(), v, scale=0.3, causal=True)
    assert fo.isnan().all(-1)[0, 0].tolist() == [False] * 3 + [True] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_non_finite_rows_are_found_exactly(dtype):
    """The poisoning's detector: a row is bad iff one of its elements is NaN or +-inf - the largest finite
    values of the dtype, whose plain sum would overflow, are not."""
    from mindspeed_cp.kernels import _bad

    big = torch.finfo(dtype).max
    x = torch.zeros(6, 64, dtype=dtype)
    x[0] = big  # sums past the dtype's range
    x[1, ::2], x[1, 1::2] = big, -big
    x[2, 5] = math.inf
    x[3, 7], x[3, 9] = math.inf, -math.inf
    x[4, 0] = math.nan
    x[5] = -big
    assert _bad(x).tolist() == [False, False, True, True, True, False]


# ----------------------------------------------------------------------------- configure(): strict types
@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(use_cp_send_recv_overlap="false"), r"--use-cp-send-recv-overlap must be True or False, got 'false'"),
        (dict(megatron_cp_in_bnsd=1), r"--megatron-cp-in-bnsd must be True or False, got 1"),
        (dict(context_parallel_size=2.0), r"--context-parallel-size 2.0 must be a positive integer"),
        (dict(cp_window_size=True), r"--cp-window-size True must be an integer"),
        (dict(context_parallel_algo=3), r"--context-parallel-algo 3 is not one of"),
        (dict(distributed_timeout_minutes=0), r"distributed_timeout_minutes 0 must be a positive number"),
    ],
)
def test_configure_takes_real_booleans_and_positive_ints(flags, match):
    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.config import CPConfigError
    from mindspeed_cp.megatron.state import STATE

    try:
        with pytest.raises(CPConfigError, match=match):
            adaptor.configure(**flags)
    finally:
        STATE.reset()


def test_configure_refuses_tensor_parallel_zero():
    from types import SimpleNamespace

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.config import CPConfigError
    from mindspeed_cp.megatron.state import STATE

    try:
        with pytest.raises(CPConfigError, match=r"--tensor-model-parallel-size 0 must be a positive integer"):
            adaptor.configure(SimpleNamespace(tensor_model_parallel_size=0), context_parallel_size=2)
    finally:
        STATE.reset()


@pytest.mark.parametrize(
    "flags",
    [
        dict(context_parallel_algo="ulysses_cp_algo", use_cp_send_recv_overlap=True),
        dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=3),
        dict(context_parallel_algo="megatron_cp_algo", cp_window_size=2),
        dict(context_parallel_algo="ulysses_cp_algo", cp_window_size=4, megatron_cp_in_bnsd=True),
    ],
)
def test_cp1_checks_types_only(flags):
    """CP=1 runs no CP algorithm: a launch script keeps its CP flags for its baseline (documented)."""
    from mindspeed_cp.config import CPConfig, CPConfigError

    CPConfig(context_parallel_size=1, **flags).validate()
    with pytest.raises(CPConfigError):
        CPConfig(context_parallel_size=1, **dict(flags, use_cp_send_recv_overlap="yes")).validate()


# ----------------------------------------------------------------------------- faults: bounded waits
def _raise_mid_forward(algo, minutes, stay):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention

    flags = dict(ulysses_degree_in_cp=2) if algo == "hybrid_cp_algo" else {}
    adaptor.configure(context_parallel_size=4, context_parallel_algo=algo, distributed_timeout_minutes=minutes, **flags)
    ps.initialize_model_parallel(context_parallel_size=4)
    r = dist.get_rank()
    q, k, v = (torch.randn(4, 1, 4, 8, requires_grad=True) for _ in range(3))

    class Boom(RuntimeError):
        pass

    def local(q_, k_, v_):  # rank 1 fails between the two all-to-alls, and stays alive
        if r == 1:
            raise Boom("rank 1 failed inside its local attention")
        return q_

    start = time.monotonic()
    try:
        if algo == "ulysses_cp_algo":
            UlyssesContextAttention(local, STATE.group("ulysses"), agree_group=STATE.agree_group)(q, k, v)
        elif algo == "megatron_cp_algo":
            if r == 1:
                raise Boom("rank 1 failed before its ring attention")
            ring_attention(q, k, v, STATE.group("ring"), agree_group=STATE.agree_group)
        elif algo == "kvallgather_cp_algo":
            if r == 1:
                raise Boom("rank 1 failed before its all-gather K/V attention")
            kvallgather_attention(q, k, v, STATE.group("allgather"), agree_group=STATE.agree_group)
        else:
            if r == 1:
                raise Boom("rank 1 failed before its hybrid attention")
            hybrid_attention(q, k, v, STATE.group("ulysses"), STATE.group("ring"), agree_group=STATE.agree_group)
    except Boom:
        if stay:  # the failed rank stays alive (a caught exception, a debugger): the others must not wait forever
            time.sleep(minutes * 60 + 5)
        raise
    except Exception as e:  # noqa: BLE001 - report how long it took to fail, then fail
        raise type(e)(f"[after {time.monotonic() - start:.1f}s] {e}") from e


@pytest.mark.parametrize(
    "algo,stay",
    [
        ("ulysses_cp_algo", True),
        ("megatron_cp_algo", True),
        ("ulysses_cp_algo", False),
        ("megatron_cp_algo", False),
        ("hybrid_cp_algo", False),
        ("kvallgather_cp_algo", False),
    ],
)
def test_a_rank_raising_mid_forward_stops_every_rank_within_the_timeout(algo, stay):
    """The failed rank either stays alive (others wait the group timeout, then raise) or tears down its process
    groups as an exiting process does (others raise at once). Either way: PeerFailure, never a hang."""
    minutes = 1 / 3  # 20 s
    start = time.monotonic()
    results = run_outcomes(WORLD, _raise_mid_forward, algo, minutes, stay, timeout=120, grace=90, restart=True)
    took = time.monotonic() - start
    assert results[1].type == "Boom", results
    for r in (0, 2, 3):
        e = results[r]
        assert getattr(e, "type", None) == "PeerFailure", (r, e)
        assert "a peer did not take part in time" in e.message and "--distributed-timeout-minutes" in e.message
        waited = float(e.message.split("[after ")[1].split("s]")[0])
        if stay:
            assert 0.9 * minutes * 60 <= waited <= minutes * 60 + 10, (r, waited)
        else:
            assert waited < 5, (r, waited)
    assert took < 90


def _megatron_ulysses_mask(bad_rank):
    import torch.distributed as dist

    from mindspeed_cp.local import local_attention
    from mindspeed_cp.megatron.attention import _StateGatherSize
    from mindspeed_cp.ulysses import UlyssesContextAttention

    r, s = dist.get_rank(), 2
    mask = torch.zeros(1, 1, 3 if r == bad_rank else s, 8, dtype=torch.bool)
    q, k, v = (torch.randn(s, 1, 4, 8, requires_grad=True) for _ in range(3))
    attn = UlyssesContextAttention(
        lambda q_, k_, v_, m: local_attention(q_, k_, v_, causal=True),
        dist.group.WORLD,
        gather_size_calculator=_StateGatherSize(s, 4),
    )
    attn(q, k, v, mask)


def test_megatron_ulysses_path_agrees_on_the_mask_rows():
    expect_error_on_every_rank(
        WORLD,
        _megatron_ulysses_mask,
        2,
        timeout=60,
        match=r"^Ulysses inputs rejected on rank 2: ValueError: attention_mask \[1, 1, 3, 8\] "
        r"does not fit this rank's 2 tokens of a 8-token sequence",
    )
