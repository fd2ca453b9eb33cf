"""Megatron-LM's real training loop (``pretrain_gpt.py`` under torchrun, gloo, CPU) with every CP algorithm
equals the same run at CP=1.

Needs ``MEGATRON_LM_PATH`` (a core_v0.16.1 checkout) and skips otherwise; ``make test-megatron-lm`` runs it.
Every run is unmodified ``pretrain_gpt.py`` through ``mindspeed_cp.launch`` on 4 (or 2) gloo ranks with the
tiny GPT of ``mindspeed_cp.tools.demo_megatron_lm.TINY_GPT`` (fp32, mock data, seed 1234, no dropout), compared per
iteration through ``$MINDSPEED_CP_METRICS`` (each iteration's reduced ``lm loss`` and grad norm at full
precision, not the rounded, partly averaged log line). A CP run and its reference use the same global batch
(4 sequences): CP=1 spreads the 4 ranks over data parallelism, a CP run over CP (and DP / TP / PP).

Tolerance per iteration: ``tests.megatron_loop.step_tolerance`` - 1e-6 relative on ``lm loss`` (about 5) and 2e-6
on the grad norm (0.8 - 4.5) at the first iteration (float32 rounding of sums taken in another order: tokens split
over ranks, gradients reduced over DP x CP), then Adam's measured drift.
"""

from __future__ import annotations

import os
import shutil

import pytest

from mindspeed_cp.tools.demo_megatron_lm import TINY_GPT, run_pretrain_gpt
from tests.megatron_loop import step_tolerance

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
pytestmark = pytest.mark.skipif(
    not MEGATRON_LM_PATH or not os.path.isfile(os.path.join(MEGATRON_LM_PATH or "", "pretrain_gpt.py")),
    reason="MEGATRON_LM_PATH is not set to a Megatron-LM checkout with pretrain_gpt.py (core_v0.16.1)",
)

ITERS = 5
RING = ["--context-parallel-algo", "megatron_cp_algo"]
ULYSSES = ["--context-parallel-algo", "ulysses_cp_algo"]
HYBRID = ["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2"]
KVAG = ["--context-parallel-algo", "kvallgather_cp_algo"]
DIST_OPT = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
VPP = ["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
SEQ511 = ["--seq-length", "511", "--max-position-embeddings", "512"]
SEQ510 = ["--seq-length", "510", "--max-position-embeddings", "512"]
DOCS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]

# name -> (ranks, pretrain_gpt.py flags after TINY_GPT)
RUNS = {
    "cp1": (4, ["--context-parallel-size", "1"]),
    "ulysses4": (4, ["--context-parallel-size", "4", *ULYSSES]),
    "ring4": (4, ["--context-parallel-size", "4", *RING]),
    "ring4_overlap": (4, ["--context-parallel-size", "4", *RING, "--use-cp-send-recv-overlap"]),
    "ring4_window2": (
        4,
        ["--context-parallel-size", "4", *RING, "--cp-window-size", "2", "--use-cp-send-recv-overlap"],
    ),
    "hybrid4": (4, ["--context-parallel-size", "4", *HYBRID]),
    "kvallgather4": (4, ["--context-parallel-size", "4", *KVAG]),
    "kvallgather4_no_overlap_kv_full": (
        4,
        [
            "--context-parallel-size",
            "4",
            *KVAG,
            "--no-cp-allgather-overlap",
            "--context-parallel-kv-cache-policy",
            "full",
        ],
    ),
    "tp2_kvallgather2": (4, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2", *KVAG]),
    "cp1_distopt": (4, ["--context-parallel-size", "1", *DIST_OPT]),
    "ring2_distopt": (4, ["--context-parallel-size", "2", *RING, *DIST_OPT]),
    "tp2_cp1": (4, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "1"]),
    "tp2_ulysses2": (4, ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2", *ULYSSES]),
    "pp2_cp1": (4, ["--pipeline-model-parallel-size", "2", "--context-parallel-size", "1"]),
    "pp2_ring2": (4, ["--pipeline-model-parallel-size", "2", "--context-parallel-size", "2", *RING]),
    "vpp_cp1": (4, [*VPP, "--context-parallel-size", "1"]),
    "vpp_ring2": (4, [*VPP, "--context-parallel-size", "2", *RING]),
    "recompute_cp1": (4, [*RECOMPUTE, "--context-parallel-size", "1"]),
    "recompute_ring4": (4, [*RECOMPUTE, "--context-parallel-size", "4", *RING]),
    "recompute_ulysses4": (4, [*RECOMPUTE, "--context-parallel-size", "4", *ULYSSES]),
    "seq511_cp1": (2, [*SEQ511, "--context-parallel-size", "1"]),
    "seq511_ulysses2": (2, [*SEQ511, "--context-parallel-size", "2", *ULYSSES]),
    "ring2": (4, ["--context-parallel-size", "2", *RING]),
    # packed documents: CP=1 applies the dataloader's dense document mask, CP runs build document-causal attention
    # from the position resets (or, without a mask in the batch, from the EOD tokens); micro-batch 1
    "docs_cp1": (4, [*DOCS, "--context-parallel-size", "1"]),
    "docs_ulysses4": (4, [*DOCS, "--context-parallel-size", "4", *ULYSSES]),
    "docs_ring4": (4, [*DOCS, "--context-parallel-size", "4", *RING]),
    "docs_ring4_window2": (4, [*DOCS, "--context-parallel-size", "4", *RING, "--cp-window-size", "2"]),
    "docs_hybrid4": (4, [*DOCS, "--context-parallel-size", "4", *HYBRID]),
    "docs_kvallgather4": (4, [*DOCS, "--context-parallel-size", "4", *KVAG]),
    "docs_hybrid4_outer_allgather": (
        4,
        [*DOCS, "--context-parallel-size", "4", *HYBRID, "--hybrid-outer-cp-algo", "kvallgather_cp_algo"],
    ),
    "docs_ring4_eod": (
        4,
        [
            "--reset-attention-mask",
            "--eod-mask-loss",
            "--no-create-attention-mask-in-dataloader",
            "--context-parallel-size",
            "4",
            *RING,
        ],
    ),
    # any length for Ring / Hybrid: 510 is not a multiple of 2 x 4
    "seq510_cp1": (4, [*SEQ510, "--context-parallel-size", "1"]),
    "seq510_ring4": (4, [*SEQ510, "--context-parallel-size", "4", *RING]),
    "seq510_hybrid4": (4, [*SEQ510, "--context-parallel-size", "4", *HYBRID]),
    "seq510_kvallgather4_general": (
        4,
        [*SEQ510, "--context-parallel-size", "4", *KVAG, "--attention-mask-type", "general"],
    ),
    "seq510_ring4_general": (4, [*SEQ510, "--context-parallel-size", "4", *RING, "--attention-mask-type", "general"]),
    # KV-cache policies (MindSpeed's flags): kept blocks / rebuilt all-to-alls, with activation recompute too
    "ring4_kv_full": (4, ["--context-parallel-size", "4", *RING, "--context-parallel-kv-cache-policy", "full"]),
    "recompute_ring4_kv_half": (
        4,
        [
            *RECOMPUTE,
            "--context-parallel-size",
            "4",
            *RING,
            "--context-parallel-kv-cache-policy",
            "half",
            "--use-cp-send-recv-overlap",
        ],
    ),
    "hybrid4_kv_half_interval": (
        4,
        [
            "--context-parallel-size",
            "4",
            *HYBRID,
            "--context-parallel-kv-cache-policy",
            "half",
            "--context-parallel-cache-interval",
            "1",
        ],
    ),
    "recompute_ulysses4_kv_full": (
        4,
        [*RECOMPUTE, "--context-parallel-size", "4", *ULYSSES, "--context-parallel-kv-cache-policy", "full"],
    ),
    "ulysses4_allgather_kv_full": (
        4,
        [
            "--context-parallel-size",
            "4",
            *ULYSSES,
            "--use-ulysses-allgather-kv",
            "--context-parallel-kv-cache-policy",
            "full",
        ],
    ),
}
_DONE = {}


def run(name, extra=(), key=None):
    """The records of one run, run once per session (``key`` names a variant with ``extra`` flags)."""
    key = key or name
    if key not in _DONE:
        ranks, flags = RUNS[name]
        _DONE[key] = run_pretrain_gpt(ranks, [*TINY_GPT, "--train-iters", str(ITERS), *flags, *extra])
    return _DONE[key]


def assert_same(got, want, iterations=None):
    its = [r["iteration"] for r in got.records]
    assert its == (iterations or list(range(1, ITERS + 1))), its
    want_by_it = {r["iteration"]: r for r in want.records}
    for r in got.records:
        w = want_by_it[r["iteration"]]
        loss_tol, norm_tol = step_tolerance(r["iteration"] - 1)
        dl = abs(r["losses"]["lm loss"] - w["losses"]["lm loss"]) / abs(w["losses"]["lm loss"])
        dg = abs(r["grad_norm"] - w["grad_norm"]) / abs(w["grad_norm"])
        assert dl <= loss_tol and dg <= norm_tol, (r["iteration"], r, w)
        assert r["skipped"] == 0


@pytest.mark.parametrize(
    "name, reference",
    [
        ("ulysses4", "cp1"),
        ("ring4", "cp1"),
        ("ring4_overlap", "cp1"),
        ("ring4_window2", "cp1"),
        ("hybrid4", "cp1"),
        ("kvallgather4", "cp1"),
        ("kvallgather4_no_overlap_kv_full", "cp1"),
        ("tp2_kvallgather2", "tp2_cp1"),
        ("ring2_distopt", "cp1_distopt"),
        ("tp2_ulysses2", "tp2_cp1"),
        ("pp2_ring2", "pp2_cp1"),
        ("vpp_ring2", "vpp_cp1"),
        ("recompute_ring4", "recompute_cp1"),
        ("recompute_ulysses4", "recompute_cp1"),
        ("seq511_ulysses2", "seq511_cp1"),
        ("docs_ulysses4", "docs_cp1"),
        ("docs_ring4", "docs_cp1"),
        ("docs_ring4_window2", "docs_cp1"),
        ("docs_hybrid4", "docs_cp1"),
        ("docs_kvallgather4", "docs_cp1"),
        ("docs_hybrid4_outer_allgather", "docs_cp1"),
        ("docs_ring4_eod", "docs_cp1"),
        ("seq510_ring4", "seq510_cp1"),
        ("seq510_hybrid4", "seq510_cp1"),
        ("seq510_kvallgather4_general", "seq510_cp1"),
        ("seq510_ring4_general", "seq510_cp1"),
        ("ring4_kv_full", "cp1"),
        ("recompute_ring4_kv_half", "recompute_cp1"),
        ("hybrid4_kv_half_interval", "cp1"),
        ("ulysses4_allgather_kv_full", "cp1"),
        ("recompute_ulysses4_kv_full", "recompute_cp1"),
    ],
)
def test_cp_run_equals_cp1(name, reference):
    assert_same(run(name), run(reference))


def test_reference_runs_agree_with_each_other():
    """The references differ from plain CP=1 only in how the same math is distributed."""
    assert_same(run("cp1_distopt"), run("cp1"))
    assert_same(run("recompute_cp1"), run("cp1"))


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Save at iteration 3 (CP=2 ring), load and continue to 5: iterations 4 and 5 equal the run that never
    stopped; the same checkpoint loaded at CP=1 continues as the CP=1 run does."""
    ckpt = str(tmp_path / "ckpt")
    first = run("ring2", ["--save", ckpt, "--save-interval", "3", "--exit-interval", "3"], key="ring2_save")
    assert [r["iteration"] for r in first.records] == [1, 2, 3]
    assert os.path.isdir(ckpt) and os.path.exists(os.path.join(ckpt, "latest_checkpointed_iteration.txt"))
    saved = str(tmp_path / "saved")
    shutil.copytree(ckpt, saved)  # the second load must see the iteration-3 checkpoint, not the resumed run's
    resumed = run("ring2", ["--load", ckpt, "--save", ckpt, "--save-interval", "1000"], key="ring2_resume")
    assert_same(resumed, run("ring2"), iterations=[4, 5])
    at_cp1 = run("cp1", ["--load", saved], key="cp1_from_ring2")
    assert_same(at_cp1, run("cp1"), iterations=[4, 5])


# ----------------------------------------------------------------------------- the model presets (issue 24)
def _training_flags():
    """TINY_GPT's training flags without its model shape's GQA (a preset brings its own; MLA refuses GQA)."""
    out, skip = [], False
    for flag in TINY_GPT:
        if skip or flag == "--group-query-attention":
            skip = False
            continue
        skip = flag == "--num-query-groups"
        if not skip:
            out.append(flag)
    return out


PRESET_ITERS = 3
PRESET_RUNS = {  # preset -> CP runs (4 ranks) compared with its CP=1 run
    "deepseek-tiny": {
        "ulysses4": ULYSSES,
        "ring4": [*RING, "--use-cp-send-recv-overlap"],
        "double_ring4": [*RING, "--cp-window-size", "2"],
        "hybrid4": HYBRID,
        "kvallgather4": KVAG,
    },
    "gpt-oss-tiny": {
        "ulysses4": ULYSSES,
        "ring4": RING,
        "kvallgather4": KVAG,
    },  # windowed layers: the conf's window-aware ring
}


def run_preset(name, cp, flags=()):
    from tests.test_presets import megatron_lm_flags

    key = ("preset", name, cp, tuple(flags))
    if key not in _DONE:
        _DONE[key] = run_pretrain_gpt(
            4,
            [
                *_training_flags(),
                *megatron_lm_flags(name),
                "--train-iters",
                str(PRESET_ITERS),
                "--context-parallel-size",
                str(cp),
                *flags,
            ],
        )
    return _DONE[key]


@pytest.mark.parametrize("name,run_name", [(n, r) for n in PRESET_RUNS for r in PRESET_RUNS[n]])
def test_preset_equals_cp1(name, run_name):
    """configs/models/deepseek-tiny.conf (MLA + MoE over EP 2 + MTP) and gpt-oss-tiny.conf (GQA + learnable sinks
    + windows on every second layer + MoE) through pretrain_gpt.py with the flags scripts/pretrain_gpt_cp.sh
    passes: every algorithm equals their CP=1 run."""
    assert_same(
        run_preset(name, 4, PRESET_RUNS[name][run_name]),
        run_preset(name, 1),
        iterations=list(range(1, PRESET_ITERS + 1)),
    )
