"""Build and train a tiny megatron-core GPT inside a gloo rank (tests/dist.py worker).

Typical use, in a module-level function run by ``run_on_ranks``::

    import mindspeed_cp.megatron_adaptor as adaptor
    from megatron.core import parallel_state

    init_parallel(tp=2, seed=7)                      # Megatron's groups + its RNG seeding
    model = build_gpt(seq=64, seed=7)
    losses = train_steps(model, fixed_batch(seq=64), steps=3)

    # context parallel: configure first, shard the batch, average grads over data x context parallel
    adaptor.configure(context_parallel_size=2, context_parallel_algo="megatron_cp_algo")
    init_parallel(cp=2, seed=7)
    model = build_gpt(seq=64, seed=7)
    losses = train_steps(model, shard_for_cp(fixed_batch(seq=64)), steps=3,
                         grad_group=parallel_state.get_data_parallel_group(with_context_parallel=True))

Everything goes through megatron-core's public entry points (``initialize_model_parallel``,
``model_parallel_cuda_manual_seed``, ``GPTModel`` with the local layer spec), so on a machine without an
accelerator this exercises ``mindspeed_cp.device``'s patches exactly as a user's script does.
Dropout defaults to 0 so that runs with different parallel layouts are comparable.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

Batch = Dict[str, torch.Tensor]


def init_parallel(tp: int = 1, cp: int = 1, pp: int = 1, seed: Optional[int] = 1234, **kwargs) -> None:
    """Megatron's model-parallel groups (with the plugin's patches), then its RNG seeding when `seed`."""
    from megatron.core import parallel_state, tensor_parallel

    import mindspeed_cp.megatron_adaptor  # noqa: F401  - the patches

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp, **kwargs
    )
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_gpt(
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: Optional[int] = None,
    vocab: int = 128,
    seq: int = 64,
    seed: Optional[int] = 1234,
    dtype: torch.dtype = torch.float32,
    position_embedding_type: str = "rope",
    mla: Optional[dict] = None,
    moe: Optional[dict] = None,
    **overrides,
):
    """A GPTModel (local layer spec) for the parallel layout of :func:`init_parallel`.

    ``seed`` re-seeds Megatron's RNG right before building, so the same seed gives the same weights
    whatever happened before (and, with CPU initialisation, whatever the TP size). ``overrides`` are
    TransformerConfig fields (e.g. ``hidden_dropout=0.1``, ``recompute_granularity="full"``,
    ``mtp_num_layers=1``: the stock local MTP block spec is added). ``mla``: MLATransformerConfig fields (the
    stock local MLA spec); ``moe``: MoE fields (``num_moe_experts``, ...; the local spec's experts). With a
    half ``dtype`` the model is wrapped in Megatron's Float16Module (half weights, fp32 loss).
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=4 * hidden,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        pipeline_dtype=dtype if ps.get_pipeline_model_parallel_world_size() > 1 else None,
    )
    fields.update(overrides, **(mla or {}), **(moe or {}))
    config = (MLATransformerConfig if mla is not None else TransformerConfig)(**fields)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, multi_latent_attention=mla is not None)
    mtp = None if not config.mtp_num_layers else get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        position_embedding_type=position_embedding_type,
        mtp_block_spec=mtp,
    )
    if dtype in (torch.bfloat16, torch.float16):  # as Megatron trains in half: every weight in `dtype`,
        from megatron.core.transformer.module import Float16Module  # fp32 logits / loss out

        model = Float16Module(config, model)
    return model


def fixed_batch(batch: int = 2, seq: int = 64, vocab: int = 128, seed: int = 0) -> Batch:
    """The same token batch on every rank (a private generator: the global RNG is not touched).

    Labels are the next tokens of one random sequence, so a model can learn them.
    """
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": torch.ones(batch, seq),
        "position_ids": torch.arange(seq).expand(batch, seq).contiguous(),
    }


def shard_for_cp(batch: Batch) -> Batch:
    """This CP rank's part of `batch`, through Megatron's get_batch_on_this_cp_rank (which the plugin
    patches per algorithm); unchanged with CP = 1."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(dict(batch))


def lm_loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token loss over the tokens of `batch` that count (``loss_mask``)."""
    per_token = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )  # [b, s]
    mask = batch["loss_mask"].to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def sync_grads(model, group=None) -> None:
    """Average gradients over `group` (data parallel, with context parallel where used), as Megatron's
    DDP does, without its CUDA buffers. (No sequence parallelism here: the local spec refuses it.)"""
    if group is None or dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)


def train_steps(
    model,
    batch: Batch,
    steps: int = 3,
    lr: float = 1e-3,
    loss_fn: Callable = lm_loss,
    grad_group=None,
    optimizer: Callable = torch.optim.Adam,
) -> List[float]:
    """`steps` optimizer steps on the fixed `batch`; the per-step losses (before each step).

    ``grad_group``: the group gradients are averaged over (see :func:`sync_grads`); the reported
    loss is averaged over it as well (with CP: the mean of the ranks' local means, i.e. the global
    mean when every rank holds as many counted tokens).
    """
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        sync_grads(model, grad_group)
        opt.step()
        reported = loss.detach().clone()
        if grad_group is not None and dist.get_world_size(grad_group) > 1:
            dist.all_reduce(reported, group=grad_group)
            reported /= dist.get_world_size(grad_group)
        losses.append(reported.item())
    return losses
