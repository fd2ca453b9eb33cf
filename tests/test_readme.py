"""The cheap commands of README.md and docs/planner.md, run as a newcomer copies them: each exits 0.

Read from the documents themselves (every ``mindspeed-cp ...`` line and every ``DRY_RUN=1 bash scripts/...`` line of
their code blocks, continuation lines joined, trailing comments dropped), so a command edited in the docs is the
command tested. They run in a scratch folder holding copies of ``scripts/`` and ``configs/`` (files they write land
there), with this interpreter's ``bin`` first on PATH (the ``mindspeed-cp`` console script) and ``PYTHON`` set for
the scripts.
"""

import os
import re
import shutil
import subprocess
import sys

from tests.conftest import ROOT

DOCS = ("README.md", os.path.join("docs", "planner.md"))


def commands(path):
    blocks, block = [], None
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            if block is not None:
                blocks.append("".join(block))
            block = [] if block is None else None
        elif block is not None:
            block.append(line)
    out = []
    for text in blocks:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(("mindspeed-cp ", "DRY_RUN=1 bash scripts/")):
                out.append(line)
    return out


def test_every_cheap_documented_command_exits_0(tmp_path):
    found = {doc: commands(os.path.join(ROOT, doc)) for doc in DOCS}
    flat = [c for cs in found.values() for c in cs]
    for kind in (
        "mindspeed-cp groups",
        "mindspeed-cp check",
        "mindspeed-cp plan",
        "mindspeed-cp patches",
        "DRY_RUN=1 bash scripts/",
    ):
        assert any(c.startswith(kind) for c in found["README.md"]), f"README.md shows no `{kind}` command"
    for folder in ("scripts", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder)
    env = dict(
        os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], PYTHON=sys.executable
    )
    for key in ("CP", "TP", "NNODES", "GPUS_PER_NODE", "MEGATRON_LM_PATH", "DEVICE"):
        env.pop(key, None)
    failures = []
    for command in flat:
        res = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        if res.returncode != 0 or "Traceback" in res.stderr:
            failures.append(f"{command}\n  exit {res.returncode}: {res.stderr.strip()[-500:]}")
    assert not failures, "\n".join(failures)
