"""``make test-compat``: the tests that touch Megatron, on every megatron-core release the plugin supports.

    python -m tests.compat                      # the whole matrix (docs/compatibility.md)
    python -m tests.compat 0.12.3 0.19.2        # some releases

Python 3.11, the main venv (torch's local CPU wheel): 0.12.3, 0.13.1, 0.14.0 and 0.15.3, each megatron-core alone
installed with ``pip --target`` into ``.compat/mcore-V`` (cached) and put first on ``PYTHONPATH``; 0.16.1 is the
main venv itself (``make test`` covers it fully). Python 3.12 (megatron-core >= 0.17 needs it; pyenv's 3.12.1,
``$PY312`` to choose another): the venv ``.compat/py312`` with the registry's torch 2.13.0 - the CUDA build, run
on the CPU - and megatron-core 0.19.2, which ships ``megatron/training``, so Megatron's own training loop is
tested there (``tests/test_megatron_training_wheel.py``); 0.17.1 and 0.18.2 as overlays on it. Downloads go
through pip's cache: once per machine. ``$MINDSPEED_CP_COMPAT_CACHE`` moves ``.compat`` elsewhere: CI points it
outside the clone so every clean clone on a machine reuses the venvs (they hold no code of ours: the tests put
the checkout first on ``PYTHONPATH``).

Per release: the GPT parity tests of every algorithm (``test_megatron_cp``, ``test_packing``'s GPT cases,
``test_dropout``, ``test_kv_cache``'s GPT cases), Megatron's schedules and optimizer
(``test_megatron_core_training``), the CPU support (``test_device``, ``test_emulation``), the patch registry
(``test_patching``), Megatron-LM's argument path and the wheel's training loop where a training package
exists. Features a release lacks are skipped by feature detection (``tests/features.py``), never by version
number. Results: a table on stdout and
``test-artifacts/compat.json``; exit status 1 if any release has a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.abspath(os.environ.get("MINDSPEED_CP_COMPAT_CACHE") or os.path.join(ROOT, ".compat"))
PY311 = ["0.12.3", "0.13.1", "0.14.0", "0.15.3"]
PY312_BASE = "0.19.2"
PY312 = ["0.17.1", "0.18.2", PY312_BASE]
TORCH = "2.13.0"
TESTS = [
    "tests/test_megatron_cp.py",
    "tests/test_packing.py",
    "tests/test_dropout.py",
    "tests/test_megatron_core_training.py",
    "tests/test_device.py",
    "tests/test_emulation.py",
    "tests/test_patching.py",
    "tests/test_megatron_lm.py",
    "tests/test_megatron_training_wheel.py",
    "tests/test_kv_cache.py",
]
# attention-level float64 cases: no Megatron code beyond parallel_state
DESELECT = "not documents_match_float64 and not test_kv_cache_cp and not bad_kv_cache"
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]


def _run(cmd, **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _python312() -> str:
    if os.environ.get("PY312"):
        return os.environ["PY312"]
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True).stdout.strip()
        path = os.path.join(root, "versions", "3.12.1", "bin", "python3.12")
        if os.path.exists(path):
            return path
    except (OSError, subprocess.CalledProcessError):
        pass
    found = shutil.which("python3.12")
    if not found:
        raise SystemExit("test-compat: no Python 3.12 (set PY312=/path/to/python3.12)")
    return found


def _venv312() -> str:
    """``.compat/py312``: torch + megatron-core 0.19.2 + what its training package and the tests import."""
    venv = os.path.join(CACHE, "py312")
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".stamp")
    if not os.path.exists(stamp):
        if not os.path.exists(python):
            _run([_python312(), "-m", "venv", venv])
        _run([python, *PIP, f"torch=={TORCH}"])
        # megatron/training of the 0.19 wheel needs nothing beyond megatron-core's own requirements here
        _run([python, *PIP, f"megatron-core=={PY312_BASE}", "pytest==9.2.0", "numpy"])
        open(stamp, "w").close()
    return python


def _overlay(python: str, version: str) -> str:
    """megatron-core ``version`` alone (``--no-deps``: the venv brings torch and the rest) in its own folder."""
    target = os.path.join(CACHE, f"mcore-{version}" if python == sys.executable else f"py312-mcore-{version}")
    if not os.path.exists(os.path.join(target, "megatron", "core")):
        _run([python, *PIP, "--no-deps", "--target", target, f"megatron-core=={version}"])
    return target


def _summary(output: str) -> dict:
    last = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last[-1] if last else ""):
        counts["error" if what.startswith("error") else what] += int(n)
    return counts


def run_release(version: str) -> dict:
    if version in PY311:
        python, extra = sys.executable, [_overlay(sys.executable, version)]
    elif version in PY312:
        python = _venv312()
        extra = [] if version == PY312_BASE else [_overlay(python, version)]
    else:
        raise SystemExit(
            f"test-compat: megatron-core {version} is not in the matrix ({', '.join(PY311 + PY312)};"
            f" 0.16.1 is `make test`)"
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(extra + [ROOT]))
    start = time.time()
    res = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "-k", DESELECT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out = res.stdout + res.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    got = dict(
        version=version,
        python=".".join(map(str, _python_version(python))),
        seconds=round(time.time() - start),
        returncode=res.returncode,
        failed_tests=failed,
        **_summary(out),
    )
    if res.returncode:
        print(out[-8000:], flush=True)
    return got


def _python_version(python: str):
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
    return tuple(int(x) for x in out.stdout.split())


def main(argv=None) -> int:
    versions = list(argv if argv is not None else sys.argv[1:]) or PY311 + PY312
    os.makedirs(CACHE, exist_ok=True)
    results = []
    for v in versions:
        print(f"== megatron-core {v}", flush=True)
        results.append(run_release(v))
        r = results[-1]
        print(
            f"   {r['passed']} passed, {r['skipped']} skipped, {r['failed'] + r['error']} failed "
            f"({r['seconds']} s, Python {r['python']})",
            flush=True,
        )
    os.makedirs(os.path.join(ROOT, "test-artifacts"), exist_ok=True)
    with open(os.path.join(ROOT, "test-artifacts", "compat.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| megatron-core | Python | passed | skipped | failed | seconds |\n|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['version']} | {r['python']} | {r['passed']} | {r['skipped']} | {r['failed'] + r['error']} "
            f"| {r['seconds']} |"
        )
    bad = [r["version"] for r in results if r["returncode"] != 0]
    if bad:
        print(f"test-compat: failures on megatron-core {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
