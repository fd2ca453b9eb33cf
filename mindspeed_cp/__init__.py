"""mindspeed-cp: context parallelism (Ulysses, Ring, Double Ring, Hybrid) for Megatron, as a plugin.

``import mindspeed_cp.megatron_adaptor`` patches Megatron; this package root only re-exports the public
API and imports nothing from Megatron.
"""
from .config import ALGORITHMS, HYBRID, RING, ULYSSES, CPConfig, CPConfigError
from .topology import LayoutError, rank_layout

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "HYBRID", "RING", "ULYSSES", "CPConfig", "CPConfigError", "LayoutError", "rank_layout",
]
