"""megatron-core on the CPU: mindspeed_cp.device's patches, exercised through Megatron's own entry points
on real gloo ranks (no mocks). Skipped where an accelerator exists, since the patches do not apply there.

Tolerances: fp32 throughout. TP=2 vs TP=1 differ only by the order of floating-point sums (row-parallel
matmuls end in an all-reduce), so losses and logits must agree to 1e-5 relative; weights must be
bit-identical (Megatron's CPU initialisation draws the full matrix and keeps this rank's shard).
"""

from __future__ import annotations

import pytest
import torch

from mindspeed_cp.device import has_accelerator
from tests import features
from tests.dist import run_on_ranks

pytestmark = pytest.mark.skipif(has_accelerator(), reason="device patches apply only without an accelerator")

SEED = 1234
STEPS = 4
REL_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- 1. a GPT trains on the CPU
def _train_tp1():
    from megatron.core import parallel_state as ps

    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel, train_steps

    init_parallel(tp=1, seed=SEED)
    model = build_gpt(seed=SEED)
    batch = fixed_batch()
    devices = sorted({p.device.type for p in model.parameters()})

    # causality of the CPU mask: changing token k changes no logit before k
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, v]
        tokens = batch["tokens"].clone()
        k = 40
        tokens[:, k] = (tokens[:, k] + 1) % 128
        changed = model(tokens, batch["position_ids"], None)
    before_k = (changed[:, :k] - logits[:, :k]).abs().max().item()
    from_k = (changed[:, k:] - logits[:, k:]).abs().max().item()

    losses = train_steps(model, batch, steps=STEPS, grad_group=ps.get_data_parallel_group())
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all().item() for p in model.parameters())
    return {"devices": devices, "losses": losses, "grads_ok": grads_ok, "before_k": before_k, "from_k": from_k}


def test_gpt_trains_on_cpu():
    results = run_on_ranks(2, _train_tp1)
    r = results[0]
    print(f"\nlosses (TP=1, DP=2, Adam lr=1e-3): {r['losses']}")
    assert r["devices"] == ["cpu"]
    assert r["grads_ok"]
    assert r["before_k"] == 0.0, "a future token changed an earlier logit: the causal mask is wrong"
    assert r["from_k"] > 0.0
    losses = r["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert results[1]["losses"] == losses  # DP replicas with the same data stay identical


# ----------------------------------------------------------------------------- 2. TP=2 == TP=1
def _tp2_vs_tp1(config):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel, train_steps

    batch = fixed_batch()
    init_parallel(tp=1, seed=SEED)
    full = build_gpt(seed=SEED, **config)
    full_weights = {n: p.detach().clone() for n, p in full.named_parameters()}
    with torch.no_grad():
        full_logits = full(batch["tokens"], batch["position_ids"], None)  # [b, s, v]
    full_losses = train_steps(full, batch, steps=STEPS, grad_group=ps.get_data_parallel_group())

    init_parallel(tp=2, seed=SEED)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    model = build_gpt(seed=SEED, **config)
    weight_diff, sharded = 0.0, 0
    for name, p in model.named_parameters():
        expected = full_weights[name]
        if getattr(p, "tensor_model_parallel", False):  # stride s: this rank's s pieces of tp*s
            stride = getattr(p, "partition_stride", 1)
            pieces = expected.chunk(tp * stride, dim=p.partition_dim)
            expected = torch.cat(pieces[rank::tp], dim=p.partition_dim)
            sharded += 1
        assert p.shape == expected.shape, name
        weight_diff = max(weight_diff, (p.detach() - expected).abs().max().item())
    with torch.no_grad():
        local = model(batch["tokens"], batch["position_ids"], None)  # [b, s, v/tp]
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(local)  # [b, s, v]
    losses = train_steps(model, batch, steps=STEPS)
    return {
        "weight_diff": weight_diff,
        "sharded": sharded,
        "logits_rel": _rel(logits, full_logits),
        "full_losses": full_losses,
        "losses": losses,
    }


TP_CONFIGS = {
    "mha": {},
    # GQA, SwiGLU (fc1 sharded with stride 2), sliding-window causal mask
    "gqa_swiglu_window": dict(
        kv_heads=2,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        window_size=(8, 0),
    ),
}


@pytest.mark.parametrize("name", sorted(TP_CONFIGS))
def test_tp2_matches_tp1(name):
    config = dict(TP_CONFIGS[name])
    if not features.local_sliding_window():
        config.pop("window_size", None)  # GQA and SwiGLU still run
    if not features.glu_tp_layout():  # megatron-core < 0.16: SwiGLU's CPU-initialised TP shards differ from TP=1
        for key in ("gated_linear_unit", "activation_func", "bias_activation_fusion"):
            config.pop(key, None)
    for r in run_on_ranks(2, _tp2_vs_tp1, config):
        loss_rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], r["full_losses"]))
        print(
            f"\n{name} TP=2 vs TP=1: weights max|diff| {r['weight_diff']}, "
            f"logits rel {r['logits_rel']:.2e}, "
            f"losses rel {loss_rel:.2e} ({r['losses']} vs {r['full_losses']})"
        )
        assert r["sharded"] > 0
        assert r["weight_diff"] == 0.0
        assert r["logits_rel"] < REL_TOL
        assert loss_rel < REL_TOL


# ----------------------------------------------------------------------------- 3. RNG tracker on the CPU
def _rng_streams(seed):
    import logging

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import (
        get_data_parallel_rng_tracker_name,
        get_expert_parallel_rng_tracker_name,
    )

    from tests.gpt_helpers import init_parallel

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    logger.addHandler(handler)
    try:
        init_parallel(tp=2, seed=None)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        out = {"tp_rank": ps.get_tensor_model_parallel_rank()}
        out["default_1"] = torch.rand(4)
        with tracker.fork():
            out["mp_1"] = torch.rand(4)
        out["default_2"] = torch.rand(4)
        with tracker.fork():
            out["mp_2"] = torch.rand(4)
            with tracker.fork(get_data_parallel_rng_tracker_name()):
                out["dp_nested"] = torch.rand(4)
            out["mp_3"] = torch.rand(4)
        with tracker.fork(get_expert_parallel_rng_tracker_name()):
            out["ep_1"] = torch.rand(4)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)  # the same seed again: the same streams
        with tracker.fork():
            out["mp_again"] = torch.rand(4)
        out["default_again"] = torch.rand(4)
    finally:
        logger.removeHandler(handler)
    out["warnings"] = warnings
    return out


def _draws(seed, *counts):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) for n in counts]


def test_rng_tracker_fork_streams():
    results = run_on_ranks(2, _rng_streams, SEED)
    for r in results:
        tp_rank = r["tp_rank"]
        default_1, default_2 = _draws(SEED, 4, 4)  # default generator: the data-parallel seed
        mp_1, mp_2, mp_3 = _draws(SEED + 2718 + tp_rank, 4, 4, 4)  # Megatron's TP seed
        (dp_1,) = _draws(SEED, 4)  # 'data-parallel-rng' starts from the same seed
        (ep_1,) = _draws(SEED + 1024 + tp_rank, 4)  # EP rank 0, expert-TP rank = TP rank
        assert torch.equal(r["default_1"], default_1)
        assert torch.equal(r["mp_1"], mp_1)
        assert not torch.equal(r["mp_1"], r["default_1"])
        assert torch.equal(r["default_2"], default_2), "a fork consumed the default stream"
        assert torch.equal(r["mp_2"], mp_2), "a second fork must continue the stream"
        assert torch.equal(r["dp_nested"], dp_1)
        assert torch.equal(r["mp_3"], mp_3), "a nested fork disturbed the outer stream"
        assert torch.equal(r["ep_1"], ep_1)
        assert torch.equal(r["mp_again"], mp_1) and torch.equal(r["default_again"], default_1)
        assert not r["warnings"], r["warnings"]
    assert not torch.equal(results[0]["mp_1"], results[1]["mp_1"])  # TP ranks: independent streams
    assert torch.equal(results[0]["default_1"], results[1]["default_1"])  # one data-parallel seed


def _recompute_grads():
    from tests.gpt_helpers import build_gpt, fixed_batch, init_parallel, lm_loss

    init_parallel(tp=2, seed=SEED)
    batch = fixed_batch()
    dropout = dict(hidden_dropout=0.2, attention_dropout=0.2)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    variants = {"plain": {}, "recompute": recompute, "distributed": dict(recompute, distribute_saved_activations=True)}
    out = {}
    for name, extra in variants.items():
        model = build_gpt(seed=SEED, **dropout, **extra)
        loss = lm_loss(model, batch)
        loss.backward()
        out[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    out["second_pass"] = lm_loss(model, batch).item()  # dropout draws new masks
    return out


def test_activation_recompute_replays_dropout():
    """Megatron's CheckpointFunction saves and restores the (CPU) RNG states through the patched
    _get/_set_cuda_rng_state and tracker: recomputed dropout masks equal the forward ones."""
    for r in run_on_ranks(2, _recompute_grads):
        loss, grads = r["plain"]
        assert r["second_pass"] != loss  # dropout is live
        for name in ("recompute", "distributed"):
            other_loss, other_grads = r[name]
            rel = max(_rel(g, h) for g, h in zip(other_grads, grads) if h.abs().max() > 0)
            print(f"\n{name}: loss {other_loss} vs {loss}, grads max rel {rel:.2e}")
            assert other_loss == loss
            assert rel < REL_TOL


# ----------------------------------------------------------------------------- masks, TP helpers, RoPE
def test_masks_on_cpu():
    """The CPU masks mean what Megatron's mean: True = masked; a query i sees keys j with
    i + (skv - sq) - left <= j <= i + (skv - sq) + right (causal: right = 0, left = everything)."""
    from megatron.core.transformer import utils

    import mindspeed_cp.megatron_adaptor  # noqa: F401

    sq, skv = 5, 7
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    assert torch.equal(utils.get_default_causal_mask(sq), j[:, :sq] > i)
    if not features.local_sliding_window():
        return  # megatron-core < 0.15: no sliding-window mask to check
    for left, right in ((2, 0), (1, 1), (0, 0)):
        offset = skv - sq
        expected = (j < i + offset - left) | (j > i + offset + right)
        got = utils.get_sliding_window_causal_mask(sq, skv, (left, right))
        assert got.device.type == "cpu" and torch.equal(got, expected), (left, right)


def _tp_helpers():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from tests.gpt_helpers import init_parallel

    init_parallel(tp=2, seed=SEED)
    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    g = torch.Generator().manual_seed(5)
    data = {"tokens": torch.randint(0, 100, (2, 8), generator=g), "labels": torch.randint(0, 100, (2, 8), generator=g)}
    got = tensor_parallel.broadcast_data(["tokens", "labels"], data if rank == 0 else None, torch.int64)
    broadcast_ok = all(torch.equal(got[k], data[k]) for k in data)

    x = torch.randn(4, 2, 3, generator=g) + rank  # [s/tp, b, h], different per rank
    x.requires_grad_(True)
    gathered = tensor_parallel.gather_from_sequence_parallel_region(x)  # [s, b, h]
    everyone = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(everyone, x.detach(), group=ps.get_tensor_model_parallel_group())
    gather_ok = torch.equal(gathered, torch.cat(everyone))
    y = torch.randn(8, 2, 3, generator=g) * (rank + 1)  # [s, b, h]
    scattered = tensor_parallel.reduce_scatter_to_sequence_parallel_region(y)  # [s/tp, b, h]
    total = y.clone()
    dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
    scatter_rel = _rel(scattered, total.chunk(tp)[rank])
    buffer = ps.get_global_memory_buffer().get_tensor((3, 5), torch.float32, "test")
    return {
        "broadcast_ok": broadcast_ok,
        "gather_ok": gather_ok,
        "scatter_rel": scatter_rel,
        "buffer": (buffer.device.type, tuple(buffer.shape)),
    }


def test_tp_helpers_on_cpu():
    for r in run_on_ranks(2, _tp_helpers):
        assert r["broadcast_ok"] and r["gather_ok"]
        assert r["scatter_rel"] < REL_TOL
        assert r["buffer"] == ("cpu", (3, 5))


def _rope_tables():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    import mindspeed_cp.megatron_adaptor  # noqa: F401  - first: a fresh worker may not be patched yet
    from tests.gpt_helpers import init_parallel

    init_parallel(tp=1, seed=SEED)
    out = {}
    for interleaved in (False, True):
        # built directly: Megatron's default use_cpu_initialization=False
        rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_interleaved=interleaved)
        emb = rope(12)  # [s, 1, 1, d]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
        freqs = torch.outer(torch.arange(12, dtype=torch.float32), inv_freq)  # [s, d/2]
        if interleaved:  # f0 f0 f1 f1 ...
            expected = freqs.repeat_interleave(2, dim=-1)
        else:  # f0 f1 ... f0 f1 ...
            expected = torch.cat([freqs, freqs], dim=-1)
        out[interleaved] = (emb.device.type, tuple(emb.shape), _rel(emb[:, 0, 0], expected))
    return out


def test_rope_tables_on_cpu():
    for r in run_on_ranks(2, _rope_tables):
        for interleaved, (device, shape, rel) in r.items():
            assert (device, shape) == ("cpu", (12, 1, 1, 16)), interleaved
            assert rel < 1e-6, (interleaved, rel)


# ----------------------------------------------------------------------------- 4. registry
def test_device_patches_listed_and_undone():
    import sys

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as random_mod
    import megatron.core.transformer.utils as tutils

    from mindspeed_cp import device
    from mindspeed_cp import megatron_adaptor as adaptor
    from mindspeed_cp.megatron.patching import Hook, resolve

    assert device.PATCHES
    for p in device.PATCHES:
        assert adaptor.PATCHES[p.target] is p
        # with CUDA / NPU they are skipped; a few also need a megatron-core defect to be there (no TE)
        assert p.when_doc.startswith("no accelerator") and p.why
        # Megatron-LM's own patches wait for megatron.training, which megatron-core alone does not ship
        absent = p in device.megatron_lm.PATCHES and p.status.startswith("skipped (target absent")
        assert absent or p.status.startswith("applied") is p.when(), (p.target, p.status)
        assert p.when() is (not device.has_accelerator()) or p.when_doc != "no accelerator"
    # (values set by a patch - te_general_gemm = None - are not objects one can trace by identity)
    patches = [
        p for p in device.PATCHES if p.applied and not isinstance(p, Hook) and callable(getattr(*resolve(p.target)))
    ]
    values = {
        p.target: getattr(*resolve(p.target))
        for p in device.PATCHES
        if p.applied and not isinstance(p, Hook) and p not in patches
    }
    patched = {p.target: getattr(*resolve(p.target)) for p in patches}
    patched_all = {
        p.target: getattr(*resolve(p.target))
        for p in adaptor.PATCHES
        if p.applied and not isinstance(p, Hook) and callable(getattr(*resolve(p.target)))
    }
    tracker_add = random_mod.CudaRNGStatesTracker.add
    assert tutils.get_default_causal_mask(3).device.type == "cpu"  # Megatron's own code, device="cuda"
    try:
        adaptor.undo()
        assert torch._C._len_torch_function_stack() == 0  # the device mode is gone
        for p in patches:
            current = getattr(*resolve(p.target))
            assert current is not patched[p.target], p.target
            assert current.__module__.split(".")[0] in ("megatron", "torch"), (p.target, current.__module__)
        for target in values:  # a value the patch created is gone again (te_general_gemm: NameError as before)
            owner, name = resolve(target)
            assert name not in vars(owner), target
        assert random_mod.CudaRNGStatesTracker.add is not tracker_add
        assert fused_softmax.get_default_causal_mask is tutils.get_default_causal_mask
        getattr(tutils.get_default_causal_mask, "cache_clear", lambda: None)()  # lru_cache'd before 0.13
        with pytest.raises((AssertionError, RuntimeError)):  # Megatron's own code wants CUDA again
            tutils.get_default_causal_mask(3)
        # no replacement of any patch left behind in a Megatron or torch module (import sites included)
        replacements = {id(obj): t for t, obj in patched_all.items()}
        stale = [
            (mod_name, attr, replacements[id(value)])
            for mod_name, mod in list(sys.modules.items())
            if mod_name.split(".")[0] in ("megatron", "torch") and mod is not None
            for attr, value in list(vars(mod).items())
            if id(value) in replacements
        ]
        assert not stale, stale
    finally:
        adaptor.apply()
    for p in device.PATCHES:  # re-applied exactly as before (a patch whose condition does not hold stays skipped)
        absent = p in device.megatron_lm.PATCHES and p.status.startswith("skipped (target absent")
        assert absent or p.status.startswith("applied") is p.when(), (p.target, p.status)
    assert torch._C._len_torch_function_stack() == 1
    assert tutils.get_default_causal_mask(3).device.type == "cpu"
