"""The agreement before the first collective of an attention call: the same verdict on every rank.

Every rank of the call shares one small row - its inputs' shapes, dtypes, device type, grad mode, softmax scale,
options - and, if its own inputs are unusable, a text saying why. Every rank then holds the same table, runs the
same pure check on it and raises the same error, naming *global* ranks and what they passed, instead of hanging its
peers in an all-to-all or a ring exchange, or computing something silently different::

    table = agree_ring(q, k, v, inputs, options, ring_group, scale)     # every rank's RingRow, or raise

Rows are frozen dataclasses with named fields (:class:`UlyssesRow`, :class:`RingRow`, :class:`HybridRow` of the
two), every tensor described by one :class:`TensorSig`; they travel as one integer list and are read back by the
same class, so every check reads names, never positions. The algorithm files keep their algorithm: each calls one
function here (:func:`agree_ulysses`, :func:`agree_ring`, :func:`agree_hybrid`) before its first collective.

Decisions
- The table covers every rank that takes part in the call: one all-gather over the CP group when it is at hand
  (the Megatron path passes it), or, for Hybrid called with only its two groups, two exchanges - inside the
  Ulysses group, then the Ulysses tables across the ring group (:func:`agree_2d`). Either way every rank ends
  with all CP ranks' rows, so a mismatch inside one Ulysses group stops the whole CP group.
- Metadata travels on the CPU over a gloo group, so the per-layer hot path holds no host-device synchronisation:
  the plugin keeps a gloo twin of every CP group when the default backend is not gloo (``STATE.agree_group``).
  Over another backend (a user's bare NCCL group) the rows go through the inputs' device, as they must.
- Texts travel only when some rank has a problem (one more all-gather, on the failure path only).
- ``check(table)`` is a pure function of the gathered rows, so it gives every rank the same answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import struct
import typing
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist

from .comm import peer_failure
from .layout.sharding import split_sizes
from .layout.window import UNBOUNDED
from .options import (
    DEAD_ROWS,
    KV_CACHE_POLICIES,
    CallInputs,
    KVAllGatherOptions,
    RingOptions,
    UlyssesOptions,
    policy_code,
)
from .stats import record_bytes

__all__ = [
    "agree",
    "agree_2d",
    "agree_hybrid",
    "agree_kvallgather",
    "agree_ring",
    "agree_ulysses",
    "agree_window_ring",
    "WindowRow",
    "Table",
    "TensorSig",
    "UlyssesRow",
    "RingRow",
    "KVAllGatherRow",
    "KVAllGatherError",
    "HybridRow",
    "UlyssesError",
    "RingAttentionError",
    "kv_head_repeats",
    "allgather_problem",
    "float_bits",
    "device_code",
    "device_name",
    "global_ranks",
]


class UlyssesError(ValueError):
    """Inputs Ulysses cannot shard; raised on every rank of the group (the message names shapes/ranks)."""


class RingAttentionError(ValueError):
    """Ring attention inputs or options that cannot run (raised on every rank of the ring)."""


class KVAllGatherError(ValueError):
    """All-gather K/V attention inputs or options that cannot run (raised on every rank of the group)."""


# ================================================================================================ encoding
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


# the attention dtypes first (codes 0..3 are the floating ones), then every other torch dtype by name
_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_DTYPES = (
    _FLOATS
    + (torch.bool,)
    + tuple(
        sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)} - set(_FLOATS) - {torch.bool}, key=str)
    )
)


def dtype_name(code: int) -> str:
    if code < 0:
        return "?"  # a blank signature: the rank's inputs were unusable
    return str(_DTYPES[code]).replace("torch.", "") if code < len(_DTYPES) else "other"


class Row:
    """A frozen dataclass of ints, bools and other rows, sent as one list of ints in field order (:meth:`encode`)
    and read back by its own class (:meth:`decode`)."""

    @classmethod
    @functools.lru_cache(maxsize=None)
    def _kinds(cls) -> Tuple[Tuple[str, Any], ...]:
        hints = typing.get_type_hints(cls)
        return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))

    @classmethod
    @functools.lru_cache(maxsize=None)
    def width(cls) -> int:
        return sum(kind.width() if isinstance(kind, type) and issubclass(kind, Row) else 1 for _, kind in cls._kinds())

    def encode(self) -> List[int]:
        out: List[int] = []
        for name, _ in self._kinds():
            value = getattr(self, name)
            out += value.encode() if isinstance(value, Row) else [int(value)]
        return out

    @classmethod
    def decode(cls, ints: Sequence[int]):
        values, i = {}, 0
        for name, kind in cls._kinds():
            if isinstance(kind, type) and issubclass(kind, Row):
                values[name], i = kind.decode(ints[i : i + kind.width()]), i + kind.width()
            else:
                values[name], i = kind(ints[i]), i + 1
        return cls(**values)


@dataclass(frozen=True)
class TensorSig(Row):
    """What the agreement knows of one tensor: its rank, first four sizes, dtype, grad mode, device type.
    ``ndim`` -1: no tensor (None); 0 with every field 0: a rank whose inputs are unusable."""

    ndim: int
    d0: int = -1
    d1: int = -1
    d2: int = -1
    d3: int = -1
    dtype: int = 0
    grad: bool = False
    device: int = 0

    @classmethod
    def of(cls, t: Optional[torch.Tensor]) -> "TensorSig":
        if t is None:
            return cls.none()
        return cls.meta(tuple(t.shape), t.dtype, t.requires_grad, t.device)

    @classmethod
    def meta(cls, shape, dtype, requires_grad: bool, device) -> "TensorSig":
        """The signature of a tensor that does not exist yet (Hybrid's ring level)."""
        dims = list(shape[:4]) + [-1] * (4 - min(len(shape), 4))
        code = _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)
        kind = torch.device(device).type
        return cls(
            len(shape),
            *dims,
            code,
            bool(requires_grad and torch.is_grad_enabled()),
            _DEVICES.index(kind) if kind in _DEVICES else len(_DEVICES),
        )

    @classmethod
    def none(cls) -> "TensorSig":
        return cls(-1)

    @classmethod
    def blank(cls) -> "TensorSig":
        return cls(0, 0, 0, 0, 0, -1, False, 0)

    @property
    def present(self) -> bool:
        return self.ndim >= 0

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(x for x in (self.d0, self.d1, self.d2, self.d3) if x >= 0)

    @property
    def is_float(self) -> bool:
        return 0 <= self.dtype < len(_FLOATS)

    def text(self, name: str, sizes: Callable[[Tuple[int, ...]], str] = lambda s: str(list(s))) -> str:
        if not self.present:
            return f"{name} none"
        more = "..." if self.ndim > 4 else ""
        return f"{name} {sizes(self.shape)}{more} {dtype_name(self.dtype)} {device_name(self.device)}" + (
            " requires_grad" if self.grad else ""
        )


@dataclass
class Table:
    """Every rank's row (``rows[i]`` from global rank ``ranks[i]``) and problem text ('' = none)."""

    rows: List[Any]
    ranks: List[int]
    texts: List[str]

    def listing(self, describe: Callable[[Any], str]) -> str:
        return "; ".join(f"rank {g}: {describe(r)}" for g, r in zip(self.ranks, self.rows))

    def part(self, name: str) -> "Table":
        """The table of one field of every row (Hybrid: its Ulysses or its ring part)."""
        return Table([getattr(r, name) for r in self.rows], self.ranks, self.texts)


Check = Callable[[Table], Optional[str]]


# ================================================================================================ exchange
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
    record_bytes("metadata", mine.numel() * mine.element_size() * (len(out) - 1))
    try:
        dist.all_gather(out, mine, group=group)
    except RuntimeError as e:
        raise peer_failure(e, group, "the input agreement") from e
    return [o.tolist() for o in out]  # on gloo a CPU copy: no device synchronisation


def _gather_text(group, text: str, longest: int, device) -> List[str]:
    data = text.encode()
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
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


def agree(
    group,
    row: Row,
    problem: Optional[str] = None,
    *,
    check: Optional[Check] = None,
    error: Type[Exception] = ValueError,
    like: Optional[torch.Tensor] = None,
    prefix: str = "",
) -> Table:
    """Share ``row`` and ``problem`` over ``group`` (one all-gather; a second only if some rank has a
    problem); raise ``error`` on every rank if any rank has a problem or ``check`` finds one; else return
    the table (rows of ``row``'s class)."""
    device = _device_for(group, like)
    text = problem or ""
    got = _gather_ints(group, [len(text.encode()), dist.get_rank()] + row.encode(), device)
    longest = max(r[0] for r in got)
    texts = _gather_text(group, text, longest, device) if longest else [""] * len(got)
    table = Table(_decode_rows(type(row), [r[2:] for r in got]), [r[1] for r in got], texts)
    verdict = _verdict(table, check, prefix)
    if verdict:
        raise error(verdict)
    return table


def _decode_rows(cls, rows: List[List[int]]) -> List[Row]:
    """Every rank's row, each distinct one decoded once (the usual case: all ranks alike, one decode)."""
    seen: Dict[Tuple[int, ...], Row] = {}
    for r in rows:
        if tuple(r) not in seen:
            seen[tuple(r)] = cls.decode(r)
    return [seen[tuple(r)] for r in rows]


def agree_2d(
    inner,
    outer,
    row: Row,
    problem: Optional[str] = None,
    *,
    check: Optional[Check] = None,
    error: Type[Exception] = ValueError,
    like: Optional[torch.Tensor] = None,
    prefix: str = "",
) -> Table:
    """:func:`agree` over every rank of two orthogonal groups (each inner group meets each outer group in
    one rank, as Hybrid's Ulysses and ring groups do) without a group spanning them: the inner groups gather
    their rows, then the outer groups gather the inner tables, so every rank holds every rank's row."""
    device = _device_for(inner, like)
    text = problem or ""
    got = _gather_ints(inner, [len(text.encode()), dist.get_rank()] + row.encode(), device)
    longest = max(r[0] for r in got)
    texts = _gather_text(inner, text, longest, device) if longest else [""] * len(got)
    width = len(got[0])
    tables = _gather_ints(outer, [x for r in got for x in r], device)  # [outer][inner * width]
    rows = [t[i : i + width] for t in tables for i in range(0, len(t), width)]
    if any(r[0] for r in rows):  # some rank somewhere has a problem: bring every inner group's texts
        blob = json.dumps(texts)
        size = _gather_ints(outer, [len(blob.encode())], device)
        texts = [t for b in _gather_text(outer, blob, max(s[0] for s in size), device) for t in json.loads(b)]
    else:
        texts = [""] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: rows[i][1])  # by global rank, for readable messages
    table = Table(
        _decode_rows(type(row), [rows[i][2:] for i in order]), [rows[i][1] for i in order], [texts[i] for i in order]
    )
    verdict = _verdict(table, check, prefix)
    if verdict:
        raise error(verdict)
    return table


# ================================================================================================ Ulysses
_NAMES = ("query", "key", "value")


@dataclass(frozen=True)
class UlyssesRow(Row):
    """A Ulysses rank: the gather size (-1: aligned), q/k/v (blank when this rank's inputs are unusable: then only
    its problem text matters), the KV-cache policy and the all-gather switch (a rank that differs would wait in
    backward for an exchange the others skip)."""

    gather_size: int
    q: TensorSig
    k: TensorSig
    v: TensorSig
    kv_cache: int
    allgather: bool

    def describe(self) -> str:
        parts = [sig.text(name, lambda s: str(tuple(s))) for name, sig in zip(_NAMES, (self.q, self.k, self.v))]
        return (
            ", ".join(parts)
            + (", aligned" if self.gather_size < 0 else f", gather size {self.gather_size}")
            + f", kv_cache_policy={None if self.kv_cache < 0 else repr(KV_CACHE_POLICIES[self.kv_cache])}"
            + (", allgather_kv" if self.allgather else "")
        )


def kv_head_repeats(heads: int, kv_heads: int, ranks: int) -> int:
    """How often each KV head is repeated before the all-to-all so every rank gets the KV its queries use.

    Query head i uses KV head ``i // (heads // kv_heads)`` (Megatron/SDPA grouping); rank r receives query
    heads ``[r*heads/P, (r+1)*heads/P)``.

    * ``kv_heads >= P``: KV heads are scattered like query heads (needs ``kv_heads % P == 0``); rank r's
      query heads use exactly KV heads ``[r*kv/P, (r+1)*kv/P)``. Returns 1.
    * ``kv_heads < P``: each KV head is repeated ``P // kv_heads`` times (needs ``P % kv_heads == 0``), so
      the all-to-all hands every rank exactly one KV head -- the one its query heads use. KV is never
      expanded to full multi-head. Example: h=8, kv=2, P=4 -> K becomes [k0, k0, k1, k1]; rank r gets query
      heads 2r, 2r+1 and KV head k_{r//2} (queries 0-3 use k0, 4-7 use k1). Gradients of the copies sum
      back into the original head (the repeat is part of the autograd graph).

    The local attention sees ``heads/P`` query heads and ``max(kv_heads, P)/P`` KV heads and groups them by
    shape. Raises :class:`UlyssesError` for combinations that cannot be split this way.
    """
    if heads % ranks:
        raise UlyssesError(f"query has {heads} heads, not divisible by the {ranks} ranks of the Ulysses group")
    if kv_heads < 1 or heads % kv_heads:
        raise UlyssesError(
            f"query has {heads} heads and key/value {kv_heads}: grouped-query attention needs "
            f"the query heads to be a multiple of the key/value heads"
        )
    if kv_heads >= ranks:
        if kv_heads % ranks:
            raise UlyssesError(
                f"key/value have {kv_heads} heads, not divisible by the {ranks} ranks of the "
                f"Ulysses group (with {kv_heads} >= {ranks} KV heads are scattered like query "
                f"heads)"
            )
        return 1
    if ranks % kv_heads:
        raise UlyssesError(
            f"key/value have {kv_heads} heads, fewer than the {ranks} ranks of the Ulysses group "
            f"and not a divisor of {ranks}: KV heads cannot be replicated so that every rank "
            f"gets the one its query heads use"
        )
    return ranks // kv_heads


def allgather_problem(heads: int, kv_heads: int, ranks: int) -> Optional[str]:
    """Why K/V cannot go by all-gather (``--use-ulysses-allgather-kv``) for these head counts, or None."""
    if kv_heads >= heads:
        return (
            f"--use-ulysses-allgather-kv needs grouped-query attention (fewer key/value heads than the {heads} "
            f"query heads), got {kv_heads} key/value heads"
        )
    if kv_heads > ranks or ranks % kv_heads:
        return (
            f"--use-ulysses-allgather-kv gathers all {kv_heads} key/value heads on each of the {ranks} ranks: it "
            f"needs at most {ranks} of them, dividing {ranks} (with more, the all-to-all sends less)"
        )
    return None


def as_length(size: Any) -> Optional[int]:
    """A gather size calculator's answer as an int (None stays None); anything else is a TypeError."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise TypeError(f"gather size must be an int (the global sequence length), got {size!r}")
    try:
        return operator.index(size)
    except TypeError:
        raise TypeError(f"gather size must be an int (the global sequence length), got {size!r}") from None


def ulysses_problem(
    qkv, seq_dim: int, head_dim: int, gather_size, ranks: int, rank: int, allgather: bool = False
) -> Optional[str]:
    """What is wrong with this rank's own Ulysses inputs (None if nothing); needs no communication."""
    for name, t in zip(_NAMES, qkv):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return (
                f"{name} must be a 4-D tensor with the sequence at dim {seq_dim} and heads at dim {head_dim}, got {got}"
            )
    q, k, v = qkv
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(_NAMES, qkv))
    if len({t.device for t in qkv}) > 1:
        return (
            "query, key and value are on different devices ("
            + ", ".join(f"{n} {t.device}" for n, t in zip(_NAMES, qkv))
            + ")"
        )
    other = [d for d in range(3) if d not in (seq_dim, head_dim)]  # the batch dim(s)
    for d in [seq_dim] + other:
        if not q.shape[d] == k.shape[d] == v.shape[d]:
            return f"query, key and value differ at dim {d} ({shapes})"
    if k.shape[head_dim] != v.shape[head_dim] or q.shape[3] != k.shape[3]:
        return f"key and value need the same heads and query and key the same head size ({shapes})"
    try:
        kv_head_repeats(q.shape[head_dim], k.shape[head_dim], ranks)
    except UlyssesError as e:
        return str(e)
    if allgather:
        problem = allgather_problem(q.shape[head_dim], k.shape[head_dim], ranks)
        if problem:
            return problem
    s_local = q.shape[seq_dim]
    if gather_size is None:
        return (
            None
            if s_local > 0
            else (
                f"query holds 0 tokens along dim {seq_dim}: aligned Ulysses needs the same non-zero local "
                f"length on every rank"
            )
        )
    if gather_size < 1:
        return f"gather size must be a positive global sequence length, got {gather_size}"
    want = split_sizes(gather_size, ranks)
    if s_local != want[rank]:
        return (
            f"gather size {gather_size} over {ranks} ranks means rank {rank} holds {want[rank]} tokens "
            f"(torch.tensor_split: {want}), but its {_NAMES[0]} has {s_local} along dim {seq_dim}"
        )
    return None


def ulysses_row(qkv, gather_size, ok: bool, options: UlyssesOptions) -> UlyssesRow:
    sigs = [TensorSig.of(t) if ok else TensorSig.blank() for t in qkv]
    return UlyssesRow(
        -1 if gather_size is None else int(gather_size),
        *sigs,
        policy_code(options.kv_cache_policy),
        options.allgather_kv,
    )


def ulysses_check(table: Table, seq_dim: int, where: str = "the Ulysses group") -> Optional[str]:
    """The same verdict on every rank: everything but the local sequence length must agree (else the
    all-to-all pieces would not match), and aligned lengths must be equal."""

    def key(row: UlyssesRow):  # the row without each tensor's sequence dim
        sizes = [dataclasses.replace(t, **{f"d{seq_dim}": 0}) for t in (row.q, row.k, row.v)]
        return dataclasses.replace(row, q=sizes[0], k=sizes[1], v=sizes[2])

    keys = [key(r) for r in table.rows]
    if any(k != keys[0] for k in keys):
        return (
            f"q/k/v shapes, dtypes, devices, requires_grad or gather sizes differ across the ranks of {where} "
            f"(only the sequence dim may differ): " + table.listing(UlyssesRow.describe)
        )
    lengths = [getattr(r.q, f"d{seq_dim}") for r in table.rows]
    if table.rows[0].gather_size < 0 and len(set(lengths)) > 1:
        return (
            f"aligned Ulysses needs the same local sequence length on every rank, got {lengths} (ranks "
            f"{table.ranks}); for uneven lengths give UlyssesContextAttention a gather_size_calculator "
            f"(e.g. DynamicGatherSizeCalculator) that returns the global length"
        )
    return None  # with a declared S each rank already checked its own length against tensor_split(S, P)


def agree_ulysses(
    qkv,
    seq_dim: int,
    head_dim: int,
    calculate: Callable[[], Any],
    group,
    options: UlyssesOptions,
    agree_group=None,
    check_inputs: bool = True,
) -> Optional[int]:
    """The Ulysses level's agreement: ``calculate()`` gives the gather size (the global length; None: aligned);
    every rank's inputs are checked, then agreed over ``agree_group`` (default ``group``). Returns the size."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    gather_size, problem, cause = None, None, None
    try:
        gather_size = as_length(calculate())
        problem = ulysses_problem(qkv, seq_dim, head_dim, gather_size, ranks, rank, options.allgather_kv)
    except Exception as e:  # noqa: BLE001 - a failing calculator must fail every rank, not hang them
        gather_size, problem, cause = None, f"{type(e).__name__}: {e}", e
    if not check_inputs:
        if problem is not None:
            raise UlyssesError(problem) from cause
        return gather_size
    try:
        agree(
            agree_group or group,
            ulysses_row(qkv, gather_size, problem is None, options),
            problem,
            check=lambda table: ulysses_check(table, seq_dim),
            error=UlyssesError,
            like=qkv[0],
            prefix="Ulysses inputs rejected on ",
        )
    except UlyssesError as e:
        raise e from cause
    return gather_size


# ================================================================================================ Ring
_WINDOW_PROBLEMS = {
    1: "--cp-window-size {K} must be >= 1, divide the ring size {P} and be smaller than it",
    2: "this rank is not a member of the Double Ring window groups (intra_group/inter_group) it was given",
    3: "Double Ring groups have the wrong sizes: intra-window {ki} ranks (expected {K}), inter-window "
    "{wi} ranks (expected {W})",
    4: "Double Ring groups do not match the ring order: intra = Rg[x*K:(x+1)*K], inter = Rg[a::K] expected",
    5: "send/recv overlap with Double Ring needs both window.intra_overlap_group and "
    "window.inter_overlap_group (got overlap_group={og}, intra twin={it}, inter twin={et})",
    6: "overlap_group must be a second communicator over the ring group's ranks {want} in the same order, got {got}",
}


@dataclass(frozen=True)
class RingRow(Row):
    """A ring rank: q/k/v/mask, then the options every rank must share (a rank that differs would wait for a
    message the others never send, or compute something else). ``window_code``: this rank's own check of its
    Double Ring groups (0 = fine); ``dropout``: the quantised probability; ``scale``: the softmax scale's bits;
    ``doc_tokens``/``doc_crc``: the documents' tokens per ring rank and a checksum of their layout."""

    q: TensorSig
    k: TensorSig
    v: TensorSig
    mask: TensorSig
    causal: bool
    bnsd: bool
    overlap: bool
    window: int
    window_code: int
    dropout: int
    dead_rows: int
    scale: int
    doc_tokens: int
    doc_crc: int
    kv_cache: int
    sink: TensorSig
    swa_left: int
    swa_right: int

    def describe(self) -> str:
        parts = [sig.text(n) for n, sig in zip(("q", "k", "v", "attention_mask"), (self.q, self.k, self.v, self.mask))]
        if self.sink.present:
            parts.append(self.sink.text("softmax_offset"))
        if self.swa_left != NO_WINDOW:
            parts.append(f"window_size={_window_text(self.swa_left, self.swa_right)}")
        drop = "none" if self.dropout < 0 else f"{self.dropout / (1 << 24):.4g}"
        dead = DEAD_ROWS[self.dead_rows] if 0 <= self.dead_rows < len(DEAD_ROWS) else "?"
        policy = None if self.kv_cache < 0 else repr(KV_CACHE_POLICIES[self.kv_cache])
        return (
            ", ".join(parts) + f", causal={self.causal}, bnsd={self.bnsd}, overlap={self.overlap}, "
            f"window={self.window}, dropout={drop}, dead_rows={dead}, softmax_scale={bits_float(self.scale):.6g}, "
            f"kv_cache_policy={policy}"
            + (
                ""
                if self.doc_tokens < 0
                else f", documents {self.doc_crc:08x} ({self.doc_tokens} tokens per ring rank)"
            )
        )


def window_code(options: RingOptions, ring_group, P: int, r: int) -> Tuple[int, dict]:
    """This rank's own check of its Double Ring (or overlap) groups: a code of :data:`_WINDOW_PROBLEMS` (0 = fine)
    and the numbers its message names."""
    window, overlap_group = options.window, options.overlap_group
    if not options.double:
        if overlap_group is None or P == 1:
            return 0, {}
        try:
            mine = global_ranks(overlap_group)
        except (RuntimeError, ValueError, AttributeError):
            mine = []
        want = global_ranks(ring_group)
        return (0, {}) if mine == want else (6, {"want": want, "got": mine or "a group without this rank"})
    K = window.size
    info = {
        "K": K,
        "P": P,
        "W": P // K if isinstance(K, int) and K > 0 else 0,
        "ki": -1,
        "wi": -1,
        "og": overlap_group is not None,
        "it": window.intra_overlap_group is not None,
        "et": window.inter_overlap_group is not None,
    }
    if not isinstance(K, int) or K < 1 or P % K or K >= P:
        return 1, info
    W = P // K
    if window.intra_group is None or window.inter_group is None:
        return 2, info
    a, x = dist.get_rank(window.intra_group), dist.get_rank(window.inter_group)
    if a < 0 or x < 0:
        return 2, info
    info.update(ki=dist.get_world_size(window.intra_group), wi=dist.get_world_size(window.inter_group))
    if info["ki"] != K or info["wi"] != W:
        return 3, info
    ring_rank = lambda p: dist.get_global_rank(ring_group, p)  # noqa: E731
    if (
        x * K + a != r
        or any(dist.get_global_rank(window.intra_group, i) != ring_rank(x * K + i) for i in range(K))
        or any(dist.get_global_rank(window.inter_group, y) != ring_rank(y * K + a) for y in range(W))
    ):
        return 4, info
    twins = (window.intra_overlap_group is not None, window.inter_overlap_group is not None)
    if twins[0] != twins[1] or (overlap_group is not None and not all(twins)):
        return 5, info
    return 0, info


def _documents_key(documents) -> Tuple[int, int]:
    """(tokens per ring rank, crc32 of the document lengths and layout): every rank must hold the same documents."""
    if documents is None:
        return -1, -1
    key = repr((documents.cp, documents.ring, documents.lengths)).encode()
    return documents.padded_len // documents.ring, zlib.crc32(key)


def ring_row(
    q: TensorSig,
    k: TensorSig,
    v: TensorSig,
    mask: TensorSig,
    inputs: CallInputs,
    options: RingOptions,
    scale: float,
    code: int,
    sink: Optional[TensorSig] = None,
) -> RingRow:
    """One rank's :class:`RingRow` (``code``: its :func:`window_code`; ``sink``: the signature of the sink logits
    when they do not exist yet - Hybrid's ring level)."""
    window = options.window_size
    return RingRow(
        q,
        k,
        v,
        mask,
        inputs.causal,
        options.bnsd,
        options.overlap,
        window if isinstance(window, int) else -1,
        code,
        -1 if inputs.dropout is None else inputs.dropout.threshold,
        DEAD_ROWS.index(options.dead_rows) if options.dead_rows in DEAD_ROWS else -1,
        float_bits(scale),
        *_documents_key(inputs.documents),
        policy_code(options.kv_cache_policy),
        TensorSig.of(inputs.softmax_offset) if sink is None else sink,
        *window_code_of(inputs),
    )


NO_WINDOW = -2  # a row's window sides when the call has no window (-1: an unbounded side)


def _window_text(left: int, right: int) -> str:
    return "None" if left == NO_WINDOW else "contradicting causal" if left == -3 else f"({left}, {right})"


def window_code_of(inputs: CallInputs) -> Tuple[int, int]:
    """(left, right) of the call's window as ints for a row (-1 unbounded; NO_WINDOW without a window)."""
    try:
        w = inputs.window
    except ValueError:
        return -3, -3  # contradicts causal: every rank sees it, window_problem names it
    if w is None:
        return NO_WINDOW, NO_WINDOW
    return tuple(-1 if x >= UNBOUNDED else x for x in (w.left, w.right))


def qkv_problem(
    q: TensorSig, k: TensorSig, v: TensorSig, m: TensorSig, scale_bits: int, rank: str = "ring rank"
) -> Optional[str]:
    """What is wrong with one rank's q/k/v (and mask, scale) whatever the algorithm's layout, or None."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return "q, k, v must be 4-D [s_local, b, heads, head_dim] (sbhd)"
    if not (q.dtype == k.dtype == v.dtype and q.is_float):
        return "q, k, v must share one floating dtype (float16, bfloat16, float32 or float64)"
    if not q.device == k.device == v.device or (m.present and m.device != q.device):
        return "q, k, v and attention_mask must be on one device"
    s, b, n, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.d0 != s or k.d1 != b or k.d3 != d or v.d3 < 1:
        return (
            "k must be [s_local, b, kv_heads, head_dim] with q's s_local, b and head_dim, and v "
            "[s_local, b, kv_heads, v_head_dim] (v_head_dim may differ: MLA)"
        )
    if min(s, b, n, d) < 1:
        return (
            f"q is [{s}, {b}, {n}, {d}]: every {rank} needs a non-empty shard (s_local >= 2 for the "
            f"zigzag layout, batch, heads and head_dim >= 1)"
        )
    scale = bits_float(scale_bits)
    if not math.isfinite(scale) or scale <= 0:
        return f"softmax_scale must be a positive finite number, got {scale}"
    if k.d2 < 1 or n % k.d2:
        return f"query heads {n} are not a multiple of key/value heads {k.d2} (GQA needs heads % kv_heads == 0)"
    return None


def sink_problem(sink: TensorSig, heads: int) -> Optional[str]:
    """A softmax offset (sink logits) must be ``[heads]``, floating, or absent."""
    if sink.present and (sink.ndim != 1 or sink.d0 != heads or not sink.is_float):
        got = sink.text("")
        return f"softmax_offset (sink logits) must be a floating [{heads}] tensor (one per query head), got {got}"
    return None


def swa_problem(left: int, right: int, mask: bool, documents: bool) -> Optional[str]:
    """What is wrong with a call's sliding window (sides as :func:`window_code_of` encodes them), or None."""
    if left == -3:
        return "window_size contradicts causal (an unbounded window is causal exactly when its right side is 0)"
    if left == NO_WINDOW:
        return None
    if mask:
        return "window_size with an attention_mask: a window replaces the mask (as in Megatron's attention)"
    if documents and right != 0:
        return f"window_size ({left}, {right}) with packed documents must look back only (right side 0)"
    return None


def ring_problem(row: RingRow, P: int, window_info: dict) -> Optional[str]:
    """What is wrong with one rank's ring inputs (a pure function of its row), or None."""
    window = _WINDOW_PROBLEMS[row.window_code].format(**window_info) if row.window_code else None
    return zigzag_problem(row, P) or window


def zigzag_problem(row, P: int, rank: str = "ring rank", size: str = "ring size") -> Optional[str]:
    """What is wrong with one rank's inputs to an algorithm of the zigzag layout (a :class:`RingRow` or a
    :class:`KVAllGatherRow`: q/k/v/mask signatures, sinks, window, causal, dead_rows, scale, documents), or None.
    ``rank`` and ``size`` name the level in the messages."""
    q, k, v, m = row.q, row.k, row.v, row.mask
    if row.dead_rows < 0:
        return f"dead_rows must be one of {', '.join(DEAD_ROWS)}"
    problem = (
        qkv_problem(q, k, v, m, row.scale, rank)
        or sink_problem(row.sink, q.d2)
        or swa_problem(row.swa_left, row.swa_right, m.present, row.doc_tokens >= 0)
    )
    if problem:
        return problem
    s, b, n, d = q.shape
    if row.doc_tokens >= 0:
        if not row.causal or m.present:
            return "documents= gives document-causal attention: pass causal=True and no attention_mask"
        if s != row.doc_tokens:
            return (
                f"the documents lay out {row.doc_tokens} tokens per {rank} (Documents.shard), but q holds {s} "
                f"(every document padded to a multiple of 2 x {size} {P})"
            )
        return None
    if (row.causal or m.present) and s % 2:
        return (
            f"s_local {s} is odd: the zigzag layout gives each {rank} two equal chunks "
            f"(--seq-length must be divisible by 2 x {size} {P})"
        )
    if m.present:
        if row.causal:
            return (
                "attention_mask was given with causal=True: pass causal=False for a general mask "
                "(--attention-mask-type general), or no mask for causal"
            )
        if m.dtype != _DTYPES.index(torch.bool):
            return "attention_mask must be bool (True = masked)"
        S = s * P
        if m.ndim != 4 or m.d0 not in (1, b) or m.d1 not in (1, n) or m.d2 not in (s, S) or m.d3 != S:
            return (
                f"attention_mask must be [b|1, heads|1, s_local|S, S] = [{b}|1, {n}|1, {s}|{S}, {S}] "
                f"(columns in global token order)"
            )
    return None


def ring_check(table: Table) -> Optional[str]:
    if any(row != table.rows[0] for row in table.rows):
        return (
            f"ring attention inputs differ across the {len(table.rows)} ranks (every rank must pass the same "
            f"shapes, dtypes, devices, grad mode and options; q/k/v are [s_local, b, heads, head_dim]): "
            + table.listing(RingRow.describe)
        )
    return None


def agree_ring(q, k, v, inputs: CallInputs, options: RingOptions, ring_group, scale: float, agree_group=None) -> None:
    """Agree on every ring rank's inputs (one all-gather over ``agree_group``, default the ring), then raise the
    same error everywhere if any is off."""
    P, r = dist.get_world_size(ring_group), dist.get_rank(ring_group)
    code, info = window_code(options, ring_group, P, r)
    sigs = [TensorSig.of(t) for t in (q, k, v, inputs.attention_mask)]
    mine = ring_row(*sigs, inputs, options, scale, code)
    problem = ring_problem(mine, P, info)
    if problem:
        problem = f"{problem} (got {mine.describe()})"
    if P == 1 and agree_group is None:
        if problem:
            raise RingAttentionError(f"ring attention: {problem}")
        return
    agree(
        ring_group if agree_group is None else agree_group,
        mine,
        problem,
        check=ring_check,
        error=RingAttentionError,
        like=q,
        prefix="ring attention inputs rejected on ",
    )


# ================================================================================================ all-gather K/V
@dataclass(frozen=True)
class KVAllGatherRow(Row):
    """An all-gather K/V rank (``kvallgather_cp_algo``): q/k/v/mask, then the options every rank must share (a rank
    that differs would wait in a collective the others skip, or compute something else). ``groups``: the KV-head
    groups the gather is split into (1: one gather, not overlapped); the rest as :class:`RingRow`."""

    q: TensorSig
    k: TensorSig
    v: TensorSig
    mask: TensorSig
    sink: TensorSig
    swa_left: int
    swa_right: int
    causal: bool
    groups: int
    dropout: int
    dead_rows: int
    scale: int
    doc_tokens: int
    doc_crc: int
    kv_cache: int

    def describe(self) -> str:
        names = ("q", "k", "v", "attention_mask", "softmax_offset")
        parts = [sig.text(n) for n, sig in zip(names, (self.q, self.k, self.v, self.mask, self.sink))]
        drop = "none" if self.dropout < 0 else f"{self.dropout / (1 << 24):.4g}"
        dead = DEAD_ROWS[self.dead_rows] if 0 <= self.dead_rows < len(DEAD_ROWS) else "?"
        policy = None if self.kv_cache < 0 else repr(KV_CACHE_POLICIES[self.kv_cache])
        return (
            ", ".join(parts) + f", window_size={_window_text(self.swa_left, self.swa_right)}, causal={self.causal}, "
            f"gather in {self.groups} KV-head group(s), dropout={drop}, "
            f"dead_rows={dead}, softmax_scale={bits_float(self.scale):.6g}, kv_cache_policy={policy}"
            + ("" if self.doc_tokens < 0 else f", documents {self.doc_crc:08x} ({self.doc_tokens} tokens per CP rank)")
        )


def kvallgather_row(q, k, v, inputs: CallInputs, options: KVAllGatherOptions, scale: float) -> KVAllGatherRow:
    """One rank's :class:`KVAllGatherRow`."""
    sigs = [TensorSig.of(t) for t in (q, k, v, inputs.attention_mask, inputs.softmax_offset)]
    kv_heads = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else 1
    return KVAllGatherRow(
        *sigs,
        *window_code_of(inputs),
        inputs.causal,
        options.head_groups(kv_heads, q.device.type if isinstance(q, torch.Tensor) else "cpu"),
        -1 if inputs.dropout is None else inputs.dropout.threshold,
        DEAD_ROWS.index(options.dead_rows) if options.dead_rows in DEAD_ROWS else -1,
        float_bits(scale),
        *_documents_key(inputs.documents),
        policy_code(options.kv_cache_policy),
    )


def kvallgather_check(table: Table) -> Optional[str]:
    if any(row != table.rows[0] for row in table.rows):
        return (
            f"all-gather K/V attention inputs differ across the {len(table.rows)} ranks (every rank must pass the "
            f"same shapes, dtypes, devices, grad mode and options; q/k/v are [s_local, b, heads, head_dim]): "
            + table.listing(KVAllGatherRow.describe)
        )
    return None


def agree_kvallgather(
    q, k, v, inputs: CallInputs, options: KVAllGatherOptions, group, scale: float, agree_group=None
) -> None:
    """Agree on every rank's all-gather K/V inputs (one all-gather over ``agree_group``, default ``group``), then
    raise the same :class:`KVAllGatherError` everywhere if any is off."""
    P = dist.get_world_size(group)
    mine = kvallgather_row(q, k, v, inputs, options, scale)
    problem = zigzag_problem(mine, P, rank="CP rank", size="--context-parallel-size")
    if not problem and mine.groups == 0:
        problem = f"gather_groups={options.gather_groups} does not divide the {k.shape[2]} KV heads of k"
    if problem:
        problem = f"{problem} (got {mine.describe()})"
    if P == 1 and agree_group is None:
        if problem:
            raise KVAllGatherError(f"all-gather K/V attention: {problem}")
        return
    agree(
        group if agree_group is None else agree_group,
        mine,
        problem,
        check=kvallgather_check,
        error=KVAllGatherError,
        like=q,
        prefix="all-gather K/V attention inputs rejected on ",
    )


# ================================================================================================ window ring
@dataclass(frozen=True)
class WindowRow(Row):
    """A rank of the window-aware ring under an explicit layout: its q/k/v (``s_local`` may differ across ranks,
    as the layout says), sink logits, the window, and what every rank must share (``layout_crc``: a checksum of
    every rank's runs)."""

    q: TensorSig
    k: TensorSig
    v: TensorSig
    sink: TensorSig
    swa_left: int
    swa_right: int
    dropout: int
    scale: int
    kv_cache: int
    layout_crc: int
    doc_crc: int

    def shared(self) -> "WindowRow":
        """The row without its own token count: what every rank's must equal."""
        return dataclasses.replace(
            self,
            q=dataclasses.replace(self.q, d0=0),
            k=dataclasses.replace(self.k, d0=0),
            v=dataclasses.replace(self.v, d0=0),
        )

    def describe(self) -> str:
        sigs = [sig.text(n) for n, sig in zip(("q", "k", "v", "softmax_offset"), (self.q, self.k, self.v, self.sink))]
        drop = "none" if self.dropout < 0 else f"{self.dropout / (1 << 24):.4g}"
        policy = None if self.kv_cache < 0 else repr(KV_CACHE_POLICIES[self.kv_cache])
        return (
            ", ".join(sigs) + f", window_size={_window_text(self.swa_left, self.swa_right)}, dropout={drop}, "
            f"softmax_scale={bits_float(self.scale):.6g}, kv_cache_policy={policy}, layout {self.layout_crc:08x}"
        )


def _window_check(table: Table) -> Optional[str]:
    if any(row.shared() != table.rows[0].shared() for row in table.rows):
        return (
            f"windowed attention inputs differ across the {len(table.rows)} ranks (every rank must pass the same "
            f"heads, head sizes, dtypes, devices, grad mode, window, options and layout): "
            + table.listing(WindowRow.describe)
        )
    return None


def agree_window_ring(q, k, v, inputs: CallInputs, options: RingOptions, layout, group, agree_group=None) -> None:
    """Agree on every rank's inputs to :func:`mindspeed_cp.window_ring.window_ring_attention_with` (one all-gather),
    then raise the same error everywhere if any is off. ``layout``: every rank's runs."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    sigs = [TensorSig.of(t) for t in (q, k, v, inputs.softmax_offset)]
    scale = float_bits(inputs.scale(q.shape[-1]))
    left, right = window_code_of(inputs)
    crc = zlib.crc32(repr(tuple(tuple((x.pos, x.n, x.doc) for x in rank) for rank in layout)).encode())
    mine = WindowRow(
        *sigs,
        left,
        right,
        -1 if inputs.dropout is None else inputs.dropout.threshold,
        scale,
        policy_code(options.kv_cache_policy),
        crc,
        _documents_key(inputs.documents)[1],
    )
    problem = (
        qkv_problem(sigs[0], sigs[1], sigs[2], TensorSig.none(), scale)
        or sink_problem(sigs[3], q.shape[2])
        or swa_problem(left, right, inputs.attention_mask is not None, inputs.documents is not None)
        or (None if left != NO_WINDOW else "window_ring_attention needs a bounded window_size")
    )
    if problem is None and len(layout) != P:
        problem = f"the layout describes {len(layout)} ranks, the group has {P}"
    if problem is None and sum(x.n for x in layout[r]) != q.shape[0]:
        problem = f"the layout gives this rank {sum(x.n for x in layout[r])} tokens, q holds {q.shape[0]}"
    if problem:
        problem = f"{problem} (got {mine.describe()})"
    agree(
        group if agree_group is None else agree_group,
        mine,
        problem,
        check=_window_check,
        error=RingAttentionError,
        like=q,
        prefix="windowed attention inputs rejected on ",
    )


# ================================================================================================ Hybrid
@dataclass(frozen=True)
class HybridRow(Row):
    """A Hybrid rank: its Ulysses-level row and the ring-level row it implies (``[S/R, b, h/U, d]``)."""

    ulysses: UlyssesRow
    ring: RingRow


def hybrid_mask_problem(mask, s_local: int, b: int, S: int) -> Optional[str]:
    if not isinstance(mask, torch.Tensor):
        return f"attention_mask must be a bool tensor, got {type(mask).__name__}"
    if mask.dtype != torch.bool:
        return f"attention_mask must be bool (True = masked), got {mask.dtype}"
    shape = tuple(mask.shape)
    if len(shape) != 4 or shape[0] not in (1, b) or shape[1] != 1 or shape[2] not in (s_local, S) or shape[3] != S:
        return (
            f"attention_mask must be [b|1, 1, s/CP|S, S] = [{b}|1, 1, {s_local}|{S}, {S}] (rows: this rank's "
            f"tokens or all, columns in global token order), got {list(shape)}"
        )
    return None


def _ring_level(q, k, v, mask, inputs: CallInputs, U: int, R: int):
    """The ring level's signatures ``[S/R, b, h/U, d]`` (KV heads replicated to U when fewer) and its mask's."""
    s_local, b, h, d = q.shape
    hk = max(k.shape[2], U)  # KV heads after the Ulysses replication
    sigs = [
        TensorSig.meta((s_local * U, b, h // U, d), q.dtype, q.requires_grad, q.device),
        TensorSig.meta((s_local * U, b, hk // U, d), k.dtype, k.requires_grad, k.device),
        TensorSig.meta((s_local * U, b, hk // U, v.shape[3]), v.dtype, v.requires_grad, v.device),
    ]
    problem = None
    if mask is not None and inputs.causal:
        problem = (
            "attention_mask was given with causal=True: pass causal=False for a general mask "
            "(--attention-mask-type general), or no mask for causal"
        )
    elif mask is not None:
        problem = hybrid_mask_problem(mask, s_local, b, s_local * U * R)
    mask_sig = TensorSig.none()
    if problem is None and mask is not None:
        rows = s_local * U if mask.shape[2] == q.shape[0] else mask.shape[2]
        mask_sig = TensorSig.meta((mask.shape[0], 1, rows, mask.shape[3]), mask.dtype, False, mask.device)
    return sigs, mask_sig, problem


def agree_hybrid(
    q,
    k,
    v,
    inputs: CallInputs,
    ulysses: UlyssesOptions,
    ring: RingOptions,
    scale: float,
    ulysses_group,
    ring_group,
    agree_group=None,
) -> None:
    """One agreement over every CP rank for both of Hybrid's levels (one all-gather over ``agree_group``, or two
    exchanges over the two groups, :func:`agree_2d`), so a bad input on one rank of one Ulysses group stops the
    whole CP group with one error naming global ranks in the user's terms (hybrid shapes, not ring-level ones)."""
    U, R = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    mask = inputs.attention_mask
    problem = ulysses_problem((q, k, v), 0, 2, None, U, dist.get_rank(ulysses_group))
    u_row = ulysses_row((q, k, v), None, problem is None, ulysses)
    sigs, mask_sig = [TensorSig.none()] * 3, TensorSig.none()
    if problem is None:
        sigs, mask_sig, problem = _ring_level(q, k, v, mask, inputs, U, R)
    code, info = window_code(ring, ring_group, R, dist.get_rank(ring_group))
    sink, sink_sig = inputs.softmax_offset, TensorSig.of(inputs.softmax_offset)
    if problem is None and sink is not None:  # [h] at the Hybrid level, [h/U] at the ring level
        problem = sink_problem(sink_sig, q.shape[2])
        sink_sig = TensorSig.meta((q.shape[2] // U,), sink.dtype, sink.requires_grad, sink.device)
    level_inputs = inputs.replace(causal=inputs.causal and mask is None)
    r_row = ring_row(*sigs, mask_sig, level_inputs, ring, scale, code, sink_sig)
    if problem is None:
        level = ring_problem(r_row, R, info)
        problem = None if level is None else f"ring level ({R} ranks, [S/R, b, h/U, d] per rank): {level}"

    def check(table: Table) -> Optional[str]:
        return ulysses_check(table.part("ulysses"), 0, where="the CP group") or ring_check(table.part("ring"))

    kwargs = dict(check=check, error=RingAttentionError, like=q, prefix="hybrid attention inputs rejected on ")
    if agree_group is not None:
        agree(agree_group, HybridRow(u_row, r_row), problem, **kwargs)
    else:
        agree_2d(ulysses_group, ring_group, HybridRow(u_row, r_row), problem, **kwargs)
