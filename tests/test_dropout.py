"""Attention dropout through a megatron-core GPT with CP.

1. The plugin's kernels (every algorithm): masks are keyed by global positions and heads, so the same model
   with the same seed gives the same losses and gradients whatever the algorithm and CP size; activation
   recompute (full, selective) replays them; another seed changes them.
2. Megatron's own local attention under Ulysses (kept where the kernels cannot follow it - Transformer Engine's
   attention, an ``attn_mask_type`` the configured mask type does not cover; forced here on purpose): after the
   all-to-all CP rank r of P computes global heads r*h/P .. (r+1)*h/P-1 (TP = 1). Megatron draws dropout from its
   model-parallel RNG stream, seeded per TP rank only: without a stream per CP rank, global heads j and j + h/P
   would drop the same positions. The masks are read off Megatron's ``attention_dropout`` module (a forward hook:
   output == 0 where the input probability was > 0).

Tolerances (fp32): losses 2e-6 absolute, gradients 1e-5 relative to the largest, across layouts; bit-identical
for the same layout and seed.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_on_ranks

LOSS_TOL = 2e-6  # GPT loss ~5 against the reference run, absolute
GRAD_TOL = 1e-5  # gradients, relative to the largest reference gradient

SEED = 1234
SEQ = 32
HEADS = 4
CP = 2


def _masks(recompute: dict, seed: int = SEED):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    import mindspeed_cp.megatron_adaptor as adaptor
    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel, lm_loss, shard_for_cp

    adaptor.configure(context_parallel_size=CP, context_parallel_algo="ulysses_cp_algo")
    init_parallel(cp=CP, seed=seed)
    model = build_gpt(heads=HEADS, seq=SEQ, seed=seed, attention_dropout=0.5, **recompute)
    for m in model.modules():  # Megatron's own attention under Ulysses, as for an attention the kernels cannot follow
        if isinstance(m, DotProductAttention):
            m._mindspeed_cp.megatron_only = "forced by tests/test_dropout.py"
    seen = []  # one [b, h/P, S, S] mask per attention call, in call order (forward, then recompute)

    def hook(module, inputs, output):
        probs = inputs[0]
        seen.append(((output == 0) & (probs > 0)).detach().clone())

    handles = [
        m.attention_dropout.register_forward_hook(hook) for m in model.modules() if isinstance(m, DotProductAttention)
    ]
    loss = lm_loss(model, shard_for_cp(fixed_batch(seq=SEQ)))
    forward_calls = len(seen)
    loss.backward()
    for h in handles:
        h.remove()
    return {
        "cp_rank": ps.get_context_parallel_rank(),
        "forward": seen[:forward_calls],
        "recomputed": seen[forward_calls:],
    }


def _global_heads(results, call):
    """{global head: [b, S, S] mask} for one attention call, from every CP rank."""
    out = {}
    for r in results:
        local = r["forward"][call]  # [b, h/P, S, S]
        for j in range(local.shape[1]):
            out[r["cp_rank"] * local.shape[1] + j] = local[:, j]
    return out


def test_ulysses_dropout_masks_differ_across_cp_ranks():
    results = run_on_ranks(CP, _masks, {})
    for call in range(len(results[0]["forward"])):  # one per layer
        heads = _global_heads(results, call)
        assert sorted(heads) == list(range(HEADS))
        for g, mask in heads.items():
            kept = 1 - mask.float().sum() / (SEQ * (SEQ + 1) / 2 * mask.shape[0])
            assert 0.35 < kept < 0.65, (call, g, kept)  # dropout 0.5 really applied to the causal triangle
        for a in range(HEADS):
            for b in range(a + 1, HEADS):
                assert not torch.equal(heads[a], heads[b]), f"layer call {call}: heads {a} and {b} share a mask"
    # layers draw different masks too
    assert not torch.equal(results[0]["forward"][0], results[0]["forward"][1])


def test_ulysses_dropout_is_deterministic_for_a_seed():
    first = run_on_ranks(CP, _masks, {})
    again = run_on_ranks(CP, _masks, {})
    other = run_on_ranks(CP, _masks, {}, seed=SEED + 1)
    for a, b, c in zip(first, again, other):
        assert all(torch.equal(x, y) for x, y in zip(a["forward"], b["forward"]))
        assert not all(torch.equal(x, z) for x, z in zip(a["forward"], c["forward"]))


@pytest.mark.parametrize(
    "name, recompute",
    [
        ("full", dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
        ("selective", dict(recompute_granularity="selective", recompute_modules=["core_attn"])),
    ],
)
def test_recompute_replays_ulysses_dropout(name, recompute):
    plain = run_on_ranks(CP, _masks, {})
    for r, p in zip(run_on_ranks(CP, _masks, recompute), plain):
        assert len(r["recomputed"]) == len(r["forward"]) == 2, (name, len(r["forward"]), len(r["recomputed"]))
        for fwd, again in zip(r["forward"], reversed(r["recomputed"])):  # backward recomputes the last layer first
            assert torch.equal(fwd, again), f"{name} recompute drew other dropout masks"
        # and recompute changes nothing about the masks themselves
        assert all(torch.equal(x, y) for x, y in zip(r["forward"], p["forward"]))


# ----------------------------------------------------------------------------- 1. the plugin's kernels
def _gpt_with_dropout(algo: dict, recompute: dict, seed: int = SEED, p: float = 0.3):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    import mindspeed_cp.megatron_adaptor as adaptor
    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel, shard_for_cp

    cp = algo.pop("cp")
    adaptor.configure(context_parallel_size=cp, **algo)
    init_parallel(cp=cp, seed=seed)
    model = build_gpt(heads=HEADS, kv_heads=2, seq=SEQ, seed=SEED, attention_dropout=p, **recompute)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # the same weights; the dropout stream from `seed`
    batch = shard_for_cp(fixed_batch(seq=SEQ))
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s_local]
    loss = per_token.sum() / (per_token.shape[0] * SEQ)
    loss.backward()
    grads = {n: p_.grad.clone() for n, p_ in model.named_parameters()}
    for g in grads.values():  # a CP rank's gradients are partial sums over its tokens
        torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())
    total = loss.detach().clone()
    torch.distributed.all_reduce(total, group=ps.get_context_parallel_group())
    return {"loss": total.item(), "grads": grads}


ALGOS = {
    "ring2": dict(cp=2, context_parallel_algo="megatron_cp_algo"),
    "ring4": dict(cp=4, context_parallel_algo="megatron_cp_algo", use_cp_send_recv_overlap=True),
    "double_ring4": dict(cp=4, context_parallel_algo="megatron_cp_algo", cp_window_size=2),
    "ulysses2": dict(cp=2, context_parallel_algo="ulysses_cp_algo"),
    "hybrid4": dict(cp=4, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
}


def _same(a, b, exact=False):
    if exact:
        return a["loss"] == b["loss"] and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])
    scale = max(g.abs().max().item() for g in b["grads"].values())
    worst = max((a["grads"][n] - b["grads"][n]).abs().max().item() for n in a["grads"]) / scale
    return abs(a["loss"] - b["loss"]) <= LOSS_TOL and worst <= GRAD_TOL


def test_kernel_dropout_is_the_same_whatever_the_layout():
    runs = {
        name: run_on_ranks(4 if algo["cp"] == 4 else 2, _gpt_with_dropout, dict(algo), {})[0]
        for name, algo in ALGOS.items()
    }
    ref = runs["ring2"]
    no_dropout = run_on_ranks(2, _gpt_with_dropout, dict(ALGOS["ring2"]), {}, p=0.0)[0]
    assert abs(ref["loss"] - no_dropout["loss"]) > 1e-3  # dropout is live
    for name, got in runs.items():
        assert _same(got, ref), name


def test_kernel_dropout_seed_and_recompute():
    plain = run_on_ranks(4, _gpt_with_dropout, dict(ALGOS["hybrid4"]), {})[0]
    again = run_on_ranks(4, _gpt_with_dropout, dict(ALGOS["hybrid4"]), {})[0]
    other = run_on_ranks(4, _gpt_with_dropout, dict(ALGOS["hybrid4"]), {}, seed=SEED + 1)[0]
    assert _same(again, plain, exact=True)
    assert not _same(other, plain)  # the tracker's seed chooses the masks (weights: the same seed=SEED)
    for recompute in (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    ):
        for name in ("hybrid4", "ulysses2"):
            world = 4 if ALGOS[name]["cp"] == 4 else 2
            base = plain if name == "hybrid4" else run_on_ranks(world, _gpt_with_dropout, dict(ALGOS[name]), {})[0]
            got = run_on_ranks(world, _gpt_with_dropout, dict(ALGOS[name]), recompute)[0]
            assert _same(got, base, exact=True), (name, recompute)
