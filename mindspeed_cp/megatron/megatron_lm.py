"""Megatron-LM (``megatron.training``) integration: our flags in its parser, validation, batch split, loss.

``PATCHES`` is spliced into ``megatron_adaptor.PATCHES``; targets under ``megatron.training`` are skipped
when Megatron-LM is not importable (``mindspeed-cp patches`` shows why). With them applied, Megatron-LM's
own ``parse_args()`` knows MindSpeed's context-parallel flags, ``validate_args()`` checks them first (every
error names the flags) and then calls :func:`mindspeed_cp.megatron_adaptor.configure` with the namespace,
so an unmodified ``pretrain_gpt.py`` runs the configured algorithm once the adaptor is imported first
(``python -m mindspeed_cp.launch pretrain_gpt.py ...`` or the one-line diff in ``patches/``).

Megatron-LM's own context-parallel rules and what happens to them (0.16.1, ``megatron/training/arguments.py``):

* ``seq_length % (2*CP) == 0`` (its zigzag) - relaxed: ring / hybrid pad each batch at its end to the next
  multiple (``sharding.padded_seq_len``; exact, pads out of the loss), ``ulysses_cp_algo`` only needs
  ``seq_length >= CP`` (unaligned lengths are split unevenly).
* ``world_size % (TP*PP*CP)`` - checked by us first with flag names, then by Megatron.
* CP needs Transformer Engine's attention (TE spec) for Megatron's own CP - mindspeed-cp runs its algorithms
  in the local spec's core attention, so CP > 1 requires ``--transformer-impl local`` (refused otherwise:
  TE would run its own CP on our sharding).
* ``--cp-comm-type`` / ``--hierarchical-context-parallel-sizes`` (TE's a2a / p2p / a2a+p2p) and
  ``--hybrid-context-parallel`` (dynamic CP for packed sequences) - refused with CP > 1: the algorithm is
  chosen by ``--context-parallel-algo``.
* ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with TP or CP > 1 - kept (Megatron's requirement; on a machine without
  an accelerator the device architecture reads as 0, so the variable is still required).
* legacy models refuse CP - kept.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional

from ..config import ARGUMENTS, CPConfig, CPConfigError, add_arguments  # noqa: F401 - re-exported
from . import batch
from .compat import te_available
from .configure import configure
from .patching import Patch, wrap


# ----------------------------------------------------------------------------- the flags
# MindSpeed's flag table and add_arguments live in mindspeed_cp.config (torch-free: `mindspeed-cp check` parses
# without importing torch); re-exported here, where Megatron-LM's parser gets them.
# ----------------------------------------------------------------------------- validation
def _te_attention_supported() -> bool:
    """True when the plugin patches Transformer Engine's attention (then the TE spec runs our algorithms)."""
    return te_available()


def _megatron_conflicts(args: Any, config: CPConfig) -> None:
    """Megatron-LM options that would silently run something else than the configured algorithm."""
    algo, cp = config.context_parallel_algo, config.cp
    feature = config.feature_problem(getattr(args, "softmax_type", "vanilla"), getattr(args, "window_size", None))
    if feature is not None:
        raise CPConfigError(
            feature.replace("softmax_type=", "--softmax-type ").replace("window_size=", "--window-size ")
        )
    impl = getattr(args, "transformer_impl", "local")
    if impl != "local" and getattr(args, "spec", None) is None and not _te_attention_supported():
        raise CPConfigError(
            f"--context-parallel-size {cp} with --context-parallel-algo {algo} needs --transformer-impl local "
            f"(got {impl}): mindspeed-cp runs its algorithms in the local spec's attention, while Transformer "
            f"Engine's attention would run its own context parallelism on this sharding"
        )
    comm = getattr(args, "cp_comm_type", None) or ["p2p"]
    if list(comm) != ["p2p"]:
        raise CPConfigError(
            f"--cp-comm-type {' '.join(comm)} selects Transformer Engine's context parallelism; with mindspeed-cp "
            f"choose --context-parallel-algo (a2a ~ ulysses_cp_algo, p2p ~ megatron_cp_algo, all_gather ~ "
            f"kvallgather_cp_algo, a2a+p2p ~ hybrid_cp_algo with --ulysses-degree-in-cp)"
        )
    if getattr(args, "hierarchical_context_parallel_sizes", None):
        raise CPConfigError(
            "--hierarchical-context-parallel-sizes is Transformer Engine's a2a+p2p layout; with mindspeed-cp use "
            "--context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp U"
        )
    if getattr(args, "hybrid_context_parallel", False):
        raise CPConfigError(
            "--hybrid-context-parallel (Megatron's dynamic CP for packed sequences) cannot be combined with "
            f"--context-parallel-size {cp}; mindspeed-cp's hybrid is --context-parallel-algo hybrid_cp_algo"
        )
    if config.attention_mask_type == "general" and not getattr(args, "create_attention_mask_in_dataloader", True):
        raise CPConfigError(
            "--attention-mask-type general reads the mask from the batch, but "
            "--no-create-attention-mask-in-dataloader removes it"
        )
    docs = config.attention_mask_type == "causal" and getattr(args, "reset_attention_mask", False)
    if docs and (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise CPConfigError(
            "--reset-attention-mask with --context-parallel-size > 1 (packed documents) reads the document boundaries "
            "from the batch, which later pipeline stages do not receive: --pipeline-model-parallel-size 1 for now"
        )
    padded = config.uses_zigzag and (docs or (_seq_length(args) or 0) % (2 * cp))
    if padded and (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise CPConfigError(
            f"{algo} pads {'every document (--reset-attention-mask)' if docs else 'the sequence'}"
            f" to a multiple of 2 x --context-parallel-size {cp}, so the tokens per rank vary from batch to batch, "
            f"but --pipeline-model-parallel-size sends fixed-shape activations between stages"
        )
    if padded and getattr(args, "sequence_parallel", False):
        raise CPConfigError(
            f"--sequence-parallel with {algo} padding (--reset-attention-mask or an unaligned "
            f"--seq-length) is not supported yet"
        )


def _seq_length(args: Any) -> Optional[int]:
    seq = getattr(args, "seq_length", None)
    return seq if seq is not None else getattr(args, "encoder_seq_length", None)


def check_args(args: Any) -> CPConfig:
    """Validate Megatron-LM's parsed ``args`` for context parallelism; raise :class:`CPConfigError`.

    Pure (no torch.distributed): runs on any machine, before any collective. Returns the config.
    """
    config = CPConfig.from_namespace(args)
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    heads = getattr(args, "num_attention_heads", None)
    kv = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else None
    seq = _seq_length(args)
    config.validate(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_attention_heads=heads,
        num_query_groups=kv,
        seq_length=seq,
        world_size=getattr(args, "world_size", None),
        num_layers=getattr(args, "num_layers", None),
    )
    if config.cp == 1:
        return config
    _megatron_conflicts(args, config)
    if seq is not None and not (config.uses_zigzag and seq % (2 * config.cp)):  # else padded per batch
        from ..layout.sharding import local_lengths

        lengths = local_lengths(config, seq)
        if len(set(lengths)) > 1 and pp > 1:
            raise CPConfigError(
                f"--seq-length {seq} is split unevenly by --context-parallel-size {config.cp} "
                f"({'/'.join(map(str, sorted(set(lengths))))} tokens per rank) but --pipeline-model-parallel-size "
                f"{pp} sends equal-shaped activations between stages; use a multiple of {config.cp}"
            )
        if getattr(args, "sequence_parallel", False) and tp > 1 and any(n % tp for n in lengths):
            raise CPConfigError(
                f"--sequence-parallel splits each CP rank's {'/'.join(map(str, sorted(set(lengths))))} tokens "
                f"over --tensor-model-parallel-size {tp}; --seq-length {seq} must give every one of the "
                f"--context-parallel-size {config.cp} ranks a multiple of {tp} tokens"
            )
    return config


class _UnalignedSeqLength(int):
    """``seq_length`` while Megatron's ``validate_args`` runs, for Ulysses with an unaligned length.

    Megatron asserts ``seq_length % (2*CP) == 0`` for every CP because its only algorithm is the zigzag ring;
    Ulysses needs ``seq_length >= CP`` (checked by :func:`check_args`). This int answers 0 to exactly that
    ``% (2*CP)`` and is a plain int for everything else; it is replaced by ``int`` right after.
    """

    modulus: int = 0

    def __mod__(self, other):
        return 0 if other == self.modulus else int(self) % other


def _validate_args(original, args, *rest, **kwargs):
    """Our checks first (flag names), then Megatron's (its zigzag length rule relaxed), then
    ``configure(args)`` with the finished namespace. Without an accelerator, :func:`cpu_args` first."""
    from ..device.megatron_lm import cpu_args, cpu_only

    if cpu_only():
        cpu_args(args)
    config = check_args(args)
    relaxed = config.cp > 1 and args.seq_length is not None and args.seq_length % (2 * config.cp) != 0
    if relaxed:
        args.seq_length = _UnalignedSeqLength(args.seq_length)
        args.seq_length.modulus = 2 * config.cp
    try:
        result = original(args, *rest, **kwargs)
    finally:
        for name in ("seq_length", "encoder_seq_length"):
            if isinstance(getattr(args, name, None), _UnalignedSeqLength):
                setattr(args, name, int(getattr(args, name)))
    configure(args)
    if config.cp > 1 and config.attention_mask_type == "causal" and getattr(args, "reset_attention_mask", False):
        # packed documents: boundaries from the position resets, else after every EOD (the tokenizer's, read
        # at the first batch); the dataloader's dense mask is dropped by get_batch_on_this_cp_rank
        from .state import STATE

        STATE.documents_from = "position_ids" if getattr(args, "reset_position_ids", False) else "eod"
    return result


def _parse_args(original, *args, **kwargs):
    """Megatron-LM's parse_args with our flags added after its own (through ``extra_args_provider``, so the
    ones it already has - ``--context-parallel-size`` - are left to it)."""
    bound = inspect.signature(original).bind(*args, **kwargs)
    user = bound.arguments.get("extra_args_provider")

    def provider(parser):
        if user is not None:
            parser = user(parser)
        return add_arguments(parser)

    bound.arguments["extra_args_provider"] = provider
    return original(*bound.args, **bound.kwargs)


def _has_param(target: str, name: str):
    """``when`` for a patch that needs ``target`` to take parameter ``name`` (signatures move)."""

    def check() -> bool:
        from .patching import resolve

        try:
            owner, attr = resolve(target)
            return name in inspect.signature(getattr(owner, attr)).parameters
        except (ImportError, AttributeError, TypeError, ValueError):
            return True  # absent target: Patch.apply reports it as skipped

    return check


# ----------------------------------------------------------------------------- batch and loss
_TRAINING_SPLIT = "megatron.training.utils.get_batch_on_this_cp_rank"


def _training_split_is_own() -> bool:
    """Older Megatron-LM defines its own get_batch_on_this_cp_rank in megatron/training/utils.py; 0.16.1 imports
    megatron.core.utils' (already patched, and the patch rebinds that import), so nothing is left to do."""
    from .patching import resolve

    try:
        owner, name = resolve(_TRAINING_SPLIT)
        fn = getattr(owner, name)
    except (ImportError, AttributeError):
        return True  # Patch.apply reports the absent target
    return getattr(fn, "__module__", None) != "megatron.core.utils"


def _token_balanced(loss_func, cp_group):
    """Wrap a ``(loss_sum, num_tokens, report)`` loss function so the schedule's per-rank normalisation
    becomes one over the whole CP group.

    Megatron divides each rank's loss sum by that rank's own token count and the DDP reduction then averages
    over DP x CP ranks: exact only when every CP rank holds the same number of loss tokens. With uneven counts
    (unaligned Ulysses lengths, loss masks) rank r's loss is scaled by ``CP * n_r / N`` (N = tokens of the
    whole CP group), so ``sum_r CP * L_r / N / (DP*CP)`` = the CP=1 per-token mean / DP.
    """
    import torch
    import torch.distributed as dist

    def balanced(output_tensor, *args, **kwargs):
        outputs = loss_func(output_tensor, *args, **kwargs)
        if kwargs.get("non_loss_data") or not isinstance(outputs, tuple) or len(outputs) != 3:
            return outputs
        loss, num_tokens, report = outputs
        total = num_tokens.detach().clone()
        dist.all_reduce(total, group=cp_group)  # every CP rank computes a loss for the same micro-batch
        scale = num_tokens.detach().to(loss.dtype) * cp_group.size() / torch.clamp(total, min=1).to(loss.dtype)
        return loss * scale, num_tokens, report

    return balanced


def _forward_step_calc_loss(original, *args, **kwargs):
    """Megatron's loss step with the loss function normalised over the CP group (see ``_token_balanced``)."""
    from .state import STATE

    bound = inspect.signature(original).bind(*args, **kwargs)
    a = bound.arguments
    config = a.get("config")
    if (
        STATE.config.cp == 1
        or a.get("loss_func") is None
        or a.get("collect_non_loss_data")
        or getattr(config, "calculate_per_token_loss", False)
    ):
        return original(*args, **kwargs)
    from megatron.core import parallel_state as ps

    group = ps.get_context_parallel_group()
    if group.size() == 1:
        return original(*args, **kwargs)
    a["loss_func"] = _token_balanced(a["loss_func"], group)
    return original(*bound.args, **bound.kwargs)


# ----------------------------------------------------------------------------- metrics at full precision
METRICS_ENV = "MINDSPEED_CP_METRICS"


def _metrics_requested() -> bool:
    import os

    return bool(os.environ.get(METRICS_ENV))


def _training_log(original, *args, **kwargs):
    """Megatron-LM's training_log, and this iteration's values appended to ``$MINDSPEED_CP_METRICS`` as one JSON
    line (by the last rank, which holds the loss): the printed log rounds to 7 digits and, in 0.16.1, averages
    the first logged iterations; comparing a CP run with CP=1 wants each iteration's exact value."""
    import json
    import os
    import time

    import torch.distributed as dist

    a = inspect.signature(original).bind(*args, **kwargs).arguments
    if dist.is_initialized() and dist.get_rank() == dist.get_world_size() - 1:
        num = lambda v: None if v is None else float(v)  # noqa: E731
        record = dict(
            iteration=int(a["iteration"]),
            skipped=int(a.get("skipped_iter") or 0),
            losses={k: num(v) for k, v in (a.get("loss_dict") or {}).items()},
            grad_norm=num(a.get("grad_norm")),
            learning_rate=num(a.get("learning_rate")),
            time=time.time(),
        )
        with open(os.environ[METRICS_ENV], "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return original(*args, **kwargs)


# ----------------------------------------------------------------------------- installed megatron-core
_HELPERS = "megatron.core.datasets.utils.compile_helpers"


def _wheel_without_makefile() -> bool:
    """megatron-core installed from its wheel: the C++ dataset helpers come prebuilt, without the Makefile."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("megatron.core.datasets")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = list(spec.submodule_search_locations)[0]
    return not os.path.exists(os.path.join(folder, "Makefile"))


def _compile_helpers(original, *args, **kwargs):
    """Skip `make` when the prebuilt helpers import (Megatron-LM's _compile_dependencies would exit(1))."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return original(*args, **kwargs)
    return None


# ----------------------------------------------------------------------------- the list
_ARGS = "megatron.training.arguments"
_SCHED = "megatron.core.pipeline_parallel.schedules.forward_step_calc_loss"

PATCHES: List[Patch] = [
    Patch(
        f"{_ARGS}.parse_args",
        wrap(_parse_args),
        "add MindSpeed's CP flags the parser lacks (--context-parallel-algo, --ulysses-degree-in-cp, "
        "--cp-window-size, --use-cp-send-recv-overlap, --megatron-cp-in-bnsd, --attention-mask-type, "
        "--context-parallel-kv-cache-policy, --context-parallel-cache-interval, --use-ulysses-allgather-kv) through "
        "extra_args_provider, after Megatron's own and any user provider",
    ),
    Patch(
        f"{_ARGS}.validate_args",
        wrap(_validate_args),
        "check the CP flags first (errors name them; TE / --cp-comm-type / dropout conflicts), relax Megatron's "
        "seq % (2*CP) rule for Ulysses, then configure(args) with the parsed namespace",
    ),
    Patch(
        _TRAINING_SPLIT,
        wrap(batch.get_batch_on_this_cp_rank),
        "pretrain_gpt.py takes the batch split from megatron.training.utils: where that is Megatron-LM's own "
        "copy, split per algorithm too (0.16.1 re-exports megatron.core.utils', patched there)",
        when=_training_split_is_own,
        when_doc="megatron.training.utils defines its own split",
    ),
    Patch(
        _SCHED,
        wrap(_forward_step_calc_loss),
        "normalise each CP rank's loss by the CP group's token count (all-reduced), not its own: exact with "
        "uneven tokens per rank (unaligned Ulysses, loss masks); --calculate-per-token-loss is left alone",
        when=_has_param(_SCHED, "loss_func"),
        when_doc="forward_step_calc_loss(..., loss_func, ...)",
    ),
    Patch(
        "megatron.training.training.training_log",
        wrap(_training_log),
        f"${METRICS_ENV}=FILE: each iteration's losses, grad norm and learning rate at full precision, one JSON "
        "line per iteration (for comparing a CP run with CP=1; the printed log rounds and averages)",
        when=_metrics_requested,
        when_doc=f"${METRICS_ENV} set",
    ),
    Patch(
        _HELPERS,
        wrap(_compile_helpers),
        "Megatron-LM runs `make` in megatron/core/datasets at start-up; the megatron-core wheel ships the "
        "helpers prebuilt and no Makefile, so make fails and rank 0 exits: use the prebuilt module",
        when=_wheel_without_makefile,
        when_doc="megatron-core installed without its datasets Makefile",
    ),
]
