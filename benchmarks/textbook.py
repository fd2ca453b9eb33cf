"""The limits the benchmarks compare against: the formulas of :mod:`mindspeed_cp.planner.costmodel`
(docs/design.md, "Conventions").

They live in the package so that ``mindspeed-cp plan`` ranks configurations with the very formulas the
benchmarks check against measurements; this module only re-exports them for the benchmarks and their tests.
"""

from __future__ import annotations

from mindspeed_cp.planner.costmodel import (  # noqa: F401
    hybrid_bytes,
    hybrid_kv_cache,
    ring_bytes,
    ring_kv_cache,
    textbook_bytes,
    ulysses_bytes,
    ulysses_kv_cache,
)
