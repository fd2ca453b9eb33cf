"""``make gpu-check`` (benchmarks/gpu_check.py): without a GPU it says so and exits 0; its tables are built and
checked here on the CPU (``--device cpu``, tiny sizes) - the GPU run itself needs a GPU."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu-check would run for real")
def test_without_a_gpu_it_says_so_and_exits_0():
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "no GPU" in res.stdout


def test_tables_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    page = out.read_text()
    assert "### 1. Kernels vs float64" in page and "### 3. Ulysses' local attention" in page
    rows = [line for line in page.splitlines() if line.startswith("| torch | float32 |")]
    assert {r.split("|")[3].strip() for r in rows} == {"causal", "mask", "gqa", "dropout", "mla", "mla-mask", "mla-gqa"}
    for r in rows:  # every fp32 error below 1e-5, and the route each call took is named
        cells = [c.strip() for c in r.split("|")]
        assert all(float(x) < 1e-5 for x in cells[4:8]), r
        assert "forward:" in cells[9] and "backward:" in cells[9], r
    assert "### 5. All-gather K/V on one device" in page
    gathered = [line for line in page.splitlines() if line.startswith("| 256 | 4 | float32 |")]
    assert len(gathered) == 1, page  # every rank's tiles emulated: out, dq, dk, dv against float64
    assert all(float(x) < 1e-5 for x in [c.strip() for c in gathered[0].split("|")][5:9]), gathered
    # 4. windows and sinks: every case, fp32 out/dq/dk/dv/dsink below 1e-5 (dsink only where there is a sink)
    assert "### 4. Sliding windows and sinks" in page
    rows = [line for line in page.splitlines() if line.startswith("| float32 |")]
    cases = {r.split("|")[2].strip(): [c.strip() for c in r.split("|")] for r in rows}
    assert set(cases) == {"window", "two-sided", "off-by-one", "learnable", "window+learnable"}, set(cases)
    for case, cells in cases.items():
        errs = [float(x) for x in cells[4:9] if x != "-"]
        assert len(errs) == (5 if case in ("off-by-one", "learnable", "window+learnable") else 4), cells
        assert all(e < 1e-5 for e in errs), cells


def test_kernel_table_names_the_routes():
    from benchmarks.gpu_check import kernel_table

    rows = {(r["kernel"], r["dtype"], r["case"]): r for r in kernel_table(torch.device("cpu"), quick=True)}
    assert "forward:cpu" in rows[("torch", "float32", "causal")]["routes"]
    assert "math (dropout" in rows[("torch", "float32", "dropout")]["routes"]
