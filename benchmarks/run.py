"""``make bench``: communication, balance, memory and speed of every algorithm against its limit, on CPU.

    python -m benchmarks.run                      # the full run -> benchmarks/results/cpu.json, cpu.md, *.png
    python -m benchmarks.run --quick --out DIR    # tiny sizes (CI smoke run, tests/test_benchmarks.py)
    python -m benchmarks.run --no-scale           # skip the tiny-GPT scale search
    python -m benchmarks.run --algo kvallgather --algo ring --name cpu_kvallgather   # the attention table only

Each CP size runs in its own set of fresh gloo ranks (world = CP, one thread per rank, all on this
machine's cores); the CP=1 references run alone in one rank. See docs/performance.md for what each
number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

from mindspeed_cp.ranks import launch

from . import report
from .attention_bench import measure_cases, measure_single
from .textbook import textbook_bytes

# the algorithms' traffic; "metadata" is reported apart
ALGO_KINDS = ("all_to_all", "ring_kv", "ring_dkv", "all_gather", "reduce_scatter")
FIELDS = (
    "algo",
    "cp",
    "seq",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
    "v_head_dim",
    "dtype_bytes",
    "comm_bytes",
    "comm_bytes_textbook",
    "work_imbalance",
    "masked_blocks_computed",
    "saved_bytes",
    "saved_bytes_single",
    "time_s",
    "time_s_single",
)

FULL = dict(
    cps=[2, 4, 8],
    seqs=[1024, 2048, 4096],
    shape=dict(batch=1, heads=8, kv_heads=8, head_dim=64),
    gqa=dict(seq=2048, kv_heads=2, cps=[4, 8]),
    mla=dict(seq=2048, head_dim=96, v_head_dim=64, cps=[4]),
    reps=3,
    megatron_max_seq=4096,
    scale=dict(start=4096, cap_s=60.0, mem_gib=4.0),
    kv_cache=dict(seq=4096, cp=4, reps=5),
    windows=dict(seq=2048, cp=4),
)
QUICK = dict(
    cps=[2, 4],
    seqs=[64, 128],
    shape=dict(batch=2, heads=4, kv_heads=4, head_dim=16),
    gqa=dict(seq=128, kv_heads=1, cps=[4]),
    mla=dict(seq=128, head_dim=24, v_head_dim=16, cps=[4]),
    reps=1,
    megatron_max_seq=None,
    scale=dict(start=64, cap_s=30.0, mem_gib=2.0, max_seq=64),
    ulysses_paths_seqs=[256],
    agreement_seqs=[128],
    agreement_calls=20,
    packing=[dict(seq=4096, cp=4, samples=3)],
    kv_cache=dict(seq=128, cp=4, reps=1, heads=4, head_dim=16),
    windows=dict(seq=512, cp=4, windows=[(16, 0), (150, 0), (16, 16)]),
)


def variants(cp: int) -> List[dict]:
    """The algorithm settings measured at one CP size (Double Ring and Hybrid need a ring of >= 2 windows /
    a Ulysses degree strictly between 1 and CP)."""
    out = [dict(algo="ulysses"), dict(algo="ring")]
    out += [dict(algo="double_ring", window=k) for k in (2, 4) if k < cp and cp % k == 0]
    out += [dict(algo="hybrid", ulysses=u) for u in (2, 4) if 1 < u < cp and cp % u == 0]
    return out + [dict(algo="kvallgather")]


def plan(cfg: dict, algos=None) -> Dict[int, List[dict]]:
    shape = dict(cfg["shape"], dtype="float32")
    per_cp: Dict[int, List[dict]] = {}
    for cp in cfg["cps"]:
        if algos:  # only these algorithms' rows (the attention table alone)
            per_cp[cp] = [c for c in plan(cfg)[cp] if c["algo"] in algos]
            continue
        cases = [dict(shape, cp=cp, seq=S, **v) for S in cfg["seqs"] for v in variants(cp)]
        main = [
            v
            for v in variants(cp)
            if v["algo"] in ("ulysses", "ring", "hybrid", "kvallgather") and v.get("ulysses", 2) == 2
        ]
        if cp in cfg["gqa"]["cps"]:  # grouped-query attention: fewer KV heads than ranks for Ulysses
            cases += [dict(shape, cp=cp, seq=cfg["gqa"]["seq"], kv_heads=cfg["gqa"]["kv_heads"], **v) for v in main]
        mla = cfg["mla"]
        if cp in mla["cps"]:  # MLA: the value head size its own (DeepSeek: 192 / 128)
            cases += [
                dict(shape, cp=cp, seq=mla["seq"], head_dim=mla["head_dim"], v_head_dim=mla["v_head_dim"], **v)
                for v in main
            ]
        per_cp[cp] = cases
    return per_cp


def _shape_key(c: dict) -> tuple:
    return (c["seq"], c["batch"], c["heads"], c["kv_heads"], c["head_dim"], c.get("v_head_dim", c["head_dim"]))


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    import torch

    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}, gloo, 1 thread per rank"


def textbook_holds(c: dict) -> bool:
    """Whether the textbook formula's assumption holds: every rank gets only the KV heads it uses."""
    if c["algo"] == "ulysses":
        return c["kv_heads"] >= c["cp"]
    if c["algo"] == "hybrid":
        return c["kv_heads"] >= c["ulysses"]
    return True


def build_record(c: dict, per_rank: List[dict], single: dict, mach: str) -> dict:
    alg = [sum(v for k, v in r["comm_by_kind"].items() if k in ALGO_KINDS) for r in per_rank]
    work = [r["work_scores"] for r in per_rank]
    useful = [r["work_unmasked"] for r in per_rank]
    e = 4 if c["dtype"] == "float32" else 2
    U = c.get("ulysses", 1) if c["algo"] == "hybrid" else (c["cp"] if c["algo"] == "ulysses" else 1)
    rec = {
        "algo": c["algo"],
        "cp": c["cp"],
        "seq": c["seq"],
        "batch": c["batch"],
        "heads": c["heads"],
        "kv_heads": c["kv_heads"],
        "head_dim": c["head_dim"],
        "v_head_dim": c.get("v_head_dim", c["head_dim"]),
        "dtype_bytes": e,
        "comm_bytes": max(alg),
        "comm_bytes_textbook": textbook_bytes(
            c["algo"],
            c["seq"],
            c["cp"],
            c["batch"],
            c["heads"],
            c["kv_heads"],
            c["head_dim"],
            e,
            ulysses=c.get("ulysses", 1),
            dv=c.get("v_head_dim"),
        ),
        "work_imbalance": max(work) / (sum(work) / len(work)),
        "masked_blocks_computed": sum(r["empty_blocks"] for r in per_rank),
        "saved_bytes": max(r["saved_bytes"] for r in per_rank),
        "saved_bytes_single": single["saved_bytes_kernel"],
        "time_s": max(r["time_s"] for r in per_rank),
        "time_s_single": single["time_s_megatron"],
        # extras
        "comm_bytes_textbook_replicated_kv": textbook_bytes(
            c["algo"],
            c["seq"],
            c["cp"],
            c["batch"],
            c["heads"],
            max(c["kv_heads"], U),
            c["head_dim"],
            e,
            ulysses=c.get("ulysses", 1),
            dv=c.get("v_head_dim"),
        ),
        "ulysses_degree": U,
        "ring_degree": c["cp"] // U,
        "window": c.get("window", 1),
        "comm_bytes_metadata": max(r["comm_by_kind"].get("metadata", 0) for r in per_rank),
        "comm_bytes_by_kind": per_rank[0]["comm_by_kind"],
        "comm_bytes_per_rank": alg,
        "work_scores_per_rank": work,
        "work_unmasked_imbalance": max(useful) / (sum(useful) / len(useful)),
        "saved_bytes_per_rank": [r["saved_bytes"] for r in per_rank],
        "held_peak_bytes": max(r["held_peak_bytes"] for r in per_rank),
        "saved_bytes_single_megatron": single["saved_bytes_megatron"],
        "time_s_per_rank": [r["time_s"] for r in per_rank],
        "cpu_time_s_per_rank": [r["cpu_time_s"] for r in per_rank],
        "time_s_single_kernel": single["time_s_kernel"],
        "single_reference": "megatron.core DotProductAttention (local spec), CP=1, full sequence, 1 thread",
        "kernel": "mindspeed_cp.kernels 'torch' (aten._scaled_dot_product_flash_attention_for_cpu)",
        "textbook_assumption_holds": textbook_holds(c),
        "machine": mach,
    }
    rec["comm_ratio"] = rec["comm_bytes"] / rec["comm_bytes_textbook"]
    rec["memory_ratio"] = rec["saved_bytes"] / (rec["saved_bytes_single"] / rec["cp"])
    # with the buffers the algorithm holds beyond what autograd keeps (the all-gather: the whole sequence's K/V)
    rec["memory_peak_ratio"] = (rec["saved_bytes"] + rec["held_peak_bytes"]) / (rec["saved_bytes_single"] / rec["cp"])
    rec["speedup"] = rec["time_s_single"] / rec["time_s"] if rec["time_s_single"] else None
    # against the same kernel at CP=1; P ranks share this machine's cores, so the ideal is min(P, cores)
    rec["speedup_vs_kernel"] = rec["time_s_single_kernel"] / rec["time_s"]
    rec["cores"] = os.cpu_count()
    rec["parallel_efficiency"] = rec["speedup_vs_kernel"] / min(rec["cp"], os.cpu_count() or 1)
    # the CPU analogue of the GPU decomposition efficiency: the CP=1 kernel's time / the CPU seconds all ranks
    # spend together (blocks, merges, copies, communication); insensitive to other load on the machine
    rec["cpu_efficiency"] = rec["time_s_single_kernel"] / sum(rec["cpu_time_s_per_rank"])
    rec["goals"] = {
        "comm": rec["comm_ratio"] <= report.GOALS["comm"],
        "balance": rec["work_imbalance"] <= report.GOALS["balance"],
        "masked": rec["masked_blocks_computed"] == 0,
        "memory": rec["memory_ratio"] <= report.GOALS["memory"],
    }
    return rec


def notes_for(records: List[dict]) -> List[str]:
    notes = []
    for r in records:
        if all(r["goals"].values()):
            continue
        what = ", ".join(k for k, ok in r["goals"].items() if not ok)
        why = ""
        if r["algo"] in ("ulysses", "hybrid") and not r["textbook_assumption_holds"]:
            n = r["ulysses_degree"]
            why = (
                f": {r['kv_heads']} KV heads < {n} Ulysses ranks, so each KV head is replicated {n // r['kv_heads']}x "
                f"before the all-to-all (every rank needs the KV head its queries use); the textbook formula "
                f"assumes kv_heads >= {n}. Ring traffic is unaffected (KV travels with its own heads)."
            )
        notes.append(
            f"{report.label(r)} CP={r['cp']} S={r['seq']} heads {r['heads']}/{r['kv_heads']}: {what} not met{why}"
        )
    return notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    ap.add_argument("--no-scale", action="store_true", help="skip the tiny-GPT scale search")
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="output directory (default benchmarks/results)",
    )
    ap.add_argument("--name", default="cpu", help="file stem of the JSON / markdown (default cpu)")
    ap.add_argument(
        "--algo",
        action="append",
        choices=["ulysses", "ring", "double_ring", "hybrid", "kvallgather"],
        help="only these algorithms' rows, and only the attention table (repeatable)",
    )
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    t_start = time.monotonic()
    mach = machine()
    load0 = os.getloadavg()[0]
    print(f"benchmarks: {mach}; load average {load0:.1f}", flush=True)

    per_cp = plan(cfg, args.algo)
    jobs = {}
    for cases in per_cp.values():
        for c in cases:
            jobs.setdefault(
                _shape_key(c),
                dict(
                    seq=c["seq"],
                    batch=c["batch"],
                    heads=c["heads"],
                    kv_heads=c["kv_heads"],
                    head_dim=c["head_dim"],
                    dtype=c["dtype"],
                    v_head_dim=c.get("v_head_dim", c["head_dim"]),
                ),
            )
    res = launch(1, measure_single, list(jobs.values()), cfg["reps"], "torch", cfg["megatron_max_seq"], timeout=900)
    if not res.ok:
        print("\n".join(res.errors), file=sys.stderr)
        return 1
    singles = {_shape_key(r): r for r in res.results[0]}
    print(f"  CP=1 references: {len(singles)} shapes ({res.wall_s:.0f} s)", flush=True)

    records = []
    for cp, cases in per_cp.items():
        res = launch(cp, measure_cases, cases, cfg["reps"], timeout=900)
        if not res.ok:
            print("\n".join(res.errors), file=sys.stderr)
            return 1
        for i, c in enumerate(cases):
            records.append(build_record(c, [r[i] for r in res.results], singles[_shape_key(c)], mach))
        print(f"  CP={cp}: {len(cases)} cases ({res.wall_s:.0f} s)", flush=True)

    if args.algo:  # the attention table alone
        stem = os.path.join(args.out, args.name)
        with open(stem + ".json", "w") as f:
            json.dump(records, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(report.markdown(records, None, mach, time.monotonic() - t_start, notes_for(records)))
        print(f"benchmarks: {len(records)} records; wrote {stem}.json, {stem}.md", flush=True)
        return 0
    scale = None
    if not args.no_scale:
        from .scale import run_scale

        sc = cfg["scale"]
        t0 = time.monotonic()
        scale = run_scale(
            cp=4,
            start=sc["start"],
            cap_s=sc["cap_s"],
            mem_budget_bytes=int(sc["mem_gib"] * 2**30),
            max_seq=sc.get("max_seq", 1 << 20),
            log=lambda m: print(m, flush=True),
        )
        for s in scale:
            s["machine"] = mach
        print(f"  scale search ({time.monotonic() - t0:.0f} s)", flush=True)

    t0 = time.monotonic()
    from .ulysses_paths import run as ulysses_paths

    paths = ulysses_paths(
        cfg.get("ulysses_paths_seqs", [2048, 4096, 8192]), cp=4, reps=cfg["reps"], log=lambda m: print(m, flush=True)
    )
    with open(
        os.path.join(args.out, "ulysses_paths.json" if args.name == "cpu" else f"{args.name}_ulysses_paths.json"), "w"
    ) as f:
        json.dump(paths, f, indent=1)
    print(f"  Ulysses: kernels vs Megatron's attention ({time.monotonic() - t0:.0f} s)", flush=True)

    t0 = time.monotonic()
    from .bench_agreement import run as agreement

    agreed = agreement(
        cp=4,
        seqs=cfg.get("agreement_seqs", [512, 4096]),
        calls=cfg.get("agreement_calls", 200),
        log=lambda m: print(m, flush=True),
    )
    with open(
        os.path.join(args.out, "agreement.json" if args.name == "cpu" else f"{args.name}_agreement.json"), "w"
    ) as f:
        json.dump(agreed, f, indent=1)
    print(f"  input agreement: cost per call and share of a GPT step ({time.monotonic() - t0:.0f} s)", flush=True)

    from .bench_packing import measure as packing

    packed = [packing(**p) for p in cfg.get("packing", [dict(seq=32768, cp=8), dict(seq=32768, cp=4)])]
    with open(os.path.join(args.out, "packing.json" if args.name == "cpu" else f"{args.name}_packing.json"), "w") as f:
        json.dump(packed, f, indent=1)
    for p in packed:
        print(
            f"  packed documents S={p['seq']} CP={p['cp']}: work imbalance "
            f"{p['summary']['per_document_zigzag']['worst']:.3f}, "
            f"padding {100 * p['summary']['padding']['mean']:.2f} %",
            flush=True,
        )

    from .bench_kv_cache import run as kv_cache

    kv = kv_cache(**cfg["kv_cache"], log=lambda m: print(m, flush=True))
    with open(
        os.path.join(args.out, "kv_cache.json" if args.name == "cpu" else f"{args.name}_kv_cache.json"), "w"
    ) as f:
        json.dump(kv, f, indent=1)

    t0 = time.monotonic()
    from .bench_windows import measure as bench_windows

    windows = bench_windows(**cfg["windows"])
    with open(os.path.join(args.out, "windows.json" if args.name == "cpu" else f"{args.name}_windows.json"), "w") as f:
        json.dump(windows, f, indent=1)
    print(f"  sliding windows: bytes, score elements, balance, memory ({time.monotonic() - t0:.0f} s)", flush=True)

    runtime = time.monotonic() - t_start
    notes = notes_for(records) + [
        f"Load average at the start of the run: {load0:.1f} "
        f"(at the end: {os.getloadavg()[0]:.1f}) on {os.cpu_count()} cores."
    ]
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump(records, f, indent=1)
    if scale is not None:
        with open(os.path.join(args.out, "scale.json" if args.name == "cpu" else f"{args.name}_scale.json"), "w") as f:
            json.dump(scale, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(records, scale, mach, runtime, notes, packed, kv, windows))
    pngs = report.plots(records, scale, args.out)
    from .planner_check import run as planner_check  # the cost model against what was just measured

    checked = planner_check(stem + ".json", args.out)
    print(
        f"  planner cost model: rank correlation {checked['rank_correlation']:.3f}, median |error| "
        f"{100 * checked['median_abs_error']:.1f} % over {len(checked['rows'])} configurations",
        flush=True,
    )
    met = sum(all(r["goals"].values()) for r in records)
    print(
        f"benchmarks: {len(records)} records, all goals met by {met}; {runtime:.0f} s; wrote {stem}.json, "
        f"{stem}.md, {', '.join(os.path.basename(p) for p in pngs)}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
