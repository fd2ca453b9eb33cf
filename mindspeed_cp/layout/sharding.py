"""Which global tokens a CP rank holds, per algorithm (batch split and RoPE positions). Pure torch.

``cp_rank`` is the rank's index in its CP group (Megatron's ``get_context_parallel_rank()``). Worked
examples, S = 16 tokens, CP = 4:

* Ulysses (contiguous; unaligned lengths allowed)::

      rank 0: 0-3   rank 1: 4-7   rank 2: 8-11   rank 3: 12-15
      (S = 13: tensor_split -> 0-3, 4-6, 7-9, 10-12)

* Ring (Megatron's zigzag: 2*CP chunks, rank r holds chunks r and 2*CP-1-r)::

      rank 0: 0,1 + 14,15   rank 1: 2,3 + 12,13   rank 2: 4,5 + 10,11   rank 3: 6,7 + 8,9

* Hybrid, U = 2 Ulysses x R = 2 ring (CP rank i: ring position i // U, Ulysses position i % U): zigzag
  over the R ring ranks (4 chunks of 4), then each ring rank's chunk pair split contiguously among its U
  Ulysses ranks, so the Ulysses all-to-all re-assembles exactly one ring rank's pair::

      ring 0 pair = 0-3 + 12-15  ->  rank 0: 0-3    rank 1: 12-15
      ring 1 pair = 4-7 + 8-11   ->  rank 2: 4-7    rank 3: 8-11
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..config import CPConfig, CPConfigError


def zigzag_index(seq_len: int, ring_size: int, pos: int, device=None) -> torch.Tensor:
    """Global positions held by ring position ``pos``: chunks ``pos`` and ``2P-1-pos`` of ``2P`` (Megatron's zigzag)."""
    c = seq_len // (2 * ring_size)
    first = torch.arange(pos * c, (pos + 1) * c, device=device)
    second = torch.arange((2 * ring_size - 1 - pos) * c, (2 * ring_size - pos) * c, device=device)
    return torch.cat([first, second])


def split_sizes(total: int, parts: int) -> List[int]:
    """Sizes of ``torch.tensor_split(range(total), parts)``: the first ``total % parts`` get one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def token_indices(config: CPConfig, cp_rank: int, seq_len: int) -> torch.Tensor:
    """Global token positions held by CP rank ``cp_rank``, in the rank's local order."""
    cp = config.cp
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank {cp_rank} outside --context-parallel-size {cp}")
    if cp == 1:
        return torch.arange(seq_len)
    config._validate_seq(seq_len)
    if config.uses_zigzag and seq_len % (2 * cp):
        raise CPConfigError(
            f"--seq-length {seq_len} is not divisible by 2 x --context-parallel-size {cp} = {2 * cp}: the zigzag "
            f"split needs 2*CP equal chunks (the patched get_batch_on_this_cp_rank pads batches of any length at "
            f"their end: mindspeed_cp.layout.sharding.padded_seq_len)"
        )
    if not config.uses_zigzag:  # Ulysses: contiguous, possibly uneven
        return torch.tensor_split(torch.arange(seq_len), cp)[cp_rank]
    u = config.ulysses_size
    pair = zigzag_index(seq_len, config.ring_size, cp_rank // u)
    return pair.chunk(u)[cp_rank % u] if u > 1 else pair


def padded_seq_len(config: CPConfig, seq_len: int) -> int:
    """:meth:`CPConfig.padded_seq_len`: Ring and Hybrid pad a batch at its end to the next multiple of 2 x CP."""
    return config.padded_seq_len(seq_len)


def local_lengths(config: CPConfig, seq_len: int) -> list:
    """Tokens held by each CP rank (uneven only for unaligned Ulysses): the sizes of :func:`token_indices`,
    in time O(CP) (``mindspeed-cp check`` at thousands of ranks)."""
    if config.cp == 1 or config.uses_zigzag:  # zigzag: every rank holds 2 equal chunks
        return [int(token_indices(config, 0, seq_len).numel())] * config.cp
    config._validate_seq(seq_len)
    return split_sizes(seq_len, config.cp)


def _sequence_lengths(batch: Dict[str, Any]) -> Dict[str, int]:
    """Sequence length of every sequence tensor of a Megatron batch (the mask's on its rows, dim 2)."""
    return {
        k: (v.shape[2] if k == "attention_mask" else v.shape[1])
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 2
    }


def batch_seq_len(batch: Dict[str, Any]) -> Optional[int]:
    """The global sequence length of a batch (None when it holds no sequence tensor)."""
    return max(_sequence_lengths(batch).values(), default=None)


def split_batch(batch: Dict[str, Any], config: CPConfig, cp_rank: int, seq_len: Optional[int] = None) -> Dict[str, Any]:
    """This rank's slice of a Megatron batch (``tokens``, ``labels``, ``loss_mask``, ``position_ids``: sequence
    on dim 1; ``attention_mask`` ``[b, 1, S, S]``: rows (dim 2) only, keys stay global, True = masked).

    Every sequence tensor must have the same global length; a mismatch is an error naming the keys.
    """
    lengths = _sequence_lengths(batch)
    if seq_len is None:
        if not lengths:
            return dict(batch)
        seq_len = max(lengths.values())
    wrong = {k: n for k, n in lengths.items() if n != seq_len}
    if wrong:
        raise CPConfigError(
            f"get_batch_on_this_cp_rank: batch tensors disagree on the sequence length {seq_len}: "
            + ", ".join(f"{k} has {n}" for k, n in sorted(wrong.items()))
        )
    if "attention_mask" in batch and isinstance(batch["attention_mask"], torch.Tensor):
        m = batch["attention_mask"]
        if m.dim() != 4 or m.shape[-1] != seq_len:
            raise CPConfigError(
                f"get_batch_on_this_cp_rank: attention_mask of shape {tuple(m.shape)} is not "
                f"[b, 1, {seq_len}, {seq_len}]"
            )
    idx = token_indices(config, cp_rank, seq_len)
    out = {}
    for key, val in batch.items():
        if isinstance(val, torch.Tensor) and key in lengths:
            dim = 2 if key == "attention_mask" else 1
            out[key] = val.index_select(dim, idx.to(val.device))
        else:
            out[key] = val
    return out
