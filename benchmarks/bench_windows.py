"""Sliding-window layers: bytes against the halo formula, score elements against the window's pairs, balance and
memory - the measured goals of the windowed algorithms (docs/performance.md, "Sliding windows").

    python -m benchmarks.bench_windows [--seq 2048] [--cp 4]       # a table on stdout, JSON with --out FILE

For each window, on ``cp`` gloo ranks, one forward + backward of every algorithm on ``[S/CP, 1, 8, 64]`` (2 KV
heads), float32:

* ``ring`` - the window-aware ring (``megatron_cp_algo`` on a windowed layer): bytes sent per rank against
  :func:`mindspeed_cp.planner.costmodel.window_ring_kv_cache` of the rank's own halo plan (exact: integers), and
  against the full causal ring's bytes (the goal: <= 0.25 at S=2048, CP=4, W=64);
* ``hybrid`` - Ulysses 2 x the window-aware ring 2;
* ``ulysses`` - the windowed kernel on the whole sequence: saved-for-backward bytes against Ulysses' causal case;
* every one: score elements its kernels computed against the (query, key) pairs in the window (``computed /
  pairs``, goal <= 1.1) and the work of the busiest rank against the mean (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List

from mindspeed_cp.ranks import launch

WINDOWS = [(64, 0), (600, 0), (64, 64)]  # shorter than a shard (S/CP = 512), longer than one, two-sided
GOALS = {"bytes_vs_ring": 0.25, "computed_vs_pairs": 1.1, "work_max_over_mean": 1.05}


def _measure(S: int, windows: List[tuple], heads: int = 8, kv_heads: int = 2, d: int = 64) -> List[dict]:
    """On every rank: one record per (algorithm, window), plus the causal references."""
    import torch
    import torch.distributed as dist

    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.layout.sharding import zigzag_index
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.stats import count_blocks, count_bytes, count_saved
    from mindspeed_cp.ulysses import UlyssesContextAttention

    P, r = dist.get_world_size(), dist.get_rank()
    world = dist.group.WORLD
    uly2 = [dist.new_group([0, 1]), dist.new_group([2, 3])] if P == 4 else None
    ring2 = [dist.new_group([0, 2]), dist.new_group([1, 3])] if P == 4 else None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(S, 1, n, d, generator=g) for n in (heads, kv_heads, kv_heads))
    zig = zigzag_index(S, P, r)

    def run(fn, shard):
        qs, ks, vs = (x[shard].clone().requires_grad_(True) for x in (q, k, v))
        with count_bytes() as sent, count_saved() as saved, count_blocks() as blocks:
            out = fn(qs, ks, vs)
            out.backward(torch.ones_like(out))
        return {"sent": dict(sent.by_kind), "saved": saved.total, "computed": dict(blocks.computed)}

    def ulysses(window):
        local = lambda a, b_, c: local_attention(a, b_, c, causal=True, window_size=window)  # noqa: E731
        return UlyssesContextAttention(local, world)

    contiguous = torch.tensor_split(torch.arange(S), P)[r]
    out = [
        dict(algo="ring", window=None, **run(lambda a, b_, c: ring_attention(a, b_, c, world), zig)),
        dict(algo="ulysses", window=None, **run(ulysses(None), contiguous)),
    ]
    for w in windows:
        out.append(
            dict(algo="ring", window=w, **run(lambda a, b_, c: ring_attention(a, b_, c, world, window_size=w), zig))
        )
        out.append(dict(algo="ulysses", window=w, **run(ulysses(w), contiguous)))
        if uly2 is not None:
            from mindspeed_cp.config import CPConfig
            from mindspeed_cp.layout.sharding import token_indices

            cfg = CPConfig(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
            hyb = lambda a, b_, c: hybrid_attention(a, b_, c, uly2[r // 2], ring2[r % 2], window_size=w)  # noqa: E731
            out.append(dict(algo="hybrid", window=w, **run(hyb, token_indices(cfg, r, S))))
    return out


def measure(seq: int = 2048, cp: int = 4, windows=WINDOWS) -> dict:
    """Run the cases and compare every rank with its formulas."""
    from mindspeed_cp.layout.window import Window, contiguous_layout, plan_halo, run_pairs, zigzag_layout
    from mindspeed_cp.planner.costmodel import window_ring_kv_cache

    res = launch(cp, _measure, seq, list(windows), timeout=900)
    if not res.ok:
        raise RuntimeError("\n".join(res.errors))
    per_rank = res.results  # [rank][case]
    b, hk, d, e, heads = 1, 2, 64, 4, 8
    ring_ref = [sum(per_rank[r][0]["sent"].values()) for r in range(cp)]
    rows = []
    for i, case in enumerate(per_rank[0]):
        if case["window"] is None:
            continue
        w = Window.of(case["window"])
        algo = case["algo"]
        ranks = [per_rank[r][i] for r in range(cp)]
        if algo == "ring":
            layout, P, heads_here = zigzag_layout(seq, cp), cp, heads
        elif algo == "hybrid":
            layout, P, heads_here = zigzag_layout(seq, cp // 2), cp // 2, heads // 2
        else:
            layout, P, heads_here = contiguous_layout(seq, 1), 1, heads // cp
        row = dict(algo=algo, window=list(case["window"]), seq=seq, cp=cp)
        if algo in ("ring", "hybrid"):
            want = []
            for rank in range(cp):
                pos = rank if algo == "ring" else rank // 2
                halo = plan_halo(layout, pos, w).bytes_per_token()
                hk_here = hk if algo == "ring" else hk / 2
                want.append(window_ring_kv_cache(halo["sent"], halo["received"], b, hk_here, d, e)["sent"])
            got = [sum(v for k, v in rk["sent"].items() if k.startswith("halo")) for rk in ranks]
            row.update(
                bytes=got,
                bytes_formula=want,
                bytes_exact=got == [int(x) for x in want],
                bytes_vs_ring=max(got) / max(ring_ref) if algo == "ring" else None,
            )
        pairs = [
            run_pairs(layout[rank if algo == "ring" else rank // 2], w, seq) if P > 1 else run_pairs(layout[0], w, seq)
            for rank in range(cp)
        ]
        computed = [rk["computed"].get("forward", 0) / (b * heads_here) for rk in ranks]
        row.update(
            computed_vs_pairs=max(c / p for c, p in zip(computed, pairs)),
            work_max_over_mean=max(computed) / (sum(computed) / cp),
            saved=[rk["saved"] for rk in ranks],
        )
        if algo == "ulysses":
            causal = [per_rank[r][1]["saved"] for r in range(cp)]
            row["saved_vs_causal"] = max(a / c for a, c in zip(row["saved"], causal))
        rows.append(row)
    return {"rows": rows, "goals": GOALS}


def markdown(result: dict) -> List[str]:
    """The section of ``cpu.md``."""
    g = result["goals"]
    lines = [
        "",
        "## Sliding windows",
        "",
        f"One windowed layer, S = {result['rows'][0]['seq']}, CP = {result['rows'][0]['cp']}, 8 heads / 2 KV heads, "
        "d = 64, float32, forward + backward (benchmarks/bench_windows.py). **bytes = formula**: every rank's bytes "
        "sent equal `window_ring_kv_cache` of its own halo plan; **vs ring**: the busiest rank's bytes / the full "
        f"causal ring's (goal <= {g['bytes_vs_ring']} at W = S/(8 CP)); **computed / pairs**: score elements the "
        f"kernels computed / (query, key) pairs in the window, busiest rank (goal <= {g['computed_vs_pairs']}); "
        f"**balance**: max / mean work (goal <= {g['work_max_over_mean']} for windows well inside a shard: the "
        "first W tokens of a sequence see fewer keys, which no layout hides once W is a shard or more); "
        "**saved vs causal**: Ulysses' saved-for-backward bytes with the window / without it.",
        "",
        "| algorithm | window | bytes = formula | vs ring | computed / pairs | balance | saved vs causal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        vs = "-" if r.get("bytes_vs_ring") is None else f"{r['bytes_vs_ring']:.3f}"
        exact = "-" if "bytes_exact" not in r else ("yes" if r["bytes_exact"] else "**no**")
        saved = "-" if "saved_vs_causal" not in r else f"{r['saved_vs_causal']:.3f}"
        lines.append(
            f"| {r['algo']} | {tuple(r['window'])} | {exact} | {vs} | {r['computed_vs_pairs']:.3f} | "
            f"{r['work_max_over_mean']:.3f} | {saved} |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = measure(args.seq, args.cp)
    for r in result["rows"]:
        print(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
