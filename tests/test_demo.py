"""`make demo` at a reduced size: every algorithm trains and matches CP=1; bad sizes are refused."""

import subprocess
import sys


def _demo(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "mindspeed_cp.tools.demo", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_small_matches_cp1():
    r = _demo("--steps", "2", "--seq", "64", "--hidden", "64", "--layers", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for label in ("CP=1 (reference)", "ulysses", "ring", "double ring", "hybrid", "kv all-gather"):
        assert f"\n{label} " in out, label
    assert "[hybrid] step 2/2" in out  # progress is printed while it runs
    assert "Every CP run matches CP=1" in out


def test_demo_refuses_an_impossible_layout():
    r = _demo("--ranks", "3", timeout=120)
    assert r.returncode == 2
    assert (
        "--heads 8 is not divisible by --tensor-model-parallel-size 1 x --ranks 3" in r.stderr
        and "\n" == r.stderr[-1]
        and r.stderr.count("\n") == 1
    )
