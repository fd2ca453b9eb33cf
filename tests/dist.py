"""A pool of persistent gloo ranks, reused across tests.

Starting a rank costs seconds (importing torch and megatron-core), so each world size gets one set of
worker processes for the whole session. ``run_on_ranks(world_size, fn, *args)`` sends ``fn`` (a
module-level function, pickled by name) to every rank, runs it there as that rank and returns the
per-rank results. After every task the worker tears down Megatron's parallel state and the plugin's CP
state so tests do not leak into each other.

A rank that raises while its peers sit in a collective would hang them: the pool then waits at most
``grace`` seconds for the others, kills and restarts the whole pool, and reports every rank's error.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from mindspeed_cp.ranks import free_port, init_rank

DEFAULT_TIMEOUT = float(os.environ.get("MSCP_TEST_TIMEOUT", "300"))
# gloo's process groups keep their threads (2 run loops and a TCP loop each) in a long-lived rank even when
# destroyed; past this many OS threads in a worker the kernel spends most of its time scheduling them (80 % system
# time measured with ~750 threads per rank), so the pool is restarted instead (a few seconds)
MAX_THREADS = int(os.environ.get("MSCP_TEST_MAX_THREADS", "400"))


def _threads() -> int:
    """OS threads of this process (gloo's native threads included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: never recycle
        return 0


@dataclass
class RankError:
    rank: int
    type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type}: {self.message}"


class DistributedTestError(AssertionError):
    def __init__(self, errors: List[RankError], note: str = ""):
        self.errors = errors
        body = "\n\n".join(f"--- rank {e.rank} ---\n{e.traceback}" for e in errors)
        super().__init__(f"{note}{len(errors)} rank(s) failed: " + "; ".join(map(str, errors)) + "\n" + body)


def _cleanup_rank() -> None:
    """Undo per-test global state in a worker (Megatron's parallel state, the plugin's CP state)."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - cleanup must never kill the worker
        traceback.print_exc()
    try:
        from mindspeed_cp.megatron.state import STATE

        STATE.reset()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    # Megatron never destroys its process groups; in a long-lived rank every initialize_model_parallel
    # would add ~20 gloo groups (each with its own threads) and slow every later test down.
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _world

        for pg in list(_world.pg_map):
            if pg is not dist.GroupMember.WORLD:
                dist.destroy_process_group(pg)
    except Exception:  # noqa: BLE001
        traceback.print_exc()


def _worker(rank: int, world_size: int, port: int, conn) -> None:
    init_rank(rank, world_size, port, timeout_s=180)
    try:
        import megatron.core  # noqa: F401  - warm the import once per rank

        import mindspeed_cp  # noqa: F401
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            result = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - report everything, keep serving
            result = ("err", RankError(rank, type(e).__name__, str(e), traceback.format_exc()))
        finally:
            _cleanup_rank()
        try:
            conn.send(result + (_threads(),))
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send(("err", RankError(rank, type(e).__name__, f"cannot return the result: {e}", ""), _threads()))


class Pool:
    def __init__(self, world_size: int, start_timeout: float = 300):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.world_size = world_size
        self.threads = 0  # the most OS threads a worker reported after its last task
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, child),
                daemon=True,
                name=f"gloo-rank{rank}-of-{world_size}",
            )
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        deadline = time.monotonic() + start_timeout
        for rank, c in enumerate(self.conns):
            if not c.poll(max(0.0, deadline - time.monotonic())):
                self.close()
                raise RuntimeError(f"gloo rank {rank} of {world_size} did not start in {start_timeout}s")
            c.recv()

    def run(
        self, fn: Callable, args=(), kwargs=None, timeout: float = DEFAULT_TIMEOUT, grace: float = 20.0
    ) -> List[Any]:
        """Run ``fn`` on every rank; return a list of results or :class:`RankError` per rank.

        Raises ``TimeoutError`` (after killing the pool) when ranks neither finish nor fail in time.
        """
        for c in self.conns:
            c.send((fn, tuple(args), dict(kwargs or {})))
        self.threads = 0
        results: List[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        while pending:
            failed = any(isinstance(r, RankError) for r in results)
            limit = min(deadline, time.monotonic() + grace) if failed else deadline
            ready = [r for r in pending if self.conns[r].poll(0)]
            if not ready:
                if time.monotonic() >= limit:
                    self.close()
                    if failed:
                        for r in pending:
                            results[r] = RankError(
                                r, "Hang", "did not return after another rank failed (stuck in a collective)", ""
                            )
                        return results
                    raise TimeoutError(
                        f"ranks {sorted(pending)} of {self.world_size} did not finish "
                        f"{getattr(fn, '__name__', fn)} in {timeout}s (pool restarted)"
                    )
                for p in self.procs:
                    if not p.is_alive():
                        self.close()
                        raise RuntimeError(f"worker {p.name} died (exit code {p.exitcode})")
                time.sleep(0.005)
                continue
            for r in ready:
                status, value, threads = self.conns[r].recv()
                results[r] = value
                self.threads = max(self.threads, threads)
                pending.discard(r)
        return results

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.conns, self.procs = [], []


_POOLS: Dict[int, Pool] = {}


def get_pool(world_size: int) -> Pool:
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = Pool(world_size)
    return pool


def run_outcomes(
    world_size: int,
    fn: Callable,
    *args,
    timeout: float = DEFAULT_TIMEOUT,
    grace: float = 20.0,
    restart: bool = False,
    **kwargs,
) -> List[Any]:
    """Per-rank results, with :class:`RankError` in place of a rank's result when it raised.

    ``grace``: how long the others may still take once one rank failed (fault tests wait for a process-group
    timeout). ``restart``: close the pool afterwards (a test that let collectives time out leaves no state
    behind for the next one).
    """
    pool = get_pool(world_size)
    try:
        return pool.run(fn, args, kwargs, timeout=timeout, grace=grace)
    finally:
        restart = restart or pool.threads > MAX_THREADS
        if restart:
            pool.close()
        if restart or not pool.alive:
            _POOLS.pop(world_size, None)


def run_on_ranks(world_size: int, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; raise if any rank failed."""
    results = run_outcomes(world_size, fn, *args, timeout=timeout, **kwargs)
    errors = [r for r in results if isinstance(r, RankError)]
    if errors:
        raise DistributedTestError(errors)
    return results


def expect_error_on_every_rank(
    world_size: int, fn: Callable, *args, match: Optional[str] = None, timeout: float = 120, **kwargs
) -> List[RankError]:
    """Assert that every rank raised (no hang, no silent success); return the errors."""
    import re

    results = run_outcomes(world_size, fn, *args, timeout=timeout, **kwargs)
    bad = [(r, v) for r, v in enumerate(results) if not isinstance(v, RankError) or v.type == "Hang"]
    assert not bad, f"expected every rank to raise, got: {bad}"
    if match is not None:
        for e in results:
            assert re.search(match, e.message), f"rank {e.rank} raised {e.type}: {e.message!r}, not /{match}/"
    return results


@atexit.register
def close_all() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()
