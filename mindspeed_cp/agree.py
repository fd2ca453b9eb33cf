"""The agreement step before the first collective of an attention call: the same verdict on every rank.

Every rank of the call shares one small row of integers - its inputs' shapes, dtypes, device type, grad
mode, softmax scale, options - and, if its own inputs are unusable, a text saying why. Every rank then holds
the same table, runs the same pure check on it and raises the same error, naming *global* ranks and what
they passed, instead of hanging its peers in an all-to-all or a ring exchange, or computing something
silently different::

    table = agree(group, row, problem, check=check, error=RingAttentionError)   # every rank's row, or raise

Decisions
- The table covers every rank that takes part in the call: one all-gather over the CP group when it is at
  hand (the Megatron path passes it), or, for Hybrid called with only its two groups, two exchanges - inside
  the Ulysses group, then the Ulysses tables across the ring group (:func:`agree_2d`). Either way every rank
  ends with all CP ranks' rows, so a mismatch inside one Ulysses group stops the whole CP group.
- Metadata travels on the CPU over a gloo group, so the per-layer hot path holds no host-device
  synchronisation: the plugin keeps a gloo twin of every CP group when the default backend is not gloo
  (``STATE.agree_group``). Over another backend (a user's bare NCCL group) the rows go through the inputs'
  device, as they must.
- Texts travel only when some rank has a problem (one more all-gather, on the failure path only).
- ``check(table)`` is a pure function of the gathered rows, so it gives every rank the same answer.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Callable, List, Optional, Type

import torch
import torch.distributed as dist

from . import comm_stats
from .comm import peer_failure

__all__ = ["agree", "agree_2d", "Table", "float_bits", "device_code", "device_name", "global_ranks"]


@dataclass
class Table:
    """Every rank's row (``rows[i]`` from global rank ``ranks[i]``) and problem text ('' = none)."""

    rows: List[List[int]]
    ranks: List[int]
    texts: List[str]

    def listing(self, describe: Callable[[List[int]], str]) -> str:
        return "; ".join(f"rank {g}: {describe(r)}" for g, r in zip(self.ranks, self.rows))


Check = Callable[[Table], Optional[str]]


def float_bits(x: float) -> int:
    """A float as the int64 of its IEEE bits (rows carry ints; equal floats give equal ints)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_float(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(n)))[0]


_DEVICES = ("cpu", "cuda", "npu", "xpu", "mps", "meta")


def device_code(t) -> int:
    """The device *type* of a tensor (ranks use different device indices on purpose)."""
    kind = t.device.type
    return _DEVICES.index(kind) if kind in _DEVICES else len(_DEVICES)


def device_name(code: int) -> str:
    return _DEVICES[code] if 0 <= code < len(_DEVICES) else "other"


def global_ranks(group) -> List[int]:
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def _device_for(group, like: Optional[torch.Tensor]) -> torch.device:
    try:
        backend = dist.get_backend(group)
    except (RuntimeError, ValueError):
        backend = "gloo"
    if backend == "gloo" or like is None:
        return torch.device("cpu")
    return like.device  # e.g. NCCL carries only device tensors


def _gather_ints(group, values: List[int], device) -> List[List[int]]:
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    comm_stats.record("metadata", mine.numel() * mine.element_size() * (len(out) - 1))
    try:
        dist.all_gather(out, mine, group=group)
    except RuntimeError as e:
        raise peer_failure(e, group, "the input agreement") from e
    return [o.tolist() for o in out]  # on gloo a CPU copy: no device synchronisation


def _gather_text(group, text: str, longest: int, device) -> List[str]:
    data = text.encode()
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
    buf = buf.to(device)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buf, group=group)
    return [bytes(o.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for o in out]


def _verdict(table: Table, check: Optional[Check], prefix: str) -> Optional[str]:
    bad = [(g, t) for g, t in zip(table.ranks, table.texts) if t]
    if bad:
        if len(bad) == len(table.ranks) and len({t for _, t in bad}) == 1:
            return f"{bad[0][1]} (on every rank)"
        return prefix + "; ".join(f"rank {g}: {t}" for g, t in bad)
    return check(table) if check is not None else None


def agree(group, row: List[int], problem: Optional[str] = None, *, check: Optional[Check] = None,
          error: Type[Exception] = ValueError, like: Optional[torch.Tensor] = None, prefix: str = "") -> Table:
    """Share ``row`` and ``problem`` over ``group`` (one all-gather; a second only if some rank has a
    problem); raise ``error`` on every rank if any rank has a problem or ``check`` finds one; else return
    the table. ``prefix`` leads a message that lists the ranks with problems."""
    device = _device_for(group, like)
    text = problem or ""
    me = dist.get_rank()
    got = _gather_ints(group, [len(text.encode()), me] + list(row), device)
    longest = max(r[0] for r in got)
    texts = _gather_text(group, text, longest, device) if longest else [""] * len(got)
    table = Table([r[2:] for r in got], [r[1] for r in got], texts)
    verdict = _verdict(table, check, prefix)
    if verdict:
        raise error(verdict)
    return table


def agree_2d(inner, outer, row: List[int], problem: Optional[str] = None, *, check: Optional[Check] = None,
             error: Type[Exception] = ValueError, like: Optional[torch.Tensor] = None, prefix: str = "") -> Table:
    """:func:`agree` over every rank of two orthogonal groups (each inner group meets each outer group in
    one rank, as Hybrid's Ulysses and ring groups do) without a group spanning them: the inner groups gather
    their rows, then the outer groups gather the inner tables, so every rank holds every rank's row."""
    device = _device_for(inner, like)
    text = problem or ""
    got = _gather_ints(inner, [len(text.encode()), dist.get_rank()] + list(row), device)
    longest = max(r[0] for r in got)
    texts = _gather_text(inner, text, longest, device) if longest else [""] * len(got)
    width = len(got[0])
    tables = _gather_ints(outer, [x for r in got for x in r], device)  # [outer][inner * width]
    rows = [t[i:i + width] for t in tables for i in range(0, len(t), width)]
    if any(r[0] for r in rows):  # some rank somewhere has a problem: bring every inner group's texts
        blob = json.dumps(texts)
        size = _gather_ints(outer, [len(blob.encode())], device)
        texts = [t for b in _gather_text(outer, blob, max(s[0] for s in size), device) for t in json.loads(b)]
    else:
        texts = [""] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: rows[i][1])  # by global rank, for readable messages
    table = Table([rows[i][2:] for i in order], [rows[i][1] for i in order], [texts[i] for i in order])
    verdict = _verdict(table, check, prefix)
    if verdict:
        raise error(verdict)
    return table
