"""Bytes a rank sends, counted at torch's c10d operators: the same meter for every system.

    with CountBytes() as meter:
        out = some_cp_attention(q, k, v); out.backward(g)
    meter.total, meter.by_op

``mindspeed_cp.stats`` counts where the plugin calls ``torch.distributed``; a peer (PyTorch's ring,
DeepSpeed, yunchang) calls it elsewhere, or through the functional collectives. Every one of those calls ends
in a c10d operator that the dispatcher routes through a ``TorchDispatchMode``, so this mode sees them all,
whoever calls: ``c10d.send`` (point to point), ``c10d.alltoall_base_`` / ``_c10d_functional.all_to_all_single``,
the all-gathers, reduce-scatters and all-reduces. Per operator, the bytes *this rank sends*:

* send: the tensors; all-to-all: the input minus the piece it keeps;
* all-gather: its input to each of the other P-1 ranks;
* reduce-scatter: (P-1)/P of its input (the ring algorithm), all-reduce: 2 (P-1)/P of it.

Receives count nothing (the sender counts them). c10d operators it does not know are listed in ``unknown``
(name and call count), never dropped silently.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _group(name_or_pg):
    """The ProcessGroup of an operator argument: a group name (functional collectives) or the boxed group the
    c10d operators carry."""
    import torch.distributed as dist

    if isinstance(name_or_pg, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(name_or_pg)
    if isinstance(name_or_pg, dist.ProcessGroup):
        return name_or_pg
    return dist.ProcessGroup.unbox(name_or_pg)


def _kept(total: int, splits, rank: int, size: int) -> int:
    """Bytes of the piece an all-to-all keeps on this rank (``splits``: rows per rank along dim 0)."""
    if not splits:
        return total // size
    rows = sum(splits)
    return total * splits[rank] // rows if rows else 0


class CountBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter = Counter()
        self.calls: Counter = Counter()
        self.unknown: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _count(self, name: str, args) -> None:
        if name in ("c10d.send",):
            self.by_op["send"] += _nbytes(args[0])
        elif name == "c10d.alltoall_base_":
            out, inp, pg, _, in_splits = args[:5]
            pg, n = _group(pg), _nbytes(inp)
            self.by_op["all_to_all"] += n - _kept(n, list(in_splits), pg.rank(), pg.size())
        elif name == "_c10d_functional.all_to_all_single":
            inp, _, in_splits, group = args[:4]
            pg, n = _group(group), _nbytes(inp)
            self.by_op["all_to_all"] += n - _kept(n, list(in_splits), pg.rank(), pg.size())
        elif name in ("c10d._allgather_base_", "c10d.allgather_into_tensor_coalesced_", "c10d.allgather_"):
            pg = _group(args[2])
            self.by_op["all_gather"] += (pg.size() - 1) * _nbytes(args[1])
        elif name == "_c10d_functional.all_gather_into_tensor":
            self.by_op["all_gather"] += (args[1] - 1) * _nbytes(args[0])
        elif name in ("c10d._reduce_scatter_base_", "c10d.reduce_scatter_tensor_coalesced_"):
            pg = _group(args[2])
            self.by_op["reduce_scatter"] += _nbytes(args[1]) * (pg.size() - 1) // pg.size()
        elif name == "_c10d_functional.reduce_scatter_tensor":
            size = args[2]
            self.by_op["reduce_scatter"] += _nbytes(args[0]) * (size - 1) // size
        elif name == "c10d.allreduce_":
            pg = _group(args[1])
            self.by_op["all_reduce"] += 2 * _nbytes(args[0]) * (pg.size() - 1) // pg.size()
        elif name == "_c10d_functional.all_reduce":
            pg = _group(args[2])
            self.by_op["all_reduce"] += 2 * _nbytes(args[0]) * (pg.size() - 1) // pg.size()
        elif name in (
            "c10d.recv_",
            "c10d.recv_any_source_",
            "c10d.barrier",
            "c10d.monitored_barrier_",
            "_c10d_functional.wait_tensor",
            "_c10d_functional._wrap_tensor_autograd",
        ):
            return
        else:
            self.unknown[name] += 1
            return
        self.calls[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.replace("::", ".")
        if name.startswith(("c10d.", "_c10d_functional.")):
            self._count(name, args)
        return func(*args, **(kwargs or {}))
