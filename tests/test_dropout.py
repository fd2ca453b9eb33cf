"""Attention dropout under Ulysses, through a megatron-core GPT: every CP rank's heads draw their own masks,
the same for the same seed, and activation recompute (full and selective) replays them exactly.

After the all-to-all, CP rank r of P computes global heads ``r*h/P .. (r+1)*h/P - 1`` (TP = 1). Megatron draws
attention dropout from its model-parallel RNG stream, which is seeded per TP rank only: without a stream per
CP rank, global heads j and j + h/P would always drop the same positions. The masks are read off Megatron's
own ``attention_dropout`` module (a forward hook: output == 0 where the input probability was > 0).
"""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_on_ranks

SEED = 1234
SEQ = 32
HEADS = 4
CP = 2


def _masks(recompute: dict, seed: int = SEED):
    import mindspeed_cp.megatron_adaptor as adaptor
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel, lm_loss, shard_for_cp

    adaptor.configure(context_parallel_size=CP, context_parallel_algo="ulysses_cp_algo")
    init_parallel(cp=CP, seed=seed)
    model = build_gpt(heads=HEADS, seq=SEQ, seed=seed, attention_dropout=0.5, **recompute)
    seen = []  # one [b, h/P, S, S] mask per attention call, in call order (forward, then recompute)

    def hook(module, inputs, output):
        probs = inputs[0]
        seen.append(((output == 0) & (probs > 0)).detach().clone())

    handles = [m.attention_dropout.register_forward_hook(hook)
               for m in model.modules() if isinstance(m, DotProductAttention)]
    loss = lm_loss(model, shard_for_cp(fixed_batch(seq=SEQ)))
    forward_calls = len(seen)
    loss.backward()
    for h in handles:
        h.remove()
    return {"cp_rank": ps.get_context_parallel_rank(), "forward": seen[:forward_calls],
            "recomputed": seen[forward_calls:]}


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


@pytest.mark.parametrize("name, recompute", [
    ("full", dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    ("selective", dict(recompute_granularity="selective", recompute_modules=["core_attn"])),
])
def test_recompute_replays_ulysses_dropout(name, recompute):
    plain = run_on_ranks(CP, _masks, {})
    for r, p in zip(run_on_ranks(CP, _masks, recompute), plain):
        assert len(r["recomputed"]) == len(r["forward"]) == 2, (name, len(r["forward"]), len(r["recomputed"]))
        for fwd, again in zip(r["forward"], reversed(r["recomputed"])):  # backward recomputes the last layer first
            assert torch.equal(fwd, again), f"{name} recompute drew other dropout masks"
        # and recompute changes nothing about the masks themselves
        assert all(torch.equal(x, y) for x, y in zip(r["forward"], p["forward"]))
