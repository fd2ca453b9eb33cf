"""Attention dropout that every CP algorithm can reproduce in backward without storing a mask.

The keep/drop decision of one attention probability is a pure function of ``(seed, sample, global head,
global query position, global key position)``: a counter-based hash (splitmix64's finaliser, on int64
tensors, any device). Whichever rank computes a (query block, key block) pair, in whatever order, forward or
backward or activation recompute, it draws the same mask - and the masks do not depend on the CP layout at
all: Ulysses, Ring, Double Ring and Hybrid at any CP size drop exactly what one device would.

    spec = AttentionDropout(p=0.1, seed=seed_tensor, heads=global_head_ids)      # one per attention call
    blk = spec.block(rows=global_query_positions, cols=global_key_positions)    # one per kernel call
    keep = blk.keep(batch, device)          # [b, n, sq, sk] bool, regenerated on demand
    out, lse = kernel.forward(q, k, v, scale=s, causal=c, dropout=blk)

Decisions
- The seed is drawn per attention call from Megatron's model-parallel RNG stream (the caller does that,
  inside the tracker's fork): layers and steps get fresh seeds, activation recompute restores the tracker
  and so draws the same seed, and the CP ranks of a group - which share that stream - agree on it, so their
  blocks tile one consistent mask. Independence across heads, CP ranks and positions comes from the
  coordinates in the hash. The seed stays a tensor on the device: no host synchronisation.
- ``p`` is quantised to 2^-24 (the top 24 bits of the hash are compared with ``round(p * 2^24)``).
- Dropout is applied to the normalised probabilities (``out = (P * M / (1-p)) V``), as Megatron and
  FlashAttention do; the log-sum-exp stays that of the undropped scores, so the float32 merge of partial
  results is unchanged.
- Cost: the mask of a block is materialised (one int64 hash per score while it is built), so kernels
  compute dropout blocks with the math kernel, and callers tile large blocks (``mindspeed_cp.local``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor

__all__ = ["AttentionDropout", "DropoutBlock", "mix64"]


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_ODD = _signed(0xD1B54A32D192ED03)
_BITS = 24


def _srl(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on an int64 tensor (wrapping arithmetic): a bijection with good avalanche."""
    x = x ^ _srl(x, 30)
    x = x * _C1
    x = x ^ _srl(x, 27)
    x = x * _C2
    return x ^ _srl(x, 31)


@dataclass(frozen=True)
class AttentionDropout:
    """Dropout of one attention call: probability ``p``, int64 ``seed`` (0-dim tensor), and the global ids
    of the call's query heads ``heads`` (``[n]`` int64; under Ulysses / TP the local heads are a slice)."""

    p: float
    seed: Tensor
    heads: Tensor

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"attention dropout probability must be in [0, 1), got {self.p}")

    @property
    def threshold(self) -> int:
        return int(round(self.p * (1 << _BITS)))

    def block(self, rows: Tensor, cols: Tensor, heads: Optional[Tensor] = None) -> "DropoutBlock":
        """The dropout of one (query block, key block): global positions ``rows`` ``[sq]``, ``cols`` ``[sk]``, or
        per sample ``[b, sq]`` / ``[b, sk]`` (packed documents: each sample has its own layout), and, for a
        subset of the call's heads, their global ids."""
        return DropoutBlock(self, rows, cols, self.heads if heads is None else heads)

    def for_heads(self, heads: Tensor) -> "AttentionDropout":
        return AttentionDropout(self.p, self.seed, heads)

    def for_rank(self, rank: int, local_heads: int) -> "AttentionDropout":
        """After a Ulysses all-to-all: rank ``rank`` computes heads ``rank*local .. (rank+1)*local - 1``."""
        return self.for_heads(self.heads[rank * local_heads : (rank + 1) * local_heads])


@dataclass(frozen=True)
class DropoutBlock:
    """What a kernel needs for one block: ``p``, ``scale = 1/(1-p)`` and :meth:`keep`."""

    spec: AttentionDropout
    rows: Tensor
    cols: Tensor
    heads: Tensor

    @property
    def p(self) -> float:
        return self.spec.p

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.spec.p)

    def keep(self, batch: int, device=None) -> Tensor:
        """``[batch, n, sq, sk]`` bool, True = kept."""
        device = device if device is not None else self.rows.device
        seed = self.spec.seed.to(device=device, dtype=torch.int64)
        b = torch.arange(batch, device=device, dtype=torch.int64)
        h = self.heads.to(device=device, dtype=torch.int64)
        rows = self.rows.to(device=device, dtype=torch.int64)
        cols = self.cols.to(device=device, dtype=torch.int64)
        rows, cols = (x if x.dim() == 2 else x[None] for x in (rows, cols))  # [b|1, sq], [b|1, sk]
        # [b, n] -> [b, n, sq] -> [b, n, sq, sk]: one mix per level, the last one per score
        base = mix64(mix64(seed + b[:, None] * _GOLDEN) + h[None, :] * _ODD)
        row = mix64(base[:, :, None] ^ (rows * _GOLDEN)[:, None, :])
        cell = mix64(row[..., None] ^ (cols * _ODD)[:, None, None, :])
        return _srl(cell, 64 - _BITS) >= self.spec.threshold
