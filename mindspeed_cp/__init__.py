"""mindspeed-cp: context parallelism (Ulysses, Ring, Double Ring, Hybrid, all-gather K/V) for Megatron, as a plugin.

``import mindspeed_cp.megatron_adaptor`` patches Megatron; this package root only re-exports the public
API. The algorithm classes import torch on first access, so the pure parts (config, topology, the
``mindspeed-cp groups`` command) start fast.
"""

import importlib

from .config import ALGORITHMS, HYBRID, KVALLGATHER, RING, ULYSSES, CPConfig, CPConfigError
from .topology import LayoutError, rank_layout

__version__ = "0.1.0"

_LAZY = {
    "UlyssesContextAttention": "ulysses",
    "DistributedAttention": "ulysses",
    "GatherSizeCalculator": "ulysses",
    "DefaultGatherSizeCalculator": "ulysses",
    "DynamicGatherSizeCalculator": "ulysses",
    "ring_attention": "ring",
    "DoubleRingWindow": "ring",
    "hybrid_attention": "hybrid",
    "kvallgather_attention": "kvallgather",
}

__all__ = [
    "ALGORITHMS",
    "HYBRID",
    "KVALLGATHER",
    "RING",
    "ULYSSES",
    "CPConfig",
    "CPConfigError",
    "LayoutError",
    "rank_layout",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
