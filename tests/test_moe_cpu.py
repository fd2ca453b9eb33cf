"""MoE and MLA's RoPE variants on the CPU: megatron-core 0.16.1 through its public API on gloo ranks, with
nothing but ``import mindspeed_cp.megatron_adaptor`` (the device layer) in between. Skipped where an accelerator
exists: the entries under test do not apply there.

- Expert parallelism: a tiny MoE GPT (4 experts, top-2, aux loss) with EP 2 - the all-to-all and the allgather
  token dispatchers - trains 2 steps under megatron-core's DDP and Adam equal to the same model with EP 1 (its
  weights, mapped to global expert indices; EP 1's all-to-all dispatcher, also against its allgather one).
  Bounds, float32, measured (AVX2) and set ~25x above the worst seen - the runs differ only in the order of
  sums (an expert's gradient is summed by the all-to-all's backward at EP 2, by DDP's all-reduce at EP 1):
  losses and aux losses 1e-6 relative (seen 0), DDP's main_grad 1e-5 relative to each tensor's largest entry
  (seen 4.1e-7 at EP 2, 0 for allgather at EP 1).
- The router without Transformer Engine: megatron-core's gating linear against torch for every router dtype.
- YaRN (MLA's default RoPE) constructs on the CPU, as MLA builds it; MLA GPTs with the stock local spec.
"""

from __future__ import annotations

import pytest
import torch

from mindspeed_cp.device import has_accelerator
from tests.dist import run_on_ranks

pytestmark = pytest.mark.skipif(has_accelerator(), reason="device patches apply only without an accelerator")

SEED = 1234
EXPERTS = 4
LOSS_TOL = 1e-6
GRAD_TOL = 1e-5
ROUTER_TOL = 1e-5  # absolute, outputs up to ~6; seen 5e-7 (float32 router and grads), 2e-7 (float64)
CASES = [("alltoall", 2), ("allgather", 2), ("allgather", 1)]  # each against the all-to-all dispatcher at EP 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- MoE: EP 2 == EP 1
def _global_name(name: str, ep_rank: int, local_experts: int) -> str:
    """``...experts.local_experts.<i>...`` on EP rank r is global expert ``r * local_experts + i``."""
    key = "local_experts."
    if key not in name:
        return name
    head, tail = name.split(key, 1)
    index, rest = tail.split(".", 1)
    return f"{head}{key}{ep_rank * local_experts + int(index)}.{rest}"


def _moe_run(dispatcher: str, ep: int, weights=None, steps: int = 2) -> dict:
    """Build the MoE GPT for EP `ep` (weights from `weights`, by global name, when given), train `steps` Adam
    steps under Megatron's DDP; every DP rank its own batch."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tests.gpt_helpers import fixed_batch, init_parallel, lm_loss

    init_parallel(tp=1, seed=SEED, expert_model_parallel_size=ep)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,
        moe_aux_loss_coeff=1e-2,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=EXPERTS),
        vocab_size=128,
        max_sequence_length=32,
    )
    ep_rank, local_experts = ps.get_expert_model_parallel_rank(), EXPERTS // ep
    names = {n: _global_name(n, ep_rank, local_experts) for n, _ in model.named_parameters()}
    if weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[names[n]])
    state = {names[n]: p.detach().clone() for n, p in model.named_parameters()}
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(), module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, params_dtype=torch.float32), [model])
    batch = fixed_batch(seq=32, seed=ps.get_data_parallel_rank())
    losses, aux, grads = [], None, None
    for step in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        clear_aux_losses_tracker()
        loss = lm_loss(model, batch)
        loss.backward()
        model.finish_grad_sync()
        if step == 0:
            grads = {names[n]: p.main_grad.clone() for n, p in model.module.named_parameters()}
            aux = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        ok, _, _ = optimizer.step()
        assert ok
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=ps.get_data_parallel_group())
        losses.append(reported.item() / ps.get_data_parallel_world_size())
    return {
        "weights": state,
        "losses": losses,
        "aux": aux,
        "grads": grads,
        "experts_here": sorted(
            {n.split("local_experts.")[1].split(".")[0] for n in names.values() if "local_experts." in n}
        ),
    }


def _ep2_vs_ep1() -> dict:
    reference = _moe_run("alltoall", ep=1)
    out = {"reference": {k: reference[k] for k in ("losses", "experts_here")}}
    for dispatcher, ep in CASES:
        got = _moe_run(dispatcher, ep=ep, weights=reference["weights"])
        grad_rel = {n: _rel(g, reference["grads"][n]) for n, g in got["grads"].items()}
        out[f"{dispatcher} EP{ep}"] = {
            "losses": got["losses"],
            "experts_here": got["experts_here"],
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(got["losses"], reference["losses"])),
            "aux_rel": max(_rel(got["aux"][k], reference["aux"][k]) for k in reference["aux"]),
            "aux_names": sorted(got["aux"]),
            "grad_rel": max(grad_rel.values()),
            "grads_compared": len(grad_rel),
            "grad_tensors_nonzero": all(g.abs().max() > 0 for g in got["grads"].values()),
        }
    return out


def test_moe_expert_parallel_equals_ep1():
    """EP 2 over 2 ranks (2 experts each) equals EP 1 for both dispatchers (and the allgather dispatcher at EP 1
    equals the all-to-all one): the all-to-all dispatcher's split sizes reach all_to_all_single as numbers, the
    router's gating linear runs without Transformer Engine."""
    results = run_on_ranks(2, _ep2_vs_ep1)
    assert results[0]["reference"]["experts_here"] == ["0", "1", "2", "3"]
    for rank, r in enumerate(results):
        for dispatcher, ep in CASES:
            d = r[f"{dispatcher} EP{ep}"]
            print(
                f"\nrank {rank} {dispatcher} EP{ep} vs alltoall EP1: losses {d['losses']} vs "
                f"{r['reference']['losses']} (rel {d['loss_rel']:.1e}), aux rel {d['aux_rel']:.1e}, "
                f"main_grad rel {d['grad_rel']:.1e} over {d['grads_compared']} tensors"
            )
            mine = [str(2 * rank), str(2 * rank + 1)] if ep == 2 else ["0", "1", "2", "3"]
            assert d["experts_here"] == mine  # EP really split the experts
            assert "load_balancing_loss" in d["aux_names"]
            assert d["grad_tensors_nonzero"]
            assert d["loss_rel"] < LOSS_TOL and d["aux_rel"] < LOSS_TOL
            assert d["grad_rel"] < GRAD_TOL
        assert r["alltoall EP2"]["losses"][1] < r["alltoall EP2"]["losses"][0]  # it trains


# ----------------------------------------------------------------------------- router without TE
@pytest.mark.parametrize("router_dtype", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_router_gating_linear_without_te(router_dtype, bias):
    """megatron-core's router gating linear (moe_router_dtype unset / fp32 / fp64) runs without Transformer
    Engine and equals torch's linear, forward and backward."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    import mindspeed_cp.megatron_adaptor  # noqa: F401

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 8, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True) if bias else None
    dtype = router_dtype or x.dtype
    out = router_gating_linear(x, w, b, dtype)
    assert out.dtype == dtype and out.shape == (3, 2, 4)
    upstream = torch.randn(out.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], upstream)
    # the reference in float64: 8-term dot products, float32 rounding stays far below the bound
    inputs = [t.detach().double().requires_grad_() for t in (x, w, b) if t is not None]
    want = torch.nn.functional.linear(*inputs)
    ref = torch.autograd.grad(want, inputs, upstream.double())
    assert (out.double() - want).abs().max() < ROUTER_TOL
    for a, e in zip(got, ref):
        assert a.dtype == torch.float32 and (a.double() - e).abs().max() < ROUTER_TOL


# ----------------------------------------------------------------------------- flex dispatcher
def _flex():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tests.gpt_helpers import init_parallel

    init_parallel(tp=1, seed=SEED, expert_model_parallel_size=2)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        add_bias_linear=False,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type="flex",
        expert_model_parallel_size=2,
    )
    GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=EXPERTS),
        vocab_size=128,
        max_sequence_length=32,
    )


def test_flex_dispatcher_refused_on_cpu():
    from tests.dist import expect_error_on_every_rank

    expect_error_on_every_rank(2, _flex, match="flex.*no accelerator.*'alltoall'")


# ----------------------------------------------------------------------------- MLA's RoPE on the CPU
def test_yarn_rope_constructs_on_cpu():
    """YaRN as MLA builds it (no use_cpu_initialization: ``with torch.device(torch.cuda.current_device())``)
    gives the tables of Megatron's own CPU-initialised path."""
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding

    import mindspeed_cp.megatron_adaptor  # noqa: F401

    kw = dict(
        kv_channels=16,
        rotary_base=10000,
        scaling_factor=4.0,
        original_max_position_embeddings=32,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    default = YarnRotaryEmbedding(**kw)
    cpu_init = YarnRotaryEmbedding(use_cpu_initialization=True, **kw)
    emb, mscale = default(64)
    want, want_mscale = cpu_init(64)
    assert emb.device.type == "cpu" and emb.shape == (64, 1, 1, 16)
    assert torch.equal(emb, want) and mscale == want_mscale
    assert torch.isfinite(emb).all()


def _mla_gpt(rope_type):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from tests.gpt_helpers import fixed_batch, init_parallel, lm_loss

    init_parallel(tp=1, seed=SEED)
    config = MLATransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_head_dim=8,
        qk_pos_emb_head_dim=8,
        v_head_dim=8,
        rope_type=rope_type,
        normalization="RMSNorm",
        rotary_scaling_factor=4.0,
        original_max_position_embeddings=16,
    )
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=128,
        max_sequence_length=32,
        position_embedding_type="none",
    )
    loss = lm_loss(model, fixed_batch(seq=32))
    loss.backward()
    return {"loss": loss.item(), "grads_finite": all(torch.isfinite(p.grad).all() for p in model.parameters())}


@pytest.mark.parametrize("rope_type", ["yarn", "rope"])
def test_mla_local_spec_on_cpu(rope_type):
    """An MLA GPT with megatron-core's stock local spec, CP=1: its RoPE (YaRN or plain) builds on the CPU, MLA
    does not trip over the Transformer Engine stand-in, and Megatron's local DotProductAttention takes the
    k_channels / v_channels the local MLA spec passes (the plugin's constructor; CP > 1: test_model_features)."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention as mla

    import mindspeed_cp.megatron_adaptor  # noqa: F401

    assert getattr(mla, "HAVE_TE", False) == getattr(te_ext, "HAVE_TE", False)
    (r,) = run_on_ranks(1, _mla_gpt, rope_type)
    assert r["grads_finite"] and 4.0 < r["loss"] < 6.0, r
