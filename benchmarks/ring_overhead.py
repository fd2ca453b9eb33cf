"""Ring attention's cost outside the kernel: ours against PyTorch's ring, on the same gloo ranks and problems.

    python -m benchmarks.ring_overhead [--cp 2] [--seq 2048] [--rounds 7] [--profile]

Bytes: one more pass of each under :class:`benchmarks.dispatch_bytes.CountBytes` (c10d operators, the same
meter for both). PyTorch's ring is its private ``_templated_ring_attention`` /
``_templated_ring_attention_backward`` (what ``context_parallel()`` runs; the public entry point has no CPU
sharding strategy in torch 2.13) with the CPU
flash op and its head-tail load balance, which is the same zigzag layout as ours; it ships with torch, so this
runs in the main venv. Both get the same shards (``[s, b, h, d]`` for ours, its ``[b, h, s, d]`` copy for
torch's), fp32, causal. Per round every system runs forward + backward once, in turn (interleaved); time = the
median over rounds of the slowest rank. Outputs and gradients are compared between the two (max abs diff).
``--profile``: torch.profiler on rank 0 for one pass of each, the ops outside the attention kernel by self CPU
time, and how many zero-fills / copies each pass makes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from mindspeed_cp.ranks import launch

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)
FILLS = ("aten::zero_", "aten::fill_", "aten::zeros", "aten::zeros_like", "aten::full", "aten::full_like")
COPIES = ("aten::copy_", "aten::clone", "aten::cat", "aten::stack", "aten::contiguous")


def ours_ring(group, q, k, v, dout, scale=None):
    """Our ring, forward + backward on this rank's zigzag shard ``[s, b, h, d]`` -> (out, [dq, dk, dv])."""
    from mindspeed_cp.ring import ring_attention

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, group, causal=True, softmax_scale=scale)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def torch_ring(group, q, k, v, dout, scale=None):
    """PyTorch's ring (CPU flash op, head-tail balance) on the same shard: ``[s, b, h, d]`` -> its ``[b, h, s, d]``."""
    import torch
    from torch.distributed.tensor.experimental._context_parallel import _attention as tcp

    aten = torch.ops.aten
    qb, kb, vb, db = (t.permute(1, 2, 0, 3).contiguous() for t in (q, k, v, dout))
    out, lse = tcp._templated_ring_attention(
        group, 2, aten._scaled_dot_product_flash_attention_for_cpu, qb, kb, vb, is_causal=True, scale=scale
    )[:2]
    grads = tcp._templated_ring_attention_backward(
        group,
        2,
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        grad_out=db,
        grad_out_name="grad_out",
        query=qb,
        key=kb,
        value=vb,
        out=out,
        logsumexp=lse,
        is_causal=True,
        dropout_p=0.0,
        scale=scale,
    )[:3]
    back = lambda t: t.permute(2, 0, 1, 3)  # noqa: E731
    return back(out), [back(g) for g in grads]


def _systems(group, scale):
    return {
        "ours": lambda *a: ours_ring(group, *a, scale=scale),
        "torch_ring": lambda *a: torch_ring(group, *a, scale=scale),
    }


def _measure(seq: int, heads: int, kv_heads: int, head_dim: int, rounds: int, profile: bool) -> dict:
    import torch
    import torch.distributed as dist

    from mindspeed_cp.ring import zigzag_index

    torch.set_num_threads(1)
    P, r = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(seq, 1, n, head_dim, generator=g) for n in (heads, kv_heads, kv_heads, heads)]
    idx = zigzag_index(seq, P, r)
    q, k, v, dout = (t[idx].contiguous() for t in full)
    scale = head_dim**-0.5
    systems = _systems(group, scale)
    results = {name: fn(q, k, v, dout) for name, fn in systems.items()}  # warm-up, and the values compared
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(
            [results["ours"][0]] + results["ours"][1], [results["torch_ring"][0]] + results["torch_ring"][1]
        )
    )
    from .dispatch_bytes import CountBytes

    sent = {}
    for name, fn in systems.items():  # bytes: one pass each under the same c10d-level meter
        with CountBytes() as meter:
            fn(q, k, v, dout)
        sent[name] = {"total": meter.total, "by_op": dict(meter.by_op), "unknown": dict(meter.unknown)}
    times = {name: [] for name in systems}
    cpu = {name: [] for name in systems}
    order = list(systems.items())
    for i in range(rounds):  # a new order every round (the same on every rank): no system always runs first
        random.Random(i).shuffle(order)
        for name, fn in order:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(q, k, v, dout)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {"rank": r, "times": times, "cpu": cpu, "max_abs_diff": diff, "sent": sent}
    if profile and r == 0:
        out["profile"] = {}
    for name, fn in systems.items():
        if not profile:
            break
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(q, k, v, dout)
        if r:
            continue
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        kernel = sum(e.self_cpu_time_total for e in events if e.key in KERNEL_OPS)
        top = sorted((e for e in events if e.key not in KERNEL_OPS), key=lambda e: -e.self_cpu_time_total)[:12]
        out["profile"][name] = {
            "self_cpu_ms": total / 1e3,
            "kernel_ms": kernel / 1e3,
            "outside_kernel_ms": (total - kernel) / 1e3,
            "fills": sum(e.count for e in events if e.key in FILLS),
            "copies": sum(e.count for e in events if e.key in COPIES),
            "top": [(e.key, round(e.self_cpu_time_total / 1e3, 2), e.count) for e in top],
        }
    return out


def run(
    cp: int = 2,
    seq: int = 2048,
    heads: int = 8,
    kv_heads: int = 8,
    head_dim: int = 64,
    rounds: int = 7,
    profile: bool = False,
) -> dict:
    res = launch(cp, _measure, seq, heads, kv_heads, head_dim, rounds, profile, timeout=3600)
    if not res.ok:
        raise RuntimeError("ring_overhead failed:\n" + "\n".join(res.errors))
    names = list(res.results[0]["times"])
    slowest = {n: [max(rk["times"][n][i] for rk in res.results) for i in range(rounds)] for n in names}
    rec = {
        "cp": cp,
        "seq": seq,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "rounds": rounds,
        "median_s": {n: statistics.median(slowest[n]) for n in names},
        "ratio_ours_over_torch": statistics.median(a / b for a, b in zip(slowest["ours"], slowest["torch_ring"])),
        "cpu_s": {
            n: statistics.median(sum(rk["cpu"][n][i] for rk in res.results) for i in range(rounds)) for n in names
        },
        "max_abs_diff": max(rk["max_abs_diff"] for rk in res.results),
        # bytes the busiest rank sends (c10d-level meter, benchmarks/dispatch_bytes.py) and the textbook
        # 3 (P-1) blocks of K+V (fp32)
        "sent_bytes": {n: max(rk["sent"][n]["total"] for rk in res.results) for n in names},
        "sent_by_op": {n: res.results[0]["sent"][n]["by_op"] for n in names},
        "sent_textbook": 3 * (cp - 1) * 2 * (seq // cp) * kv_heads * head_dim * 4,
        "unknown_ops": {n: res.results[0]["sent"][n]["unknown"] for n in names},
    }
    if profile:
        rec["profile"] = res.results[0]["profile"]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    rec = run(args.cp, args.seq, args.heads, args.kv_heads, rounds=args.rounds, profile=args.profile)
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
