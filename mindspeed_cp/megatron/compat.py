"""What differs between megatron-core releases and with Transformer Engine, and the plugin's answers.

* megatron-core 0.12's FP8 fallback raises on an empty parameter list (:func:`quantize_param_shard`);
* megatron-core 0.14 - 0.16 without Transformer Engine: MLA takes Megatron's ``MagicMock`` stand-in for TE as TE
  (:func:`mla_sees_te_stub`);
* with Transformer Engine importable the plugin runs its algorithm inside TE's attention, said once at start-up
  (:func:`announce_te`).
"""

from __future__ import annotations

import functools
import importlib

from ..config import CPConfig


def quantize_param_shard(original, model_params, *args, **kwargs):
    if len(model_params) == 0:  # no FP8 parameters: nothing to cast (0.13+ returns here by itself)
        return None
    return original(model_params, *args, **kwargs)


def raises_without_fp8_params() -> bool:
    """megatron-core 0.12's fallback (no Transformer Engine) raises even when there is nothing to quantize."""
    import inspect

    try:
        from megatron.core import fp8_utils
    except ImportError:
        return False
    impl = getattr(fp8_utils, "_quantize_param_shard_impl", None)
    try:
        return (
            impl is not None
            and "len(model_params) == 0" not in inspect.getsource(impl)
            and "Invalid" in inspect.getsource(impl)
        )
    except (OSError, TypeError):
        return False


def te_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


@functools.lru_cache(maxsize=None)  # asked before the patch corrects the flag: the release's own state
def mla_sees_te_stub() -> bool:
    """megatron-core 0.14-0.16 without Transformer Engine: MLA's module flag HAVE_TE is True (its TE names
    imported from Megatron's MagicMock stand-in) while the TE extension's own is False."""
    try:
        mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
        te_ext = importlib.import_module("megatron.core.extensions.transformer_engine")
    except ImportError:
        return False
    return getattr(mla, "HAVE_TE", False) is True and getattr(te_ext, "HAVE_TE", True) is False


_TE_ANNOUNCED: list = []


def te_takeover(config: CPConfig) -> str:
    """What runs in Transformer Engine's attention under this configuration (said once at start-up)."""
    return (
        f"mindspeed-cp: Transformer Engine is importable - its attention (TEDotProductAttention, the TE layer "
        f"spec) runs mindspeed-cp's {config.describe()} on the plugin's sharding, not TE's own context "
        f"parallelism; Megatron-LM's --cp-comm-type other than p2p and --hierarchical-context-parallel-sizes "
        f"are refused (choose --context-parallel-algo)"
    )


def announce_te(config: CPConfig, rank: int) -> bool:
    """Print :func:`te_takeover` once per process, on global rank 0; True when it printed."""
    if rank != 0 or _TE_ANNOUNCED:
        return False
    _TE_ANNOUNCED.append(config.describe())
    print(te_takeover(config), flush=True)
    return True
