"""A megatron-core GPT with CP equals the same GPT at CP=1: per-token losses and CP-summed gradients.

Each case runs on TP*CP gloo ranks. The reference is the same model (same TP, CP=1, weights copied) on the
full sequence; the CP model gets its batch from Megatron's own ``get_batch_on_this_cp_rank`` (patched),
its per-token losses are mapped back to global positions by the split ``position_ids``, and its
gradients are summed over the CP group (each CP rank holds part of the tokens of one sequence).
Loss = sum over tokens / (b*S) in both, so the CP-summed gradients must equal the reference's.
Tolerances (fp32): losses 2e-6 absolute on values ~5, gradients 1e-5 relative to the largest gradient.
"""

import pytest

from tests import features
from tests.dist import expect_error_on_every_rank, run_on_ranks

LOSS_TOL = 2e-6
GRAD_TOL = 1e-5


def _gpt_case(case):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    import mindspeed_cp.megatron_adaptor as adaptor  # first, like a user's script: before Megatron's names are bound
    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel

    tp, cp, seq, b = case["tp"], case["cp"], case["seq"], case.get("batch", 2)
    heads, kv = case.get("heads", 4), case.get("kv_heads")
    general = case.get("attention_mask_type") == "general"
    batch = fixed_batch(batch=b, seq=seq, seed=case.get("seed", 0))
    if general:
        # a causal mask with some extra masked keys (True = masked); the first key stays visible
        g = torch.Generator().manual_seed(1)
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1).expand(b, 1, seq, seq).clone()
        mask |= torch.rand(b, 1, seq, seq, generator=g) < 0.2
        mask[..., 0] = False
        for row in case.get("dead_rows", ()):  # fully masked rows: Megatron's local attention averages V there
            mask[:, :, row] = True
        batch["attention_mask"] = mask

    def loss_and_grads(model, data, total):
        per_token = model(data["tokens"], data["position_ids"], data.get("attention_mask"), labels=data["labels"])
        loss = per_token.sum() / total
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return per_token.detach(), grads

    # reference: CP = 1, same TP
    init_parallel(tp=tp, cp=1)
    layers = case.get("num_layers", 2)
    model_fields = case.get("model", {})  # TransformerConfig overrides for both models
    ref_model = build_gpt(heads=heads, kv_heads=kv, seq=seq, seed=7, num_layers=layers, **model_fields)
    ref_loss, ref_grads = loss_and_grads(ref_model, dict(batch), b * seq)
    state = ref_model.state_dict()
    ps.destroy_model_parallel()

    flags = {
        k: case[k]
        for k in (
            "context_parallel_algo",
            "ulysses_degree_in_cp",
            "cp_window_size",
            "use_cp_send_recv_overlap",
            "megatron_cp_in_bnsd",
            "attention_mask_type",
            "context_parallel_kv_cache_policy",
            "context_parallel_cache_interval",
            "use_ulysses_allgather_kv",
            "cp_allgather_overlap",
            "hybrid_outer_cp_algo",
        )
        if k in case
    }
    adaptor.configure(context_parallel_size=cp, **flags)
    init_parallel(tp=tp, cp=cp)
    model = build_gpt(heads=heads, kv_heads=kv, seq=seq, seed=11, num_layers=layers, **model_fields)
    model.load_state_dict(state)
    local = get_batch_on_this_cp_rank(dict(batch))
    from mindspeed_cp.stats import count_bytes

    with count_bytes() as sent:
        loss, grads = loss_and_grads(model, local, b * seq)
    policies = [m._mindspeed_cp.kv_cache_policy for m in model.modules() if hasattr(m, "_mindspeed_cp")]

    cp_group = ps.get_context_parallel_group()
    # per-token losses back to global positions
    full = torch.zeros(b, seq)
    full.scatter_(1, local["position_ids"], loss)
    seen = torch.zeros(b, seq)
    seen.scatter_(1, local["position_ids"], torch.ones_like(loss))
    dist.all_reduce(full, group=cp_group)
    dist.all_reduce(seen, group=cp_group)
    for g in grads.values():
        dist.all_reduce(g, group=cp_group)
    assert set(grads) == set(ref_grads)
    gmax = max(float(g.abs().max()) for g in ref_grads.values())
    return {
        "tokens_held": int(loss.numel()),
        "every_token_once": bool((seen == 1).all()),
        "loss_err": float((full - ref_loss).abs().max()),
        "loss_err_by_position": [round(float(e), 6) for e in (full - ref_loss).abs().amax(0)],
        "loss_scale": float(ref_loss.abs().max()),
        "grad_err": max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads) / gmax,
        "worst_param": max(grads, key=lambda n: float((grads[n] - ref_grads[n]).abs().max())),
        "kv_cache_policies": policies,  # per layer, in order
        "sent": dict(sent.by_kind),
    }


def _check(world, case):
    results = run_on_ranks(world, _gpt_case, case)
    for rank, r in enumerate(results):
        assert r["every_token_once"], (rank, r)
        assert r["loss_err"] <= LOSS_TOL * max(1.0, r["loss_scale"]), (rank, r)
        assert r["grad_err"] <= GRAD_TOL, (rank, r)
    return results


ULYSSES_CASES = [
    pytest.param(2, dict(tp=1, cp=2, seq=32), id="cp2"),
    pytest.param(4, dict(tp=1, cp=4, seq=32), id="cp4"),
    pytest.param(4, dict(tp=2, cp=2, seq=32), id="tp2-cp2"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, heads=8, kv_heads=2), id="cp4-gqa-kv2-replicated"),
    pytest.param(4, dict(tp=2, cp=2, seq=32, heads=8, kv_heads=2), id="tp2-cp2-gqa"),
    pytest.param(4, dict(tp=1, cp=4, seq=30), id="cp4-unaligned-30"),
    pytest.param(2, dict(tp=1, cp=2, seq=31, heads=4, kv_heads=2), id="cp2-unaligned-31-gqa"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, attention_mask_type="general"), id="cp4-general-mask"),
    pytest.param(
        4, dict(tp=1, cp=4, seq=32, attention_mask_type="general", dead_rows=(5, 20)), id="cp4-general-dead-rows"
    ),
]


@pytest.mark.parametrize("world,case", ULYSSES_CASES)
def test_ulysses_gpt_matches_cp1(world, case):
    _check(world, dict(case, context_parallel_algo="ulysses_cp_algo"))


RING_CASES = [
    pytest.param(2, dict(tp=1, cp=2, seq=32), id="cp2"),
    pytest.param(4, dict(tp=1, cp=4, seq=32), id="cp4"),
    pytest.param(4, dict(tp=2, cp=2, seq=32), id="tp2-cp2"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, cp_window_size=2), id="cp4-double-ring-w2"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, attention_mask_type="general"), id="cp4-general-mask"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, use_cp_send_recv_overlap=True), id="cp4-overlap"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, megatron_cp_in_bnsd=True, heads=8, kv_heads=2), id="cp4-bnsd-gqa"),
    pytest.param(
        4,
        dict(
            tp=1,
            cp=4,
            seq=32,
            cp_window_size=2,
            use_cp_send_recv_overlap=True,
            megatron_cp_in_bnsd=True,
            attention_mask_type="general",
        ),
        id="cp4-all-options",
    ),
    pytest.param(
        4, dict(tp=1, cp=4, seq=32, attention_mask_type="general", dead_rows=(5, 20)), id="cp4-general-dead-rows"
    ),
    pytest.param(
        4,
        dict(
            tp=1,
            cp=4,
            seq=32,
            cp_window_size=2,
            use_cp_send_recv_overlap=True,
            attention_mask_type="general",
            dead_rows=(0, 31),
        ),
        id="cp4-double-ring-dead-rows",
    ),
]


@pytest.mark.parametrize("world,case", RING_CASES)
def test_ring_gpt_matches_cp1(world, case):
    _check(world, dict(case, context_parallel_algo="megatron_cp_algo"))


HYBRID_CASES = [
    pytest.param(4, dict(tp=1, cp=4, seq=32, ulysses_degree_in_cp=2), id="cp4-u2"),
    pytest.param(
        4,
        dict(tp=1, cp=4, seq=32, ulysses_degree_in_cp=2, heads=4, kv_heads=2, attention_mask_type="general"),
        id="cp4-u2-gqa-general",
    ),
    pytest.param(
        4,
        dict(tp=1, cp=4, seq=32, ulysses_degree_in_cp=2, attention_mask_type="general", dead_rows=(5, 20)),
        id="cp4-u2-general-dead-rows",
    ),
    pytest.param(
        8,
        dict(tp=1, cp=8, seq=32, ulysses_degree_in_cp=2, cp_window_size=2, use_cp_send_recv_overlap=True),
        id="cp8-u2-w2-overlap",
    ),
    pytest.param(8, dict(tp=2, cp=4, seq=32, ulysses_degree_in_cp=2, megatron_cp_in_bnsd=True), id="tp2-cp4-u2-bnsd"),
]


@pytest.mark.parametrize("world,case", HYBRID_CASES)
def test_hybrid_gpt_matches_cp1(world, case):
    _check(world, dict(case, context_parallel_algo="hybrid_cp_algo"))


@pytest.mark.parametrize(
    "world,case",
    [
        pytest.param(4, dict(tp=1, cp=4, seq=32, heads=8, kv_heads=2), id="cp4-u2-gqa"),
        pytest.param(8, dict(tp=2, cp=4, seq=32, cp_allgather_overlap=False, attention_mask_type="general"), id="tp2"),
    ],
)
def test_hybrid_with_the_kv_allgather_outside_matches_cp1(world, case):
    """``--hybrid-outer-cp-algo kvallgather_cp_algo``: Ulysses inside, the K/V all-gather over the ring group."""
    case = dict(case, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    results = _check(world, dict(case, hybrid_outer_cp_algo="kvallgather_cp_algo"))
    assert all(set(r["sent"]) == {"metadata", "all_to_all", "all_gather", "reduce_scatter"} for r in results)


KVALLGATHER_CASES = [
    pytest.param(2, dict(tp=1, cp=2, seq=32), id="cp2"),
    pytest.param(4, dict(tp=1, cp=4, seq=32), id="cp4"),
    pytest.param(4, dict(tp=2, cp=2, seq=32, heads=8, kv_heads=2), id="tp2-cp2-gqa"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, heads=8, kv_heads=2, cp_allgather_overlap=False), id="cp4-gqa-no-overlap"),
    pytest.param(4, dict(tp=1, cp=4, seq=32, attention_mask_type="general"), id="cp4-general-mask"),
    pytest.param(
        4, dict(tp=1, cp=4, seq=32, attention_mask_type="general", dead_rows=(5, 20)), id="cp4-general-dead-rows"
    ),
]


@pytest.mark.parametrize("world,case", KVALLGATHER_CASES)
def test_kvallgather_gpt_matches_cp1(world, case):
    results = _check(world, dict(case, context_parallel_algo="kvallgather_cp_algo"))
    assert all(set(r["sent"]) == {"metadata", "all_gather", "reduce_scatter"} for r in results)


def _cp1_untouched():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    import mindspeed_cp.megatron_adaptor  # noqa: F401
    from tests.gpt_helpers import build_gpt, init_parallel

    init_parallel(tp=1, cp=1)
    model = build_gpt(seq=16)
    cores = [m for m in model.modules() if isinstance(m, DotProductAttention)]
    return len(cores), sum(hasattr(m, "_mindspeed_cp") for m in cores)


def test_cp1_leaves_megatron_attention_untouched():
    assert run_on_ranks(2, _cp1_untouched) == [(2, 0), (2, 0)]


def _model_without_cp_in_a_cp_world():
    import mindspeed_cp.megatron_adaptor as adaptor
    from tests.gpt_helpers import build_gpt, init_parallel

    adaptor.configure(context_parallel_size=2)
    init_parallel(tp=1, cp=2)
    build_gpt(seq=16, context_parallel_size=1)


def test_model_config_without_cp_in_a_cp_world_is_an_error():
    from tests.dist import expect_error_on_every_rank

    expect_error_on_every_rank(
        2,
        _model_without_cp_in_a_cp_world,
        match=r"TransformerConfig.context_parallel_size=1 while parallel_state was "
        r"initialized with --context-parallel-size 2",
    )


def _early_bound_get_batch():
    import torch

    import mindspeed_cp.megatron_adaptor as adaptor

    adaptor.undo()  # as if the user's file bound Megatron's name before importing the plugin
    try:
        from megatron.core.utils import get_batch_on_this_cp_rank as early
    finally:
        adaptor.apply()
    from megatron.core import parallel_state as ps

    adaptor.configure(context_parallel_size=2)  # Ulysses: contiguous halves, not Megatron's zigzag
    ps.initialize_model_parallel(context_parallel_size=2)
    batch = {"position_ids": torch.arange(8).expand(2, 8).contiguous()}
    return early(batch)["position_ids"][0].tolist()


def test_get_batch_bound_before_the_plugin_still_splits_for_the_algorithm():
    assert run_on_ranks(2, _early_bound_get_batch) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def _ulysses_paths():
    import warnings

    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.megatron import attention
    from tests.gpt_helpers import init_parallel

    adaptor.configure(context_parallel_size=2, context_parallel_algo="ulysses_cp_algo")
    init_parallel(cp=2)
    attention._TOLD.clear()  # said once per process: forget earlier tests in this rank
    out = {}
    for name, extra in (
        ("plain", {}),
        ("window", dict(window_size=(8, 0))),
        ("off_by_one", dict(softmax_type="off-by-one")),
    ):
        cfg = TransformerConfig(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            context_parallel_size=2,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            **extra,
        )
        m = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        q, k, v = (torch.randn(8, 1, 4, 8) for _ in range(3))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            m(q, k, v, None)
        out[name] = (m._mindspeed_cp.megatron_only, [str(w.message) for w in seen if "mindspeed-cp" in str(w.message)])
    return out


@pytest.mark.skipif(not features.local_sliding_window(), reason=features.WHY["local_sliding_window"])
def test_ulysses_runs_windows_and_sinks_in_the_kernels():
    """Sliding windows and sinks no longer send Ulysses to Megatron's S x S attention: the plugin's kernels compute
    them (nothing is said, nothing falls back)."""
    for r in run_on_ranks(2, _ulysses_paths):
        for name in ("plain", "window", "off_by_one"):
            assert r[name][0] is None and not r[name][1], (name, r[name])


def _window_with_a_general_mask(algo):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import mindspeed_cp.megatron_adaptor as adaptor
    from tests.gpt_helpers import init_parallel

    adaptor.configure(context_parallel_size=2, context_parallel_algo=algo, attention_mask_type="general")
    init_parallel(cp=2)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        context_parallel_size=2,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        window_size=(8, 0),
    )
    DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


@pytest.mark.skipif(not features.local_sliding_window(), reason=features.WHY["local_sliding_window"])
@pytest.mark.parametrize("algo", ["megatron_cp_algo", "kvallgather_cp_algo"])
def test_a_window_with_a_general_mask_is_refused_at_build(algo):
    """A window replaces the mask in Megatron's attention: with --attention-mask-type general the model build stops
    on every rank, naming both (never a window silently dropped or a mask silently ignored)."""
    expect_error_on_every_rank(2, _window_with_a_general_mask, algo, match="with --attention-mask-type general")
