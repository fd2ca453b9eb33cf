"""``make demo-megatron-lm``: Megatron-LM's real ``pretrain_gpt.py`` trained with each CP algorithm, vs CP=1.

    MEGATRON_LM_PATH=/path/to/Megatron-LM python -m mindspeed_cp.tools.demo_megatron_lm [--ranks 4] [--iters 5]

Each run is ``torchrun --nproc-per-node R -m mindspeed_cp.launch pretrain_gpt.py ...`` - Megatron-LM's own
training loop (``pretrain``: DDP, optimizer, schedules, timers, logging) on gloo ranks, with a tiny GPT and
mock data, the same seed and the same global batch. CP=1 runs the R ranks as data parallelism; every CP run
uses them as one CP group of R. The losses and grad norms come from ``$MINDSPEED_CP_METRICS`` (each iteration at
full precision), so the table compares like with like. Exits 1 if any run differs from CP=1 by more than
``--tolerance``.

:func:`run_pretrain_gpt` is the one way this package (demo, tests) starts Megatron-LM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..ranks import free_port

# A tiny GPT that Megatron-LM trains on a CPU in seconds: RoPE, GQA, fp32, no dropout (so CP=1 and CP runs
# draw nothing random after initialisation), mock data; argparse takes the last value, so callers append.
# --adam-eps 1e-5: with Megatron's 1e-8, Adam's m / (sqrt(v) + eps) turns float32 rounding in gradients near
# zero into full +-lr steps, so two exact runs drift apart by ~1e-6 in grad norm after one step whatever CP does.
TINY_GPT = [
    "--num-layers",
    "2",
    "--hidden-size",
    "128",
    "--ffn-hidden-size",
    "512",
    "--num-attention-heads",
    "8",
    "--group-query-attention",
    "--num-query-groups",
    "4",
    "--seq-length",
    "512",
    "--max-position-embeddings",
    "512",
    "--position-embedding-type",
    "rope",
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "4",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-4",
    "--lr-decay-style",
    "cosine",
    "--weight-decay",
    "0.01",
    "--clip-grad",
    "1.0",
    "--adam-eps",
    "1e-5",
    "--attention-dropout",
    "0.0",
    "--hidden-dropout",
    "0.0",
    "--init-method-std",
    "0.02",
    "--seed",
    "1234",
    "--transformer-impl",
    "local",
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--vocab-size",
    "256",
    "--log-interval",
    "1",
    "--eval-interval",
    "1000",
    "--eval-iters",
    "0",
    # torch.compile of Megatron's JIT fusions costs ~20 s per run on a small CPU and changes nothing here
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
]

RUNS = [  # (label, pretrain_gpt.py flags); CP = --ranks for every run but the reference
    ("CP=1 (reference)", []),
    ("ulysses", ["--context-parallel-algo", "ulysses_cp_algo"]),
    ("ring", ["--context-parallel-algo", "megatron_cp_algo", "--use-cp-send-recv-overlap"]),
    ("double ring", ["--context-parallel-algo", "megatron_cp_algo", "--cp-window-size", "2"]),
    ("hybrid", ["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2"]),
    ("kv all-gather", ["--context-parallel-algo", "kvallgather_cp_algo"]),
]


class PretrainError(RuntimeError):
    """pretrain_gpt.py exited with an error: the message ends with the tail of its output."""


@dataclass
class Run:
    """One finished ``pretrain_gpt.py`` run: every logged iteration (``$MINDSPEED_CP_METRICS`` records)."""

    records: List[dict]
    output: str
    seconds: float
    losses: List[float] = field(init=False)
    grad_norms: List[Optional[float]] = field(init=False)

    def __post_init__(self) -> None:
        self.losses = [r["losses"].get("lm loss") for r in self.records]
        self.grad_norms = [r["grad_norm"] for r in self.records]

    def seconds_per_iteration(self) -> Optional[float]:
        """Mean wall time between logged iterations after the first (which includes warm-up)."""
        times = [r["time"] for r in self.records]
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def run_pretrain_gpt(
    nproc: int,
    flags: Sequence[str],
    *,
    megatron_lm_path: Optional[str] = None,
    script: str = "pretrain_gpt.py",
    cwd: Optional[str] = None,
    timeout: float = 1800,
    env: Optional[Dict[str, str]] = None,
) -> Run:
    """``torchrun --nproc-per-node nproc -m mindspeed_cp.launch SCRIPT FLAGS`` on this machine; returns its records.

    ``SCRIPT`` is found in ``megatron_lm_path`` (default ``$MEGATRON_LM_PATH``). One thread per rank.
    """
    root = megatron_lm_path or os.environ.get("MEGATRON_LM_PATH")
    if not root:
        raise PretrainError("set MEGATRON_LM_PATH to a Megatron-LM checkout (core_v0.16.1)")
    with tempfile.TemporaryDirectory(prefix="mindspeed-cp-") as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        full_env = dict(
            os.environ,
            MEGATRON_LM_PATH=root,
            MINDSPEED_CP_METRICS=metrics,
            OMP_NUM_THREADS="1",
            CUDA_DEVICE_MAX_CONNECTIONS="1",
            PYTHONWARNINGS="ignore",
            **(env or {}),
        )
        full_env.pop("PYTHONPATH", None)  # nothing may put the checkout before site-packages
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            "-m",
            "mindspeed_cp.launch",
            script,
            *flags,
        ]
        start = time.time()
        res = subprocess.run(cmd, cwd=cwd or tmp, env=full_env, capture_output=True, text=True, timeout=timeout)
        seconds = time.time() - start
        output = res.stdout + res.stderr
        if res.returncode != 0:
            first = next(
                (line for line in output.splitlines() if re.match(r"\[rank\d+\]: \w*(Error|Exception)\b", line)), ""
            )
            raise PretrainError(f"{script} exited with {res.returncode}: {first}\n{output[-6000:]}")
        records = []
        if os.path.exists(metrics):
            with open(metrics, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
    return Run(records=records, output=output, seconds=seconds)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mindspeed_cp.tools.demo_megatron_lm", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--ranks", type=int, default=4, help="gloo ranks (= CP size of the CP runs)")
    p.add_argument("--iters", type=int, default=5, help="training iterations per run")
    p.add_argument("--tolerance", type=float, default=2e-6, help="largest allowed |loss - loss at CP=1|")
    p.add_argument("--only", nargs="*", help="labels of the runs to do (default: all)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not os.environ.get("MEGATRON_LM_PATH"):
        print("demo-megatron-lm: set MEGATRON_LM_PATH to a Megatron-LM core_v0.16.1 checkout", file=sys.stderr)
        return 2
    runs = [r for r in RUNS if not args.only or r[0] in args.only or r[0] == RUNS[0][0]]
    results = []
    for label, flags in runs:
        cp = 1 if not flags else args.ranks
        print(f"[demo-megatron-lm] {label}: pretrain_gpt.py on {args.ranks} gloo ranks, CP={cp} ...", flush=True)
        run = run_pretrain_gpt(
            args.ranks, [*TINY_GPT, "--train-iters", str(args.iters), "--context-parallel-size", str(cp), *flags]
        )
        if len(run.losses) != args.iters:
            print(
                f"[demo-megatron-lm] {label}: {len(run.losses)} iterations logged, expected {args.iters}",
                file=sys.stderr,
            )
            return 1
        results.append((label, run))
    ref = results[0][1]
    head = "".join(f"  iter {i + 1:<6}" for i in range(args.iters))
    print(f"\n{'run':<18}{head}  max|Δloss|  max|Δgrad norm|  s/iter")
    ok = True
    for label, run in results:
        dl = max(abs(a - b) for a, b in zip(run.losses, ref.losses))
        dg = max(abs(a - b) for a, b in zip(run.grad_norms, ref.grad_norms))
        ok &= dl <= args.tolerance and dg <= args.tolerance
        per = run.seconds_per_iteration()
        print(
            f"{label:<18}"
            + "".join(f"  {x:<11.7f}" for x in run.losses)
            + f"  {dl:9.2e}  {dg:14.2e}  {per if per is not None else float('nan'):6.2f}"
        )
    print("Every CP run matches CP=1" if ok else f"Some run differs from CP=1 by more than {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
