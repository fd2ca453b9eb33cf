"""``import mindspeed_cp.megatron_adaptor`` applies every Megatron patch of the plugin, once.

This module is the one place that lists what the plugin replaces in Megatron (:data:`PATCHES`;
``mindspeed-cp patches`` prints it). Each entry is a dotted target, the function that builds the
replacement from the original, and why. Implementations live next to the feature they serve.

Usage (MindSpeed's convention)::

    import mindspeed_cp.megatron_adaptor as adaptor          # patches megatron.core
    adaptor.configure(context_parallel_size=4, context_parallel_algo="megatron_cp_algo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=4)
    # ... build a GPTModel as usual; its core attention now runs ring attention.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any, Optional

from . import attention, batch, device, megatron_lm
from .config import CPConfig, CPConfigError
from .patching import Patch, PatchRegistry, replace, wrap
from .state import STATE, CPStateError


# ----------------------------------------------------------------------------- parallel_state
def _initialize_model_parallel(original, *args, **kwargs):
    """Megatron's groups first, then ours from the same layout function, on every rank in one order."""
    import inspect

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    params = {**{k: p.default for k, p in inspect.signature(original).parameters.items()},
              **bound.arguments}
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
                f"configure(context_parallel_size={config.cp}) (--context-parallel-size)")
        config = config.replace(context_parallel_size=cp)
    config.validate(world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    minutes = STATE.timeout_minutes
    if minutes is not None and "distributed_timeout_minutes" not in bound.arguments and \
            "distributed_timeout_minutes" in params:
        kwargs = {**kwargs, "distributed_timeout_minutes": minutes}  # configure() names it: Megatron's groups too
    elif minutes is None:
        minutes = params.get("distributed_timeout_minutes", 30) or 30
    if cp > 1 and order != "tp-cp-ep-dp-pp":
        raise CPConfigError(
            f"mindspeed-cp lays out context-parallel sub-groups for Megatron's default rank order "
            f"tp-cp-ep-dp-pp, got order={order!r}")
    result = original(*args, **kwargs)
    STATE.config = config
    if cp > 1:
        from datetime import timedelta

        timeout = timedelta(minutes=minutes)
        STATE.build_groups(world, dist.get_rank(), tp, pp,
                           new_group=lambda ranks: dist.new_group(ranks, timeout=timeout),
                           cp_group=ps.get_context_parallel_group(),
                           gloo_group=(lambda ranks: dist.new_group(ranks, timeout=timeout, backend="gloo"))
                           if dist.get_backend() != "gloo" else None)
        if _te_available():
            announce_te(config, dist.get_rank())
    return result


_TE_ANNOUNCED: list = []


def te_takeover(config: CPConfig) -> str:
    """What runs in Transformer Engine's attention under this configuration (said once at start-up)."""
    return (f"mindspeed-cp: Transformer Engine is importable - its attention (TEDotProductAttention, the TE layer "
            f"spec) runs mindspeed-cp's {config.describe()} on the plugin's sharding, not TE's own context "
            f"parallelism; Megatron-LM's --cp-comm-type other than p2p and --hierarchical-context-parallel-sizes "
            f"are refused (choose --context-parallel-algo)")


def announce_te(config: CPConfig, rank: int) -> bool:
    """Print :func:`te_takeover` once per process, on global rank 0; True when it printed."""
    if rank != 0 or _TE_ANNOUNCED:
        return False
    _TE_ANNOUNCED.append(config.describe())
    print(te_takeover(config), flush=True)
    return True


def _destroy_model_parallel(original, *args, **kwargs):
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

    for group, ranks in (("_EMBEDDING_GROUP", "_EMBEDDING_GLOBAL_RANKS"),
                         ("_POSITION_EMBEDDING_GROUP", "_POSITION_EMBEDDING_GLOBAL_RANKS")):
        if getattr(ps, group, None) is None and getattr(ps, ranks, None) is not None:
            setattr(ps, ranks, None)


def _quantize_param_shard(original, model_params, *args, **kwargs):
    if len(model_params) == 0:  # no FP8 parameters: nothing to cast (0.13+ returns here by itself)
        return None
    return original(model_params, *args, **kwargs)


def _raises_without_fp8_params() -> bool:
    """megatron-core 0.12's fallback (no Transformer Engine) raises even when there is nothing to quantize."""
    import inspect

    try:
        from megatron.core import fp8_utils
    except ImportError:
        return False
    impl = getattr(fp8_utils, "_quantize_param_shard_impl", None)
    try:
        return impl is not None and "len(model_params) == 0" not in inspect.getsource(impl) and "Invalid" in \
            inspect.getsource(impl)
    except (OSError, TypeError):
        return False


def _te_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


@functools.lru_cache(maxsize=None)  # asked before the patch corrects the flag: the release's own state
def _mla_sees_te_stub() -> bool:
    """megatron-core 0.14-0.16 without Transformer Engine: MLA's module flag HAVE_TE is True (its TE names
    imported from Megatron's MagicMock stand-in) while the TE extension's own is False."""
    try:
        mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
        te_ext = importlib.import_module("megatron.core.extensions.transformer_engine")
    except ImportError:
        return False
    return getattr(mla, "HAVE_TE", False) is True and getattr(te_ext, "HAVE_TE", True) is False


# ----------------------------------------------------------------------------- the list
PATCHES = PatchRegistry()
for _patch in (
    Patch("megatron.core.parallel_state.initialize_model_parallel", wrap(_initialize_model_parallel),
          "after Megatron's groups, create the Ulysses / ring / double-ring groups (and the overlap "
          "communicators) from mindspeed_cp.topology, the function `mindspeed-cp groups` draws"),
    Patch("megatron.core.parallel_state.destroy_model_parallel", wrap(_destroy_model_parallel),
          "drop the context-parallel groups together with Megatron's (and the embedding groups' rank lists "
          "megatron-core < 0.13 leaves behind)", versions="all (0.12: stale embedding rank lists reset)"),
    Patch("megatron.core.fp8_utils.quantize_param_shard", wrap(_quantize_param_shard),
          "the distributed optimizer casts its FP8 parameters after every step; without Transformer Engine there "
          "are none, but megatron-core 0.12's fallback raises anyway (0.13 fixed it the same way)",
          when=_raises_without_fp8_params, when_doc="megatron-core's FP8 fallback raises on an empty list",
          versions="0.12 (0.13+ returns on an empty list itself)"),
    # core attention swap; with CP = 1 both calls go straight to Megatron's own code
    Patch("megatron.core.transformer.dot_product_attention.DotProductAttention.__init__",
          wrap(attention.core_attention_init),
          "local spec: with CP > 1 build Megatron's attention from a CP=1 copy of the config (its assert refuses "
          "CP; h/U heads under Ulysses) and attach the configured algorithm"),
    Patch("megatron.core.transformer.dot_product_attention.DotProductAttention.forward",
          wrap(attention.core_attention_forward),
          "local spec: run Ulysses / ring / hybrid attention around (or instead of) the local attention"),
    Patch("megatron.core.extensions.transformer_engine.TEDotProductAttention.__init__",
          wrap(attention.core_attention_init),
          "TE spec: as for the local spec; TE's own CP stays off (untested here: TE needs CUDA)",
          when=_te_available, when_doc="Transformer Engine importable"),
    Patch("megatron.core.extensions.transformer_engine.TEDotProductAttention.forward",
          wrap(attention.core_attention_forward),
          "TE spec: run the configured algorithm around (or instead of) TE's attention (untested here)",
          when=_te_available, when_doc="Transformer Engine importable"),
    Patch("megatron.core.transformer.multi_latent_attention.HAVE_TE", replace(False),
          "without Transformer Engine megatron-core stands a MagicMock in for it, so MLA's `from ...transformer_engine "
          "import TELinear` succeeds, MLA sets its HAVE_TE and its constructor raises on isinstance(linear_proj, "
          "TELinear): every MLA model fails to build. The flag says what is installed",
          when=_mla_sees_te_stub, when_doc="no Transformer Engine, MLA's HAVE_TE wrongly True",
          versions="0.14 - 0.16 (0.12 - 0.13 have no such check; 0.17+ imports HAVE_TE from the TE extension)"),
    Patch("megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed",
          wrap(attention.model_parallel_cuda_manual_seed),
          "also seed one attention-dropout stream per CP rank for the Ulysses level (Megatron's stream is seeded "
          "per TP rank only: every CP rank would drop the same positions of its different heads)"),
    # sharding
    Patch("megatron.core.utils.get_batch_on_this_cp_rank", wrap(batch.get_batch_on_this_cp_rank),
          "split the batch per algorithm: contiguous (Ulysses, unaligned lengths too), zigzag (ring), "
          "zigzag then contiguous (hybrid), per-document zigzag for packed documents; records the layout. In "
          "place: a name imported before the plugin would otherwise split Megatron's way", inplace=True),
    Patch("megatron.core.utils.get_thd_batch_on_this_cp_rank", wrap(batch.get_thd_batch_on_this_cp_rank),
          "packed THD batches (cu_seqlens): the per-document layout of every algorithm instead of TE's "
          "(Megatron's needs TE for CP > 1), the same PackedSeqParams back; in place, as above", inplace=True,
          versions="0.16 - 0.17 (absent before; 0.18 removed it)"),
    Patch("megatron.core.transformer.multi_token_prediction.roll_tensor", wrap(batch.roll_tensor),
          "multi-token prediction shifts tokens, labels, loss mask and positions one position left; Megatron's CP "
          "shift assumes its zigzag (wrong at every shard boundary of Ulysses and Hybrid, and before 0.14 it did not "
          "cross ranks at all): shift by global position under every layout (one value per boundary), and count the "
          "MTP loss tokens over the CP group", versions="all (cp_group from 0.14, packed_seq_params from 0.16)"),
    Patch("megatron.core.models.common.embeddings.rope_utils.get_pos_emb_on_this_cp_rank",
          replace(batch.get_pos_emb_on_this_cp_rank),
          "RoPE positions of the tokens this rank holds, for every algorithm (Megatron's is zigzag only, and "
          "its index goes through .cuda())", versions="all (cp_group argument from 0.13; before, parallel_state's)"),
    Patch("megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb",
          wrap(batch.apply_rotary_pos_emb),
          "THD RoPE under CP: positions per document for the plugin's layout (Megatron's THD branch and TE's fused "
          "kernel assume TE's zigzag over the whole CP group, and read cu_seqlens on the host every layer)",
          versions="all (cp_group argument from 0.13; THD batches only 0.16 - 0.17)"),
    Patch("megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.forward",
          wrap(batch.rotary_forward),
          "RoPE's table is cached by length with this rank's slice in it; packed documents change the slice with "
          "every batch, so the cache is bypassed for them"),
    Patch("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding.YarnRotaryEmbedding.forward",
          wrap(batch.rotary_forward),
          "YaRN RoPE (MLA's default) caches its table the same way: bypassed for packed documents",
          versions="all (YaRN from 0.12)"),
    Patch("megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.get_rotary_seq_len",
          wrap(batch.get_rotary_seq_len),
          "RoPE table covers the global length when Ulysses lengths are unaligned (Megatron assumes s*CP)"),
    *device.PATCHES,
    *megatron_lm.PATCHES,
):
    PATCHES.add(_patch)


def apply() -> None:
    """Apply every patch (a no-op for those already applied)."""
    PATCHES.apply_all()


def undo() -> None:
    """Restore every original (tests use this; a training job never needs it)."""
    PATCHES.undo_all()


def _check_namespace(namespace: Any) -> None:
    """configure()'s first argument: None or an object whose attributes are Megatron's args."""
    if namespace is None:
        return
    if isinstance(namespace, Mapping):
        raise CPConfigError(f"configure() takes Megatron's parsed args (an object with attributes such as "
                            f"context_parallel_size) or keywords, not a {type(namespace).__name__}: write "
                            f"configure(**options)")
    if isinstance(namespace, (str, bytes, int, float, list, tuple, set)) or not hasattr(namespace, "__dict__") \
            and not any(hasattr(namespace, name) for name in CPConfig.fields()):
        raise CPConfigError(f"configure() takes Megatron's parsed args (an object with attributes such as "
                            f"context_parallel_size) or keywords, got {type(namespace).__name__} {namespace!r:.60}")


def configure(namespace: Optional[Any] = None, *, distributed_timeout_minutes: Optional[float] = None,
              documents: Optional[str] = None, eod_token: Optional[int] = None, **flags: Any) -> CPConfig:
    """Make these CP options active, validated. Call before ``initialize_model_parallel``.

    ``namespace`` is Megatron's parsed ``args`` (or any object with the option attributes: an
    ``argparse.Namespace``, a ``SimpleNamespace``, a dataclass); keyword ``flags`` override it. A mapping is
    refused (its keys are not attributes, so every option would silently keep its default): pass
    ``configure(**options)``. Model facts found on the namespace (``tensor_model_parallel_size``,
    ``num_attention_heads``, ``num_query_groups``, ``seq_length``, ``world_size``) are validated too: positive
    integers, the error naming the flag.
    ``distributed_timeout_minutes``: how long a collective of the CP groups waits for a stalled peer before
    it raises (default: what ``initialize_model_parallel`` is given, Megatron's 30); passed on to
    ``initialize_model_parallel`` when its caller does not name it.
    ``documents``: packed sequences, document-causal attention (:mod:`mindspeed_cp.packing`); the batch's
    document boundaries are read by ``get_batch_on_this_cp_rank`` from ``"position_ids"`` (they restart at 0,
    ``--reset-position-ids``) or after every ``"eod"`` token (``eod_token``). Megatron-LM sets it from
    ``--reset-attention-mask`` with ``--attention-mask-type causal``.
    """
    _check_namespace(namespace)
    minutes = distributed_timeout_minutes
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not minutes > 0):
        raise CPConfigError(f"distributed_timeout_minutes {minutes!r} must be a positive number of minutes")
    if documents not in (None, "position_ids", "eod"):
        raise CPConfigError(f"documents={documents!r}: read document boundaries from 'position_ids' or 'eod'")
    if documents == "eod" and (isinstance(eod_token, bool) or not isinstance(eod_token, int)):
        raise CPConfigError(f"documents='eod' needs eod_token=<the EOD token id>, got {eod_token!r}")
    config = CPConfig.from_namespace(namespace, **flags)
    ns = namespace
    gqa = getattr(ns, "group_query_attention", True)
    def size(name):  # absent or None: 1; anything else is validated as given (0 is an error, not 1)
        value = getattr(ns, name, None)
        return 1 if value is None else value

    config.validate(
        tensor_model_parallel_size=size("tensor_model_parallel_size"),
        pipeline_model_parallel_size=size("pipeline_model_parallel_size"),
        num_attention_heads=getattr(ns, "num_attention_heads", None),
        num_query_groups=getattr(ns, "num_query_groups", None) if gqa else None,
        seq_length=getattr(ns, "seq_length", None),
        world_size=getattr(ns, "world_size", None),
    )
    if STATE.groups_built and config != STATE.config:
        raise CPStateError(
            f"configure({config.describe()}) while groups for {STATE.config.describe()} exist: call "
            f"parallel_state.destroy_model_parallel() first")
    STATE.set_config(config)
    STATE.timeout_minutes = minutes
    STATE.documents_from, STATE.eod_token = documents, eod_token
    STATE.cp_explicit = "context_parallel_size" in flags or (
        ns is not None and getattr(ns, "context_parallel_size", None) is not None)
    return config


apply()
