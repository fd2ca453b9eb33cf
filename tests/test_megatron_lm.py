"""Real Megatron-LM (``megatron.training``): our flags in its parser, its validation, the launcher, the diff.

Tests marked by the ``megatron_lm`` fixture need ``MEGATRON_LM_PATH`` pointing at a Megatron-LM checkout
(core_v0.16.1) and skip otherwise. They run Megatron-LM in subprocesses on the CPU (no GPU), with the
checkout on ``sys.path`` after site-packages so the installed megatron-core is the one imported. The loss
normalisation and THD tests patch megatron-core only and run on the gloo pool without Megatron-LM.

Run as a script (``python tests/test_megatron_lm.py CASES_JSON``) this file is the subprocess that parses
and validates a list of Megatron-LM command lines and prints one JSON result per case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_FLAGS = (
    "context_parallel_size",
    "context_parallel_algo",
    "ulysses_degree_in_cp",
    "cp_window_size",
    "use_cp_send_recv_overlap",
    "megatron_cp_in_bnsd",
    "attention_mask_type",
    "context_parallel_kv_cache_policy",
    "context_parallel_cache_interval",
    "use_ulysses_allgather_kv",
    "cp_allgather_overlap",
    "window_attn_cp_algo",
    "hybrid_outer_cp_algo",
)
# A tiny GPT that Megatron-LM 0.16.1 accepts on the CPU; cases append their own flags (argparse: last wins).
BASE = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "8",
    "--seq-length",
    "64",
    "--max-position-embeddings",
    "128",
    "--micro-batch-size",
    "1",
    "--transformer-impl",
    "local",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "128",
    "--train-iters",
    "3",
    "--lr",
    "1e-3",
    "--attention-dropout",
    "0.0",
]
SUBPROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONWARNINGS": "ignore"}


# ================================================================================ subprocess side
def _run_cases(cases):
    """Parse + validate each case with Megatron-LM's own functions; one JSON line per case."""
    sys.path.append(os.environ["MEGATRON_LM_PATH"])  # after site-packages: the installed megatron-core wins
    import mindspeed_cp.megatron_adaptor  # noqa: F401  (first, as the launcher / the diff do)

    # isort: split
    import megatron.core
    from megatron.training.arguments import parse_args, validate_args

    from mindspeed_cp.megatron.state import STATE

    results = []
    for case in cases:
        STATE.reset()
        os.environ["WORLD_SIZE"] = str(case["world"])
        sys.argv = ["pretrain_gpt.py"] + case["argv"]
        out = {"name": case["name"], "core": megatron.core.__file__}
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = parse_args()
                out["parsed"] = {k: getattr(args, k, "<missing>") for k in OUR_FLAGS}
                validate_args(args, {})
            out.update(
                ok=True,
                seq_length=[type(args.seq_length).__name__, args.seq_length],
                configured=STATE.config.__dict__ if STATE.configured else None,
                documents_from=STATE.documents_from,
            )
        except SystemExit as e:
            out.update(ok=False, exit=e.code, error=err.getvalue().strip().splitlines()[-1:])
        except Exception as e:  # noqa: BLE001 - reported to the test
            out.update(ok=False, type=type(e).__name__, error=str(e))
        results.append(out)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    _run_cases(json.loads(sys.argv[1]))
    sys.exit(0)


# ================================================================================ pytest side
import pytest  # noqa: E402

from tests import features  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")


@pytest.fixture(scope="module")
def megatron_lm():
    """The Megatron-LM checkout, or skip with the reason."""
    if not MEGATRON_LM_PATH:
        pytest.skip(
            "MEGATRON_LM_PATH is not set (point it at a Megatron-LM core_v0.16.1 checkout to run "
            "the Megatron-LM integration tests)"
        )
    if not os.path.isfile(os.path.join(MEGATRON_LM_PATH, "megatron", "training", "arguments.py")):
        pytest.skip(f"MEGATRON_LM_PATH={MEGATRON_LM_PATH} has no megatron/training/arguments.py")
    return MEGATRON_LM_PATH


def _env(**extra):
    env = dict(os.environ, **SUBPROCESS_ENV, **extra)
    env.pop("PYTHONPATH", None)  # nothing may put the checkout before site-packages
    return env


def _dry_run_command(script: str):
    """(world size, pretrain_gpt.py arguments) printed by a scripts/*.sh DRY_RUN."""
    res = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", script)],
        capture_output=True,
        text=True,
        env=_env(DRY_RUN="1", DEVICE="gpu", PYTHON=sys.executable),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    line = res.stdout.split("command:\n", 1)[1].strip().splitlines()[0]
    words = shlex.split(line)
    at = next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py"))
    opt = lambda name: int(words[words.index(name) + 1])  # noqa: E731
    return opt("--nproc-per-node") * opt("--nnodes"), words[at + 1 :]


SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "scripts")) if re.match(r"pretrain_gpt_.*_32k_.*\.sh$", f))

CASES = [
    dict(name="defaults", world=2, argv=["--context-parallel-size", "2"]),
    dict(
        name="all_flags",
        world=8,
        argv=[
            "--context-parallel-size",
            "8",
            "--context-parallel-algo",
            "hybrid_cp_algo",
            "--ulysses-degree-in-cp",
            "2",
            "--cp-window-size",
            "2",
            "--use-cp-send-recv-overlap",
            "--megatron-cp-in-bnsd",
            "--attention-mask-type",
            "general",
            "--context-parallel-kv-cache-policy",
            "half",
            "--context-parallel-cache-interval",
            "1",
            "--window-attn-cp-algo",
            "megatron_cp_algo",
        ],
    ),
    dict(
        name="allgather_kv",
        world=4,
        argv=[
            "--context-parallel-size",
            "4",
            "--use-ulysses-allgather-kv",
            "--group-query-attention",
            "--num-query-groups",
            "2",
            "--context-parallel-kv-cache-policy",
            "full",
        ],
    ),
    dict(name="allgather_kv_mha", world=4, argv=["--context-parallel-size", "4", "--use-ulysses-allgather-kv"]),
    dict(
        name="cache_interval_too_big",
        world=4,
        argv=[
            "--context-parallel-size",
            "4",
            "--context-parallel-algo",
            "megatron_cp_algo",
            "--context-parallel-kv-cache-policy",
            "full",
            "--context-parallel-cache-interval",
            "2",
        ],
    ),
    dict(name="ulysses_unaligned", world=8, argv=["--context-parallel-size", "4", "--seq-length", "66"]),
    dict(
        name="ring_unaligned",
        world=8,
        argv=["--context-parallel-size", "4", "--seq-length", "66", "--context-parallel-algo", "megatron_cp_algo"],
    ),
    dict(
        name="ring_unaligned_general",
        world=8,
        argv=[
            "--context-parallel-size",
            "4",
            "--seq-length",
            "66",
            "--context-parallel-algo",
            "megatron_cp_algo",
            "--attention-mask-type",
            "general",
        ],
    ),
    dict(
        name="ring_reset_mask",
        world=4,
        argv=[
            "--context-parallel-size",
            "4",
            "--context-parallel-algo",
            "megatron_cp_algo",
            "--reset-attention-mask",
            "--reset-position-ids",
        ],
    ),
    dict(
        name="ring_reset_mask_pp",
        world=8,
        argv=[
            "--context-parallel-size",
            "4",
            "--context-parallel-algo",
            "megatron_cp_algo",
            "--reset-attention-mask",
            "--pipeline-model-parallel-size",
            "2",
        ],
    ),
    dict(
        name="bad_heads",
        world=8,
        argv=["--context-parallel-size", "4", "--num-attention-heads", "6", "--hidden-size", "60"],
    ),
    dict(
        name="bad_window",
        world=4,
        argv=["--context-parallel-size", "4", "--context-parallel-algo", "megatron_cp_algo", "--cp-window-size", "3"],
    ),
    dict(
        name="bad_ulysses_degree",
        world=4,
        argv=[
            "--context-parallel-size",
            "4",
            "--context-parallel-algo",
            "hybrid_cp_algo",
            "--ulysses-degree-in-cp",
            "3",
        ],
    ),
    dict(name="unknown_algo", world=2, argv=["--context-parallel-size", "2", "--context-parallel-algo", "zigzag"]),
    dict(name="bad_world", world=6, argv=["--context-parallel-size", "4"]),
    dict(name="te_impl", world=2, argv=["--context-parallel-size", "2", "--transformer-impl", "transformer_engine"]),
    dict(name="ulysses_reset_mask", world=2, argv=["--context-parallel-size", "2", "--reset-attention-mask"]),
    dict(
        name="ring_dropout",
        world=2,
        argv=[
            "--context-parallel-size",
            "2",
            "--context-parallel-algo",
            "megatron_cp_algo",
            "--attention-dropout",
            "0.1",
        ],
    ),
    dict(name="cp_comm_type", world=2, argv=["--context-parallel-size", "2", "--cp-comm-type", "a2a"]),
    dict(
        name="unaligned_pp",
        world=8,
        argv=["--context-parallel-size", "4", "--seq-length", "66", "--pipeline-model-parallel-size", "2"],
    ),
    dict(
        name="general_without_mask",
        world=2,
        argv=[
            "--context-parallel-size",
            "2",
            "--attention-mask-type",
            "general",
            "--no-create-attention-mask-in-dataloader",
        ],
    ),
    dict(name="cp1_te_ok", world=1, argv=["--transformer-impl", "transformer_engine"]),
]


@pytest.fixture(scope="module")
def results(megatron_lm):
    """Every case (and every example script's command) through Megatron-LM's parse_args + validate_args,
    in one subprocess (importing megatron.training takes seconds)."""
    cases = [dict(c, argv=BASE + c["argv"]) for c in CASES]
    for script in SCRIPTS:
        world, argv = _dry_run_command(script)
        cases.append(dict(name=script, world=world, argv=argv))
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    assert res.returncode == 0 and "RESULTS " in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
    found = json.loads(res.stdout.split("RESULTS ", 1)[1])
    return {r["name"]: r for r in found}


def test_installed_megatron_core_is_used(results):
    core = results["defaults"]["core"]
    assert not os.path.realpath(core).startswith(os.path.realpath(MEGATRON_LM_PATH) + os.sep), core


def test_defaults(results):
    r = results["defaults"]
    assert r["ok"], r
    assert r["parsed"] == {
        "context_parallel_size": 2,
        "context_parallel_algo": "ulysses_cp_algo",
        "ulysses_degree_in_cp": None,
        "cp_window_size": 1,
        "use_cp_send_recv_overlap": False,
        "megatron_cp_in_bnsd": False,
        "attention_mask_type": "causal",
        "context_parallel_kv_cache_policy": None,
        "context_parallel_cache_interval": 0,
        "use_ulysses_allgather_kv": False,
        "cp_allgather_overlap": True,
        "window_attn_cp_algo": None,
        "hybrid_outer_cp_algo": "megatron_cp_algo",
    }
    assert r["configured"] == r["parsed"]  # configure(args) ran with the parsed namespace


def test_all_flags_together(results):
    r = results["all_flags"]
    assert r["ok"], r
    want = {
        "context_parallel_size": 8,
        "context_parallel_algo": "hybrid_cp_algo",
        "ulysses_degree_in_cp": 2,
        "cp_window_size": 2,
        "use_cp_send_recv_overlap": True,
        "megatron_cp_in_bnsd": True,
        "attention_mask_type": "general",
        "context_parallel_kv_cache_policy": "half",
        "context_parallel_cache_interval": 1,
        "use_ulysses_allgather_kv": False,
        "cp_allgather_overlap": True,
        "window_attn_cp_algo": "megatron_cp_algo",
        "hybrid_outer_cp_algo": "megatron_cp_algo",
    }
    assert r["parsed"] == want and r["configured"] == want


def test_packed_documents_and_any_length_are_accepted(results):
    """--reset-attention-mask with the causal type: packed documents (boundaries from the position resets, else
    from EOD tokens); Ring at a length 2 x CP does not divide: padded at its end per batch."""
    assert results["ulysses_reset_mask"]["ok"] and results["ulysses_reset_mask"]["documents_from"] == "eod"
    assert results["ring_reset_mask"]["ok"] and results["ring_reset_mask"]["documents_from"] == "position_ids"
    for name in ("ring_unaligned", "ring_unaligned_general"):
        r = results[name]
        assert r["ok"] and r["seq_length"] == ["int", 66] and r["documents_from"] is None, r


def test_ulysses_accepts_seq_not_divisible_by_2cp(results):
    r = results["ulysses_unaligned"]
    assert r["ok"], r
    assert r["seq_length"] == ["int", 66]  # a plain int again after Megatron's validate_args


@pytest.mark.parametrize(
    "name, flags",
    [
        ("ring_reset_mask_pp", ["--reset-attention-mask", "--pipeline-model-parallel-size"]),
        ("bad_heads", ["--num-attention-heads 6", "--context-parallel-size 4"]),
        ("bad_window", ["--cp-window-size 3"]),
        ("bad_ulysses_degree", ["--ulysses-degree-in-cp 3"]),
        ("bad_world", ["world size 6", "--context-parallel-size 4"]),
        ("te_impl", ["--transformer-impl local"]),
        ("cp_comm_type", ["--cp-comm-type a2a", "--context-parallel-algo"]),
        ("unaligned_pp", ["--seq-length 66", "--pipeline-model-parallel-size 2"]),
        ("general_without_mask", ["--attention-mask-type general", "--no-create-attention-mask-in-dataloader"]),
        ("allgather_kv_mha", ["--use-ulysses-allgather-kv needs grouped-query attention"]),
        ("cache_interval_too_big", ["--context-parallel-cache-interval 2 must be smaller than --num-layers 2"]),
    ],
)
def test_bad_configuration_names_its_flags(results, name, flags):
    r = results[name]
    assert not r["ok"] and r.get("type") == "CPConfigError", r
    for flag in flags:
        assert flag in r["error"], (flag, r["error"])


def test_kv_cache_flags(results):
    """MindSpeed's KV-cache flags through Megatron-LM's parser and validate_args into the configuration."""
    r = results["allgather_kv"]
    assert r["ok"], r
    assert r["configured"]["use_ulysses_allgather_kv"] and r["configured"]["context_parallel_kv_cache_policy"] == "full"


def test_unknown_algorithm_is_an_argparse_error(results):
    r = results["unknown_algo"]
    assert not r["ok"] and r["exit"] == 2, r
    assert "--context-parallel-algo" in r["error"][0] and "zigzag" in r["error"][0]


def test_attention_dropout_is_accepted_by_every_algorithm(results):
    assert results["ring_dropout"]["ok"], results["ring_dropout"]


def test_cp1_leaves_megatron_alone(results):
    assert results["cp1_te_ok"]["ok"], results["cp1_te_ok"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_command_is_valid_megatron_lm(results, script):
    """The DRY_RUN command of every example script passes Megatron-LM 0.16.1's parse_args + validate_args."""
    r = results[script]
    assert r["ok"], r
    assert r["configured"]["context_parallel_size"] > 1


# -------------------------------------------------------------------------------- launcher
_PROBE = """\
import sys
ad = sys.modules.get("mindspeed_cp.megatron_adaptor")
assert ad is not None, "adaptor not imported before the script"
applied = {p.target for p in ad.PATCHES if p.applied}
assert "megatron.training.arguments.parse_args" in applied, sorted(applied)
assert "megatron.training.arguments.validate_args" in applied, sorted(applied)
import json, os, megatron.core, gpt_builders  # gpt_builders: the script's folder is importable
from megatron.training.arguments import parse_args
args = parse_args()
print("PROBE " + json.dumps({"argv0": sys.argv[0], "name": __name__, "core": megatron.core.__file__,
                             "algo": args.context_parallel_algo, "window": args.cp_window_size}))
"""


def test_launcher_loads_plugin_before_the_script(megatron_lm, tmp_path):
    probe = os.path.join(megatron_lm, "_mindspeed_cp_probe_%d.py" % os.getpid())  # beside pretrain_gpt.py
    with open(probe, "w") as f:
        f.write(_PROBE)
    try:
        # cwd = the checkout: the worst case for shadowing the installed megatron-core
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "mindspeed_cp.launch",
                os.path.basename(probe),
                "--context-parallel-size",
                "4",
                "--context-parallel-algo",
                "megatron_cp_algo",
                "--cp-window-size",
                "2",
            ]
            + BASE,
            cwd=megatron_lm,
            capture_output=True,
            text=True,
            env=_env(WORLD_SIZE="4"),
            timeout=900,
        )
    finally:
        os.remove(probe)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.split("PROBE ", 1)[1])
    assert out["name"] == "__main__" and out["argv0"] == probe
    assert (out["algo"], out["window"]) == ("megatron_cp_algo", 2)
    assert not os.path.realpath(out["core"]).startswith(os.path.realpath(megatron_lm) + os.sep), out["core"]


def test_launcher_runs_real_pretrain_gpt_from_megatron_lm_path(megatron_lm, tmp_path):
    """`pretrain_gpt.py` resolved against $MEGATRON_LM_PATH, run unmodified: its --help lists our flags."""
    res = subprocess.run(
        [sys.executable, "-m", "mindspeed_cp.launch", "pretrain_gpt.py", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    for flag in (
        "--context-parallel-algo {ulysses_cp_algo,megatron_cp_algo,hybrid_cp_algo,kvallgather_cp_algo}",
        "--ulysses-degree-in-cp",
        "--cp-window-size",
        "--use-cp-send-recv-overlap",
        "--megatron-cp-in-bnsd",
        "--attention-mask-type {causal,general}",
        "--context-parallel-size",
        "--context-parallel-kv-cache-policy {full,half}",
        "--context-parallel-cache-interval",
        "--use-ulysses-allgather-kv",
        "--no-cp-allgather-overlap",
        "--hybrid-outer-cp-algo {megatron_cp_algo,kvallgather_cp_algo}",
    ):
        assert flag in res.stdout, flag
    # Megatron's own --context-parallel-size, not registered a second time
    assert len(re.findall(r"^\s+--context-parallel-size ", res.stdout, re.M)) == 1


def test_launcher_missing_script_exits_2(tmp_path):
    env = dict(os.environ, MEGATRON_LM_PATH=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-m", "mindspeed_cp.launch", "no_such_script.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 2
    assert "no_such_script.py" in res.stderr and "MEGATRON_LM_PATH" in res.stderr


def test_launcher_sys_path_puts_checkout_last(tmp_path, monkeypatch):
    from mindspeed_cp import launch

    (tmp_path / "train.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path), "/some/site-packages"])
    monkeypatch.chdir(tmp_path)
    assert launch.resolve_script("train.py", megatron_lm_path="/nowhere") == str(tmp_path / "train.py")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert launch.resolve_script("train.py", megatron_lm_path=str(tmp_path)) == str(tmp_path / "train.py")
    launch.prepare_sys_path([str(tmp_path)])
    assert sys.path == ["/some/site-packages", str(tmp_path)]


_INIT_PROBE = """\
import json, os
from megatron.core import parallel_state as ps
from megatron.training.initialize import initialize_megatron
from mindspeed_cp.megatron.state import STATE
initialize_megatron()
print("INIT " + json.dumps({"rank": int(os.environ["RANK"]), "cp": ps.get_context_parallel_world_size(),
                            "ulysses": STATE.ranks("ulysses"), "ring": STATE.ranks("ring"),
                            "algo": STATE.config.context_parallel_algo}), flush=True)
"""


def test_initialize_megatron_builds_our_groups_on_gloo(megatron_lm, tmp_path):
    """Megatron-LM's own initialize_megatron on 4 CPU ranks (torchrun, gloo): flags parsed, configure(args),
    Megatron's groups, then ours - the rank lists `mindspeed-cp groups` draws."""
    import socket

    from mindspeed_cp.topology import rank_layout

    (tmp_path / "probe.py").write_text(_INIT_PROBE)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--master-port",
            str(port),
            "-m",
            "mindspeed_cp.launch",
            str(tmp_path / "probe.py"),
            "--context-parallel-size",
            "4",
            "--context-parallel-algo",
            "hybrid_cp_algo",
            "--ulysses-degree-in-cp",
            "2",
            "--distributed-backend",
            "gloo",
        ]
        + BASE,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(OMP_NUM_THREADS="1"),
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # four ranks share one stdout: their lines may interleave, so find each record, not each line
    got = {r["rank"]: r for r in (json.loads(m) for m in re.findall(r"INIT (\{[^{}]*\})", res.stdout))}
    want = rank_layout(4, cp=4, cp_algo="hybrid_cp_algo", ulysses_degree=2)
    assert sorted(got) == [0, 1, 2, 3]
    for rank, r in got.items():
        assert r["cp"] == 4 and r["algo"] == "hybrid_cp_algo"
        assert r["ulysses"] == next(g for g in want["ulysses"] if rank in g)
        assert r["ring"] == next(g for g in want["ring"] if rank in g)


# -------------------------------------------------------------------------------- the diff
def test_diff_applies_to_the_checkout(megatron_lm, tmp_path):
    diff = os.path.join(ROOT, "patches", "pretrain_gpt.py.diff")
    shutil.copy(os.path.join(megatron_lm, "pretrain_gpt.py"), tmp_path / "pretrain_gpt.py")
    if shutil.which("git"):
        res = subprocess.run(["git", "apply", "--check", diff], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    if not shutil.which("patch"):
        pytest.skip("`patch` not installed")
    res = subprocess.run(["patch", "-p1", "--fuzz=0", "-i", diff], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = (tmp_path / "pretrain_gpt.py").read_text().splitlines()
    ours = lines.index("import mindspeed_cp.megatron_adaptor  # noqa: F401")
    first_megatron = next(
        i for i, line in enumerate(lines) if re.match(r"(from|import) (megatron|gpt_builders|model_provider)\b", line)
    )
    assert ours < first_megatron
    original = open(os.path.join(megatron_lm, "pretrain_gpt.py")).read().splitlines()
    assert [line for i, line in enumerate(lines) if i != ours] == original  # exactly one line added


# -------------------------------------------------------------------------------- loss normalisation (gloo)
def _loss_case(n, per_token_loss):
    """forward_step_calc_loss on CP=2 with uneven tokens per rank (Ulysses, S=13, masked tokens)."""
    import types

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import schedules

    import mindspeed_cp.megatron_adaptor as ad
    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.megatron.state import STATE

    ad.configure(context_parallel_size=n)
    ps.initialize_model_parallel(context_parallel_size=n)
    rank = ps.get_context_parallel_rank()
    seq = 13
    losses = torch.linspace(0.5, 4.0, seq, dtype=torch.float64)  # per-token losses of the whole sequence
    mask = torch.ones(seq, dtype=torch.float64)
    mask[[1, 2, 3]] = 0  # rank 0 loses three loss tokens: 4 vs 6 counted tokens
    idx = token_indices(STATE.config, rank, seq)
    local = losses[idx].clone().requires_grad_(True)

    def loss_func(output_tensor):
        m = mask[idx]
        total = torch.sum(output_tensor * m)
        count = m.sum().to(torch.int)
        return total, count, {"lm loss": torch.stack([total.detach(), count.to(total.dtype)])}

    config = types.SimpleNamespace(calculate_per_token_loss=per_token_loss, timers=None)
    call = dict(
        model=types.SimpleNamespace(),
        output_tensor=local,
        loss_func=loss_func,
        config=config,
        vp_stage=None,
        collect_non_loss_data=False,
        num_microbatches=1,
        forward_data_store=[],
        cp_group_size=n,
        is_last_stage=True,
    )
    out, _ = schedules.forward_step_calc_loss(**call)
    out.backward()
    original = schedules.forward_step_calc_loss.__mindspeed_cp_original__
    plain, _ = original(**dict(call, output_tensor=local.detach(), forward_data_store=[]))
    # what DDP does with the loss gradients: sum over the DP x CP group scaled by 1 / (DP x CP)
    summed = out.detach().clone()
    dist.all_reduce(summed)
    plain_summed = plain.detach().clone()
    dist.all_reduce(plain_summed)
    return dict(
        ddp=float(summed) / n,
        plain_ddp=float(plain_summed) / n,
        grad=(local.grad / n).tolist(),
        want=float((losses * mask).sum() / mask.sum()),
        want_grad=(mask[idx] / mask.sum()).tolist(),
        out=float(out),
        plain=float(plain),
    )


@pytest.mark.skipif(not features.forward_step_calc_loss(), reason=features.WHY["forward_step_calc_loss"])
def test_loss_is_normalised_over_the_cp_group():
    res = run_on_ranks(2, _loss_case, 2, False)
    want = res[0]["want"]
    for r in res:
        assert r["ddp"] == pytest.approx(want, rel=1e-12)  # the CP=1 per-token mean
        assert r["grad"] == pytest.approx(r["want_grad"], rel=1e-12)
    # Megatron's own normalisation (each rank by its own token count) is off with 4 vs 6 tokens:
    assert abs(res[0]["plain_ddp"] - want) > 1e-3


@pytest.mark.skipif(not features.forward_step_calc_loss(), reason=features.WHY["forward_step_calc_loss"])
def test_per_token_loss_is_left_alone():
    res = run_on_ranks(2, _loss_case, 2, True)
    for r in res:
        assert r["out"] == r["plain"]  # --calculate-per-token-loss: Megatron already normalises globally
