"""The limits the benchmarks compare against (DESIGN.md section 3). Pure arithmetic.

Bytes one rank sends, forward + backward, with ``s = S/P`` local tokens, ``b`` batch, ``h`` query heads,
``hk`` KV heads, ``d`` head dim, ``e`` bytes per element:

* Ulysses over P ranks: ``2 (P-1)/P s b d (2h + 2hk) e`` -- q, k, v and out each cross one all-to-all in
  the forward pass, their gradients the inverse one in the backward pass; a rank keeps 1/P of each.
* Ring over P ranks (and Double Ring, whose inner + outer hops add up to the same P-1 per pass):
  ``3 (P-1) 2 s b hk d e`` -- K+V forward, K+V again and dK+dV backward, P-1 hops each.
* Hybrid U x R: Ulysses over U on the S/P local tokens, plus Ring over R on ``h/U``, ``hk/U`` heads and
  ``S/R`` tokens (what one ring rank holds after the Ulysses all-to-all).

The formulas assume every rank receives only the KV heads its query heads use, i.e. ``hk >= P`` (Ulysses)
or ``hk >= U`` (hybrid). With fewer KV heads, Ulysses must replicate KV heads (each rank needs one), and
measured / textbook exceeds 1 by design; the benchmarks report that ratio as it is.
"""
from __future__ import annotations


def ulysses_bytes(S: int, P: int, b: int, h: int, hk: int, d: int, e: int) -> float:
    s = S / P
    return 2 * (P - 1) / P * s * b * d * (2 * h + 2 * hk) * e


def ring_bytes(S: int, P: int, b: int, hk: int, d: int, e: int) -> float:
    s = S / P
    return 3 * (P - 1) * 2 * s * b * hk * d * e


def hybrid_bytes(S: int, U: int, R: int, b: int, h: int, hk: int, d: int, e: int) -> float:
    # all-to-all among U ranks on the S/(U R) tokens each CP rank holds, then a ring of R ranks on S/R tokens
    # with h/U, hk/U heads
    return ulysses_bytes(S / R, U, b, h, hk, d, e) + ring_bytes(S, R, b, hk / U, d, e)


def textbook_bytes(algo: str, S: int, cp: int, b: int, h: int, hk: int, d: int, e: int, ulysses: int = 1) -> float:
    """Textbook bytes per rank for ``algo`` in ``ulysses | ring | double_ring | hybrid``."""
    if algo == "ulysses":
        return ulysses_bytes(S, cp, b, h, hk, d, e)
    if algo in ("ring", "double_ring"):
        return ring_bytes(S, cp, b, hk, d, e)
    if algo == "hybrid":
        return hybrid_bytes(S, ulysses, cp // ulysses, b, h, hk, d, e)
    raise ValueError(f"unknown algorithm {algo!r}")
