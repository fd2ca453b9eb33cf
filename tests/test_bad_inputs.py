"""A newcomer fuzzing every documented command: each bad input exits with status 2 and exactly one line on stderr
naming the argument (and its valid range where it has one) - never a traceback, never a wrong answer.

Most inputs run in this process through ``mindspeed_cp.tools.cli.main`` (argparse's exits caught); a few run the real
command in a subprocess, to show that nothing escapes as a traceback there either.
"""

import argparse
import json
import os
import subprocess
import sys

import pytest

from mindspeed_cp.tools.cli import main as cli_main
from tests.conftest import ROOT

PLAN = ["plan", "--model", "gpt3-1.3b", "--seq-length", "32768", "--world-size", "8"]
GROUPS = ["groups", "--world-size", "16"]
CHECK = ["check", "--world-size", "8"]

# (argv, what the one line must say); a later flag overrides the same flag given earlier
BAD = [
    # plan: the defects of issue 28 first
    (PLAN + ["--seq-length", "0"], ["argument --seq-length", ">= 1", "'0'"]),
    (PLAN + ["--pp", "0"], ["argument --pp/--pipeline-model-parallel-size", ">= 1"]),
    (PLAN + ["--micro-batch-size", "0"], ["argument --micro-batch-size", ">= 1"]),
    (PLAN + ["--write-preset", "/nonexistent/x.conf"], ["argument --write-preset", "no folder /nonexistent"]),
    (PLAN + ["--seq-length", "-32768"], ["argument --seq-length", ">= 1", "'-32768'"]),
    (PLAN + ["--tp", "0"], ["argument --tp/--tensor-model-parallel-size", ">= 1"]),
    (PLAN + ["--cp", "0"], ["argument --cp/--context-parallel-size", ">= 1"]),
    (PLAN + ["--gpus-per-node", "0"], ["argument --gpus-per-node", ">= 1"]),
    (PLAN + ["--top", "-3"], ["argument --top", ">= 1"]),
    (PLAN + ["--set", "hbm_gb=-80"], ["--set hbm_gb=-80", "a number > 0"]),
    (PLAN + ["--cp", "3"], ["no feasible configuration: --world-size 8 is not divisible by", "--cp 3"]),
    (PLAN + ["--set", "hbm_gb=abc"], ["--set hbm_gb=abc", "a number > 0", "'abc'"]),
    # plan: more
    (PLAN + ["--seq-length", "32k"], ["argument --seq-length", "'32k'"]),
    (PLAN + ["--world-size", "0"], ["argument --world-size", ">= 1"]),
    (PLAN + ["--world-size", "99999999"], ["argument --world-size", "<= 4,194,304"]),
    (PLAN + ["--world-size", "12"], ["--world-size 12 is not a multiple of --gpus-per-node 8"]),
    (PLAN + ["--tp", "3"], ["no feasible configuration", "--tp 3"]),
    (PLAN + ["--top", "0"], ["argument --top", ">= 1"]),
    (PLAN + ["--write-preset", "/tmp"], ["argument --write-preset", "not a file name"]),
    (PLAN + ["--set", "hbm_gb"], ["--set hbm_gb", "KEY=VALUE"]),
    (PLAN + ["--set", "peak=1"], ["--set peak=...", "not a device constant", "peak_tflops"]),
    (PLAN + ["--set", "attention_efficiency=1.5"], ["--set attention_efficiency=1.5", "<= 1"]),
    (PLAN + ["--set", "gpus_per_node=0"], ["--set gpus_per_node=0", "an integer >= 1"]),
    (PLAN + ["--set", "inter_node_latency_us=-1"], ["--set inter_node_latency_us=-1", ">= 0"]),
    (PLAN + ["--set", "peak_tflops=inf"], ["--set peak_tflops=inf", "a number > 0"]),
    (PLAN + ["--device", "tpu"], ["--device 'tpu': no such preset", "h100", "cpu-here"]),
    (PLAN + ["--model", "nope"], ["--model 'nope': no such file or preset", "gpt3-30b"]),
    (PLAN + ["--num-layers", "0"], ["argument --num-layers", ">= 1"]),
    (PLAN + ["--hidden-size", "100"], ["--hidden-size 100 is not divisible by --num-attention-heads 16"]),
    (PLAN + ["--num-query-groups", "3"], ["--num-query-groups 3 does not divide --num-attention-heads 16"]),
    (PLAN + ["--vocab-size", "-1"], ["argument --vocab-size", ">= 1"]),
    (PLAN + ["--recompute", "partial"], ["argument --recompute", "invalid choice: 'partial'"]),
    (PLAN + ["--rank-by", "speed"], ["argument --rank-by", "invalid choice"]),
    (PLAN + ["--format", "yaml"], ["argument --format", "invalid choice"]),
    (
        ["plan", "--seq-length", "8", "--world-size", "8", "--num-layers", "2"],
        ["the model needs --hidden-size, --num-attention-heads"],
    ),
    (
        ["plan", "--model", "gpt3-30b", "--seq-length", "1048576", "--world-size", "8"],
        ["no feasible configuration", "do not fit in memory", "GB of 80 GB", "--recompute full"],
    ),
    (["plan", "--model", "gpt3-1.3b", "--world-size", "8"], ["the following arguments are required: --seq-length"]),
    # groups
    (GROUPS + ["--world-size", "0"], ["argument --world-size", ">= 1"]),
    (GROUPS + ["--world-size", "5000000"], ["argument --world-size", "<= 4,194,304"]),
    (GROUPS + ["--tp", "0"], ["argument --tp/--tensor-model-parallel-size", ">= 1"]),
    (GROUPS + ["--pp", "-2"], ["argument --pp/--pipeline-model-parallel-size", ">= 1"]),
    (GROUPS + ["--cp", "0"], ["argument --cp/--context-parallel-size", ">= 1"]),
    (GROUPS + ["--ulysses-degree-in-cp", "0"], ["argument --ulysses-degree-in-cp", ">= 1"]),
    (GROUPS + ["--cp-window-size", "0"], ["argument --cp-window-size", ">= 1"]),
    (GROUPS + ["--nodes", "0"], ["argument --nodes", ">= 1"]),
    (GROUPS + ["--nodes", "3"], ["--nodes 3", "world size 16"]),
    (GROUPS + ["--devices-per-node", "0"], ["argument --devices-per-node", ">= 1"]),
    (GROUPS + ["--cp-algo", "bogus"], ["argument --cp-algo/--context-parallel-algo", "invalid choice: 'bogus'"]),
    (GROUPS + ["--cp", "4", "--tp", "3"], ["world size 16 is not divisible", "--tensor-model-parallel-size 3"]),
    (GROUPS + ["--cp", "8", "--cp-algo", "hybrid_cp_algo"], ["needs --ulysses-degree-in-cp"]),
    (GROUPS + ["--output", "/nonexistent/groups.json"], ["argument --output/-o", "no folder /nonexistent"]),
    (GROUPS + ["--format", "svg"], ["argument --format", "invalid choice"]),
    # check
    (CHECK + ["--num-attention-heads", "0"], ["argument --num-attention-heads", ">= 1"]),
    (CHECK + ["--num-query-groups", "0"], ["argument --num-query-groups", ">= 1"]),
    (CHECK + ["--seq-length", "0"], ["argument --seq-length", ">= 1"]),
    (CHECK + ["--num-layers", "-1"], ["argument --num-layers", ">= 1"]),
    (CHECK + ["--world-size", "0"], ["argument --world-size", ">= 1"]),
    (CHECK + ["--cp", "0"], ["argument --cp/--context-parallel-size", ">= 1"]),
    (CHECK + ["--tp", "x"], ["argument --tp/--tensor-model-parallel-size", "'x'"]),
    (CHECK + ["--cp", "4", "--cp-window-size", "0"], ["--cp-window-size 0 must be an integer >= 1"]),
    (
        CHECK + ["--cp", "4", "--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "0"],
        ["--ulysses-degree-in-cp 0 must be a positive integer"],
    ),
    (
        CHECK + ["--cp", "4", "--context-parallel-kv-cache-policy", "full", "--context-parallel-cache-interval", "-1"],
        ["--context-parallel-cache-interval -1 must be an integer >= 0"],
    ),
    (CHECK + ["--context-parallel-algo", "bogus"], ["argument --context-parallel-algo", "invalid choice"]),
    (CHECK + ["--context-parallel-kv-cache-policy", "quarter"], ["argument --context-parallel-kv-cache-policy"]),
    (CHECK + ["--cp", "3"], ["world size 8 is not divisible", "--context-parallel-size 3"]),
    (CHECK + ["--cp", "4", "--num-attention-heads", "6"], ["--num-attention-heads 6 is not divisible"]),
    (CHECK + ["--cp", "4", "--seq-length", "3"], ["--seq-length 3 is shorter than --context-parallel-size 4"]),
    (
        CHECK + ["--cp", "4", "--context-parallel-algo", "kvallgather_cp_algo", "--cp-window-size", "2"],
        ["--cp-window-size 2 only apply to the ring level", "kvallgather_cp_algo would ignore them"],
    ),
    (
        CHECK + ["--cp", "4", "--context-parallel-algo", "megatron_cp_algo", "--no-cp-allgather-overlap"],
        ["--no-cp-allgather-overlap only applies to --context-parallel-algo kvallgather_cp_algo"],
    ),
    (
        CHECK + ["--cp", "4", "--context-parallel-algo", "kvallgather_cp_algo", "--ulysses-degree-in-cp", "2"],
        ["--ulysses-degree-in-cp 2 only applies to --context-parallel-algo hybrid_cp_algo"],
    ),
    # demo (refused before any rank starts)
    (["demo", "--steps", "0"], ["argument --steps", ">= 1"]),
    (["demo", "--only", "bogus"], ["argument --only", "'bogus' is not a run label", "'double ring'"]),
    (["demo", "--ranks", "1"], ["argument --ranks", ">= 2 and <= 64"]),
    (["demo", "--ranks", "3"], ["--heads 8 is not divisible by", "--ranks 3"]),
    (["demo", "--seq", "0"], ["argument --seq", ">= 1"]),
    (["demo", "--seq", "2"], ["--seq 2 is shorter than --ranks 4"]),
    (["demo", "--batch", "0"], ["argument --batch", ">= 1"]),
    (["demo", "--hidden", "100"], ["--hidden 100 is not divisible by --heads 8"]),
    (["demo", "--kv-heads", "3"], ["--kv-heads 3 does not divide --heads 8"]),
    (["demo", "--lr", "-1"], ["argument --lr", "> 0"]),
    (["demo", "--tolerance", "nan"], ["argument --tolerance", ">= 0"]),
    (["demo", "--bogus"], ["unrecognized arguments: --bogus"]),
    # patches and the command itself
    (["patches", "--format", "yaml"], ["argument --format", "invalid choice"]),
    (["patches", "--output", "/nonexistent/p.txt"], ["argument --output/-o", "no folder /nonexistent"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ([], ["the following arguments are required: COMMAND"]),
]


def _run(argv, capsys):
    try:
        rc = cli_main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(rc, out, err):
    assert rc == 2, (rc, out[-500:], err)
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and err.startswith("mindspeed-cp"), err
    return err


def test_every_bad_input_is_one_line_and_status_2(capsys):
    assert len(BAD) >= 80
    failures = []
    for argv, names in BAD:
        rc, out, err = _run(argv, capsys)
        try:
            line = _one_line(rc, out, err)
            missing = [n for n in names if n not in line]
            assert not missing, f"{missing} not in {line!r}"
        except AssertionError as e:
            failures.append(f"{' '.join(argv)}: {e}")
    assert not failures, "\n".join(failures)


def test_bad_files_are_named(tmp_path, capsys):
    """A --device or --model file with bad content: the file and the key, one line."""
    bad_json, no_peak, bad_model = tmp_path / "dev.json", tmp_path / "nopeak.json", tmp_path / "m.conf"
    bad_json.write_text("{not json")
    no_peak.write_text(json.dumps({"name": "x", "hbm_gb": 80, "intra_node_gbps": 1, "inter_node_gbps": 1}))
    bad_model.write_text("NUM_LAYERS=two\nHIDDEN_SIZE=64\nNUM_ATTENTION_HEADS=4\n")
    for argv, names in [
        (PLAN + ["--device", str(bad_json)], [f"--device {bad_json}: not a device JSON file"]),
        (PLAN + ["--device", str(no_peak)], [f"--device {no_peak}: no peak_tflops"]),
        (PLAN + ["--model", str(bad_model)], [f"--model {bad_model}: NUM_LAYERS must be an integer >= 1"]),
    ]:
        line = _one_line(*_run(argv, capsys))
        assert all(n in line for n in names), line


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--model", "gpt3-1.3b", "--seq-length", "0", "--world-size", "8"],
        [
            "plan",
            "--model",
            "gpt3-1.3b",
            "--seq-length",
            "32768",
            "--world-size",
            "8",
            "--write-preset",
            "/nonexistent/x.conf",
        ],
        ["demo", "--steps", "0"],
        ["check", "--world-size", "8", "--num-attention-heads", "0"],
    ],
)
def test_the_real_command_prints_no_traceback(argv):
    res = subprocess.run(
        [sys.executable, "-m", "mindspeed_cp", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    _one_line(res.returncode, res.stdout, res.stderr)


def test_check_module_entry_is_one_line_too():
    """``python -m mindspeed_cp.tools.check`` (what the scripts run) refuses the same way."""
    res = subprocess.run(
        [sys.executable, "-m", "mindspeed_cp.tools.check", "--world-size", "8", "--cp", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "argument --cp" in res.stderr, res.stderr


@pytest.mark.parametrize(
    "namespace,kwargs,match",
    [
        (
            {"context_parallel_size": 4, "context_parallel_algo": "bogus"},
            {},
            r"not a dict: write configure\(\*\*options\)",
        ),
        ("context_parallel_size=4", {}, r"got str"),
        (
            argparse.Namespace(context_parallel_size=2, num_attention_heads="8"),
            {},
            r"^--num-attention-heads '8' must be a positive integer \(got str\)$",
        ),
        (
            argparse.Namespace(context_parallel_size=2, seq_length=3.5),
            {},
            r"^--seq-length 3.5 must be a positive integer",
        ),
        (
            argparse.Namespace(context_parallel_size=2, num_query_groups=0),
            {},
            r"^--num-query-groups 0 must be a positive",
        ),
        (None, dict(context_parallel_size="4"), r"--context-parallel-size '4' must be a positive integer"),
    ],
)
def test_configure_refuses_a_mapping_and_wrongly_typed_facts(namespace, kwargs, match):
    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.config import CPConfigError

    with pytest.raises(CPConfigError, match=match):
        adaptor.configure(namespace, **kwargs)


def test_configure_keeps_every_documented_call():
    import mindspeed_cp.megatron_adaptor as adaptor

    args = argparse.Namespace(
        context_parallel_size=2,
        context_parallel_algo="megatron_cp_algo",
        num_attention_heads=8,
        seq_length=64,
        tensor_model_parallel_size=1,
    )
    try:
        assert adaptor.configure(args).context_parallel_algo == "megatron_cp_algo"
        assert adaptor.configure(context_parallel_size=2, cp_window_size=1).cp == 2
        assert adaptor.configure(args, use_cp_send_recv_overlap=True).use_cp_send_recv_overlap
    finally:
        adaptor.configure(context_parallel_size=1)
    assert os.path.isdir(ROOT)


def test_missing_requirements_are_one_line(tmp_path):
    """An interpreter without torch / megatron-core (the base Python under this venv): the commands that need them
    say so in one line (exit 2); groups and plan need neither."""
    base = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run([base, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{base} has torch")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for argv in (["check", "--world-size", "8", "--cp", "2"], ["patches"]):
        res = subprocess.run(
            [base, "-m", "mindspeed_cp", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        line = _one_line(res.returncode, res.stdout, res.stderr)
        assert "cannot import torch" in line and "megatron-core>=0.12" in line, line
    res = subprocess.run(
        [base, "-m", "mindspeed_cp", "groups", "--world-size", "8", "--cp", "2", "--format", "json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and json.loads(res.stdout)["cp"][0] == [0, 1], res.stderr
