"""Token runs and sliding windows in closed form - pure Python, no torch (the planner and the CLI import this).

A window is Megatron's ``window_size=(left, right)``: the query at global position ``i`` sees the keys
``i - left .. i + right``. A ``Run`` is ``n`` tokens of a buffer, from index ``index``, holding the consecutive
positions ``pos .. pos + n - 1`` of one document; a rank's tokens are a few runs (Ulysses: one; Megatron's zigzag:
two; per-document zigzag: two per document). :mod:`mindspeed_cp.layout.window` plans blocks and halo exchanges on
them; here are the layouts the algorithms shard a sequence in, built in O(P), and what a rank's halo and work are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence, Tuple

__all__ = [
    "UNBOUNDED",
    "Window",
    "Run",
    "zigzag_layout",
    "contiguous_layout",
    "hybrid_layout",
    "halo_tokens",
    "run_pairs",
]

UNBOUNDED = 1 << 62  # a side without limit: larger than any sequence


@dataclass(frozen=True)
class Window:
    """``left`` / ``right``: keys seen before / after the query (``UNBOUNDED``: no limit). ``Window(UNBOUNDED, 0)``
    is plain causal attention, ``Window(UNBOUNDED, UNBOUNDED)`` full attention."""

    left: int
    right: int

    @classmethod
    def of(cls, window_size, causal: bool = True) -> "Window":
        """Megatron's ``window_size`` (a ``(left, right)`` pair, ``-1``/None = unbounded; None = no window) and the
        call's ``causal`` -> a Window. A window replaces the causal mask, as in Megatron's attention."""
        if window_size is None:
            return cls(UNBOUNDED, 0 if causal else UNBOUNDED)
        try:
            left, right = (int(x) if x is not None else -1 for x in window_size)
        except (TypeError, ValueError):
            raise ValueError(f"window_size must be a pair (left, right) of integers, got {window_size!r}") from None
        if left < -1 or right < -1:
            raise ValueError(f"window_size {tuple(window_size)}: each side is >= 0, or -1 for no limit")
        return cls(UNBOUNDED if left == -1 else left, UNBOUNDED if right == -1 else right)

    @property
    def bounded(self) -> bool:
        return self.left < UNBOUNDED or self.right < UNBOUNDED

    @property
    def width(self) -> int:
        """Keys a query far from every boundary sees (``UNBOUNDED`` if a side is)."""
        return min(UNBOUNDED, self.left + self.right + 1)

    def reach(self, first: int, last: int) -> Tuple[int, int]:
        """The key positions ``[lo, hi)`` the queries ``first..last`` can see (before clipping to a document)."""
        return first - self.left, last + self.right + 1 if self.right < UNBOUNDED else UNBOUNDED

    def seen(self, q_pos, k_pos):
        """``[..., sq, sk]`` bool tensor: key position within the window of the query position (tensors in)."""
        diff = k_pos[..., None, :] - q_pos[..., :, None]
        return (diff >= -self.left) & (diff <= self.right)


@dataclass(frozen=True)
class Run:
    index: int  # first buffer index
    pos: int  # its global position
    n: int  # tokens
    doc: int = 0  # document (0 without documents)


# ------------------------------------------------------------------------------------------ layouts in closed form
# The layouts the algorithms shard a sequence in, as runs, built in O(P) (the planner costs thousands of ranks).


@functools.lru_cache(maxsize=256)
def zigzag_layout(seq_len: int, P: int) -> Tuple[Tuple[Run, ...], ...]:
    """Megatron's zigzag of ``seq_len`` tokens over ``P`` ranks as runs: rank r holds chunks r and 2P-1-r.

    >>> zigzag_layout(8, 2)[0]
    (Run(index=0, pos=0, n=2, doc=0), Run(index=2, pos=6, n=2, doc=0))
    """
    c = seq_len // (2 * P)
    return tuple((Run(0, r * c, c), Run(c, (2 * P - 1 - r) * c, c)) for r in range(P))


@functools.lru_cache(maxsize=256)
def contiguous_layout(seq_len: int, P: int) -> Tuple[Tuple[Run, ...], ...]:
    """Ulysses' contiguous split (``torch.tensor_split``: the first ``seq_len % P`` ranks one token more)."""
    base, extra = divmod(seq_len, P)
    out, at = [], 0
    for r in range(P):
        n = base + (1 if r < extra else 0)
        out.append((Run(0, at, n),) if n else ())
        at += n
    return tuple(out)


@functools.lru_cache(maxsize=256)
def hybrid_layout(seq_len: int, U: int, R: int) -> Tuple[Tuple[Run, ...], ...]:
    """Hybrid's layout over its ``U x R`` CP ranks (CP rank ``j U + u``: ring position ``j``, Ulysses rank ``u``):
    ring position ``j``'s zigzag pair split contiguously into ``U`` parts."""
    out = []
    for ring_runs in zigzag_layout(seq_len, R):
        held = sum(x.n for x in ring_runs)
        sizes = [held // U + (1 if u < held % U else 0) for u in range(U)]  # torch.chunk of equal parts
        lo = 0
        for n in sizes:
            hi, mine = lo + n, []
            for x in ring_runs:
                a, b = max(lo, x.index), min(hi, x.index + x.n)
                if a < b:
                    mine.append(Run(a - lo, x.pos + a - x.index, b - a))
            out.append(tuple(mine))
            lo = hi
    return tuple(out)


def halo_tokens(runs: Sequence[Run], window: Window, seq_len: int) -> int:
    """Keys a rank holding ``runs`` (one document) receives for its queries' windows: the union of what they
    reach, minus what it holds - what :func:`mindspeed_cp.layout.window.plan_halo`'s steps bring it, in closed form.

    >>> halo_tokens(zigzag_layout(2048, 4)[1], Window(64, 0), 2048)     # 64 of chunk 0, 64 of chunk 5
    128
    """
    spans = sorted(
        (max(0, lo), min(seq_len, hi)) for lo, hi in (window.reach(x.pos, x.pos + x.n - 1) for x in runs if x.n)
    )
    total, end = 0, 0
    for a, b in spans:
        a = max(a, end)
        if b > a:
            total, end = total + b - a, b
    return total - sum(x.n for x in runs)


def _clipped_sum(x: int, cap: int) -> int:
    """``sum(min(i, cap) for i in range(x))``."""
    if x <= cap + 1:
        return x * (x - 1) // 2
    return cap * (cap + 1) // 2 + (x - cap - 1) * cap


def run_pairs(runs: Sequence[Run], window: Window, seq_len: int) -> int:
    """(query, key) pairs the queries of ``runs`` see in a sequence of ``seq_len`` tokens (one document): the work
    of a windowed layer on that rank, in closed form (:func:`mindspeed_cp.layout.window.window_pairs` counts it
    from positions).

    >>> run_pairs(contiguous_layout(8, 1)[0], Window(2, 0), 8)      # 1 + 2 + 3 * 6 keys
    21
    """
    left, right = min(window.left, seq_len), min(window.right, seq_len)
    total = 0
    for x in runs:
        a, b = x.pos, x.pos + x.n
        before = _clipped_sum(b, left) - _clipped_sum(a, left)  # sum of min(i, left)
        after = _clipped_sum(seq_len - a, right) - _clipped_sum(seq_len - b, right)  # sum of min(S-1-i, right)
        total += x.n + before + after
    return total
