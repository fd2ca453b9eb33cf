"""``make bench-peers``: our algorithms next to what a user would pick instead, on the same gloo ranks and problems.

    python -m benchmarks.peers [--quick]        # -> benchmarks/results/peers.json, peers.md

Runs in its own venv (``.peers/venv``: torch 2.13.0 from the local CPU wheel, DeepSpeed with ``DS_BUILD_OPS=0``,
yunchang), built on first use (:func:`ensure_venv`); our package comes from this checkout (``PYTHONPATH``).

Systems (first version; yunchang's Ulysses / ring / USP are the next step, see issue 16's note):

* ``ours-ulysses`` - :class:`mindspeed_cp.ulysses.UlyssesContextAttention` around the plugin's local attention;
* ``deepspeed-ulysses`` - DeepSpeed's ``DistributedAttention`` as shipped (layout ``[s, b, h, d]``,
  ``scatter_idx=2, gather_idx=0``) around torch's SDPA (the same CPU flash kernel). Its first
  ``init_distributed()`` JIT-builds a shared-memory op (~1 min, cached in ``~/.cache/torch_extensions``);
* ``ours-ring`` - :func:`mindspeed_cp.ring.ring_attention` (zigzag);
* ``torch-ring`` - PyTorch's private ``_templated_ring_attention`` (+ backward) with the CPU flash op and its
  head-tail load balance (the same zigzag); its public ``context_parallel()`` has no CPU sharding strategy.

Per problem (P ranks, S tokens, heads/KV heads, fp32, causal): every system's output and gradients against
float64 full attention (max abs error / max abs reference), the bytes the busiest rank sends (one counted pass,
:class:`benchmarks.dispatch_bytes.CountBytes`, the same c10d-level meter for all), and time: rounds in which every
system runs forward + backward once in turn (interleaved), median over rounds of the slowest rank, and the ratio
to ours of the same algorithm within each round. A system that raises (crash, refusal) gets a row with its error.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
VENV = os.path.join(ROOT, ".peers", "venv")
PINS = ["torch==2.13.0", "deepspeed==0.19.8"]
ALGO = {"ours-ulysses": "ulysses", "deepspeed-ulysses": "ulysses", "ours-ring": "ring", "torch-ring": "ring"}

FULL = [dict(P=P, S=S, heads=8, kv_heads=kv) for P in (2, 4) for S in (2048, 8192) for kv in (8, 2)] + \
       [dict(P=4, S=4094, heads=8, kv_heads=8, unaligned=True)]
QUICK = [dict(P=2, S=256, heads=4, kv_heads=4), dict(P=4, S=254, heads=4, kv_heads=4, unaligned=True)]


# ----------------------------------------------------------------------------- the venv
def ensure_venv() -> str:
    python = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".stamp")
    if not os.path.exists(stamp):
        subprocess.run([sys.executable if sys.version_info[:2] == (3, 11) else "python3.11", "-m", "venv", VENV],
                       check=True)
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + [PINS[0]], check=True)
        with open(os.path.join(VENV, "constraints.txt"), "w") as f:
            f.write(PINS[0] + "\n")
        env = dict(os.environ, DS_BUILD_OPS="0")
        subprocess.run(pip + ["-c", os.path.join(VENV, "constraints.txt"), PINS[1], "numpy"], check=True, env=env)
        open(stamp, "w").close()
    return python


# ----------------------------------------------------------------------------- the systems (on every rank)
def _systems(P: int):
    """name -> fn(q, k, v, dout, S) -> (out, [dq, dk, dv]) on this rank's shard ``[s, b, h, d]``."""
    import torch
    import torch.distributed as dist

    group = dist.group.WORLD
    out = {}

    def ours_ulysses(q, k, v, dout, S):
        from mindspeed_cp.local import local_attention
        from mindspeed_cp.ulysses import UlyssesContextAttention

        class Size:
            def calculate(self, *a, **kw):
                return S

        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = UlyssesContextAttention(lambda a, b, c: local_attention(a, b, c, causal=True), group,
                                    gather_size_calculator=Size())(*leaves)
        o.backward(dout)
        return o.detach(), [t.grad for t in leaves]

    def deepspeed_ulysses(q, k, v, dout, S):
        from deepspeed.sequence.layer import DistributedAttention

        def local(a, b, c, *args, **kw):  # [S, b, h/P, d] -> SDPA ([b, h, S, d]); GQA by enable_gqa
            o = torch.nn.functional.scaled_dot_product_attention(
                a.permute(1, 2, 0, 3), b.permute(1, 2, 0, 3), c.permute(1, 2, 0, 3), is_causal=True,
                enable_gqa=a.shape[2] != b.shape[2])
            return o.permute(2, 0, 1, 3)

        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = DistributedAttention(local, group, scatter_idx=2, gather_idx=0)(*leaves, batch_dim_idx=1)
        o.backward(dout)
        return o.detach(), [t.grad for t in leaves]

    from .ring_overhead import ours_ring, torch_ring  # the ring pair, shared with benchmarks/ring_overhead.py

    out.update({"ours-ulysses": ours_ulysses, "deepspeed-ulysses": deepspeed_ulysses,
                "ours-ring": lambda q, k, v, dout, S: ours_ring(group, q, k, v, dout),
                "torch-ring": lambda q, k, v, dout, S: torch_ring(group, q, k, v, dout)})
    return out


def _layout(algo: str, S: int, P: int, r: int):
    import torch

    from mindspeed_cp.ring import zigzag_index

    if algo == "ring":
        if S % (2 * P):
            raise ValueError(f"S={S} is not a multiple of 2 x {P} (zigzag)")
        return zigzag_index(S, P, r)
    return torch.tensor_split(torch.arange(S), P)[r]


def _setup(pb: dict, name: str):
    """This rank's inputs for ``pb`` in the layout of system ``name``, the float64 reference (for this rank's
    tokens) and the system's function."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from tests.attention_ref import reference_attention

    if not getattr(_setup, "ds", False):
        deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over the launcher's gloo group
        torch.set_num_threads(1)
        _setup.ds = True
    S, h, hk = pb["S"], pb["heads"], pb["kv_heads"]
    d = 64 if S > 512 else 16
    g = torch.Generator().manual_seed(S + hk)
    full = [torch.randn(S, 1, n, d, generator=g, dtype=torch.float64) for n in (h, hk, hk, h)]
    idx = _layout(ALGO[name], S, dist.get_world_size(), dist.get_rank())
    q, k, v, dout = (t[idx].float().contiguous() for t in full)
    return (q, k, v, dout, S), full, idx, _systems(dist.get_world_size())[name]


def _probe(pb: dict, name: str) -> dict:
    """Exactness and bytes of one system on one problem (its own processes: a peer's crash stays its own)."""
    import torch

    from tests.attention_ref import reference_attention

    from .dispatch_bytes import CountBytes

    args, full, idx, fn = _setup(pb, name)
    # float64 reference one query head at a time (S x S per head: 0.5 GB at S = 8192), gradients accumulated
    leaves = [t.clone().requires_grad_() for t in full[:3]]
    h, hk = full[0].shape[2], full[1].shape[2]
    outs = []
    for i in range(h):
        j = i // (h // hk)  # the KV head query head i uses
        o = reference_attention(leaves[0][:, :, i:i + 1], leaves[1][:, :, j:j + 1], leaves[2][:, :, j:j + 1], causal=True)
        (o * full[3][:, :, i:i + 1]).sum().backward()
        outs.append(o.detach())
    want = [torch.cat(outs, 2)] + [t.grad for t in leaves]
    with CountBytes() as meter:
        got = fn(*args)
    errs = [float((a.double() - b[idx]).abs().max() / b.abs().max()) for a, b in zip([got[0]] + got[1], want)]
    return {"error": max(errs), "sent": meter.total, "sent_by_op": dict(meter.by_op), "unknown": dict(meter.unknown)}


def _time(pb: dict, names: List[str], rounds: int) -> dict:
    """Interleaved rounds: every system once per round, in turn; per-system wall times on this rank."""
    import torch.distributed as dist

    runs = {name: _setup(pb, name) for name in names}
    for _, (args, _, _, fn) in runs.items():
        fn(*args)  # warm-up
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name, (args, _, _, fn) in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- driver
def _inside(problems, rounds, out_dir) -> int:
    sys.path[:0] = [ROOT]
    from .launch import launch

    records = []
    for pb in problems:
        rows = []
        for name in ALGO:
            if pb.get("unaligned") and ALGO[name] == "ring":
                continue  # attention-level rings take zigzag shards (2P equal chunks); Megatron pads the batch
            rec = dict(pb, system=name, algo=ALGO[name])
            res = launch(pb["P"], _probe, pb, name, timeout=1800)
            if res.ok:
                rec.update(error=max(r["error"] for r in res.results), sent=max(r["sent"] for r in res.results),
                           sent_by_op=res.results[0]["sent_by_op"], unknown_ops=res.results[0]["unknown"])
                if rec["error"] > 1e-4:
                    rec["failed"] = f"wrong result: error {rec['error']:.2e} against float64"
            else:
                rec["failed"] = "; ".join(list(dict.fromkeys(e.splitlines()[0][:240] for e in res.errors))[:2])
            rows.append(rec)
        live = [r["system"] for r in rows if "failed" not in r]
        res = launch(pb["P"], _time, pb, live, rounds, timeout=3600)
        if not res.ok:
            print("\n".join(res.errors), file=sys.stderr)
            return 1
        for rec in rows:
            if rec["system"] in live:
                rec["round_s"] = [max(rk[rec["system"]][j] for rk in res.results) for j in range(rounds)]
                rec["time_s"] = statistics.median(rec["round_s"])
        for rec in rows:  # ratio to ours of the same algorithm, within each round
            ours = next((o for o in rows if o["system"] == f"ours-{rec['algo']}" and "round_s" in o), None)
            if ours is not None and "round_s" in rec:
                rec["time_ratio_to_ours"] = statistics.median(a / b for a, b in zip(rec["round_s"], ours["round_s"]))
                rec["sent_ratio_to_ours"] = rec["sent"] / ours["sent"] if ours["sent"] else None
        records += rows
        print(f"  P={pb['P']} S={pb['S']} heads {pb['heads']}/{pb['kv_heads']}: " + ", ".join(
            f"{r['system']} {'failed' if 'failed' in r else format(r.get('time_ratio_to_ours', 0), '.3f')}"
            for r in rows), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "peers.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out_dir, "peers.md"), "w") as f:
        f.write(markdown(records))
    print(markdown(records))
    return 0


def markdown(records: List[dict]) -> str:
    lines = ["# Peers side by side (CPU, gloo, one thread per rank, fp32, causal)", "",
             "error = max |out, dq, dk, dv - float64| / max |float64|; sent = bytes the busiest rank sends, forward + "
             "backward (c10d-level meter, the same for every system); time = median over interleaved rounds of the "
             "slowest rank; ratios to ours (same algorithm, problem, round).", "",
             "| P | S | heads q/kv | system | error | sent MiB | sent / ours | time ms | time / ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = f"| {r['P']} | {r['S']}{' (unaligned)' if r.get('unaligned') else ''} | {r['heads']}/{r['kv_heads']} " \
               f"| {r['system']} "
        if "failed" in r:
            lines.append(head + f"| **failed**: {r['failed']} | | | | |")
            continue
        lines.append(head + f"| {r['error']:.1e} | {r['sent'] / 2**20:.2f} | {r.get('sent_ratio_to_ours') or 0:.3f} "
                            f"| {1e3 * r['time_s']:.0f} | {r.get('time_ratio_to_ours', 0):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    problems, rounds = (QUICK, args.rounds or 1) if args.quick else (FULL, args.rounds or 7)
    if args.inside:
        return _inside(problems, rounds, args.out)
    python = ensure_venv()
    cmd = [python, "-m", "benchmarks.peers", "--inside", "--rounds", str(rounds), "--out", args.out]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, PYTHONPATH=ROOT, DS_BUILD_OPS="0", DS_ACCELERATOR="cpu")
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
