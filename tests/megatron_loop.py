"""megatron-core's own training machinery in a gloo rank, wired as Megatron-LM's ``train`` wires it.

``train(case)`` builds the GPT model chunks for the layout (virtual pipeline stages too), wraps each in
megatron-core's ``DistributedDataParallel`` (contiguous grad buffers, optional overlapped reduce and
distributed optimizer), builds ``get_megatron_optimizer`` (Adam, grad clipping), sets the config hooks
Megatron-LM sets (grad scale, finalize_model_grads, no_sync / grad_sync / param_sync, timers) and runs
``get_forward_backward_func()`` - no pipelining, 1F1B or interleaved 1F1B with their p2p - and
``optimizer.step()`` for a few steps. The loss function is pretrain_gpt.py's ``(sum, tokens, report)`` so
the plugin's CP loss normalisation is on the path. Returns per step the ``lm loss`` reduced like
Megatron-LM's train_step (sum over micro-batches, all-reduce over DP x CP) and the grad norm.

On a machine without an accelerator every CUDA call of that machinery goes through
``mindspeed_cp.device.emulation``: this is CI's view of Megatron-LM's training loop (which needs a
Megatron-LM checkout).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist

from tests import features

SEED = 1234


def step_tolerance(iteration: int):
    """``(loss, grad norm)`` bounds of a training run against its CP=1 reference at ``iteration`` (0 = the first),
    both relative: |difference| / the reference's value, float32.

    The first iteration differs only by the rounding of sums taken in another order (tokens over ranks, gradients
    over DP x CP): a mean of N token losses summed in another order typically moves by sqrt(N) ulp (N = 256 here:
    1e-6 relative); measured at most 2 ulp (1.9e-7 relative) on the loss and 1.5e-7 on the grad norm. Later
    iterations add Adam's amplification of those differences, which grows with every step and depends on the CPU's
    vector width: the grad norm's relative difference at iteration 4 measured 1.8e-6 with AVX-512 (AMD), 9.8e-7
    with AVX2, 6.4e-7 without vectorisation (``ATEN_CPU_CAPABILITY`` on one machine), 5.3e-6 reported on an Intel
    AVX-512 machine; the loss's at most 2 ulp. Bounds: (1e-6, 2e-6) at the first iteration, (2e-6, 2e-5) later -
    ~4x the worst seen; a CP error shows at the first iteration already, orders of magnitude above them
    (docs/reliability.md, "Bounds")."""
    return (1e-6, 2e-6) if iteration == 0 else (2e-6, 2e-5)


def _batches(global_batch: int, seq: int, vocab: int) -> List[Dict[str, torch.Tensor]]:
    """The global batch as single sequences (micro-batch size 1), the same on every rank."""
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(global_batch):
        start, step = torch.randint(0, vocab, (1,), generator=g), torch.randint(1, 7, (1,), generator=g)
        stream = (start + step * torch.arange(seq + 1)) % vocab  # learnable arithmetic sequences
        noise = torch.rand(seq + 1, generator=g) < 0.1
        stream = torch.where(noise, torch.randint(0, vocab, (seq + 1,), generator=g), stream)[None]
        out.append(
            {
                "tokens": stream[:, :-1].contiguous(),
                "labels": stream[:, 1:].contiguous(),
                "loss_mask": torch.ones(1, seq),
                "position_ids": torch.arange(seq)[None].contiguous(),
            }
        )
    return out


def _loss_func(loss_mask, output_tensor):
    """pretrain_gpt.py's loss_func (0.16): (sum of token losses, token count, report for logging). Where the
    schedule multiplies such a loss by the CP size (megatron-core 0.12), the count it divides by is the CP
    group's, as 0.12's pretrain_gpt.py all-reduces it; the report stays this rank's."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    if features.cp_scaled_token_loss():
        from megatron.core import parallel_state as ps

        num_tokens = num_tokens.clone()
        dist.all_reduce(num_tokens, group=ps.get_context_parallel_group())
    return loss, num_tokens, report


def _forward_step(data_iterator, model):
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = get_batch_on_this_cp_rank(dict(next(data_iterator)))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def train(case: dict) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.timers import Timers
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    import mindspeed_cp.megatron_adaptor as adaptor

    tp, pp, cp, vpp = case.get("tp", 1), case.get("pp", 1), case.get("cp", 1), case.get("vpp")
    seq, layers, steps, vocab = case.get("seq", 64), case.get("layers", 2), case.get("steps", 4), 128
    dist_opt, overlap, ep = case.get("distributed_optimizer", False), case.get("overlap", False), case.get("ep", 1)
    adaptor.configure(context_parallel_size=cp, **case.get("flags", {}))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    fields = dict(
        num_layers=layers,
        hidden_size=64,
        ffn_hidden_size=256,
        num_attention_heads=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(case.get("model", {}))  # a model preset's TransformerConfig fields (tests/test_presets.py)
    vocab = fields.pop("vocab", vocab)
    config = (MLATransformerConfig if fields.get("multi_latent_attention") else TransformerConfig)(
        **fields,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        pipeline_dtype=torch.float32,
        deallocate_pipeline_outputs=True,
        overlap_p2p_comm=vpp is not None,
        batch_p2p_comm=vpp is None,
    )
    norm = {} if config.normalization == "LayerNorm" else dict(normalization=config.normalization)  # 0.13+
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, multi_latent_attention=config.multi_latent_attention, **norm
    )
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=dist_opt,
        overlap_param_gather=overlap and dist_opt,
        bucket_size=4096,
    )
    torch.manual_seed(SEED)  # the same weights whatever the CP layout (CPU initialisation)
    chunks = []
    for stage in range(vpp or 1):
        vp = stage if vpp else None
        if features.vp_stage():
            stage_kw, model_kw = dict(ignore_virtual=False, vp_stage=vp), dict(vp_stage=vp)
        else:  # megatron-core < 0.13: the virtual rank is global state
            ps.set_virtual_pipeline_model_parallel_rank(vp)
            stage_kw, model_kw = dict(ignore_virtual=False), {}
        mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False) if config.mtp_num_layers else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=seq,
            position_embedding_type="rope",
            pre_process=ps.is_pipeline_first_stage(**stage_kw),
            post_process=ps.is_pipeline_last_stage(**stage_kw),
            mtp_block_spec=mtp,
            **model_kw,
        )
        chunks.append(
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, disable_bucketing=stage > 0)
        )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            adam_eps=1e-5,
            clip_grad=1.0,
            weight_decay=0.01,
            use_distributed_optimizer=dist_opt,
            params_dtype=torch.float32,
        ),
        chunks,
    )
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.timers = Timers(log_level=2, log_option="minmax")
    if overlap:
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.grad_sync_func = [c.start_grad_sync for c in chunks] if len(chunks) > 1 else chunks[0].start_grad_sync
        if dist_opt:
            config.param_sync_func = (
                [c.start_param_sync for c in chunks] if len(chunks) > 1 else chunks[0].start_param_sync
            )

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    global_batch = case.get("global_batch", 4)
    micro = global_batch // dp
    data = _batches(global_batch, seq, vocab)
    forward_backward = get_forward_backward_func()
    losses, grad_norms = [], []
    for step in range(steps):
        mine = [data[m * dp + dp_rank] for m in range(micro)]  # Megatron's sampler: micro-batch m, DP rank d
        iterators = [iter(mine) for _ in chunks]
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iterators if vpp else iterators[0],
            model=chunks if vpp else chunks[0],
            num_microbatches=micro,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, f"step {step}: optimizer skipped the update"
        # train_step's reduction: sum the reports over micro-batches, all-reduce over DP x CP, divide
        total = torch.zeros(2)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for r in reduced:
                total += r["lm loss"]
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(total, last, group=ps.get_pipeline_model_parallel_group())
        losses.append(float(total[0] / total[1]))
        grad_norms.append(float(grad_norm))
    return {"losses": losses, "grad_norms": grad_norms, "timers": sorted(config.timers._timers)}
