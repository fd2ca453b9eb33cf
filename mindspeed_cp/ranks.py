"""Gloo ranks on this machine: a free port, a rank's process group, and one-shot launches of a function.

    results = launch(4, body, arg, timeout=300)        # body(*args) runs as rank 0..3; one result per rank

One helper for the package (``--device cpu-here`` calibration, ``make demo``, ``make demo-megatron-lm``), the
benchmarks and the tests' persistent pool (``tests/dist.py``): :func:`free_port`, :func:`init_rank` (a rank's
environment, one intra-op thread, the gloo process group) and :func:`launch`.

Each rank is a fresh ``spawn``ed process with one intra-op thread (what a rank of a CPU job gets; the
machine's cores are shared by all ranks). ``body`` is a module-level function (pickled by name).

A rank may report progress with :func:`progress` (e.g. one record per finished step of a search); the
launcher returns those alongside the results, so work done before a failure is not lost.

A rank that raises while its peers wait in a collective would hang them; the launcher waits ``grace``
seconds after the first failure, then kills every rank and reports :class:`LaunchResult` with
``ok=False`` (the errors of every rank, and whatever rank 0 reported with :func:`progress` before).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, List

_CONN = None  # this rank's pipe to the launcher (set in the worker)


@dataclass
class LaunchResult:
    ok: bool
    results: List[Any]  # per rank: the body's return value, or None
    errors: List[str] = field(default_factory=list)  # "rank r: Type: message" for every failed rank
    progress: List[Any] = field(default_factory=list)  # what rank 0 reported with progress(), in order
    timed_out: bool = False
    wall_s: float = 0.0

    @staticmethod
    def is_memory_error(error: str) -> bool:
        return any(
            s in error
            for s in (
                "MemoryError",
                "can't allocate memory",
                "not enough memory",
                "std::bad_alloc",
                "Cannot allocate memory",
            )
        )

    @property
    def out_of_memory(self) -> bool:
        return any(self.is_memory_error(e) for e in self.errors)


def progress(item: Any) -> None:
    """Send ``item`` to the launcher now (only rank 0's items are kept)."""
    import torch.distributed as dist

    if _CONN is not None and dist.get_rank() == 0:
        _CONN.send(("progress", item))


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world: int, port: int, timeout_s: float) -> None:
    """Become gloo rank ``rank`` of ``world`` on this machine: torchrun's environment variables, one intra-op
    thread (the machine's cores are shared by all ranks), the default process group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _worker(rank: int, world: int, port: int, conn, fn: Callable, args: tuple, timeout_s: float) -> None:
    global _CONN
    _CONN = conn
    try:
        init_rank(rank, world, port, timeout_s)
        result = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - report everything to the launcher
        result = ("err", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    try:
        conn.send(result)
    except Exception as e:  # noqa: BLE001 - e.g. unpicklable
        conn.send(("err", f"rank {rank}: cannot return the result: {e}"))


def launch(world: int, fn: Callable, *args: Any, timeout: float = 600, grace: float = 10) -> LaunchResult:
    """Run ``fn(*args)`` on ``world`` fresh gloo ranks; never raises for a rank's failure (see ``ok``)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    conns, procs = [], []
    start = time.monotonic()
    for rank in range(world):
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=_worker,
            args=(rank, world, port, child, fn, args, timeout),
            daemon=True,
            name=f"bench-rank{rank}-of-{world}",
        )
        p.start()
        conns.append(parent)
        procs.append(p)
    results: List[Any] = [None] * world
    errors: List[str] = []
    items: List[Any] = []
    pending = set(range(world))
    deadline = start + timeout
    timed_out = False
    first_fail = 0.0
    while pending:
        limit = min(deadline, first_fail + grace) if errors else deadline
        got = False
        for r in sorted(pending):
            while r in pending and conns[r].poll(0):
                got = True
                try:
                    status, value = conns[r].recv()
                except EOFError:
                    status, value = "err", f"rank {r}: process exited (code {procs[r].exitcode})"
                if status == "progress":
                    items.append(value)
                    continue
                pending.discard(r)
                if status == "ok":
                    results[r] = value
                else:
                    if not errors:
                        first_fail = time.monotonic()
                    errors.append(value)
            if r in pending and not procs[r].is_alive() and not conns[r].poll(0):
                pending.discard(r)
                if not errors:
                    first_fail = time.monotonic()
                code = procs[r].exitcode
                why = " (SIGKILL: the OOM killer?)" if code == -9 else ""
                errors.append(f"rank {r}: process died (exit code {code}){why}")
        if pending and not got:
            if time.monotonic() >= limit:
                timed_out = not errors
                if timed_out:
                    errors.append(f"ranks {sorted(pending)} did not finish in {timeout:.0f} s")
                break
            time.sleep(0.01)
    for p in procs:
        if not errors:
            p.join(timeout=10)  # finished ranks are only shutting down
        if p.is_alive():
            p.kill()
        p.join(timeout=5)
    for c in conns:
        c.close()
    return LaunchResult(
        ok=not errors,
        results=results,
        errors=errors,
        progress=items,
        timed_out=timed_out,
        wall_s=time.monotonic() - start,
    )
