"""The real ``mindspeed-cp`` command (console script and ``python -m mindspeed_cp``) in a subprocess."""

import json
import os
import re
import subprocess
import sys

import pytest

from mindspeed_cp.topology import rank_layout
from tests.conftest import ROOT

SCRIPT = os.path.join(os.path.dirname(sys.executable), "mindspeed-cp")


def run_cli(*args, entry="module"):
    cmd = [SCRIPT] if entry == "script" else [sys.executable, "-m", "mindspeed_cp"]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def flags(world, tp=1, pp=1, cp=1, algo=None, ulysses=None, window=None):
    out = ["groups", "--world-size", world, "--tp", tp, "--pp", pp, "--cp", cp]
    if algo:
        out += ["--cp-algo", algo]
    if ulysses:
        out += ["--ulysses-degree-in-cp", ulysses]
    if window:
        out += ["--cp-window-size", window]
    return out


# (world, tp, pp, cp, algo, ulysses degree, window): every algorithm, PP > 1, hybrid and Double Ring.
SHAPES = [
    (8, 2, 1, 2, None, None, None),
    (8, 1, 1, 1, None, None, None),
    (16, 2, 2, 2, "megatron_cp_algo", None, None),
    (24, 2, 3, 4, "megatron_cp_algo", None, 2),
    (16, 1, 1, 8, "megatron_cp_algo", None, 4),
    (16, 2, 1, 8, "hybrid_cp_algo", 2, 2),
    (32, 1, 2, 8, "hybrid_cp_algo", 4, None),
    (16, 4, 1, 4, "ulysses_cp_algo", None, None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_json_is_rank_layout(shape):
    world, tp, pp, cp, algo, u, k = shape
    res = run_cli(*flags(*shape), "--format", "json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    want = rank_layout(world, tp, pp, cp, algo or "ulysses_cp_algo", u, k or 1)
    assert got == want
    assert list(got) == list(want)  # key order as returned


def test_console_script_and_long_flags_agree_with_module():
    if not os.path.exists(SCRIPT):
        pytest.skip(f"console script {SCRIPT} not installed (pip install -e .)")
    short = run_cli(*flags(16, 2, 1, 8, "hybrid_cp_algo", 2, 2), "--format", "json", entry="script")
    long = run_cli(
        "groups",
        "--world-size",
        16,
        "--tensor-model-parallel-size",
        2,
        "--pipeline-model-parallel-size",
        1,
        "--context-parallel-size",
        8,
        "--context-parallel-algo",
        "hybrid_cp_algo",
        "--ulysses-degree-in-cp",
        2,
        "--cp-window-size",
        2,
        "--format",
        "json",
    )
    assert short.returncode == 0 and long.returncode == 0, short.stderr + long.stderr
    assert json.loads(short.stdout) == json.loads(long.stdout)


def test_megatron_worked_example():
    # The documented Megatron order tp-cp-ep-dp-pp (TP fastest) for world 8, TP 2, CP 2, DP 2.
    got = json.loads(run_cli(*flags(8, 2, 1, 2), "--format", "json").stdout)
    assert got["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert got["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert got["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert got["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def _parse_text(out):
    """The text picture back into {kind: groups} and the rank grid (a list of node rows)."""
    kinds, grid, kind, section = {}, [], None, None
    for line in out.splitlines():
        head = re.match(r"== (\w+):", line)
        if head:
            kind, section = head.group(1), "groups"
            kinds[kind] = []
        elif line == "ranks:":
            section = "ranks"
        elif "group index of each device" in line:
            section = "index"
        elif kind and "each rank is its own group" in line:
            kinds[kind] = "singletons"
        elif section == "groups" and re.match(r"\s+\d+ -> ", line):
            idx, ranks = line.split("->")
            assert int(idx) == len(kinds[kind])
            kinds[kind].append([int(r) for r in ranks.split()])
        elif section == "ranks" and re.match(r"\s+node \d+", line):
            grid.append([int(r) for r in line.split()[2:]])
    return kinds, grid


@pytest.mark.parametrize(
    "shape,where,devices",
    [
        ((16, 2, 1, 8, "hybrid_cp_algo", 2, 2), [], 8),
        ((24, 2, 3, 4, "megatron_cp_algo", None, 2), ["--nodes", 6], 4),
        ((12, 2, 2, 3, "megatron_cp_algo", None, None), [], 8),  # last node partly filled
        ((8, 2, 2, 2, None, None, None), ["--devices-per-node", 2], 2),
    ],
)
def test_text_lists_every_group_and_rank(shape, where, devices):
    world, tp, pp, cp, algo, u, k = shape
    res = run_cli(*flags(*shape), *where)
    assert res.returncode == 0, res.stderr
    kinds, grid = _parse_text(res.stdout)
    want = rank_layout(world, tp, pp, cp, algo or "ulysses_cp_algo", u, k or 1)
    assert list(kinds) == list(want)
    for kind, groups in want.items():
        if kinds[kind] == "singletons":
            assert groups == [[r] for r in range(world)], kind
        else:
            assert kinds[kind] == groups, kind
    # the node x device grid: every rank once, rank = node * devices + device
    assert [r for row in grid for r in row] == list(range(world))
    assert all(len(row) == devices for row in grid[:-1])
    assert f"x {devices} device" in res.stdout


def test_output_file(tmp_path):
    path = tmp_path / "layout.json"
    res = run_cli(*flags(16, 2, 1, 4, "megatron_cp_algo", None, 2), "--format", "json", "--output", path)
    assert res.returncode == 0 and res.stdout == "", res.stderr
    assert json.loads(path.read_text()) == rank_layout(16, 2, 1, 4, "megatron_cp_algo", None, 2)


def _one_error_line(res):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


@pytest.mark.parametrize(
    "args,names",
    [
        (flags(12, 2, 1, 4), ["world size 12", "not divisible", "--context-parallel-size 4"]),
        (flags(16, 1, 1, 8, "hybrid_cp_algo", 3), ["--ulysses-degree-in-cp 3", "does not divide"]),
        (flags(16, 1, 1, 8, "hybrid_cp_algo"), ["needs --ulysses-degree-in-cp"]),
        (flags(16, 1, 1, 8, "megatron_cp_algo", None, 3), ["--cp-window-size 3", "does not divide"]),
        (flags(16, 1, 1, 8, "hybrid_cp_algo", 2, 4), ["--cp-window-size 4", "smaller than"]),
        (flags(16, 1, 1, 4, "ulysses_cp_algo", None, 2), ["--cp-window-size 2", "ulysses_cp_algo"]),
        (flags(8, 1, 1, 4, "zigzag_algo"), ["--context-parallel-algo", "zigzag_algo"]),
        (flags(8, 0, 1, 1), ["argument --tp/--tensor-model-parallel-size", "must be an integer >= 1, got '0'"]),
        (flags(16, 2, 1, 2) + ["--nodes", 3], ["--nodes 3", "world size 16"]),
        (flags(16, 2, 1, 2) + ["--devices-per-node", 0], ["argument --devices-per-node", ">= 1, got '0'"]),
    ],
)
def test_impossible_layout_exits_2_with_one_line(args, names):
    line = _one_error_line(run_cli(*args))
    assert line.startswith("mindspeed-cp groups: ")
    for name in names:
        assert name in line, line


@pytest.mark.parametrize(
    "args,name",
    [
        (["groups", "--tp", 2], "--world-size"),
        (["groups", "--world-size", 8, "--tp", "two"], "--tp"),
        (["groups", "--world-size", 8, "--format", "svg"], "--format"),
        (["groups", "--world-size", 8, "--nodes", 1, "--devices-per-node", 8], "--devices-per-node"),
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, name):
    line = _one_error_line(run_cli(*args))
    assert line.startswith("mindspeed-cp")
    assert name in line, line


def test_patches_lists_megatron_targets():
    text = run_cli("patches")
    assert text.returncode == 0, text.stderr
    assert re.search(r"megatron\.core\.parallel_state\.initialize_model_parallel\s+\[applied", text.stdout)
    as_json = run_cli("patches", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    rows = {r["target"]: r for r in json.loads(as_json.stdout)}
    row = rows["megatron.core.parallel_state.initialize_model_parallel"]
    assert row["status"].startswith("applied") and row["why"]
    assert "megatron.core.parallel_state.destroy_model_parallel" in rows


@pytest.mark.parametrize(
    "args,want",
    [
        (
            ["--world-size", 4, "--cp", 4, "--cp-algo", "megatron_cp_algo", "--seq-length", 4096],
            "tokens per CP rank: 1024\n",
        ),
        (
            ["--world-size", 4, "--cp", 4, "--cp-algo", "megatron_cp_algo", "--seq-length", 4094],
            "tokens per CP rank: 1024 (each batch padded at its end to 4096)",
        ),
        (
            [
                "--world-size",
                8,
                "--cp",
                8,
                "--cp-algo",
                "hybrid_cp_algo",
                "--ulysses-degree-in-cp",
                2,
                "--seq-length",
                1000,
            ],
            "tokens per CP rank: 126 (each batch padded at its end to 1008)",
        ),
        (["--world-size", 3, "--cp", 3, "--seq-length", 1000], "tokens per CP rank: 333/334"),
        (
            [
                "--world-size",
                4,
                "--cp",
                4,
                "--cp-algo",
                "megatron_cp_algo",
                "--seq-length",
                4094,
                "--attention-mask-type",
                "general",
            ],
            "tokens per CP rank: 1024 (each batch padded at its end to 4096)",
        ),
    ],
)
def test_check_any_length(args, want):
    res = run_cli("check", *args)
    assert res.returncode == 0 and want in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize(
    "args,names",
    [
        (
            ["--world-size", 8, "--cp", 4, "--pp", 2, "--cp-algo", "megatron_cp_algo", "--seq-length", 4094],
            ["--pipeline-model-parallel-size"],
        ),
    ],
)
def test_check_refuses_what_padding_cannot_serve(args, names):
    line = _one_error_line(run_cli("check", *args))
    assert all(n in line for n in names), line
