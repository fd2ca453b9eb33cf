"""Smoke run of the benchmarks at tiny sizes: every JSON field is there and the ratios meet their goals.

``python -m benchmarks.run --quick`` measures Ulysses, Ring, Double Ring and Hybrid on real gloo ranks
(CP 2 and 4, S = 64 and 128) plus a tiny-GPT scale search at S = 64; ``benchmarks.gpu_decomposition
--dry-run`` runs the GPU script on the CPU. Goals (docs/performance.md): bytes sent / textbook <= 1.02,
work max / mean <= 1.02, no fully masked block computed, saved-for-backward bytes / (single / CP) <= 1.10.
Where the textbook's assumption does not hold (fewer KV heads than Ulysses ranks: KV heads must be
replicated), the bytes must equal the textbook volume of the replicated KV heads exactly instead.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = (
    "algo",
    "cp",
    "seq",
    "batch",
    "heads",
    "kv_heads",
    "head_dim",
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


def _run(args, timeout):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    _run(["benchmarks.run", "--quick", "--out", str(out)], timeout=600)
    with open(out / "cpu.json") as f:
        records = json.load(f)
    with open(out / "scale.json") as f:
        scale = json.load(f)
    return out, records, scale


def _design_textbook(r):
    """docs/design.md, "Conventions", written out again here (s = S/P local tokens), with MLA's value head size dv
    in the place of d for V and the output (dv = d otherwise)."""
    S, P, b, h, hk, d, e = (r[k] for k in ("seq", "cp", "batch", "heads", "kv_heads", "head_dim", "dtype_bytes"))
    dv = r["v_head_dim"]

    def uly(S, P, h, hk):
        return 2 * (P - 1) / P * (S / P) * b * (h * d + hk * d + hk * dv + h * dv) * e

    def ring(S, P, hk):
        return 3 * (P - 1) * (S / P) * b * hk * (d + dv) * e

    if r["algo"] == "ulysses":
        return uly(S, P, h, hk)
    if r["algo"] in ("ring", "double_ring", "kvallgather"):  # the all-gather without a policy: the ring's volume
        return ring(S, P, hk)
    U = r["ulysses_degree"]
    R = P // U
    return uly(S / R, U, h, hk) + ring(S, R, hk / U)


def test_every_field_and_variant(quick):
    out, records, scale = quick
    for r in records:
        missing = [k for k in FIELDS if k not in r]
        assert not missing, (missing, r)
        assert r["time_s"] > 0 and r["time_s_single"] > 0 and r["saved_bytes_single"] > 0
        assert r["comm_bytes_textbook"] == pytest.approx(_design_textbook(r), rel=1e-12)
    seen = {(r["algo"], r["cp"]) for r in records}
    assert {("ulysses", 2), ("ring", 2), ("ulysses", 4), ("ring", 4), ("double_ring", 4), ("hybrid", 4)} <= seen
    assert {("kvallgather", 2), ("kvallgather", 4)} <= seen
    mla = {r["algo"] for r in records if r["v_head_dim"] != r["head_dim"]}  # MLA: the value head size its own
    assert mla == {"ulysses", "ring", "hybrid", "kvallgather"}, mla
    for r in records:  # the all-gather holds the whole sequence's K/V (one KV-head group at a time at least)
        if r["algo"] == "kvallgather":
            gathered = r["seq"] * r["batch"] * r["kv_heads"] * (r["head_dim"] + r["v_head_dim"]) * r["dtype_bytes"]
            assert r["held_peak_bytes"] >= gathered, r
    for name in ("cpu.md", "ratios_vs_cp.png", "ratios_vs_seq.png", "scale_cp4.png"):
        assert (out / name).stat().st_size > 0, name


def test_ratios_meet_goals(quick):
    _, records, _ = quick
    worst = {}
    for r in records:
        tag = f"{r['algo']} CP={r['cp']} S={r['seq']} heads {r['heads']}/{r['kv_heads']}"
        assert r["masked_blocks_computed"] == 0, tag
        assert r["work_imbalance"] <= 1.02, (tag, r["work_imbalance"])
        if r["textbook_assumption_holds"]:
            assert r["comm_bytes"] / r["comm_bytes_textbook"] <= 1.02, (tag, r["comm_bytes"], r["comm_bytes_textbook"])
            assert r["saved_bytes"] / (r["saved_bytes_single"] / r["cp"]) <= 1.10, (tag, r["saved_bytes"])
            for k, v in (
                ("comm", r["comm_bytes"] / r["comm_bytes_textbook"]),
                ("memory", r["saved_bytes"] * r["cp"] / r["saved_bytes_single"]),
                ("balance", r["work_imbalance"]),
            ):
                worst[k] = max(worst.get(k, 0), v)
        else:  # replicated KV heads: exactly the textbook volume of what must travel
            assert r["comm_bytes"] == pytest.approx(r["comm_bytes_textbook_replicated_kv"], rel=1e-12), tag
        assert r["comm_bytes_metadata"] < 4096, tag  # the input-agreement all-gathers stay tiny
    print(f"\nworst ratios where the textbook applies: {worst}")


def test_scale_search_smoke(quick):
    _, _, scale = quick
    assert {s["algo"] for s in scale} == {"ulysses", "ring", "double_ring", "hybrid", "kvallgather"}
    for s in scale:
        assert s["max_seq"] >= 64 and s["stopped_by"], s
        ok = [a for a in s["attempts"] if "failed" not in a]
        assert ok and all(math.isfinite(a["loss"]) and a["step_s"] > 0 for a in ok), s


def test_memory_fit_finds_quadratic_growth():
    from benchmarks.scale import memory_at, memory_bound_seq

    points = [(s, 3.0 * s + 0.5 * s * s) for s in (1024, 2048, 4096)]
    assert memory_at(points, 8192) == pytest.approx(3.0 * 8192 + 0.5 * 8192**2, rel=1e-6)
    budget = 3.0 * 20000 + 0.5 * 20000**2
    assert abs(memory_bound_seq(points, budget) - 20000) <= 1024


def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    _run(["benchmarks.gpu_decomposition", "--dry-run", "--out", str(out)], timeout=300)
    with open(out) as f:
        rows = json.load(f)
    assert {(r["seq"], r["cp"]) for r in rows} == {(256, 2), (256, 4), (512, 2), (512, 4)}
    for r in rows:
        for k in (
            "time_s_full",
            "time_s_ring_rank",
            "time_s_ulysses_local",
            "ring_efficiency",
            "ring_efficiency_with_merge",
            "ulysses_efficiency",
            "time_s_ring_cp1",
            "time_s_megatron_cp1",
        ):
            assert r[k] is not None and math.isfinite(r[k]) and r[k] > 0, (k, r)


def test_ulysses_paths_record(quick):
    out, _, _ = quick
    with open(out / "ulysses_paths.json") as f:
        rows = json.load(f)
    assert [r["seq"] for r in rows] == [256]
    for r in rows:  # the kernels keep q, k, v, out, lse; Megatron's attention its S x S probabilities too
        assert 0 < r["kernels_saved_bytes"] < r["megatron_saved_bytes"]
        assert r["kernels_time_s"] > 0 and r["megatron_time_s"] > 0


def test_agreement_record(quick):
    out, _, _ = quick
    with open(out / "agreement.json") as f:
        rows = json.load(f)
    assert {r["algo"] for r in rows} == {"ulysses", "ring", "hybrid", "hybrid_two_groups"}
    for r in rows:  # one agreement per attention layer call (2 layers, forward only), Hybrid alone: two exchanges
        assert r["calls_per_step"] == 2 and r["exchanges_per_call"] == (2 if r["algo"] == "hybrid_two_groups" else 1)
        assert r["agree_us"] > 0 and 0 < r["share"] < 1


def test_packing_record(quick):
    out, _, _ = quick
    with open(out / "packing.json") as f:
        (rec,) = json.load(f)
    assert rec["seq"] == 4096 and rec["cp"] == 4 and len(rec["rows"]) == 3
    assert rec["summary"]["per_document_zigzag"]["worst"] <= 1.05 < rec["summary"]["global_zigzag"]["worst"]
    assert 0 <= rec["summary"]["padding"]["worst"] <= 0.02
    # row tiles compute only the key columns their documents reach: far less than whole blocks, balanced
    assert (
        1 <= rec["summary"]["computed_over_useful"]["mean"]
        and rec["summary"]["computed_over_full_blocks"]["worst"] < 0.5
    )
    assert rec["summary"]["computed_imbalance"]["worst"] <= 1.2  # coarse here: 4 row tiles per shard
    assert "## Packed documents" in (out / "cpu.md").read_text()


def test_kv_cache_records(quick):
    """Every policy x setting: bytes sent = the formula, Δsaved = the formula (within 2 %), ratios to no policy."""
    out, _, _ = quick
    with open(out / "kv_cache.json") as f:
        records = json.load(f)
    assert len(records) == 18 and {r["policy"] for r in records} == {"none", "half", "full"}
    for r in records:
        assert abs(r["sent_over_formula"] - 1) <= 0.02, r
        assert abs(r["saved_delta"] - r["saved_delta_formula"]) <= 0.02 * max(1, abs(r["saved_delta_formula"])), r
        assert r["time_s"] > 0 and r["time_ratio"] > 0
    ring = {r["policy"]: r for r in records if r["label"] == "Ring"}
    assert ring["full"]["comm_ratio"] == pytest.approx(2 / 3) and ring["half"]["comm_ratio"] == pytest.approx(5 / 6)
    assert ring["full"]["memory_ratio"] > ring["half"]["memory_ratio"] > 1
    assert "## KV-cache policies" in (out / "cpu.md").read_text()


def test_windows_record(quick):
    """Sliding windows (S=512, CP=4: the goal's proportions, W = S/(8 CP)): every rank's bytes equal the halo
    formula, a fraction of the full causal ring's; the kernels compute only pairs in the window; balanced while the
    window is inside a shard; Ulysses keeps what it keeps without a window (no S x S)."""
    out, _, _ = quick
    with open(out / "windows.json") as f:
        res = json.load(f)
    rows = {(r["algo"], tuple(r["window"])): r for r in res["rows"]}
    assert len(rows) == 9
    for (algo, window), r in rows.items():
        assert r["computed_vs_pairs"] <= res["goals"]["computed_vs_pairs"], r
        if algo != "ulysses":
            assert r["bytes_exact"], r
        if window != (150, 0):  # inside a shard of 128: balanced (a window of 150 leaves the first tokens short)
            assert r["work_max_over_mean"] <= res["goals"]["work_max_over_mean"], r
        if algo == "ulysses":
            assert r["saved_vs_causal"] <= 1.02, r
    assert rows[("ring", (16, 0))]["bytes_vs_ring"] <= res["goals"]["bytes_vs_ring"]
    assert "## Sliding windows" in (out / "cpu.md").read_text()


def test_ring_overhead_runs_and_matches_torchs_ring():
    """benchmarks/ring_overhead.py at a tiny size: our ring and PyTorch's private ring (same zigzag shards, fp32)
    give the same output and gradients, and both are timed."""
    from benchmarks.ring_overhead import run

    rec = run(cp=2, seq=256, heads=4, kv_heads=4, head_dim=16, rounds=1)
    assert rec["max_abs_diff"] <= 1e-5, rec
    assert rec["median_s"]["ours"] > 0 and rec["median_s"]["torch_ring"] > 0 and rec["ratio_ours_over_torch"] > 0
    # the c10d-level meter (benchmarks/dispatch_bytes.py): ours = the textbook 3 (P-1) K+V blocks plus the input
    # agreement's all-gather; PyTorch's ring sends one more dK/dV hop (+1/3 at P = 2)
    ours, theirs = rec["sent_bytes"]["ours"], rec["sent_bytes"]["torch_ring"]
    assert rec["sent_by_op"]["ours"]["send"] == rec["sent_textbook"] and ours - rec["sent_textbook"] < 1024, rec
    assert theirs == pytest.approx(4 / 3 * rec["sent_textbook"]), rec
    assert not rec["unknown_ops"]["ours"] and not rec["unknown_ops"]["torch_ring"], rec


def test_planner_check_on_the_quick_run(quick):
    """make bench ends with the planner's predictions of what it measured (benchmarks/planner_check.py)."""
    out, records, _ = quick
    with open(out / "planner.json") as f:
        res = json.load(f)
    assert len(res["rows"]) == sum(1 for r in records if r.get("time_s"))
    assert all(r["predicted_s"] > 0 for r in res["rows"]) and -1 <= res["rank_correlation"] <= 1
    assert (out / "planner.md").exists()


def test_peer_layouts_and_summary_rules():
    """benchmarks/peers.py without its venv: the Hybrid layout is the plugin's, a fixed copy of a peer is timed
    only where the peer as shipped fails, and a problem no peer solves is a row of its own."""
    import torch

    from benchmarks.peer_systems import layout
    from benchmarks.peers import _timed, markdown, summary
    from mindspeed_cp.config import CPConfig
    from mindspeed_cp.layout.sharding import token_indices

    cfg = CPConfig(context_parallel_size=8, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    for r in range(8):
        assert torch.equal(layout("hybrid", 64, 8, r), token_indices(cfg, r, 64))
    ok, bad = {"error": 1e-7}, {"failed": "wrong result"}
    assert _timed("yunchang-ring-fixed", {"yunchang-ring-fixed": ok, "yunchang-ring": bad})
    assert not _timed("yunchang-ring-fixed", {"yunchang-ring-fixed": ok, "yunchang-ring": ok})
    pb = dict(P=4, S=64, heads=4, kv_heads=2)
    recs = [
        dict(
            pb,
            system="ours-ulysses",
            algo="ulysses",
            error=1e-7,
            sent=10,
            cpu_s=1.0,
            wall_s=1.0,
            ours_over_cpu=1.0,
            ours_over_wall=1.0,
        ),
        dict(pb, system="deepspeed-ulysses", algo="ulysses", failed="AssertionError: kv heads"),
    ]
    (row,) = summary(recs)
    assert row["peer"] is None and row["failed"] == ["deepspeed-ulysses: AssertionError: kv heads"]
    assert "**no exact peer**" in markdown(recs, 1)
