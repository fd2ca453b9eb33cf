"""``--device cpu-here``: the cost model's device constants measured on this machine (a few seconds).

* attention: the plugin's kernel as the algorithms call it (an unmasked n x n block, forward + backward, 4 heads
  of 64, fp32, one thread) at n = 128-1024; the cost model's ``t = F / (A n / (n + n_half)) + c0`` fitted
  through them (:func:`fit`) gives ``peak_tflops`` = A (so ``attention_efficiency`` = 1),
  ``attention_half_tokens`` = n_half and ``kernel_call_us`` = c0 / 2 (a forward and a backward call); the
  plugin's whole causal attention at 512-2048 tokens then gives ``attention_call_us``, what one attention call
  costs beyond its kernel calls (wrappers, input checks, the NaN contract's passes);
* dense layers: one fp32 matmul, ``matmul_efficiency`` = its FLOP/s / A;
* links: gloo ranks on this machine, ping-pong of one element (latency) and of 16 MiB (bandwidth); every rank
  is on the one "node" (``gpus_per_node`` large);
* all of it in as many ranks as there are cores, the timings on every rank at once: what a rank of a CPU job
  gets while its peers compute too (shared memory bandwidth and caches), not what one process gets alone;
* ``cores``: ``os.cpu_count()``; with more ranks than cores :func:`mindspeed_cp.planner.plan.plan` multiplies
  compute and transfer times by ranks / cores (the ranks share the cores, and on one machine a transfer is a copy
  by a core).

The result is a plain dict (a device preset's fields), cached for the process.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import time

from ..ranks import free_port, init_rank


def _best(fn, reps: int = 3) -> float:
    """The median of ``reps`` timed runs after a warm-up: with every core's rank timing at once, the median is
    the contended time a rank of a job sees (the minimum catches moments when the other ranks are idle)."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def _attention_time(n: int, heads: int = 4, d: int = 64) -> float:
    """One attention block as the algorithms call the kernel (``mindspeed_cp.kernels``, the device's default):
    ``n`` queries over ``n`` keys, unmasked, forward + backward - a ring step's shape."""
    import torch

    from ..kernels import get_kernel

    kernel = get_kernel(None, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, d, generator=g) for _ in range(4))

    def run():
        out, lse = kernel.forward(q, k, v, scale=d**-0.5, causal=False)
        kernel.backward(do, q, k, v, out, lse, scale=d**-0.5, causal=False)

    return _best(run, reps=7)


def _local_time(n: int, heads: int = 4, d: int = 64) -> float:
    """The plugin's whole-sequence attention (causal, forward + backward): what one Ulysses call runs."""
    import torch

    from ..local import local_attention

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(n, 1, heads, d, generator=g) for _ in range(4))

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        local_attention(*leaves, causal=True).backward(do)

    return _best(run, reps=5)


def _matmul_rate() -> float:
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 2048)
    return 2 * 1024 * 1024 * 2048 / _best(lambda: a @ b)


def _worker(rank: int, world: int, port: int, queue) -> None:
    """One of ``world`` (= the cores) ranks: a gloo ping-pong between ranks 0 and 1, then the attention and
    matmul timings on every rank at once - the throughput a rank gets while the others compute too."""
    import torch
    import torch.distributed as dist

    init_rank(rank, world, port, timeout_s=120)

    def pingpong(t: torch.Tensor, n: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            elif rank == 1:
                dist.recv(t, 0)
                dist.send(t, 0)
        return (time.perf_counter() - t0) / (2 * n)  # one way

    small = torch.zeros(1)
    big = torch.zeros(4 * 2**20)  # 16 MiB
    pingpong(small, 5)
    latency = min(pingpong(small, 50) for _ in range(3))
    one_way = min(pingpong(big, 5) for _ in range(3))
    secs, local = [], []
    for n in LENGTHS:
        dist.barrier()
        secs.append(_attention_time(n))
    for n in LOCAL_LENGTHS:
        dist.barrier()
        local.append(_local_time(n))
    dist.barrier()
    dense = _matmul_rate()
    if rank == 0:
        queue.put((latency, big.numel() * 4 / max(one_way - latency, 1e-9), secs, local, dense))
    dist.barrier()
    dist.destroy_process_group()


def _run_workers() -> tuple:
    ctx = mp.get_context("spawn")
    port = free_port()
    queue = ctx.Queue()
    world = max(2, os.cpu_count() or 2)
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


LENGTHS = (128, 256, 512, 1024)  # kernel blocks (ring steps)
LOCAL_LENGTHS = (512, 1024, 2048)  # whole causal sequences (a Ulysses call)


def fit(lengths, seconds, flops, half: bool = False) -> tuple:
    """Least squares of ``t = F/A + F n_half/(n A) + c0`` (the cost model's compute time plus a per-call cost)
    through the measured points: (A FLOP/s, n_half tokens, c0 s), the last two kept >= 0. ``half=False`` fixes
    n_half = 0: on a CPU the two terms are not told apart by four noisy points (measured: the fitted n_half
    jumped between 0 and 160 tokens from one run to the next), and a CPU kernel has no tiles to fill."""
    import numpy as np

    cols = [np.array(flops, float), np.array(flops, float) / np.array(lengths, float), np.ones(len(lengths))]
    t = np.array(seconds, float)
    for keep in ((0, 1, 2), (0, 2), (0, 1), (0,)) if half else ((0, 2), (0,)):
        x, *_ = np.linalg.lstsq(np.stack([cols[i] for i in keep], 1), t, rcond=None)
        coef = dict(zip(keep, x))
        if all(v >= 0 for v in coef.values()):
            break
    inv_a = coef[0]
    return float(1 / inv_a), float(coef.get(1, 0.0) / inv_a), float(coef.get(2, 0.0))


@functools.lru_cache(maxsize=None)
def _measure() -> tuple:
    import statistics

    from .costmodel import BWD_FLOPS_PER_PAIR, FWD_FLOPS_PER_PAIR, causal_pairs

    latency, bandwidth, secs, local, dense = _run_workers()
    per_pair = (FWD_FLOPS_PER_PAIR + BWD_FLOPS_PER_PAIR) * 64 * 4
    peak, half, call = fit(LENGTHS, secs, [per_pair * n * n for n in LENGTHS])
    # what a whole attention call costs beyond its kernel calls (wrapper, checks, NaN contract, copies)
    extra = statistics.median(
        t - per_pair * causal_pairs(n) / (peak * n / (n + half)) - call for n, t in zip(LOCAL_LENGTHS, local)
    )
    return peak, half, call, max(extra, 0.0), dense, latency, bandwidth


def cpu_here() -> dict:
    """This machine as a device preset (see the module docstring)."""
    import platform

    peak, half, call, extra, dense, latency, bandwidth = _measure()
    return {
        "name": "cpu-here",
        "description": f"this machine, measured: {platform.processor() or platform.machine()},"
        f" {os.cpu_count()} cores, one thread per rank, gloo",
        "peak_tflops": peak / 1e12,
        "attention_efficiency": 1.0,
        "attention_half_tokens": half,
        "kernel_call_us": call * 1e6 / 2,  # per forward or backward call
        "attention_call_us": extra * 1e6,  # per attention forward + backward, beyond its kernel calls
        "matmul_efficiency": min(dense / peak, 10.0),
        "hbm_gb": _memory_gb(),
        "intra_node_gbps": bandwidth / 1e9,
        "inter_node_gbps": bandwidth / 1e9,
        "intra_node_latency_us": latency * 1e6,
        "inter_node_latency_us": latency * 1e6,
        "link_efficiency": 1.0,
        "inter_link_efficiency": 1.0,
        "gpus_per_node": 1 << 20,
        "cores": os.cpu_count() or 1,
        "sources": {"all": "measured by mindspeed_cp.planner.calibrate on this machine"},
    }


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0
