"""The planner's cost model against this machine's measurements: predicted vs measured attention times.

    python -m benchmarks.planner_check [--results benchmarks/results/cpu.json]   # -> planner.json, planner.md

Every configuration ``make bench`` measured (``cpu.json``: Ulysses, Ring, Double Ring, Hybrid at CP 2-8 and
S 1k-4k, GQA; forward + backward, the slowest rank) is predicted by :func:`mindspeed_cp.planner.costmodel.
attention_time` with ``--device cpu-here`` (:mod:`mindspeed_cp.planner.calibrate`, measured in this run) and compared:
Spearman rank correlation and the median of |predicted / measured - 1| (issue 17's goals: >= 0.9, <= 25 %).
``make bench`` runs it after its measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import List

from mindspeed_cp.planner.costmodel import Attention, Device, Model, attention_time, rank_correlation

HERE = os.path.dirname(os.path.abspath(__file__))
GOALS = {"rank_correlation": 0.9, "median_abs_error": 0.25}


def predict(dev: Device, rec: dict) -> float:
    """Predicted forward + backward seconds of one ``cpu.json`` record."""
    cp, U = rec["cp"], rec.get("ulysses_degree") or 1
    algo = {"double_ring": "ring"}.get(rec["algo"], rec["algo"])
    model = Model(
        num_layers=1,
        hidden_size=rec["heads"] * rec["head_dim"],
        num_attention_heads=rec["heads"],
        num_query_groups=rec["kv_heads"],
        v_head_dim=rec.get("v_head_dim"),
    )
    a = Attention(
        algo=algo,
        cp=cp,
        ulysses=cp if algo == "ulysses" else U if algo == "hybrid" else 1,
        window=rec.get("window") or 1,
    )
    return attention_time(dev.for_ranks(cp), model, rec["seq"], rec["batch"], a, e=rec["dtype_bytes"])["total"]


def compare(records: List[dict], dev: Device) -> dict:
    rows = []
    for rec in records:
        if not rec.get("time_s"):
            continue
        p = predict(dev, rec)
        rows.append(
            {k: rec.get(k) for k in ("algo", "cp", "seq", "kv_heads", "window", "ulysses_degree")}
            | {"measured_s": rec["time_s"], "predicted_s": p, "ratio": p / rec["time_s"]}
        )
    measured, predicted = [r["measured_s"] for r in rows], [r["predicted_s"] for r in rows]
    out = {
        "rows": rows,
        "rank_correlation": rank_correlation(predicted, measured),
        "median_abs_error": statistics.median(abs(r["ratio"] - 1) for r in rows),
        "device": {k: v for k, v in vars(dev).items() if k != "sources"},
    }
    out["goals"] = {
        "rank_correlation": out["rank_correlation"] >= GOALS["rank_correlation"],
        "median_abs_error": out["median_abs_error"] <= GOALS["median_abs_error"],
    }
    return out


def markdown(res: dict) -> str:
    d = res["device"]
    lines = [
        "# The planner's cost model against this machine (benchmarks/planner_check.py)",
        "",
        f"Device cpu-here (measured): attention {d['peak_tflops'] * 1e3:.1f} GFLOP/s on long blocks, half of it "
        f"at {d['attention_half_tokens']:.0f} tokens; dense x{d['matmul_efficiency']:.2f} of that; gloo "
        f"{d['intra_node_gbps']:.2f} GB/s, {d['intra_node_latency_us']:.0f} us; {d.get('cores')} cores.",
        "",
        f"**Rank correlation {res['rank_correlation']:.3f}** (goal >= {GOALS['rank_correlation']}), "
        f"**median |predicted/measured - 1| {100 * res['median_abs_error']:.1f} %** (goal <= "
        f"{100 * GOALS['median_abs_error']:.0f} %), over {len(res['rows'])} configurations.",
        "",
        "| algorithm | CP | U | window | S | KV heads | measured ms | predicted ms | predicted / measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['algo']} | {r['cp']} | {r['ulysses_degree'] or ''} | {r['window'] or ''} | {r['seq']} | "
            f"{r['kv_heads']} | {1e3 * r['measured_s']:.1f} | {1e3 * r['predicted_s']:.1f} | "
            f"{r['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run(results: str, out_dir: str, dev: Device = None) -> dict:
    from mindspeed_cp.planner.plan import device

    with open(results) as f:
        records = json.load(f)
    res = compare(records, dev or device("cpu-here"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "planner.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "planner.md"), "w") as f:
        f.write(markdown(res))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results", "cpu.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    res = run(args.results, args.out)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
