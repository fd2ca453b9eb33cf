"""Models people train with long context today, through megatron-core at CP against the same model at CP=1.

Multi-token prediction (MTP) under every layout, MLA with its own value head size through the stock local MLA
spec, learnable softmax offsets (sinks) under Ulysses. One distributed call per layout family: the CP=1 reference
(Megatron's own attention, DP over the same ranks, every rank the whole batch) is computed once and every variant
(algorithm, CP size, options) is built from its weights and fed the same batch through the patched
``get_batch_on_this_cp_rank``. Gradients go through Megatron's own ``DistributedDataParallel`` (its averaging
over DP x CP, and over the expert-data-parallel group for experts) in both runs, so the test adds no reduction
rule of its own. The loss of a CP rank is its per-token sum x CP / N (N: the batch's tokens), the one-device mean
once DDP averages over CP; Megatron normalises the MTP loss itself (``roll_tensor``'s count).

Checked per variant, every rank (fp32; bounds measured on AVX2 and AVX-512 machines, see docs/reliability.md):
every real token held once; per-token LM and MTP losses at their global positions within ``LOSS_TOL`` of CP=1;
every main_grad within ``GRAD_TOL`` of CP=1 relative to the largest reference gradient.
"""

from __future__ import annotations

import pytest
import torch

from tests import features
from tests.dist import run_on_ranks

LOSS_TOL = 1e-5  # per-token losses ~5: measured max 9.5e-7
GRAD_TOL = 1e-4  # relative to the largest reference gradient: measured max 3.3e-7
WEIGHT_TOL = 1e-5  # after SGD steps (lr 0.5): measured max
MLA = dict(
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=12,
    rope_type="yarn",
    rotary_scaling_factor=4.0,
    original_max_position_embeddings=16,
    multi_latent_attention=True,
)
FLAGS = (
    "context_parallel_algo",
    "ulysses_degree_in_cp",
    "cp_window_size",
    "use_cp_send_recv_overlap",
    "megatron_cp_in_bnsd",
    "context_parallel_kv_cache_policy",
    "use_ulysses_allgather_kv",
    "window_attn_cp_algo",
    "cp_allgather_overlap",
    "hybrid_outer_cp_algo",
)


# ----------------------------------------------------------------------------------------------- worker side
def _batch(spec):
    """(batch, CP=1 attention mask or None, THD (cu_seqlens, max_seqlen) or None), the same on every rank."""
    from tests.gpt_helpers import fixed_batch
    from tests.test_packing import _thd_batch, doc_mask

    S, b, lengths = spec["seq"], spec.get("batch", 2), spec.get("documents")
    if spec.get("thd"):
        batch, segments, cu, _ = _thd_batch(lengths, seed=spec.get("seed", 0))
        return batch, doc_mask(segments), (cu, torch.tensor([max(segments)], dtype=torch.int32))
    batch = fixed_batch(batch=b, seq=S, seed=spec.get("seed", 0))
    if lengths is None:
        return batch, None, None
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).expand(b, S).contiguous()
    return batch, doc_mask(lengths).expand(b, 1, S, S), None


def _model(spec, seed):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from tests.gpt_helpers import build_gpt

    model = build_gpt(
        seq=spec["seq"] if not spec.get("thd") else sum(spec["documents"]), seed=seed, **spec.get("model", {})
    )
    return model, DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)


def _train(spec, model, ddp, data, thd_params, tokens: int, cp: int):
    """``spec["steps"]`` (default 1) forward + backward passes, with an optimizer step between them: the first
    pass's per-token losses, MTP losses and DDP-reduced grads, every pass's loss over the CP group, the final
    weights. SGD: its step is linear in the gradient, so the weights differ by lr x the gradients' rounding (Adam's
    first steps are sign-like: a near-zero gradient's rounding could move a weight by the whole lr)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    first, losses = None, []
    for step in range(spec.get("steps", 1)):
        if step:
            for p in model.parameters():
                p.grad = p.main_grad
            opt.step()
            ddp.zero_grad_buffer()
        result = _step(model, ddp, data, thd_params, tokens, cp)
        first = first or result
        total = (result[0] * data["loss_mask"]).sum() / tokens
        dist.all_reduce(total, group=ps.get_context_parallel_group())
        losses.append(float(total))
    return first, losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _step(model, ddp, data, thd_params, tokens: int, cp: int):
    """One forward + backward: per-token LM losses, the MTP layers' per-token losses, DDP-reduced grads."""
    seen = []
    compute = model.compute_language_model_loss

    def spy(labels, logits):  # records what Megatron computes, changes nothing
        out = compute(labels, logits)
        seen.append(out.detach().clone())
        return out

    model.compute_language_model_loss = spy
    try:
        per_token = ddp(
            data["tokens"],
            data["position_ids"],
            data.get("attention_mask"),
            labels=data["labels"],
            loss_mask=data["loss_mask"],
            packed_seq_params=thd_params,
        )
    finally:
        del model.compute_language_model_loss
    ((per_token * data["loss_mask"]).sum() * cp / tokens).backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return per_token.detach(), seen[:-1], grads


def _reference(spec):
    """The CP=1 run: Megatron's attention on the whole batch (documents: the dense document mask)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tests.gpt_helpers import init_parallel
    from tests.test_packing import _megatron_dense_for_packed

    batch, mask, thd = _batch(spec)
    init_parallel(cp=1, **spec.get("parallel", {}))
    model, ddp = _model(spec, seed=7)
    params = None
    if thd is not None:
        from megatron.core.utils import get_thd_batch_on_this_cp_rank

        for m in model.modules():
            if isinstance(m, DotProductAttention):
                _megatron_dense_for_packed(m, mask)
        batch, params = get_thd_batch_on_this_cp_rank(dict(batch), thd[0], None, thd[1])
    elif mask is not None:
        batch = dict(batch, attention_mask=mask)
    tokens = batch["tokens"].numel()
    state = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()
    }  # before any step
    out = _train(spec, model, ddp, batch, params, tokens, 1)
    ps.destroy_model_parallel()
    return out, state, tokens


def _variant(spec, variant, state, tokens):
    """One CP variant from the reference weights: its per-token losses, MTP losses, grads, and where its tokens sit."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.megatron.state import STATE
    from tests.gpt_helpers import init_parallel

    cp = variant["cp"]
    batch, _, thd = _batch(spec)
    documents = None if spec.get("documents") is None or thd is not None else "position_ids"
    adaptor.configure(context_parallel_size=cp, documents=documents, **{k: variant[k] for k in FLAGS if k in variant})
    init_parallel(cp=cp, **variant.get("parallel", spec.get("parallel", {})))
    model, ddp = _model(spec, seed=11)
    model.load_state_dict(state)
    params = None
    if spec.get("before"):  # an earlier batch with other documents (RoPE tables are cached by length)
        other = dict(
            batch,
            position_ids=torch.cat([torch.arange(n) for n in spec["before"]])
            .expand_as(batch["position_ids"])
            .contiguous(),
        )
        with torch.no_grad():
            prev = get_batch_on_this_cp_rank(other)
            model(prev["tokens"], prev["position_ids"], None, labels=prev["labels"])
    if thd is not None:
        from megatron.core.utils import get_thd_batch_on_this_cp_rank

        local, params = get_thd_batch_on_this_cp_rank(dict(batch), thd[0], None, thd[1])
    else:
        local = get_batch_on_this_cp_rank(dict(batch))
    result = _train(spec, model, ddp, local, params, tokens, cp)
    rank, docs = ps.get_context_parallel_rank(), STATE.documents
    if docs is not None:
        src = docs.source.gather(1, docs.positions(rank))
    else:
        src = token_indices(STATE.config, rank, STATE.seq_len).expand(local["tokens"].shape[0], -1)
        src = torch.where(src < batch["tokens"].shape[1], src, -1)  # pads of an unaligned Ring/Hybrid batch
    return result, src


def _place(src, values, shape):
    """Per-token values of this rank at their global positions, summed over the CP group (with a count)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    full, seen = torch.zeros(shape), torch.zeros(shape)
    for i in range(shape[0]):
        keep = src[i] >= 0
        full[i, src[i][keep]] = values[i][keep].float()
        seen[i, src[i][keep]] = 1
    for t in (full, seen):
        dist.all_reduce(t, group=ps.get_context_parallel_group())
    return full, seen


def _parity(spec):
    """Every variant of ``spec`` against the CP=1 reference; a dict of errors per variant."""
    from megatron.core import parallel_state as ps

    ((ref_loss, ref_mtp, ref_grads), ref_losses, ref_weights), state, tokens = _reference(spec)
    gmax = max(float(g.abs().max()) for g in ref_grads.values())
    results = []
    for variant in spec["variants"]:
        ((loss, mtp, grads), losses, weights), src = _variant(spec, variant, state, tokens)
        full, seen = _place(src, loss, ref_loss.shape)
        mtp_err = [float((_place(src, m, ref_loss.shape)[0] - r).abs().max()) for m, r in zip(mtp, ref_mtp)]
        worst = max(grads, key=lambda n: float((grads[n] - ref_grads[n]).abs().max()))
        results.append(
            {
                "variant": variant,
                "every_token_once": bool((seen == 1).all()),
                "loss_err": float((full - ref_loss).abs().max()),
                "mtp_layers": len(mtp),
                "mtp_err": max(mtp_err, default=0.0),
                "grad_err": float((grads[worst] - ref_grads[worst]).abs().max()) / gmax,
                "worst": worst,
                "step_loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                "weight_err": max(float((weights[n] - ref_weights[n]).abs().max()) for n in weights),
            }
        )
        ps.destroy_model_parallel()
    return results


def _check(world, spec):
    per_rank = run_on_ranks(world, _parity, spec)
    mtp = spec.get("model", {}).get("mtp_num_layers") or 0
    for rank, results in enumerate(per_rank):
        for r in results:
            assert r["every_token_once"], (rank, r)
            assert r["mtp_layers"] == mtp, (rank, r)
            assert r["loss_err"] <= LOSS_TOL and r["mtp_err"] <= LOSS_TOL, (rank, r)
            assert r["grad_err"] <= GRAD_TOL, (rank, r)
            assert r["step_loss_err"] <= LOSS_TOL and r["weight_err"] <= WEIGHT_TOL, (rank, r)
    return per_rank


# ----------------------------------------------------------------------------------------------- MTP
U, R, H = "ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo"
MTP = dict(mtp_num_layers=1, mtp_loss_scaling_factor=1.0)
MTP_CASES = [
    pytest.param(
        2,
        dict(seq=32, model=MTP, variants=[dict(cp=2, context_parallel_algo=U), dict(cp=2, context_parallel_algo=R)]),
        id="cp2",
    ),
    pytest.param(
        4,
        dict(
            seq=32,
            model=dict(MTP, mtp_num_layers=2),
            variants=[
                dict(cp=4, context_parallel_algo=U),
                dict(cp=4, context_parallel_algo=R),
                dict(cp=4, context_parallel_algo=R, cp_window_size=2, use_cp_send_recv_overlap=True),
                dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2),
            ],
        ),
        id="cp4-two-mtp-layers",
    ),
    pytest.param(
        4,
        dict(
            seq=30,
            model=dict(MTP, heads=8, kv_heads=2),
            variants=[
                dict(cp=4, context_parallel_algo=U),
                dict(cp=4, context_parallel_algo=R),
                dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2),
            ],
        ),
        id="cp4-unaligned-30-gqa",
    ),
    pytest.param(
        4,
        dict(
            seq=50,
            documents=[7, 1, 30, 12],
            batch=1,
            model=MTP,
            variants=[
                dict(cp=4, context_parallel_algo=U),
                dict(cp=4, context_parallel_algo=R),
                dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2),
            ],
        ),
        id="cp4-packed-documents",
    ),
]


@pytest.mark.parametrize("world,spec", MTP_CASES)
def test_mtp_matches_cp1(world, spec):
    """MTP's shifted tokens, labels, loss mask and positions follow each layout (Megatron's own shift assumed its
    zigzag: wrong at every Ulysses / Hybrid shard boundary); the MTP loss is counted over the CP group."""
    _check(world, spec)


@pytest.mark.skipif(not features.thd_split(), reason=features.WHY["thd_split"])
def test_mtp_thd_stops_at_document_ends():
    """THD batches: the shift stops at every document's end, as Megatron's one-device THD shift does."""
    _check(
        4,
        dict(
            seq=None,
            documents=[7, 1, 30, 13],
            thd=True,
            model=MTP,
            variants=[
                dict(cp=4, context_parallel_algo=R),
                dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2),
                dict(cp=4, context_parallel_algo=U),
            ],
        ),
    )


# ----------------------------------------------------------------------------------------------- MLA
MLA_VARIANTS = [
    dict(cp=4, context_parallel_algo=U),
    dict(cp=4, context_parallel_algo=R),
    dict(cp=4, context_parallel_algo=R, cp_window_size=2, megatron_cp_in_bnsd=True),
    dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2),
    dict(cp=4, context_parallel_algo=R, context_parallel_kv_cache_policy="half"),
    dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2, context_parallel_kv_cache_policy="full"),
]


def test_mla_stock_local_spec_matches_cp1():
    """MLA (qk head 16 + 8 rope, v head 12, YaRN RoPE) with megatron-core's own local MLA spec (which passes
    k_channels / v_channels to the core attention) under every algorithm and KV-cache policy = CP=1."""
    _check(4, dict(seq=32, model=dict(mla=MLA), variants=MLA_VARIANTS))


def test_mla_with_mtp_and_packed_documents_matches_cp1():
    """MLA + MTP with packed documents after an earlier batch of other documents (YaRN's table is cached by length:
    the documents' positions change with every batch) and plain MLA with the rope variant."""
    _check(
        4,
        dict(
            seq=50,
            documents=[7, 1, 30, 12],
            before=[33, 17],
            batch=1,
            model=dict(MTP, mla=MLA),
            variants=[dict(cp=4, context_parallel_algo=R), dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2)],
        ),
    )
    _check(2, dict(seq=32, model=dict(mla=dict(MLA, rope_type="rope")), variants=[dict(cp=2, context_parallel_algo=U)]))


# ----------------------------------------------------------------------------------------------- learnable sinks
SINK_VARIANTS = [
    dict(cp=2, context_parallel_algo=U),
    dict(cp=4, context_parallel_algo=U),
    dict(cp=4, context_parallel_algo=U, context_parallel_kv_cache_policy="full"),
]


@pytest.mark.parametrize("kind", ["learnable", "off-by-one"])
def test_softmax_offsets_under_ulysses_match_cp1(kind):
    """gpt-oss sinks under Ulysses: every CP rank keeps the whole ``[h]`` offset, so a CP=1 checkpoint loads (the
    variants load the reference's state dict, strict) and three SGD steps reach the same weights; each rank's
    softmax applies its heads' slice. (Every algorithm: test_windows_and_sinks_match_cp1.)"""
    _check(4, dict(seq=32, steps=3, model=dict(heads=8, kv_heads=2, softmax_type=kind), variants=SINK_VARIANTS))


# ----------------------------------------------------------------------------------------------- windows and sinks
WINDOW_VARIANTS = [
    dict(cp=4, context_parallel_algo=U),
    dict(cp=4, context_parallel_algo=R),
    dict(cp=4, context_parallel_algo=R, cp_window_size=2, use_cp_send_recv_overlap=True),
    dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2),
    dict(cp=4, context_parallel_algo=U, window_attn_cp_algo=R),
    dict(cp=4, context_parallel_algo=R, window_attn_cp_algo=U, context_parallel_kv_cache_policy="full"),
    dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2, window_attn_cp_algo=R),
    dict(cp=4, context_parallel_algo="kvallgather_cp_algo"),
    dict(cp=4, context_parallel_algo="kvallgather_cp_algo", window_attn_cp_algo=U, cp_allgather_overlap=False),
    dict(cp=4, context_parallel_algo=H, ulysses_degree_in_cp=2, hybrid_outer_cp_algo="kvallgather_cp_algo"),
]
WINDOWED = dict(heads=8, kv_heads=2, window_attn_skip_freq=2)  # layer 1 windowed, layer 2 full


@pytest.mark.parametrize(
    "kind,window,steps",
    [("vanilla", (5, 0), 1), ("off-by-one", (12, 0), 1), ("learnable", (5, 0), 3), ("learnable", (12, 3), 1)],
)
def test_windows_and_sinks_match_cp1(kind, window, steps):
    """A sliding window on every second layer (shorter than a shard of 8 tokens, longer, two-sided), with and
    without sinks, under every algorithm and per-layer algorithm (``--window-attn-cp-algo``): per-token losses and
    gradients equal CP=1 (Megatron's own attention with its window mask and ``SoftmaxOne``); learnable sinks keep
    one whole ``[h]`` offset on every rank (the CP=1 checkpoint loads) and three SGD steps reach the same weights."""
    model = dict(WINDOWED, softmax_type=kind, window_size=window)
    _check(4, dict(seq=32, steps=steps, model=model, variants=WINDOW_VARIANTS))


def test_windows_unaligned_under_ulysses_with_the_window_ring():
    """An unaligned length under Ulysses (uneven contiguous shards), the windowed layers on the window-aware ring."""
    model = dict(WINDOWED, softmax_type="learnable", window_size=(9, 0))
    variants = [dict(cp=4, context_parallel_algo=U, window_attn_cp_algo=R), dict(cp=4, context_parallel_algo=U)]
    _check(4, dict(seq=30, model=model, variants=variants))


def _init_with_the_same_seed(cp):
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor
    from tests.gpt_helpers import build_gpt, init_parallel

    init_parallel(cp=1)
    ref = build_gpt(seq=32, heads=8, kv_heads=2, softmax_type="learnable", seed=7).state_dict()
    ps.destroy_model_parallel()
    adaptor.configure(context_parallel_size=cp)
    init_parallel(cp=cp)
    got = build_gpt(seq=32, heads=8, kv_heads=2, softmax_type="learnable", seed=7).state_dict()
    tensors = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
    return sorted(k for k in tensors if got[k].shape != ref[k].shape or not torch.equal(got[k], ref[k]))


def test_learnable_offsets_initialise_as_at_cp1():
    """Built from the same seed, a Ulysses model equals the CP=1 one - its offsets included (made whole and drawn
    at the same point of the random stream, so the layers after it draw the same numbers too)."""
    assert run_on_ranks(4, _init_with_the_same_seed, 4) == [[]] * 4


@pytest.mark.parametrize(
    "algo,extra,refused",
    [
        ("megatron_cp_algo", dict(softmax_type="learnable"), None),
        ("hybrid_cp_algo", dict(window_size=(128, 0)), None),
        ("ulysses_cp_algo", dict(softmax_type="learnable", window_size=(128, 0)), None),
        ("megatron_cp_algo", dict(window_size=(128, 0), attention_mask_type="general"), "--window-size (128, 0)"),
    ],
)
def test_megatron_lm_arguments_refuse_what_no_algorithm_can_compute(algo, extra, refused):
    """Megatron-LM's validate_args (mindspeed_cp.megatron.megatron_lm.check_args) accepts windows and sinks on
    every algorithm and refuses, before anything starts and with the sentence the model build would raise, what
    Megatron's attention itself does not define: a window and an explicit mask together."""
    import argparse

    from mindspeed_cp.config import CPConfigError
    from mindspeed_cp.megatron.megatron_lm import check_args

    args = argparse.Namespace(
        context_parallel_size=4,
        context_parallel_algo=algo,
        world_size=4,
        ulysses_degree_in_cp=2 if algo == H else None,
        num_attention_heads=8,
        seq_length=64,
        transformer_impl="local",
        **extra,
    )
    if refused is None:
        check_args(args)
        return
    with pytest.raises(CPConfigError, match=__import__("re").escape(f"{refused}) with --attention-mask-type general")):
        check_args(args)
