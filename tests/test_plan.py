"""``mindspeed-cp plan`` and its cost model (mindspeed_cp/planner/costmodel.py): feasibility, formulas against the bytes
the algorithms really send, link classes from the layout, published rankings, the shipped presets, the CLI."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from mindspeed_cp.config import CPConfig, CPConfigError
from mindspeed_cp.planner import costmodel as cm
from mindspeed_cp.planner.plan import cp_attention_time, device, flags, plan, preset, presets, read_conf
from mindspeed_cp.tools.cli import main as cli_main

from .dist import run_on_ranks
from .published_cases import CASES, GAP, degrees

GPT_1_3B = cm.Model(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192, name="gpt3-1.3b")
GPT_30B = cm.Model(num_layers=64, hidden_size=6144, num_attention_heads=64, ffn_hidden_size=24576, name="gpt3-30b")


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["a100", "h100", "h200", "h800", "910b", "l20"])
def test_every_device_preset_loads_and_cites_its_numbers(name):
    dev = device(name)
    assert name in presets()
    for key in ("peak_tflops", "hbm_gb", "intra_node_gbps", "inter_node_gbps", "attention_efficiency"):
        assert getattr(dev, key) > 0
        assert key in dev.sources, f"{name}: no source for {key}"


def test_device_constants_can_be_overridden_and_typos_are_refused():
    assert device("h100", {"inter_node_gbps": "25"}).inter_node_gbps == 25.0
    with pytest.raises(ValueError, match="not a device constant"):
        device("h100", {"inter_gbps": "25"})
    with pytest.raises(ValueError, match="no such preset"):
        device("h1000")


# ----------------------------------------------------------------------------- feasibility
def test_every_ranked_configuration_validates_and_every_rejection_says_why():
    model = cm.Model(num_layers=48, hidden_size=5120, num_attention_heads=40, num_query_groups=8)  # 40 heads, GQA 8
    res = plan(model, device("h100"), 32768, 32, recompute="full")
    assert res["ranked"] and res["rejected"]
    check = dict(num_attention_heads=40, num_query_groups=8, seq_length=32768, world_size=32)
    for e in res["ranked"]:
        e["config"].validate(tensor_model_parallel_size=e["tp"], **check)
        assert e["memory"]["fits"]
    whys = {r["why"] for r in res["rejected"]}
    assert any("--num-attention-heads 40" in w for w in whys), whys  # e.g. Ulysses over TP 2 x CP 16 ranks
    assert any("GB of 80 GB" in w for w in whys), whys  # CP 1 and TP 1 does not fit at 32k
    for r in res["rejected"]:  # a rejection by rule is exactly CPConfig's error
        if "GB of" not in r["why"]:
            with pytest.raises(CPConfigError, match=re.escape(r["why"])):
                r["config"].validate(tensor_model_parallel_size=r["tp"], **check)


def test_memory_rules_out_what_does_not_fit():
    dev = device("a100")
    fits = plan(GPT_1_3B, dev, 32768, 8, tp=1, cp=1)["ranked"]
    small = plan(GPT_1_3B, device("a100", {"hbm_gb": "40"}), 32768, 8, tp=1, cp=1)
    assert fits and not small["ranked"]
    assert "GB of 40 GB" in small["rejected"][0]["why"]


# ----------------------------------------------------------------------------- formulas
def test_ring_step_pairs_sum_to_causal_attention():
    for S, P in ((64, 2), (96, 4), (4096, 8)):
        assert sum(cm.ring_step_pairs(S, P, j) for j in range(P)) * P == cm.causal_pairs(S)


def _measured_bytes(algo, S, h, hk, d, U, policy):
    import torch.distributed as dist

    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.ring import ring_attention, zigzag_index
    from mindspeed_cp.stats import count_bytes
    from mindspeed_cp.ulysses import UlyssesContextAttention

    P, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(S, 1, n, d, generator=g) for n in (h, hk, hk))
    if algo == "ulysses":
        idx = torch.tensor_split(torch.arange(S), P)[r]
    elif algo in ("ring", "kvallgather"):
        idx = zigzag_index(S, P, r)
    else:
        idx = token_indices(
            CPConfig(context_parallel_size=P, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=U), r, S
        )
    leaves = [t[idx].clone().requires_grad_() for t in (q, k, v)]
    with count_bytes() as st:
        if algo == "ulysses":
            out = UlyssesContextAttention(
                lambda a, b, c: local_attention(a, b, c), dist.group.WORLD, kv_cache_policy=policy
            )(*leaves)
        elif algo == "ring":
            out = ring_attention(*leaves, dist.group.WORLD, kv_cache_policy=policy)
        elif algo == "kvallgather":
            out = kvallgather_attention(*leaves, dist.group.WORLD, kv_cache_policy=policy)
        else:
            groups = [dist.new_group(list(range(i * U, (i + 1) * U))) for i in range(P // U)]
            rings = [dist.new_group(list(range(j, P, U))) for j in range(U)]
            outer = "kvallgather" if algo == "hybrid-kvallgather" else "ring"
            out = hybrid_attention(*leaves, groups[r // U], rings[r % U], kv_cache_policy=policy, outer=outer)
        out.sum().backward()
    return st.total - st.by_kind.get("metadata", 0)


@pytest.mark.parametrize(
    "algo,hk,U,policy",
    [
        ("ulysses", 4, 4, None),
        ("ulysses", 4, 4, "full"),
        ("ring", 4, 1, None),
        ("ring", 2, 1, "half"),
        ("ring", 4, 1, "full"),
        ("hybrid", 4, 2, None),
        ("hybrid", 2, 2, "full"),
        ("kvallgather", 4, 1, None),
        ("kvallgather", 2, 1, "half"),
        ("kvallgather", 1, 1, "full"),
        ("hybrid-kvallgather", 4, 2, None),
        ("hybrid-kvallgather", 2, 2, "full"),
    ],
)
def test_the_bytes_the_model_charges_are_the_bytes_sent(algo, hk, U, policy):
    """attention_time's bytes per link class add up to what comm_stats counts on real gloo ranks."""
    S, h, d, P = 64, 4, 8, 4
    sent = max(run_on_ranks(P, _measured_bytes, algo, S, h, hk, d, U, policy))
    model = cm.Model(num_layers=1, hidden_size=h * d, num_attention_heads=h, num_query_groups=hk)
    if algo == "kvallgather":
        t = cm.attention_time(device("h100"), model, S, 1, cm.Attention("kvallgather", P, kv_cache=policy), e=4)
    elif algo == "hybrid-kvallgather":
        a = cm.Attention("hybrid", P, ulysses=U, kv_cache=policy, outer="kvallgather")
        t = cm.attention_time(device("h100"), model, S, 1, a, e=4)
    else:
        t = cp_attention_time(device("h100"), model, S, 1, P, P if algo == "ulysses" else U, kv_cache=policy, e=4)
    assert t["intra_bytes"] + t["inter_bytes"] == pytest.approx(sent, rel=1e-9)


def test_the_all_gather_against_ring_and_ulysses():
    """kvallgather_cp_algo's bytes: the ring's without a policy; with the gathered K/V kept, 2/3 of the ring's and
    P hk / (h + hk) of Ulysses' (GQA 8:1 at CP 4: 4/9); the planner ranks it, counting the gathered K/V's memory."""
    S, b, d, e = 32768, 1, 128, 2
    for P, h, hk in ((4, 8, 1), (8, 32, 8), (16, 64, 8)):
        kept = cm.kvallgather_kv_cache(S, P, b, hk, d, e, "full")["sent"]
        assert cm.kvallgather_bytes(S, P, b, hk, d, e) == cm.ring_bytes(S, P, b, hk, d, e)
        assert 3 * kept == pytest.approx(2 * cm.ring_bytes(S, P, b, hk, d, e))
        assert kept / cm.ulysses_bytes(S, P, b, h, hk, d, e) == pytest.approx(P * hk / (h + hk))
    model = cm.Model(num_layers=24, hidden_size=4096, num_attention_heads=32, num_query_groups=8)
    res = plan(model, device("h100"), 65536, 16, tp=1, cp=16)
    rows = {
        e["config"].context_parallel_kv_cache_policy: e
        for e in res["ranked"]
        if e["config"].context_parallel_algo == "kvallgather_cp_algo"
    }
    assert set(rows) == {None, "half", "full"}
    groups = cm.head_groups(8, True)  # one layer's gathered K/V (bf16), plus one head group's fp32 dK/dV
    for r in rows.values():
        assert r["memory"]["gathered_kv"] == pytest.approx(65536 * 8 * 256 * e + 65536 * 8 / groups * 256 * 4)
    sent = {p: r["predicted"]["intra_bytes"] + r["predicted"]["inter_bytes"] for p, r in rows.items()}
    assert sent["full"] == pytest.approx(2 / 3 * sent[None]) and sent["half"] == pytest.approx(5 / 6 * sent[None])
    assert (
        rows["full"]["memory"]["kv_cache"] > rows["half"]["memory"]["kv_cache"] > 0 == rows[None]["memory"]["kv_cache"]
    )


def test_hybrid_with_the_all_gather_outside_is_planned():
    """Hybrid is enumerated with each outer level; the all-gather outside is costed on ``hk/U`` KV heads over the
    ring group (its bytes: Ulysses over U plus the all-gather over R), holds those heads' gathered K/V, and its rows
    carry ``--hybrid-outer-cp-algo`` (flags and preset)."""
    model = cm.Model(num_layers=24, hidden_size=4096, num_attention_heads=32, num_query_groups=8)
    res = plan(model, device("h100"), 65536, 16, tp=1, cp=16, kv_policies=(None,))
    rows = {}
    for e in res["ranked"]:
        c = e["config"]
        if c.context_parallel_algo == "hybrid_cp_algo" and c.cp_window_size == 1 and not c.use_cp_send_recv_overlap:
            rows[(c.ulysses_degree_in_cp, c.hybrid_outer_cp_algo)] = e
    assert {u for u, o in rows if o == "kvallgather_cp_algo"} == {2, 4, 8}
    for u in (2, 4, 8):
        gather, ring = rows[(u, "kvallgather_cp_algo")], rows[(u, "megatron_cp_algo")]
        sent = [r["predicted"]["intra_bytes"] + r["predicted"]["inter_bytes"] for r in (gather, ring)]
        assert sent[0] == pytest.approx(sent[1])  # no policy: the all-gather sends the ring's bytes
        hk = 8 // u  # one layer's gathered K/V of this rank's KV heads (bf16), one head group's fp32 dK/dV
        want = 65536 * hk * 256 * 2 + 65536 * hk / cm.head_groups(hk, True) * 256 * 4
        assert gather["memory"]["gathered_kv"] == pytest.approx(want)
        assert "--hybrid-outer-cp-algo kvallgather_cp_algo" in flags(gather)
        assert "--hybrid-outer-cp-algo" not in flags(ring)
        assert "HYBRID_OUTER_CP_ALGO=kvallgather_cp_algo" in preset(gather, 16, 8, model, 65536)


def test_link_classes_follow_the_rank_layout():
    # 30B preset: TP 4, hybrid CP 8 with U 2 on 8-GPU nodes: the Ulysses pair is on one node, the ring crosses
    model, dev = GPT_30B, device("h100")
    res = plan(model, dev, 32768, 32, tp=4, cp=8, recompute="full", kv_policies=(None,))
    hyb = next(
        e
        for e in res["ranked"]
        if e["config"].context_parallel_algo == "hybrid_cp_algo"
        and e["config"].ulysses_degree_in_cp == 2
        and e["config"].cp_window_size == 1
    )
    uly = next(e for e in res["ranked"] if e["config"].context_parallel_algo == "ulysses_cp_algo")
    assert hyb["predicted"]["intra_bytes"] > 0 and hyb["predicted"]["inter_bytes"] > 0
    # Ulysses over 8 ranks TP 4 apart spans 4 nodes (2 ranks each): 6 of a rank's 7 peers are off its node
    p = uly["predicted"]
    assert p["inter_bytes"] - p["tp_inter_bytes"] == pytest.approx(6 * (p["intra_bytes"] - p["tp_intra_bytes"]))
    assert p["tp_inter_bytes"] == 0 < p["tp_intra_bytes"]  # TP 4 stays on its node
    assert cm.link_classes([0, 4, 8, 12], 8) == {"intra": 1, "inter": 2}
    assert cm.ring_hops([0, 1, 2, 3], 8) == "intra" and cm.ring_hops([0, 8], 8) == "inter"


def test_a_mesh_gives_a_ring_hop_one_link_and_an_all_to_all_all_of_them():
    dev = device("910b")
    assert dev.link("intra", 1)[0] == pytest.approx(28e9 * dev.link_efficiency)
    assert dev.link("intra", 7)[0] == pytest.approx(196e9 * dev.link_efficiency)


def test_double_ring_hides_the_inter_node_hop_behind_an_inner_ring():
    """16 ranks, 8 per node, ring CP 16 at 32k: window 8 (a node) exposes less than the plain ring."""
    dev = device("h100", {"inter_node_gbps": "5"})
    model = cm.Model(num_layers=1, hidden_size=4096, num_attention_heads=32)
    plain = cp_attention_time(dev, model, 32768, 1, 16, 1)
    double = cp_attention_time(dev, model, 32768, 1, 16, 1, window=8)
    assert double["ring_exposed"] < plain["ring_exposed"]
    assert double["intra_bytes"] + double["inter_bytes"] == plain["intra_bytes"] + plain["inter_bytes"]


def test_kv_cache_full_trades_memory_for_bytes():
    dev = device("h100")
    res = plan(GPT_1_3B, dev, 32768, 8, tp=1, cp=8)["ranked"]
    by = {
        (
            e["config"].context_parallel_algo,
            e["config"].context_parallel_kv_cache_policy,
            e["config"].cp_window_size,
            e["config"].use_cp_send_recv_overlap,
            e["config"].ulysses_degree_in_cp,
        ): e
        for e in res
    }
    none, full = by[("megatron_cp_algo", None, 1, False, None)], by[("megatron_cp_algo", "full", 1, False, None)]
    assert full["predicted"]["intra_bytes"] == pytest.approx(2 / 3 * none["predicted"]["intra_bytes"])
    assert full["memory"]["kv_cache"] > 0 == none["memory"]["kv_cache"]


def test_rank_correlation():
    assert cm.rank_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert cm.rank_correlation([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- published rankings
def _judged_pairs(case):
    pub = case["published"]
    return [(a, b) for a, b in itertools.permutations(pub, 2) if pub[a] >= GAP * pub[b]]  # a clearly faster


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_published_rankings(case):
    dev = device(case["device"])
    model = cm.Model(
        num_layers=1,
        hidden_size=case["heads"] * case["head_dim"],
        num_attention_heads=case["heads"],
        num_query_groups=case["kv_heads"],
    )
    time = {
        lab: cp_attention_time(
            dev, model, case["S"], case["batch"], case["world"], degrees(lab)[0], forward_only=case["forward_only"]
        )["total"]
        for lab in case["published"]
    }
    wrong = [(a, b) for a, b in _judged_pairs(case) if not time[a] < time[b]]
    assert _judged_pairs(case), "a case must judge at least one pair"
    assert (not wrong) == case["reproduced"], (
        f"{case['id']}: published faster-slower pairs the model orders otherwise: {wrong}; predicted ms "
        f"{ {k: round(1e3 * v, 2) for k, v in time.items()} } - update tests/published_cases.py and docs/planner.md"
    )


# ----------------------------------------------------------------------------- the shipped presets
@pytest.mark.parametrize(
    "model,preset,world",
    [
        (GPT_1_3B, "1.3b-32k-ulysses", 8),
        (GPT_1_3B, "1.3b-32k-ring", 8),
        (GPT_1_3B, "1.3b-32k-hybrid", 8),
        (GPT_30B, "30b-32k-ulysses", 32),
        (GPT_30B, "30b-32k-hybrid", 32),
        (GPT_30B, "30b-32k-double-ring", 32),
    ],
)
def test_the_shipped_presets_are_within_five_percent_of_the_plan(model, preset, world):
    """Each preset shows one algorithm at its TP and CP: the plan's best of that algorithm there (Ulysses degree,
    window, overlap, KV-cache policy) is at most 5 % faster than the preset by the cost model."""
    conf = read_conf(f"configs/cp/{preset}.conf")
    tp, cp = int(conf["TP"]), int(conf["CP"])
    recompute = "full" if "--recompute-granularity full" in conf.get("EXTRA_ARGS", "") else "none"
    res = plan(model, device("h100"), 32768, world, tp=tp, cp=cp, recompute=recompute)
    want = dict(
        context_parallel_algo=conf["CP_ALGO"],
        cp_window_size=int(conf.get("CP_WINDOW", 1)),
        use_cp_send_recv_overlap=conf.get("CP_OVERLAP") == "1",
        context_parallel_kv_cache_policy=conf.get("CP_KV_CACHE") or None,
    )
    if conf["CP_ALGO"] == "hybrid_cp_algo":
        want["ulysses_degree_in_cp"] = int(conf["ULYSSES_DEGREE"])
    mine = [e for e in res["ranked"] if all(getattr(e["config"], k) == v for k, v in want.items())]
    assert mine, f"{preset} is infeasible or over memory by the plan: {[r['why'] for r in res['rejected']][:3]}"
    best = min(e["rank_time"] for e in res["ranked"] if e["config"].context_parallel_algo == conf["CP_ALGO"])
    assert min(e["rank_time"] for e in mine) <= 1.05 * best, (preset, min(e["rank_time"] for e in mine), best)


# ----------------------------------------------------------------------------- the command
def _best_row_flags(text):
    row = next(line for line in text.splitlines() if re.match(r"\s+1\s+\d", line))
    return row.split("  ")[-1].strip()


def test_plan_command_text_json_and_preset(tmp_path, capsys):
    out = tmp_path / "mine.conf"
    assert (
        cli_main(
            [
                "plan",
                "--model",
                "gpt3-30b",
                "--seq-length",
                "32768",
                "--world-size",
                "32",
                "--device",
                "h100",
                "--recompute",
                "full",
                "--top",
                "3",
                "--cp",
                "8",
                "--write-preset",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "feasible configurations" in text and "--context-parallel-size" in text
    conf = read_conf(out)
    assert {"NNODES", "TP", "CP", "CP_ALGO"} <= set(conf) and conf["NNODES"] == "4" and conf["CP"] == "8"
    flags = _best_row_flags(text)  # the best row's flags = the preset's settings
    assert (
        f"--context-parallel-algo {conf['CP_ALGO']}" in flags and f"--tensor-model-parallel-size {conf['TP']}" in flags
    )
    assert (
        cli_main(
            [
                "plan",
                "--model",
                "gpt3-1.3b",
                "--seq-length",
                "32768",
                "--world-size",
                "8",
                "--device",
                "a100",
                "--format",
                "json",
                "--top",
                "2",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["ranked"][0]["flags"].startswith("--tensor-model-parallel-size")
    assert (
        cli_main(
            [
                "plan",
                "--model",
                "gpt3-1.3b",
                "--seq-length",
                "32768",
                "--world-size",
                "8",
                "--device",
                "a100",
                "--top",
                "2",
            ]
        )
        == 0
    )
    feasible = int(re.search(r"(\d+) feasible configurations", capsys.readouterr().out).group(1))
    assert len(data["ranked"]) == feasible > 2  # --top cuts the table, never the JSON


def test_rows_come_in_the_documented_order():
    """docs/planner.md: tiers by speed (the fastest remaining and all within 1 % of it), each simplest first (the
    enumeration order); so the predicted time never drops by more than 1 % from one row to the next."""
    from mindspeed_cp.planner.plan import candidates

    dev = device("h100")
    ranked = plan(GPT_1_3B, dev, 32768, 16)["ranked"]
    enumeration = [(t, c) for t, c in candidates(GPT_1_3B, 32768, 16, dev.gpus_per_node)]
    position = [enumeration.index((e["tp"], e["config"])) for e in ranked]
    times = [e["rank_time"] for e in ranked]
    i, tiers = 0, 0
    while i < len(ranked):
        head = min(times[i:])
        j = i
        while j < len(ranked) and times[j] <= 1.01 * head:
            j += 1
        assert all(t > 1.01 * head for t in times[j:]), i  # the tier holds every row within 1 % of the fastest left
        assert position[i:j] == sorted(position[i:j]), i  # simplest first inside it
        i, tiers = j, tiers + 1
    assert tiers > 5 and len(ranked) > 50


def test_flags_and_preset_carry_every_assumption_of_the_memory_check(tmp_path, capsys):
    """What the memory check assumed is in every row's flags and in the preset (30B at 32k: without the distributed
    optimizer and recomputation the plan's pick would not fit)."""
    argv = ["plan", "--model", "gpt3-30b", "--seq-length", "32768", "--world-size", "32", "--format", "json"]
    assert cli_main(argv + ["--recompute", "full", "--micro-batch-size", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)["ranked"]
    for r in rows:
        for flag in ("--micro-batch-size 2", "--use-distributed-optimizer", "--recompute-granularity full"):
            assert flag in r["flags"], (flag, r["flags"])
        assert ("--sequence-parallel" in r["flags"]) == (r["tp"] > 1)
    assert (
        cli_main(
            [
                "plan",
                "--model",
                "gpt3-1.3b",
                "--seq-length",
                "32768",
                "--world-size",
                "8",
                "--format",
                "json",
                "--no-distributed-optimizer",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["ranked"]
    assert rows and not any("--use-distributed-optimizer" in r["flags"] or "--recompute" in r["flags"] for r in rows)
    best = plan(GPT_30B, device("h100"), 32768, 32, recompute="full")["ranked"][0]
    bare = plan(GPT_30B, device("h100"), 32768, 32, tp=best["tp"], cp=best["cp"], distributed_optimizer=False)
    assert all(r["config"] != best["config"] for r in bare["ranked"])  # the pick needs what its flags say


def test_ring_steps_cover_every_step_of_a_pass():
    """The cost model folds a ring pass's alike steps (O(1) in the ring size): the same steps, pairs and hops
    as walking every step (the hop after step s leaves a Double Ring window when s + 1 is a multiple of K)."""
    from collections import Counter

    for R in range(2, 40):
        for K in [R] + [k for k in range(2, R) if R % k == 0]:
            S = 2 * R * 3
            walked = Counter(
                (
                    cm.ring_step_pairs(S, R, s),
                    None if s == R - 1 else "outer" if R > K and (s + 1) % K == 0 else "inner",
                )
                for s in range(R)
            )
            folded = Counter()
            for step, count, hop in cm.ring_steps(R, K):
                folded[(cm.ring_step_pairs(S, R, step), hop)] += count
            assert folded == walked, (R, K)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "nope"], "--model 'nope': no such file or preset"),
        (["--model", "gpt3-1.3b", "--device", "tpu"], "--device 'tpu': no such preset"),
        (["--num-layers", "2"], "the model needs --hidden-size, --num-attention-heads"),
        (["--model", "gpt3-1.3b", "--set", "peak=1"], "not a device constant"),
        (["--model", "gpt3-1.3b", "--tp", "3"], "no feasible configuration"),
    ],
)
def test_plan_command_errors_are_one_line_and_status_2(argv, match, capsys):
    assert cli_main(["plan", "--seq-length", "32768", "--world-size", "8"] + argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_plan_keeps_to_what_the_model_build_accepts():
    """A model conf with sinks and sliding windows (gpt-oss-tiny: --softmax-type learnable --window-size 16,0
    --window-attn-skip-freq 2) gets every algorithm (each computes them; CPConfig.feature_problem is the one rule the
    model build and the plan share); MLA's head sizes come from the conf's flags (deepseek-tiny: qk 24 + 8, v 16)."""
    import argparse

    from mindspeed_cp.planner.plan import device, model_from, plan

    args = argparse.Namespace(
        model="gpt-oss-tiny",
        swiglu=False,
        num_layers=None,
        hidden_size=None,
        num_attention_heads=None,
        num_query_groups=None,
        ffn_hidden_size=None,
        vocab_size=None,
    )
    model = model_from(args)
    assert model.softmax_type == "learnable" and model.window_size == "16,0"
    res = plan(model, device("h100"), 8192, 8)
    algos = {e["config"].context_parallel_algo for e in res["ranked"] if e["config"].cp > 1}
    assert algos == {"ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo", "kvallgather_cp_algo"}, algos
    deepseek = model_from(argparse.Namespace(**dict(vars(args), model="deepseek-tiny")))
    assert (deepseek.head_dim, deepseek.v_dim) == (32, 16)


def test_windowed_layers_cost_by_their_halo():
    """A sliding-window model: the windowed layers cost by the halo (CPConfig's --window-attn-cp-algo or the
    configured algorithm), the full ones as before; the plan offers the per-layer algorithm and writes it."""
    import dataclasses

    from mindspeed_cp.layout.window import Window, plan_halo, zigzag_layout
    from mindspeed_cp.planner.costmodel import (
        Attention,
        Model,
        attention_time,
        ring_kv_cache,
        window_attention_time,
        window_halo,
        window_ring_kv_cache,
    )
    from mindspeed_cp.planner.plan import device, plan

    gptoss = Model(
        num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=2, window_size="64,0",
        window_attn_skip_freq="2",
    )  # fmt: skip
    assert gptoss.windowed_layers() == 2 and gptoss.window == Window(64, 0)
    assert dataclasses.replace(gptoss, window_attn_skip_freq="[1,1,0]+[0]").windowed_layers() == 2
    S, P, d, e = 2048, 4, 64, 2
    halo = window_halo("ring", S, P, 1, Window(64, 0))
    assert halo["halo"] == max(
        plan_halo(zigzag_layout(S, P), r, Window(64, 0)).bytes_per_token()["received"] for r in range(P)
    )
    windowed = window_ring_kv_cache(halo["halo"], halo["halo"], 1, 2, d, e)["sent"]
    ring = ring_kv_cache(S, P, 1, 2, d, e)["sent"]
    assert halo["halo"] == 128 and windowed / ring == 128 / 1536  # the goal: <= 0.25 of the ring's
    dev = device("h100")
    a = Attention(algo="ring", cp=P)
    win, full = window_attention_time(dev, gptoss, S, 1, a, "ring"), attention_time(dev, gptoss, S, 1, a)
    assert win["intra_bytes"] == windowed and win["compute"] < full["compute"]
    res = plan(gptoss, dev, 16384, 8)
    flags = {e["config"].window_attn_cp_algo for e in res["ranked"]}
    assert {None, "megatron_cp_algo", "ulysses_cp_algo"} <= flags, flags
