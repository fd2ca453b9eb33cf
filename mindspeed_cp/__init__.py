"""mindspeed-cp: context parallelism (Ulysses, Ring, Double Ring, Hybrid) for Megatron, as a plugin.

``import mindspeed_cp.megatron_adaptor`` patches Megatron; this package root only re-exports the public
API (it imports torch, never Megatron).
"""
from .config import ALGORITHMS, HYBRID, RING, ULYSSES, CPConfig, CPConfigError
from .hybrid import hybrid_attention
from .ring import DoubleRingWindow, ring_attention
from .topology import LayoutError, rank_layout
from .ulysses import (DefaultGatherSizeCalculator, DistributedAttention, DynamicGatherSizeCalculator,
                      GatherSizeCalculator, UlyssesContextAttention)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "HYBRID", "RING", "ULYSSES", "CPConfig", "CPConfigError", "LayoutError", "rank_layout",
    "UlyssesContextAttention", "DistributedAttention", "GatherSizeCalculator", "DefaultGatherSizeCalculator",
    "DynamicGatherSizeCalculator", "ring_attention", "DoubleRingWindow", "hybrid_attention",
]
