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


# ----------------------------------------------------------------------------- KV-cache policies (issue 15)
# Exact per-rank figures (any length: rank r of a Ulysses level holds split_sizes(S, P)[r] tokens), forward +
# backward, for --context-parallel-kv-cache-policy None | half | full and --use-ulysses-allgather-kv. "sent" is
# what the rank sends; "saved" is how many more bytes than with no policy autograd keeps for backward (the
# input K/V kept, minus the all-to-all output or received blocks no longer kept; negative = less memory).
_AGAIN = {None: 0, "half": 1, "full": 2}  # K/V tensors whose exchange runs again in backward (Ulysses)


def ulysses_kv_cache(S: int, P: int, b: int, h: int, hk: int, d: int, e: int, policy=None, allgather=False,
                     rank: int = 0) -> dict:
    """Ulysses over P ranks: q/out all-to-alls, K/V all-to-alls (KV heads replicated to P when hk < P) or
    all-gathers (every KV head, padded to the longest shard) plus reduce-scatters, and the policy's repeats."""
    base, extra = divmod(S, P)
    s = base + (1 if rank < extra else 0)
    longest = base + (1 if extra else 0)
    a = (P - 1) / P
    qo = 2 * (s * h * a + (S - s) * h / P) * b * d * e  # q and out forward, their gradients backward
    if allgather:
        one = (P - 1) * longest * b * hk * d * e  # one K or V all-gather; its reduce-scatter sends as much
        kv, post = 2 * 2 * one, S * b * 1 * d * e
    else:
        hr = max(hk, P)  # heads after the replication
        one = s * hr * a * b * d * e
        kv, post = 2 * (one + (S - s) * hr / P * b * d * e), S * b * hr / P * d * e
    n = _AGAIN[policy]
    return {"sent": qo + kv + n * one, "saved": n * (s * b * hk * d * e - post), "again": n * one}


def ring_kv_cache(S: int, P: int, b: int, hk: int, d: int, e: int, policy=None) -> dict:
    """Ring (or Double Ring) over P ranks holding S/P tokens each: blocks B = 2 (S/P) b hk d e."""
    block = 2 * (S / P) * b * hk * d * e
    hops = P - 1
    again = {None: 1.0, "half": 0.5, "full": 0.0}[policy]
    return {"sent": (2 + again) * hops * block, "saved": (1 - again) * hops * block}


def hybrid_kv_cache(S: int, U: int, R: int, b: int, h: int, hk: int, d: int, e: int, policy=None,
                    ring_policy="same", rank: int = 0) -> dict:
    """Ulysses over U on the S/R tokens of a ring rank, Ring over R on h/U, max(hk, U)/U heads."""
    ring_policy = policy if ring_policy == "same" else ring_policy
    u = ulysses_kv_cache(S // R, U, b, h, hk, d, e, policy, rank=rank % U)
    r = ring_kv_cache(S, R, b, max(hk, U) / U, d, e, ring_policy)
    return {"sent": u["sent"] + r["sent"], "saved": u["saved"] + r["saved"]}
