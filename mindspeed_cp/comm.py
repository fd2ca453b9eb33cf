"""Differentiable all-to-all over a process group, for equal and uneven splits.

One exchange covers both Ulysses cases. Every rank cuts its tensor along ``scatter_dim`` into P pieces
(``scatter_sizes``; piece j goes to rank j) and receives from every rank i a piece that is ``gather_sizes[i]``
long along ``gather_dim``; the received pieces are concatenated along ``gather_dim``::

    # q, aligned:   [s/P, b, h, d] -> [s, b, h/P, d]     scatter heads, gather sequence
    # out, aligned: [s, b, h/P, d] -> [s/P, b, h, d]     scatter sequence, gather heads
    # uneven (S=13, P=4, rank 3 holds 3 tokens): [3, b, h, d] -> [13, b, h/4, d], gather_sizes [4, 3, 3, 3]

The backward of an all-to-all is the inverse all-to-all (the roles of the two dims and of the two size
lists swap), so gradients travel exactly the reverse route. All dims other than the two named ones must
be equal on every rank; callers check that before the first collective (see :mod:`mindspeed_cp.ulysses`).

Communication goes through ``torch.distributed.all_to_all_single`` with split sizes (NCCL, HCCL and gloo
all implement it); every exchange reports the bytes it sends to *other* ranks to
:func:`mindspeed_cp.stats.record_bytes` under the kind ``"all_to_all"`` (or the ``kind`` given).

:func:`start_all_gather` / :func:`start_reduce_scatter` post one asynchronous all-gather / reduce-scatter (the
all-gather K/V algorithm, :mod:`mindspeed_cp.kvallgather`, overlaps them with its compute); ``wait()`` gives the result.

:func:`all_gather` (``--use-ulysses-allgather-kv``) gathers a sequence-sharded tensor on every rank, uneven
shards padded to the longest; its backward is the reduce-scatter of the gradient (kinds ``"all_gather"``,
``"reduce_scatter"``)::

    # k: [s_r, b, hk, d] -> [S, b, hk, d]        backward: dk [S, b, hk, d] summed over ranks -> [s_r, b, hk, d]

Ring send/recv (:class:`RingExchanger`): every rank sends a tensor to the next position of a ring process group
and receives one of the same shape from the previous position::

    ex = RingExchanger(group, overlap_group=None)
    pending = ex.start(kv, "ring_kv")   # posts isend(kv -> next) and irecv(prev -> new buffer)
    ...                                 # compute while the messages travel
    kv = pending.wait()                 # the tensor from the previous position

Without ``overlap_group`` both directions are one batched ``batch_isend_irecv`` on ``group`` (deadlock free on
NCCL). With it (``--use-cp-send-recv-overlap``) a message on the link ``p -> p+1`` travels on communicator
``(group, overlap_group)[p % 2]``, so on an even ring every rank sends on one communicator and receives on the
other and the two do not serialise (on an odd ring position 0 uses one for both, and then batches them).
Messages of different kinds between the same pair may be in flight together; each kind has its own tag (gloo
matches on it) and every rank posts them in the same order (NCCL matches in order).

The multi-token-prediction shift (:func:`shift_left`) moves only the values that cross a shard boundary, as
:func:`mindspeed_cp.layout.shift.plan_shift` planned them.

Every message is reported to :func:`mindspeed_cp.stats.record_bytes` with its kind (``all_to_all``,
``all_gather``, ``reduce_scatter``, ``ring_kv``: key/value blocks, ``ring_dkv``: dK/dV accumulators, ``shift``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .layout.shift import ShiftPlan
from .stats import note_held, record_bytes

Tensor = torch.Tensor


class PeerFailure(RuntimeError):
    """A collective of the CP groups failed because a peer did not take part in time (it raised, stalled or
    died); raised in place of the backend's bare timeout / connection error, with that error as its cause."""


def peer_failure(error: BaseException, group, what: str) -> PeerFailure:
    """The :class:`PeerFailure` to raise for ``error`` from ``what`` over ``group``."""
    try:
        ranks = [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]
    except (RuntimeError, ValueError):
        ranks = "?"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return PeerFailure(
        f"mindspeed-cp: {what} over global ranks {ranks} failed on rank {dist.get_rank()}: a peer did not take "
        f"part in time or has left ({first}). Another rank most likely raised or stopped first - its own "
        f"error says why. The wait is bounded by --distributed-timeout-minutes (megatron-core: "
        f"configure(distributed_timeout_minutes=...))."
    )


def _resized(shape: Sequence[int], dim_a: int, size_a: int, dim_b: int, size_b: int) -> List[int]:
    """``shape`` with dims ``dim_a`` and ``dim_b`` set to ``size_a`` and ``size_b``."""
    out = list(shape)
    out[dim_a], out[dim_b] = size_a, size_b
    return out


def _outermost(shape: Sequence[int], dim: int) -> bool:
    """Every dim before ``dim`` has size 1: consecutive pieces along ``dim`` are consecutive runs of memory."""
    return math.prod(shape[:dim]) == 1


def _exchange(
    x: torch.Tensor,
    group,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: List[int],
    gather_sizes: List[int],
    kind: str = "all_to_all",
) -> torch.Tensor:
    """The all-to-all itself (no autograd). At most one copy each way: none into the send buffer when the
    pieces already are consecutive runs (scatter along the outermost dim, e.g. the output's sequence), none out
    of the receive buffer when the received runs are (gather along it, e.g. q/k/v's sequence)."""
    me, world = dist.get_rank(group), len(scatter_sizes)
    # Send buffer: piece j (scatter_sizes[j] along scatter_dim) laid out contiguously, pieces in rank order,
    # because all_to_all_single cuts its flat input into consecutive runs of send_counts elements.
    pieces = torch.split(x, scatter_sizes, dim=scatter_dim)
    send_counts = [p.numel() for p in pieces]
    if _outermost(x.shape, scatter_dim) and x.is_contiguous():
        send = x.reshape(-1)  # pieces cut along the outermost dim of a contiguous tensor are those runs already
    elif len(set(scatter_sizes)) == 1:  # equal pieces (heads): one strided copy [.., P*n, ..] -> [P, .., n, ..]
        send = x.new_empty(sum(send_counts))
        grouped = x.unflatten(scatter_dim, (world, scatter_sizes[0])).movedim(scatter_dim, 0)
        send.view(grouped.shape).copy_(grouped)
    else:
        send = x.new_empty(sum(send_counts))
        for run, piece in zip(send.split(send_counts), pieces):
            run.view(piece.shape).copy_(piece)
    # From rank i we receive its gather-dim share (gather_sizes[i]) of the heads/tokens we own here.
    recv_shapes = [_resized(x.shape, scatter_dim, scatter_sizes[me], gather_dim, n) for n in gather_sizes]
    recv_counts = [math.prod(s) for s in recv_shapes]
    recv = x.new_empty(sum(recv_counts))
    record_bytes(kind, (send.numel() - send_counts[me]) * send.element_size())
    try:
        dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    except RuntimeError as e:
        raise peer_failure(e, group, "the Ulysses all-to-all") from e
    if _outermost(x.shape, gather_dim):  # runs received in rank order along the outermost dim: the result itself
        return recv.view(_resized(x.shape, scatter_dim, scatter_sizes[me], gather_dim, sum(gather_sizes)))
    return torch.cat([run.view(s) for run, s in zip(recv.split(recv_counts), recv_shapes)], dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Autograd wrapper: forward scatters ``scatter_dim`` / gathers ``gather_dim``; backward inverts it."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, kind="all_to_all"):
        ctx.route = (group, scatter_dim, gather_dim, scatter_sizes, gather_sizes)
        return _exchange(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, kind)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim, scatter_sizes, gather_sizes = ctx.route
        # Inverse route: what was gathered is scattered back to where it came from, and vice versa.
        grad_x = _AllToAll.apply(grad, group, gather_dim, scatter_dim, gather_sizes, scatter_sizes)
        return grad_x, None, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    group,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: Optional[Sequence[int]] = None,
    gather_sizes: Optional[Sequence[int]] = None,
    kind: str = "all_to_all",
) -> torch.Tensor:
    """Differentiable all-to-all: ``x`` cut along ``scatter_dim``, pieces gathered along ``gather_dim``.

    ``scatter_sizes``: how much of ``scatter_dim`` goes to each rank (default: equal parts; must then divide).
    ``gather_sizes``: how long each rank's piece is along ``gather_dim`` (default: all as long as ours).
    Returns a tensor whose ``gather_dim`` is ``sum(gather_sizes)`` and ``scatter_dim`` is
    ``scatter_sizes[rank]``. With one rank it returns ``x`` itself.
    """
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    scatter_dim %= x.dim()
    gather_dim %= x.dim()
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all: scatter_dim and gather_dim are both {scatter_dim}")
    if scatter_sizes is None:
        if x.shape[scatter_dim] % world:
            raise ValueError(
                f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is not divisible by "
                f"the {world} ranks of the group"
            )
        scatter_sizes = [x.shape[scatter_dim] // world] * world
    if gather_sizes is None:
        gather_sizes = [x.shape[gather_dim]] * world
    scatter_sizes, gather_sizes = [int(n) for n in scatter_sizes], [int(n) for n in gather_sizes]
    if len(scatter_sizes) != world or len(gather_sizes) != world:
        raise ValueError(f"all_to_all: need {world} scatter and gather sizes, got {scatter_sizes} and {gather_sizes}")
    if sum(scatter_sizes) != x.shape[scatter_dim] or gather_sizes[me] != x.shape[gather_dim]:
        raise ValueError(
            f"all_to_all: shape {tuple(x.shape)} does not match scatter sizes {scatter_sizes} "
            f"(dim {scatter_dim}) / gather sizes {gather_sizes} (dim {gather_dim}, rank {me})"
        )
    if world == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim, tuple(scatter_sizes), tuple(gather_sizes), kind)


# torch 2.13 renamed them (the old names warn); older releases have only the old ones
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _padded(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` moved to dim 0 and zero-padded there to ``size`` (contiguous)."""
    x = x.movedim(dim, 0)
    if x.shape[0] == size:
        return x.contiguous()
    out = x.new_zeros((size,) + tuple(x.shape[1:]))
    out[: x.shape[0]] = x
    return out


def _gather(x: torch.Tensor, group, dim: int, sizes: List[int], kind: str) -> torch.Tensor:
    most, world = max(sizes), len(sizes)
    send = _padded(x, dim, most)
    recv = send.new_empty((world * most,) + tuple(send.shape[1:]))
    record_bytes(kind, (world - 1) * send.numel() * send.element_size())
    try:
        _ALL_GATHER(recv, send, group=group)
    except RuntimeError as e:
        raise peer_failure(e, group, "the Ulysses K/V all-gather") from e
    # equal shards: the receive buffer is the result (a view); uneven: drop each shard's padding
    whole = recv if len(set(sizes)) == 1 else torch.cat([recv[i * most : i * most + n] for i, n in enumerate(sizes)])
    return whole.movedim(0, dim)


def _reduce_scatter(grad: torch.Tensor, group, dim: int, sizes: List[int]) -> torch.Tensor:
    most, world, me = max(sizes), len(sizes), dist.get_rank(group)
    if len(set(sizes)) == 1:  # [P*most, ...] as it is
        send = grad.movedim(dim, 0).contiguous()
    else:  # each rank's piece padded to the longest: [P*most, ...]
        send = torch.cat([_padded(p, dim, most) for p in torch.split(grad, sizes, dim=dim)])
    recv = send.new_empty((most,) + tuple(send.shape[1:]))
    record_bytes("reduce_scatter", (world - 1) * recv.numel() * recv.element_size())
    try:
        _REDUCE_SCATTER(recv, send, group=group)
    except RuntimeError as e:
        raise peer_failure(e, group, "the Ulysses dK/dV reduce-scatter") from e
    return recv[: sizes[me]].movedim(0, dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, kind):
        ctx.route = (group, dim, sizes)
        return _gather(x, group, dim, list(sizes), kind)

    @staticmethod
    def backward(ctx, grad):
        group, dim, sizes = ctx.route
        return _reduce_scatter(grad.contiguous(), group, dim, list(sizes)), None, None, None, None


def all_gather(x: torch.Tensor, group, dim: int, sizes: Sequence[int], kind: str = "all_gather") -> torch.Tensor:
    """Differentiable all-gather along ``dim``: rank i contributes ``sizes[i]`` of it (uneven allowed). The
    gradient of every rank's copy is summed back to its shard (a reduce-scatter). With one rank: ``x``."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    sizes = [int(n) for n in sizes]
    dim %= x.dim()
    if len(sizes) != world or sizes[me] != x.shape[dim]:
        raise ValueError(f"all_gather: shape {tuple(x.shape)} does not match sizes {sizes} (dim {dim}, rank {me})")
    if world == 1:
        return x
    return _AllGather.apply(x, group, dim, tuple(sizes), kind)


# ------------------------------------------------------------------------------------------ ring send/recv
TAGS = {"ring_kv": 11, "ring_dkv": 12, "halo_kv": 13, "halo_dkv": 14, "all_gather": 15, "reduce_scatter": 16}


class PendingExchange:
    """An exchange in flight; :meth:`wait` returns the received tensor (idempotent)."""

    def __init__(
        self,
        works: List,
        received: torch.Tensor,
        sent: torch.Tensor,
        group=None,
        what: str = "a ring send/recv",
        finish=None,
    ) -> None:
        self._works = works
        self._received = received
        self._sent = sent  # keep the send buffer alive until the message has left
        self._group = group
        self._what = what
        self._finish = finish  # received -> result, once every message is in (a reduce-scatter's sum)

    def wait(self) -> torch.Tensor:
        try:
            for w in self._works:
                w.wait()
        except RuntimeError as e:
            raise peer_failure(e, self._group, self._what) from e
        if self._finish is not None:
            self._received, self._finish = self._finish(self._received), None
        self._works, self._sent = [], None
        return self._received


# ------------------------------------------------------------------------------------------ async all-gather
# Note [gloo collectives as point-to-point]: on CPU tensors (gloo) the all-gather and reduce-scatter of
# kvallgather_cp_algo are posted as one batch of isend/irecv with every other rank: the same bytes on the wire, but
# gloo's own all-gather / reduce-scatter cost 1.5-2.2x the CPU time and 1.5-2.1x the wall time of that batch
# (measured on 2 cores, 1 thread per rank: 4 MB per rank at P = 2: all-gather 7.1 ms of CPU vs 3.2; 1 MB at P = 4:
# 2.5 vs 1.8, wall 7.8 vs 3.7 ms; reduce-scatter of 8 MB at P = 2: 9.5 ms vs 5.4 with the sum). Device tensors keep
# the backend's collectives (NCCL/HCCL run them as rings on their own streams). The reduce-scatter sums the P parts
# in rank order in float32 (float64 for float64), then casts: every rank's sum in one fixed order.
def _p2p_all(group, sends: Sequence[Tensor], recvs: Sequence[Tensor], kind: str) -> List:
    """``sends[j]`` to group rank ``j`` and ``recvs[j]`` from it, for every ``j`` but this rank: one batch."""
    me, ops = dist.get_rank(group), []
    for j in range(len(recvs)):
        if j != me:
            peer = dist.get_global_rank(group, j)
            ops.append(dist.P2POp(dist.isend, sends[j], peer, group, TAGS[kind]))
            ops.append(dist.P2POp(dist.irecv, recvs[j], peer, group, TAGS[kind]))
    return [w for w in dist.batch_isend_irecv(ops) if w is not None] if ops else []


def start_all_gather(x: torch.Tensor, group, kind: str = "all_gather") -> PendingExchange:
    """Post the all-gather of ``x`` ``[n, ...]`` (equal on every rank) over ``group``; ``wait()`` gives ``[P*n, ...]``
    in rank order. Reports ``(P-1) x`` bytes of ``x`` (what this rank sends to the others). CPU tensors: Note
    [gloo collectives as point-to-point]."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    recv = note_held(x.new_empty((world * x.shape[0],) + tuple(x.shape[1:])))
    record_bytes(kind, (world - 1) * x.numel() * x.element_size())
    try:
        if x.device.type == "cpu":
            parts = recv.chunk(world)
            parts[dist.get_rank(group)].copy_(x)
            works = _p2p_all(group, [x] * world, parts, "all_gather")
        else:
            works = [_ALL_GATHER(recv, x, group=group, async_op=True)]
    except RuntimeError as e:
        raise peer_failure(e, group, "the K/V all-gather") from e
    return PendingExchange(works, recv, x, group, "the K/V all-gather")


def start_reduce_scatter(x: torch.Tensor, group, kind: str = "reduce_scatter") -> PendingExchange:
    """Post the reduce-scatter (sum) of ``x`` ``[P*n, ...]`` over ``group``: ``wait()`` gives this rank's ``[n, ...]``
    of the sum over ranks. Reports ``(P-1) x`` bytes of the result (the parts this rank sends on). CPU tensors: Note
    [gloo collectives as point-to-point]."""
    x = x.contiguous()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0] // world
    record_bytes(kind, (world - 1) * n * x[0].numel() * x.element_size())
    try:
        if x.device.type == "cpu":
            recv = note_held(x.new_empty((world, n) + tuple(x.shape[1:])))
            recv[me].copy_(x[me * n : (me + 1) * n])
            works = _p2p_all(group, x.chunk(world), recv.unbind(0), "reduce_scatter")
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            finish = lambda parts: parts.sum(0, dtype=acc).to(x.dtype)  # noqa: E731 - rank order, one sum
        else:
            recv = note_held(x.new_empty((n,) + tuple(x.shape[1:])))
            works, finish = [_REDUCE_SCATTER(recv, x, group=group, async_op=True)], None
    except RuntimeError as e:
        raise peer_failure(e, group, "the dK/dV reduce-scatter") from e
    return PendingExchange(works, recv, x, group, "the dK/dV reduce-scatter", finish)


class RingExchanger:
    """Next/previous neighbours in ``group`` (positions are group ranks, in group order)."""

    def __init__(self, group, overlap_group=None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.pos = dist.get_rank(group)
        if self.pos < 0:
            raise ValueError("this rank is not a member of the ring process group it was given")
        self.next = dist.get_global_rank(group, (self.pos + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.pos - 1) % self.size)
        comms = (group, group if overlap_group is None else overlap_group)
        self._send_group = comms[self.pos % 2]
        self._recv_group = comms[((self.pos - 1) % self.size) % 2]
        self.overlap = overlap_group is not None

    def start(self, tensor: torch.Tensor, kind: str) -> PendingExchange:
        """Send ``tensor`` to the next position, receive a tensor like it from the previous one."""
        tensor = tensor.contiguous()
        received = note_held(torch.empty_like(tensor))
        tag = TAGS[kind]
        record_bytes(kind, tensor.numel() * tensor.element_size())
        if self._send_group is self._recv_group:
            ops = [
                dist.P2POp(dist.isend, tensor, self.next, self._send_group, tag),
                dist.P2POp(dist.irecv, received, self.prev, self._send_group, tag),
            ]
            works = dist.batch_isend_irecv(ops)
        else:
            works = [
                dist.isend(tensor, self.next, group=self._send_group, tag=tag),
                dist.irecv(received, self.prev, group=self._recv_group, tag=tag),
            ]
        return PendingExchange([w for w in works if w is not None], received, tensor, self.group)


class PairExchanger:
    """Any distance in ``group``: :meth:`start` sends to the rank ``t`` positions after this one and receives from
    the one ``t`` before (mod P; a negative ``t`` reverses the direction) - the halo exchange of a windowed layer
    (:mod:`mindspeed_cp.window_ring`). Message sizes come from a plan every rank shares, so an empty side posts
    nothing and its partner expects nothing."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.pos = dist.get_rank(group)

    def start(self, send: Optional[Tensor], t: int, recv_numel: int, like: Tensor, kind: str) -> PendingExchange:
        """Post ``send`` (None: nothing) to position ``pos + t`` and a receive of ``recv_numel`` elements (dtype and
        device of ``like``) from ``pos - t``."""
        received = like.new_empty(recv_numel)
        ops = []
        if send is not None and send.numel():
            send = send.contiguous()
            record_bytes(kind, send.numel() * send.element_size())
            dst = dist.get_global_rank(self.group, (self.pos + t) % self.size)
            ops.append(dist.P2POp(dist.isend, send, dst, self.group, TAGS[kind]))
        if recv_numel:
            src = dist.get_global_rank(self.group, (self.pos - t) % self.size)
            ops.append(dist.P2POp(dist.irecv, received, src, self.group, TAGS[kind]))
        works = dist.batch_isend_irecv(ops) if ops else []
        return PendingExchange([w for w in works if w is not None], received, send, self.group)


# ------------------------------------------------------------------------------------------ K/V in flight
class KVPair:
    """K and V as they travel around the ring: one flat buffer, K's elements then V's, each in the travel layout
    (``[s, b, hk, d]``, or ``[b, hk, s, d]`` with ``bnsd``); V has its own head size (MLA: ``d_v != d``). dK/dV
    accumulators use the same layout, and the KV-cache policies keep parts of it (``half``: the K part)."""

    def __init__(self, k_shape, v_shape, bnsd: bool) -> None:
        order = (1, 2, 0, 3) if bnsd else (0, 1, 2, 3)
        self.bnsd = bnsd
        self.k_shape = tuple(k_shape[i] for i in order)
        self.v_shape = tuple(v_shape[i] for i in order)
        self.nk = math.prod(self.k_shape)
        self.numel = self.nk + math.prod(self.v_shape)

    def empty(self, dtype, device) -> Tensor:
        return torch.empty(self.numel, dtype=dtype, device=device)

    def pack(self, k: Tensor, v: Tensor) -> Tensor:
        """``[s, b, hk, d]`` K and ``[s, b, hk, dv]`` V -> the flat travel buffer (one copy of each)."""
        buf = self.empty(k.dtype, k.device)
        self.k_part(buf).view(self.k_shape).copy_(k.permute(1, 2, 0, 3) if self.bnsd else k)
        self.v_part(buf).view(self.v_shape).copy_(v.permute(1, 2, 0, 3) if self.bnsd else v)
        return buf

    def k_part(self, buf: Tensor) -> Tensor:
        return buf[: self.nk]

    def v_part(self, buf: Tensor) -> Tensor:
        return buf[self.nk :]

    def k_view(self, part: Tensor) -> Tensor:
        """A K part (flat) -> its ``[b, hk, s, d]`` view."""
        x = part.view(self.k_shape)
        return x if self.bnsd else x.permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d]

    def v_view(self, part: Tensor) -> Tensor:
        x = part.view(self.v_shape)
        return x if self.bnsd else x.permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d]

    def views(self, buf: Tensor) -> Tuple[Tensor, Tensor]:
        """The buffer -> (K ``[b, hk, s, d]``, V ``[b, hk, s, dv]``) views."""
        return self.k_view(self.k_part(buf)), self.v_view(self.v_part(buf))

    def unpack(self, buf: Tensor) -> Tuple[Tensor, Tensor]:
        """The buffer -> (K ``[s, b, hk, d]``, V ``[s, b, hk, dv]``) views."""
        k, v = self.views(buf)
        return k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)  # [b, h, s, d] -> [s, b, h, d]


# ------------------------------------------------------------------------------------------ the MTP shift
def shift_left(x: Tensor, dim: int, plan: ShiftPlan, group) -> Tensor:
    """``x`` (this rank's tokens along ``dim``) shifted one position left by global position: a new tensor, 0
    where the plan has no successor. A collective over ``group``: every rank of it calls it. Not differentiable
    (Megatron shifts ids, labels and masks)."""
    local_out, local_in, send, recv_out = plan.on(x.device)
    xs = x.detach().movedim(dim, -1)  # [..., s_local]
    out = torch.zeros_like(xs)
    out[..., local_out] = xs[..., local_in]
    if dist.get_world_size(group) > 1:
        payload = xs[..., send].movedim(-1, 0).contiguous()  # [n_send, ...]: one value per boundary per sample
        got = payload.new_empty((recv_out.numel(),) + tuple(payload.shape[1:]))
        record_bytes("shift", payload.numel() * payload.element_size())
        try:
            dist.all_to_all_single(
                got,
                payload,
                output_split_sizes=list(plan.recv_counts),
                input_split_sizes=list(plan.send_counts),
                group=group,
            )
        except RuntimeError as e:
            raise peer_failure(e, group, "the multi-token-prediction shift") from e
        out[..., recv_out] = got.movedim(0, -1)
    return out.movedim(-1, dim)
