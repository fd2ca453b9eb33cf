"""KV-cache policies per algorithm: bytes sent, bytes kept for backward and time, each against no policy.

    python -m benchmarks.bench_kv_cache [--seq 4096] [--cp 4] [--reps 5]      # -> results/kv_cache.json

On CP gloo ranks (one thread each), for every algorithm setting (Ulysses MHA, Ulysses GQA with fewer KV heads
than ranks, Ulysses with the K/V all-gather, Ring, Double Ring, Hybrid) and policy (None, half, full): one
counted pass (:func:`mindspeed_cp.stats.count_bytes`, :func:`mindspeed_cp.stats.count_saved`), then
``reps`` rounds in which the three policies of a setting run one after the other (interleaved, so a slow
moment of the machine hits all three); time = median over rounds of the slowest rank. Reported per policy:
bytes sent per rank and the ratio to the formula (``benchmarks.textbook.*_kv_cache``), bytes saved for
backward and the difference to no policy vs its formula, and the ratios to no policy (comm, memory, time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import List

from mindspeed_cp.ranks import launch

from . import textbook

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = (None, "half", "full")


def settings(cp: int, heads: int, kv_small: int) -> List[dict]:
    """The algorithm settings: (label, case fields)."""
    out = [
        dict(label="Ulysses", algo="ulysses", kv_heads=heads),
        dict(label=f"Ulysses GQA {heads}/{kv_small}", algo="ulysses", kv_heads=kv_small),
        dict(label=f"Ulysses all-gather K/V {heads}/1", algo="ulysses", kv_heads=1, allgather_kv=True),
        dict(label="Ring", algo="ring", kv_heads=heads),
        dict(label="Double Ring K=2", algo="double_ring", window=2, kv_heads=heads),
        dict(label=f"Hybrid U=2 x R={cp // 2}", algo="hybrid", ulysses=2, kv_heads=heads),
    ]
    return out


def formula(case: dict, rank: int) -> dict:
    S, P, b, h, hk, d, e = case["seq"], case["cp"], case["batch"], case["heads"], case["kv_heads"], case["head_dim"], 4
    policy = case.get("kv_cache_policy")
    if case["algo"] == "ulysses":
        return textbook.ulysses_kv_cache(S, P, b, h, hk, d, e, policy, case.get("allgather_kv", False), rank)
    if case["algo"] in ("ring", "double_ring"):
        return textbook.ring_kv_cache(S, P, b, hk, d, e, policy)
    return textbook.hybrid_kv_cache(S, case["ulysses"], P // case["ulysses"], b, h, hk, d, e, policy, rank=rank)


def _measure(groups: List[List[dict]], reps: int) -> List[List[dict]]:
    """On every rank: per setting (a list of its three policy cases), counted passes and interleaved rounds."""
    import torch
    import torch.distributed as dist

    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.stats import count_bytes, count_saved

    from .attention_bench import _inputs, _one_pass, build_runner

    torch.set_num_threads(1)
    out = []
    for gi, cases in enumerate(groups):
        runners = [build_runner(c) for c in cases]
        cfg = runners[0][0]
        s_local = int(token_indices(cfg, dist.get_rank(), cases[0]["seq"]).numel())
        q, k, v, dout = _inputs(cases[0], s_local, seed=100 * gi + dist.get_rank())
        rows = []
        for _, run in runners:
            for t in (q, k, v):
                t.grad = None
            with count_bytes() as sent:
                with count_saved() as saved:
                    o = run(q, k, v)
                o.backward(dout)
            del o
            rows.append(
                {
                    "sent": sum(n for kind, n in sent.by_kind.items() if kind != "metadata"),
                    "by_kind": dict(sent.by_kind),
                    "saved": saved.total,
                    "times": [],
                }
            )
        for _ in range(reps):
            for row, (_, run) in zip(rows, runners):
                dist.barrier()
                t0 = time.perf_counter()
                _one_pass(run, q, k, v, dout)
                row["times"].append(time.perf_counter() - t0)
        out.append(rows)
    return out


def run(
    seq: int = 4096, cp: int = 4, heads: int = 8, head_dim: int = 64, batch: int = 1, reps: int = 5, log=print
) -> List[dict]:
    groups = []
    for st in settings(cp, heads, kv_small=2 if cp > 2 else 1):
        base = dict(st, cp=cp, seq=seq, batch=batch, heads=heads, head_dim=head_dim, dtype="float32")
        groups.append([dict(base, kv_cache_policy=p) for p in POLICIES])
    t0 = time.monotonic()
    res = launch(cp, _measure, groups, reps, timeout=3600)
    if not res.ok:
        raise RuntimeError("kv_cache benchmark failed:\n" + "\n".join(res.errors))
    records = []
    for gi, cases in enumerate(groups):
        per_rank = [r[gi] for r in res.results]  # [rank][policy]
        # time of a round = its slowest rank; ratios to no policy within the same round
        rounds = [
            [max(per_rank[rk][pi]["times"][i] for rk in range(cp)) for i in range(reps)] for pi in range(len(POLICIES))
        ]
        for pi, case in enumerate(cases):
            want = [formula(case, rk) for rk in range(cp)]
            base_saved = [per_rank[rk][0]["saved"] for rk in range(cp)]
            rec = {k: case[k] for k in ("label", "algo", "cp", "seq", "batch", "heads", "kv_heads", "head_dim")}
            rec.update(
                policy=case["kv_cache_policy"] or "none",
                sent_bytes=max(per_rank[rk][pi]["sent"] for rk in range(cp)),
                sent_formula=max(w["sent"] for w in want),
                saved_bytes=max(per_rank[rk][pi]["saved"] for rk in range(cp)),
                saved_delta=max(per_rank[rk][pi]["saved"] - base_saved[rk] for rk in range(cp)),
                saved_delta_formula=max(w["saved"] for w in want),
                sent_by_kind=per_rank[0][pi]["by_kind"],
                time_s=statistics.median(rounds[pi]),
                time_ratio=statistics.median(a / b for a, b in zip(rounds[pi], rounds[0])),
            )
            rec["sent_over_formula"] = rec["sent_bytes"] / rec["sent_formula"]
            records.append(rec)
        for rec in records[-len(cases) :]:
            rec["comm_ratio"] = rec["sent_bytes"] / records[-len(cases)]["sent_bytes"]
            rec["memory_ratio"] = rec["saved_bytes"] / records[-len(cases)]["saved_bytes"]
    log(f"  KV-cache policies, S={seq} CP={cp}: {len(records)} records ({time.monotonic() - t0:.0f} s)")
    return records


def markdown(records: List[dict]) -> List[str]:
    if not records:
        return []
    r0 = records[0]
    lines = [
        "",
        f"## KV-cache policies (S={r0['seq']}, CP={r0['cp']}, {r0['heads']} heads of {r0['head_dim']}, fp32; "
        f"benchmarks/bench_kv_cache.py)",
        "",
        "Per rank, forward + backward. **comm** / **memory** / **time** = this policy / no policy (memory: bytes "
        "autograd keeps for backward, the whole attention call; time: median of interleaved rounds, slowest rank). "
        "**sent / formula** and **Δsaved** vs formula: docs/performance.md.",
        "",
        "| setting | policy | comm | memory | time | sent MiB | sent / formula | Δsaved MiB | Δsaved formula MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['label']} | {r['policy']} | {r['comm_ratio']:.3f} | {r['memory_ratio']:.3f} "
            f"| {r['time_ratio']:.3f} | {r['sent_bytes'] / 2**20:.2f} | {r['sent_over_formula']:.4f} "
            f"| {r['saved_delta'] / 2**20:+.2f} | {r['saved_delta_formula'] / 2**20:+.2f} |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    records = run(args.seq, args.cp, reps=args.reps)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "kv_cache.json"), "w") as f:
        json.dump(records, f, indent=1)
    print("\n".join(markdown(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
