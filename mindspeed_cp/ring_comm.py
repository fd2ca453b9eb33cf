"""Ring send/recv: every rank sends a tensor to the next position of a ring process group and receives
one of the same shape from the previous position.

    ex = RingExchanger(group, overlap_group=None)
    pending = ex.start(kv, "ring_kv")   # posts isend(kv -> next) and irecv(prev -> new buffer)
    ...                                 # compute while the messages travel
    kv = pending.wait()                 # the tensor from the previous position

Every send is reported to :func:`mindspeed_cp.comm_stats.record` with its kind ("ring_kv": key/value
blocks, forward and backward; "ring_dkv": dK/dV accumulators).

Without ``overlap_group`` both directions are one batched ``batch_isend_irecv`` on ``group`` (deadlock
free on NCCL). With it (``--use-cp-send-recv-overlap``) a message on the link ``p -> p+1`` travels on
communicator ``(group, overlap_group)[p % 2]``, so on an even ring every rank sends on one communicator
and receives on the other and the two do not serialise (on an odd ring position 0 uses one for both, and
then batches them).

Messages of different kinds between the same pair may be in flight together; each kind has its own tag
(gloo matches on it) and every rank posts them in the same order (NCCL matches in order).
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from .comm import peer_failure
from .comm_stats import record

TAGS = {"ring_kv": 11, "ring_dkv": 12}


class PendingExchange:
    """An exchange in flight; :meth:`wait` returns the received tensor (idempotent)."""

    def __init__(self, works: List, received: torch.Tensor, sent: torch.Tensor, group=None) -> None:
        self._works = works
        self._received = received
        self._sent = sent  # keep the send buffer alive until the message has left
        self._group = group

    def wait(self) -> torch.Tensor:
        try:
            for w in self._works:
                w.wait()
        except RuntimeError as e:
            raise peer_failure(e, self._group, "a ring send/recv") from e
        self._works, self._sent = [], None
        return self._received


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
        received = torch.empty_like(tensor)
        tag = TAGS[kind]
        record(kind, tensor.numel() * tensor.element_size())
        if self._send_group is self._recv_group:
            ops = [dist.P2POp(dist.isend, tensor, self.next, self._send_group, tag),
                   dist.P2POp(dist.irecv, received, self.prev, self._send_group, tag)]
            works = dist.batch_isend_irecv(ops)
        else:
            works = [dist.isend(tensor, self.next, group=self._send_group, tag=tag),
                     dist.irecv(received, self.prev, group=self._recv_group, tag=tag)]
        return PendingExchange([w for w in works if w is not None], received, tensor, self.group)

    def exchange(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Blocking :meth:`start` + :meth:`PendingExchange.wait`."""
        return self.start(tensor, kind).wait()

