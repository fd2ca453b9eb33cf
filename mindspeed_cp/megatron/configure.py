"""``configure()``: make the CP options active, validated - the one entry Megatron-LM's ``validate_args`` and a
megatron-core script call (``mindspeed_cp.megatron_adaptor.configure`` is this function)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from ..config import CPConfig, CPConfigError
from .state import STATE, CPStateError


def _check_namespace(namespace: Any) -> None:
    """configure()'s first argument: None or an object whose attributes are Megatron's args."""
    if namespace is None:
        return
    if isinstance(namespace, Mapping):
        raise CPConfigError(
            f"configure() takes Megatron's parsed args (an object with attributes such as "
            f"context_parallel_size) or keywords, not a {type(namespace).__name__}: write "
            f"configure(**options)"
        )
    if (
        isinstance(namespace, (str, bytes, int, float, list, tuple, set))
        or not hasattr(namespace, "__dict__")
        and not any(hasattr(namespace, name) for name in CPConfig.fields())
    ):
        raise CPConfigError(
            f"configure() takes Megatron's parsed args (an object with attributes such as "
            f"context_parallel_size) or keywords, got {type(namespace).__name__} {namespace!r:.60}"
        )


def configure(
    namespace: Optional[Any] = None,
    *,
    distributed_timeout_minutes: Optional[float] = None,
    documents: Optional[str] = None,
    eod_token: Optional[int] = None,
    **flags: Any,
) -> CPConfig:
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
    ``documents``: packed sequences, document-causal attention (:mod:`mindspeed_cp.layout.packing`); the batch's
    document boundaries are read by ``get_batch_on_this_cp_rank`` from ``"position_ids"`` (they restart at 0,
    ``--reset-position-ids``) or after every ``"eod"`` token (``eod_token``). Megatron-LM sets it from
    ``--reset-attention-mask`` with ``--attention-mask-type causal``.
    """
    _check_namespace(namespace)
    minutes = distributed_timeout_minutes
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0):
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
            f"parallel_state.destroy_model_parallel() first"
        )
    STATE.set_config(config)
    STATE.timeout_minutes = minutes
    STATE.documents_from, STATE.eod_token = documents, eod_token
    STATE.cp_explicit = "context_parallel_size" in flags or (
        ns is not None and getattr(ns, "context_parallel_size", None) is not None
    )
    return config
