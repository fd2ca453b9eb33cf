"""The example launch scripts (scripts/*.sh): syntax, DRY_RUN layout + command, refusal of impossible layouts.

DRY_RUN needs no GPU and no Megatron-LM: the scripts validate with ``python -m mindspeed_cp.tools.check`` and draw
the layout with ``python -m mindspeed_cp groups`` (``PYTHON`` = this interpreter). Whether real Megatron-LM
accepts the printed commands is tested in test_megatron_lm.py (needs MEGATRON_LM_PATH).
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS_DIR = os.path.join(ROOT, "scripts")
ALL = sorted(f for f in os.listdir(SCRIPTS_DIR) if f.endswith(".sh"))
EXAMPLES = [f for f in ALL if re.match(r"pretrain_gpt_.*_32k_.*\.sh$", f)]

# script -> (world, TP, CP, algorithm, flags the command must also carry)
EXPECTED = {
    "pretrain_gpt_1.3b_32k_ulysses.sh": (8, 1, 8, "ulysses_cp_algo", []),
    "pretrain_gpt_1.3b_32k_ring.sh": (8, 1, 8, "megatron_cp_algo", ["--use-cp-send-recv-overlap"]),
    "pretrain_gpt_1.3b_32k_hybrid.sh": (8, 1, 8, "hybrid_cp_algo", ["--ulysses-degree-in-cp 4"]),
    "pretrain_gpt_1.3b_32k_kvallgather.sh": (
        8,
        1,
        8,
        "kvallgather_cp_algo",
        ["--context-parallel-kv-cache-policy full"],
    ),
    "pretrain_gpt_30b_32k_ulysses.sh": (32, 8, 4, "ulysses_cp_algo", ["--sequence-parallel"]),
    "pretrain_gpt_30b_32k_double_ring.sh": (
        32,
        4,
        8,
        "megatron_cp_algo",
        ["--cp-window-size 2", "--use-cp-send-recv-overlap"],
    ),
    "pretrain_gpt_30b_32k_hybrid.sh": (32, 4, 8, "hybrid_cp_algo", ["--ulysses-degree-in-cp 2"]),
}


def run_script(name, ARGS=(), cwd=None, **env):
    full = dict(os.environ, **{"PYTHON": sys.executable, **env})
    for key in ("MEGATRON_LM_PATH", "CP", "TP", "NNODES", "GPUS_PER_NODE", "PYTHONPATH"):
        if key not in env:
            full.pop(key, None)
    return subprocess.run(
        ["bash", os.path.join(SCRIPTS_DIR, name), *ARGS], capture_output=True, text=True, env=full, timeout=600, cwd=cwd
    )


def test_every_example_is_expected():
    assert sorted(EXAMPLES) == sorted(EXPECTED)


@pytest.mark.parametrize("name", ALL)
def test_bash_syntax(name):
    res = subprocess.run(["bash", "-n", os.path.join(SCRIPTS_DIR, name)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", EXAMPLES)
def test_dry_run_prints_layout_and_command(name):
    world, tp, cp, algo, extra = EXPECTED[name]
    res = run_script(name, DRY_RUN="1", DEVICE="gpu")  # the command for the GPU cluster the script is for
    assert res.returncode == 0, res.stderr
    out = res.stdout
    dp = world // (tp * cp)
    assert f"world {world} = TP {tp} x CP {cp} x DP {dp} x PP 1" in out  # mindspeed-cp groups picture
    assert re.search(rf"^ok: CP={cp} {algo}", out, re.M)  # mindspeed_cp.tools.check
    cmd = shlex.split(out.split("command:\n", 1)[1].strip().splitlines()[0])
    assert cmd[0] == "CUDA_DEVICE_MAX_CONNECTIONS=1" and cmd[1] == "torchrun"
    assert cmd[cmd.index("-m") + 1] == "mindspeed_cp.launch"
    assert cmd[cmd.index("-m") + 2].endswith("/pretrain_gpt.py")
    text = " ".join(cmd)
    assert f"--context-parallel-size {cp} --context-parallel-algo {algo}" in text
    assert f"--tensor-model-parallel-size {tp} " in text and "--transformer-impl local" in text
    assert "--seq-length 32768" in text and "--mock-data" in text
    for flag in extra:
        assert flag in text, flag
    nodes = int(cmd[cmd.index("--nnodes") + 1])
    assert nodes * int(cmd[cmd.index("--nproc-per-node") + 1]) == world


def test_environment_overrides_the_preset():
    res = run_script(
        "pretrain_gpt_1.3b_32k_ring.sh",
        DRY_RUN="1",
        CP="4",
        DATA_PATH="/data/x_text_document",
        VOCAB_FILE="/v.json",
        MERGE_FILE="/m.txt",
    )
    assert res.returncode == 0, res.stderr
    assert "world 8 = TP 1 x CP 4 x DP 2 x PP 1" in res.stdout
    assert "--data-path /data/x_text_document" in res.stdout and "--mock-data" not in res.stdout


@pytest.mark.parametrize(
    "env, flag",
    [
        (dict(CP="3"), "--context-parallel-size 3"),  # 8 GPUs cannot hold CP 3
        (dict(NUM_ATTENTION_HEADS="12"), "--num-attention-heads 12"),  # 12 heads over CP 8 Ulysses
        (dict(SEQ_LENGTH="5"), "--seq-length 5"),  # fewer tokens than CP ranks
    ],
)
def test_impossible_layout_is_refused_before_launch(env, flag):
    res = run_script("pretrain_gpt_1.3b_32k_ulysses.sh", DRY_RUN="1", **env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert flag in res.stderr
    assert "command:" not in res.stdout


def test_double_ring_window_must_divide_the_ring():
    res = run_script("pretrain_gpt_30b_32k_double_ring.sh", DRY_RUN="1", CP_WINDOW="3")
    assert res.returncode == 2 and "--cp-window-size 3" in res.stderr


def test_launch_needs_megatron_lm_path():
    res = run_script("pretrain_gpt_1.3b_32k_ring.sh", MEGATRON_LM_PATH="/nonexistent")
    assert res.returncode == 2 and "MEGATRON_LM_PATH" in res.stderr


def test_tiny_model_keeps_the_sequence_and_layout():
    """MODEL=tiny: the 2-layer GPT of configs/models/tiny.conf, the script's own 32k and CP layout."""
    res = run_script("pretrain_gpt_1.3b_32k_hybrid.sh", DRY_RUN="1", MODEL="tiny", DEVICE="cpu")
    assert res.returncode == 0, res.stderr
    text = res.stdout.split("command:\n", 1)[1]
    for flag in (
        "--num-layers 2",
        "--hidden-size 128",
        "--ffn-hidden-size 512",
        "--num-attention-heads 8",
        "--seq-length 32768",
        "--context-parallel-size 8 --context-parallel-algo hybrid_cp_algo",
        "--ulysses-degree-in-cp 4",
        "--vocab-size 1024",
        "--eval-iters 1",
    ):
        assert flag in text, flag


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_device_chooses_backend_and_precision(device):
    res = run_script("pretrain_gpt_30b_32k_ulysses.sh", DRY_RUN="1", DEVICE=device)
    assert res.returncode == 0, res.stderr
    text = res.stdout.split("command:\n", 1)[1]
    if device == "cpu":  # gloo, fp32, and sequence parallelism (needs Apex) dropped - said in one line
        assert "no accelerator: gloo ranks, fp32, without --sequence-parallel" in res.stdout
        assert "--distributed-backend gloo" in text and "--bf16" not in text and "--sequence-parallel" not in text
    else:
        assert "no accelerator" not in res.stdout
        assert "--distributed-backend nccl" in text and "--bf16" in text and "--sequence-parallel" in text


def test_device_auto_matches_this_machine():
    from mindspeed_cp.device import has_accelerator

    res = run_script("pretrain_gpt_1.3b_32k_ring.sh", DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    assert ("no accelerator" in res.stdout) is (not has_accelerator())


def test_bad_device_is_refused():
    res = run_script("pretrain_gpt_1.3b_32k_ring.sh", DRY_RUN="1", DEVICE="tpu")
    assert res.returncode == 2 and "DEVICE must be auto, gpu or cpu" in res.stderr


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_PATH"), reason="needs MEGATRON_LM_PATH (a Megatron-LM checkout)")
def test_tiny_script_trains_on_gloo_ranks():
    """The real launch, shrunk: 2 gloo ranks, ring CP 2, 256 tokens, 2 iterations of the script's own command."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    res = run_script(
        "pretrain_gpt_1.3b_32k_ring.sh",
        MODEL="tiny",
        GPUS_PER_NODE="2",
        CP="2",
        SEQ_LENGTH="256",
        TRAIN_ITERS="2",
        GLOBAL_BATCH_SIZE="2",
        MEGATRON_LM_PATH=os.environ["MEGATRON_LM_PATH"],
        TORCHRUN=torchrun,
        MASTER_PORT=str(20000 + os.getpid() % 20000),
        OMP_NUM_THREADS="1",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "no accelerator: gloo ranks, fp32" in out
    assert re.search(r"iteration\s+2/\s+2 \|", out), out[-3000:]


def test_a_planned_preset_runs(tmp_path):
    """`mindspeed-cp plan --write-preset` writes everything the script needs: the GPU command carries every flag
    of the plan's best row (layout, CP options, micro-batch, sequence parallelism, distributed optimizer,
    recomputation) and the planned sequence length."""
    import json

    conf = tmp_path / "planned.conf"
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "mindspeed_cp",
            "plan",
            "--model",
            "gpt3-30b",
            "--seq-length",
            "65536",
            "--world-size",
            "64",
            "--recompute",
            "full",
            "--format",
            "json",
            "--write-preset",
            str(conf),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plan.returncode == 0, plan.stderr
    best = json.loads(plan.stdout)["ranked"][0]
    res = run_script("pretrain_gpt_cp.sh", DRY_RUN="1", DEVICE="gpu", ARGS=["gpt3-30b", str(conf)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    text = " ".join(shlex.split(res.stdout.split("command:\n", 1)[1].strip().splitlines()[0]))
    for flag in re.split(r" (?=--)", best["flags"]):
        assert f"{flag} " in f"{text} ", flag
    assert "--seq-length 65536" in text and "--micro-batch-size 1 --global-batch-size" in text
    nodes = int(re.search(r"--nnodes (\d+)", text).group(1))
    assert nodes * int(re.search(r"--nproc-per-node (\d+)", text).group(1)) == 64


def test_without_the_plugin_one_line_names_python(tmp_path):
    """No mindspeed_cp in the interpreter (a fresh shell without the venv): one line naming PYTHON and the venv,
    exit 2, no Python traceback."""
    base = getattr(sys, "_base_executable", None) or "python3"
    for python in (base, str(tmp_path / "no-such-python")):
        res = run_script("pretrain_gpt_1.3b_32k_ring.sh", DRY_RUN="1", PYTHON=python, cwd=str(tmp_path))
        assert res.returncode == 2, res.stdout + res.stderr
        assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert f"cannot import mindspeed_cp with PYTHON={python}" in res.stderr and ".venv" in res.stderr


def test_cp1_baseline_keeps_the_presets_cp_options():
    """CP=1 runs no CP algorithm, so every CP option of a preset is accepted there (type-checked only): the ring
    preset's KV-cache policy and overlap stay on the command line of its CP=1 baseline."""
    res = run_script("pretrain_gpt_1.3b_32k_ring.sh", DRY_RUN="1", CP="1", DEVICE="gpu")
    assert res.returncode == 0, res.stderr
    assert "--context-parallel-size 1 " in res.stdout and "--context-parallel-kv-cache-policy full" in res.stdout
