"""The limits the benchmarks compare against: the formulas of :mod:`mindspeed_cp.planner.costmodel`
(docs/design.md, "Conventions").

They live in the package so that ``mindspeed-cp plan`` ranks configurations with the very formulas the
benchmarks check against measurements; this module only re-exports them for the benchmarks and their tests.
"""

from __future__ import annotations

from mindspeed_cp.planner.costmodel import (
    textbook_bytes,  # noqa: F401
)
