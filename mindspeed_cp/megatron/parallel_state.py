"""Megatron's parallel state, and the plugin's groups beside it.

``initialize_model_parallel`` builds Megatron's groups first, then the Ulysses / ring / double-ring groups from the
same layout function :mod:`mindspeed_cp.topology` draws (:meth:`mindspeed_cp.megatron.state.CPState.build_groups`),
on every rank in one order; ``destroy_model_parallel`` drops them together with Megatron's.
"""

from __future__ import annotations

from ..config import CPConfigError
from .compat import announce_te, te_available
from .state import STATE


def initialize_model_parallel(original, *args, **kwargs):
    """Megatron's groups first, then ours from the same layout function, on every rank in one order."""
    import inspect

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    params = {**{k: p.default for k, p in inspect.signature(original).parameters.items()}, **bound.arguments}
    tp = params.get("tensor_model_parallel_size", 1) or 1
    pp = params.get("pipeline_model_parallel_size", 1) or 1
    cp = params.get("context_parallel_size", 1) or 1
    order = params.get("order", "tp-cp-ep-dp-pp")
    world = dist.get_world_size()

    config = STATE.config
    if cp != config.cp:
        if STATE.configured and STATE.cp_explicit:
            raise CPConfigError(
                f"initialize_model_parallel(context_parallel_size={cp}) contradicts "
                f"configure(context_parallel_size={config.cp}) (--context-parallel-size)"
            )
        config = config.replace(context_parallel_size=cp)
    config.validate(world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    minutes = STATE.timeout_minutes
    if (
        minutes is not None
        and "distributed_timeout_minutes" not in bound.arguments
        and "distributed_timeout_minutes" in params
    ):
        kwargs = {**kwargs, "distributed_timeout_minutes": minutes}  # configure() names it: Megatron's groups too
    elif minutes is None:
        minutes = params.get("distributed_timeout_minutes", 30) or 30
    if cp > 1 and order != "tp-cp-ep-dp-pp":
        raise CPConfigError(
            f"mindspeed-cp lays out context-parallel sub-groups for Megatron's default rank order "
            f"tp-cp-ep-dp-pp, got order={order!r}"
        )
    result = original(*args, **kwargs)
    STATE.config = config
    if cp > 1:
        from datetime import timedelta

        timeout = timedelta(minutes=minutes)
        STATE.build_groups(
            world,
            dist.get_rank(),
            tp,
            pp,
            new_group=lambda ranks: dist.new_group(ranks, timeout=timeout),
            cp_group=ps.get_context_parallel_group(),
            gloo_group=(lambda ranks: dist.new_group(ranks, timeout=timeout, backend="gloo"))
            if dist.get_backend() != "gloo"
            else None,
        )
        if te_available():
            announce_te(config, dist.get_rank())
    return result


def destroy_model_parallel(original, *args, **kwargs):
    import torch.distributed as dist

    def destroy(pg):
        # new_group returns GroupMember.NON_GROUP_MEMBER (not a process group) on ranks outside the group
        if isinstance(pg, dist.ProcessGroup):
            dist.destroy_process_group(pg)

    STATE.clear_groups(destroy=destroy if dist.is_initialized() else None)
    result = original(*args, **kwargs)
    _forget_stale_embedding_ranks()
    return result


def _forget_stale_embedding_ranks() -> None:
    """megatron-core < 0.13 leaves the (position) embedding groups' rank lists behind when it destroys them; a
    rank outside those groups at the next initialisation then believes it is in one and asks for a group that
    is gone (finalize_model_grads: "position embedding group is not initialized"). Only rank lists whose group
    is already None are reset, so newer versions are untouched."""
    from megatron.core import parallel_state as ps

    for group, ranks in (
        ("_EMBEDDING_GROUP", "_EMBEDDING_GLOBAL_RANKS"),
        ("_POSITION_EMBEDDING_GROUP", "_POSITION_EMBEDDING_GLOBAL_RANKS"),
    ):
        if getattr(ps, group, None) is None and getattr(ps, ranks, None) is not None:
            setattr(ps, ranks, None)
