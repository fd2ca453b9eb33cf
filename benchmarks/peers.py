"""``make bench-peers``: our algorithms next to what a user would pick instead, on the same gloo ranks and problems.

    python -m benchmarks.peers [--quick]   # -> benchmarks/results/peers.json, peers.md (quick: test-artifacts/)
    python -m benchmarks.peers --algo kvallgather [--out DIR]   # one algorithm's systems (its rows replaced)

Runs in its own venv (``.peers/venv``: torch 2.13.0 from the local CPU wheel, DeepSpeed with ``DS_BUILD_OPS=0``,
yunchang without flash-attn), built on first use (:func:`ensure_venv`); our package comes from this checkout
(``PYTHONPATH``).

Systems (:mod:`benchmarks.peer_systems`, which says exactly what each adapter changes): Ulysses - ours,
DeepSpeed's ``DistributedAttention``, yunchang's ``UlyssesAttention``; Ring - ours, PyTorch's private ring
(its public ``context_parallel()`` has no CPU sharding strategy in 2.13), yunchang's zigzag ring (as shipped and
a fixed copy); Hybrid (P >= 4, U = 2) - ours, yunchang's USP ``LongContextAttention`` (as shipped and fixed);
all-gather K/V - ours (``kvallgather_cp_algo``), PyTorch's private function with its all-gather rotater,
ring-flash-attn's ``llama3_flash_attn_varlen_func`` (its flash-attn calls on the CPU flash op; contiguous shards).

Per problem (P ranks, S tokens, heads / KV heads, dtype, causal):

1. the float64 reference of the whole sequence, once, in this process (:func:`reference`, cached);
2. a probe launch: every system in turn, its output and gradients against the reference and the bytes its
   busiest rank sends (one pass under :class:`benchmarks.dispatch_bytes.CountBytes`); a system that raises
   (crash, refusal) or is wrong gets a row with its error and is not timed (:func:`_probe_all`);
3. a timing launch: rounds in which every exact system runs forward + backward once, in turn (interleaved, in a
   new random order every round, so that no system always follows the same one);
   per system the median over rounds of the summed CPU time and of the slowest rank's wall time, and the
   ratio ours / system within each round.

Results are written after every problem, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import List

from mindspeed_cp.ranks import launch

from .peer_systems import ALGO, FIXED, LAYOUT, ULYSSES_DEGREE, Groups, layout, system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
VENV = os.path.join(ROOT, ".peers", "venv")
REF = os.path.join(ROOT, ".peers", "ref")
TORCH, PEERS = "torch==2.13.0", ["deepspeed==0.19.8"]
# their only dependency besides torch is flash-attn (CUDA); the adapters replace the calls they make
NO_DEPS = ["yunchang==0.6.4", "ring-flash-attn==0.1.8"]
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # max |error| / max |float64| beyond which a result is wrong

FULL = (
    [dict(P=P, S=S, heads=8, kv_heads=kv) for P in (2, 4) for S in (2048, 8192) for kv in (8, 2)]
    + [dict(P=4, S=4094, heads=8, kv_heads=8, unaligned=True)]
    + [dict(P=P, S=2048, heads=8, kv_heads=8, dtype="bfloat16") for P in (2, 4)]
)
QUICK = [
    dict(P=2, S=256, heads=4, kv_heads=4),
    dict(P=4, S=256, heads=4, kv_heads=2),
    dict(P=4, S=254, heads=4, kv_heads=4, unaligned=True),
    dict(P=4, S=256, heads=4, kv_heads=4, dtype="bfloat16"),
]


# ----------------------------------------------------------------------------- the venv
def ensure_venv() -> str:
    """``.peers/venv``: torch from the local CPU wheel (pinned by constraints, so no peer pulls a CUDA build),
    DeepSpeed without its ops, yunchang without flash-attn. Rebuilt only when the pins change."""
    python = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".stamp")
    want = " ".join([TORCH] + PEERS + NO_DEPS)
    if os.path.exists(stamp) and open(stamp).read() == want:
        return python
    if not os.path.exists(python):
        subprocess.run(
            [sys.executable if sys.version_info[:2] == (3, 11) else "python3.11", "-m", "venv", VENV], check=True
        )
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [TORCH], check=True)
    constraints = os.path.join(VENV, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(TORCH + "\n")
    env = dict(os.environ, DS_BUILD_OPS="0")
    subprocess.run(pip + ["-c", constraints] + PEERS + ["numpy"], check=True, env=env)
    subprocess.run(pip + ["-c", constraints, "--no-deps"] + NO_DEPS, check=True)
    with open(stamp, "w") as f:
        f.write(want)
    return python


# ----------------------------------------------------------------------------- problems and references
def _key(pb: dict) -> str:
    return f"S{pb['S']}-h{pb['heads']}-kv{pb['kv_heads']}-{pb.get('dtype', 'float32')}"


def _inputs(pb: dict):
    """q, k, v, dout of the whole sequence ``[S, 1, h, d]`` in float64, rounded to the problem's dtype (so the
    reference sees exactly what the systems see)."""
    import torch

    S, h, hk = pb["S"], pb["heads"], pb["kv_heads"]
    d = 64 if S > 512 else 16
    g = torch.Generator().manual_seed(S + hk)
    dtype = getattr(torch, pb.get("dtype", "float32"))
    return [torch.randn(S, 1, n, d, generator=g, dtype=torch.float64).to(dtype).double() for n in (h, hk, hk, h)]


def reference(pb: dict) -> list:
    """float64 out, dq, dk, dv of the whole sequence (causal), computed once per problem in the driver, one query
    head at a time (S x S per head: 0.5 GB at S = 8192), cached in ``.peers/ref/``."""
    import torch

    from tests.attention_ref import reference_attention

    path = os.path.join(REF, _key(pb) + ".pt")
    if os.path.exists(path):
        return torch.load(path, mmap=True)
    full = _inputs(pb)
    leaves = [t.clone().requires_grad_() for t in full[:3]]
    h, hk = full[0].shape[2], full[1].shape[2]
    outs = []
    for i in range(h):
        j = i // (h // hk)  # the KV head query head i uses
        o = reference_attention(
            leaves[0][:, :, i : i + 1], leaves[1][:, :, j : j + 1], leaves[2][:, :, j : j + 1], causal=True
        )
        (o * full[3][:, :, i : i + 1]).sum().backward()
        outs.append(o.detach())
    want = [torch.cat(outs, 2)] + [t.grad for t in leaves]
    os.makedirs(REF, exist_ok=True)
    torch.save(want, path + ".tmp")
    os.replace(path + ".tmp", path)
    return want


def systems_for(pb: dict) -> List[str]:
    """The systems that take problem ``pb``: Ring / Hybrid need 2 x ring-size equal chunks (an unaligned length
    goes to Ulysses only; Megatron pads the batch for the rings), Hybrid needs P >= 4 (U = 2 x R >= 2)."""
    names = []
    for name, algo in ALGO.items():
        if algo != "ulysses" and pb.get("unaligned"):
            continue
        if algo == "hybrid" and pb["P"] < 2 * ULYSSES_DEGREE:
            continue
        names.append(name)
    return names


def _setup(pb: dict, groups):
    import torch
    import torch.distributed as dist

    if not getattr(_setup, "ready", False):
        import deepspeed

        # DeepSpeed's comm layer over the launcher's gloo group, without building its CPU shared-memory all-reduce
        # op (a minute of JIT compilation on first use): DistributedAttention never uses it, its all-to-alls go
        # through torch.distributed. (``deepspeed.comm.torch`` as an attribute is torch itself: sys.modules.)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        torch.set_num_threads(1)
        _setup.ready = True
    dtype = getattr(torch, pb.get("dtype", "float32"))
    full = _inputs(pb)

    def shard(name):
        idx = layout(LAYOUT.get(name, ALGO[name]), pb["S"], dist.get_world_size(), dist.get_rank())
        return idx, [t[idx].to(dtype).contiguous() for t in full]

    return shard


# ----------------------------------------------------------------------------- on every rank
def _probe(pb: dict, names: List[str]) -> bool:
    """Exactness and bytes of each system in turn (one pass each under :class:`CountBytes`). After each system
    every rank's record goes to every rank (``all_gather_object``) and rank 0 reports it (:func:`progress`): a
    system that fails on some ranks only leaves its peers waiting, the launcher kills them, and the driver
    relaunches with the systems after it."""
    import torch.distributed as dist

    from mindspeed_cp.ranks import progress

    from .dispatch_bytes import CountBytes

    groups = Groups(pb["S"])
    shard = _setup(pb, groups)
    want = reference(pb)
    for name in names:
        try:
            idx, args = shard(name)
            with CountBytes() as meter:
                out, grads = system(name, groups)(*args)
            errs = [float((a.double() - b[idx]).abs().max() / b.abs().max()) for a, b in zip([out] + grads, want)]
            rec = {
                "error": max(errs),
                "errors": errs,
                "sent": meter.total,
                "sent_by_op": dict(meter.by_op),
                "unknown": dict(meter.unknown),
            }
        except Exception as e:  # noqa: BLE001 - a peer's refusal is a row of the table
            rec = {"failed": f"rank {dist.get_rank()}: {type(e).__name__}: {str(e).splitlines()[0][:240]}"}
        recs = [None] * dist.get_world_size()
        dist.all_gather_object(recs, rec)
        progress((name, recs))
    return True


def _time(pb: dict, names: List[str], rounds: int) -> dict:
    """Interleaved rounds: every system once per round, in turn; per system this rank's wall and CPU times."""
    import torch.distributed as dist

    groups = Groups(pb["S"])
    shard = _setup(pb, groups)
    runs = {name: (system(name, groups), shard(name)[1]) for name in names}
    for fn, args in runs.values():
        fn(*args)  # warm-up
    times = {name: {"wall": [], "cpu": []} for name in names}
    order = list(runs.items())
    for i in range(rounds):  # a new order every round (the same on every rank): no system always follows another
        random.Random(i).shuffle(order)
        for name, (fn, args) in order:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(*args)
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


# ----------------------------------------------------------------------------- driver
def _merge(recs: List[dict], dtype: str) -> dict:
    """One record from every rank's: the worst error, the busiest rank's bytes, the first failure."""
    failed = [r["failed"] for r in recs if "failed" in r]
    if failed:
        return {"failed": "; ".join(list(dict.fromkeys(failed))[:2])}
    rec = {
        "error": max(r["error"] for r in recs),
        "sent": max(r["sent"] for r in recs),
        "sent_by_op": recs[0]["sent_by_op"],
        "unknown_ops": recs[0]["unknown"],
    }
    if rec["error"] > TOLERANCE[dtype]:
        rec["failed"] = f"wrong result: error {rec['error']:.2e} against float64 (tolerance {TOLERANCE[dtype]:.0e})"
    return rec


def _probe_all(pb: dict, names: List[str]) -> dict:
    """Every system's probe record; a launch that dies is resumed after the system that killed it."""
    done, todo = {}, list(names)
    while todo:
        res = launch(pb["P"], _probe, pb, todo, timeout=1800)
        for name, recs in res.progress:
            done[name] = _merge(recs, pb.get("dtype", "float32"))
        todo = [n for n in todo if n not in done]
        if not res.ok and todo:  # the first unfinished system took the launch down
            done[todo[0]] = {
                "failed": "; ".join(
                    list(
                        dict.fromkeys(
                            e.splitlines()[0][:240]
                            for e in res.errors
                            if "did not finish" not in e or len(res.errors) == 1
                        )
                    )[:2]
                )
            }
            todo = todo[1:]
    return done


def _ratios(rows: List[dict]) -> None:
    """ours / this system of the same algorithm, wall and CPU time, within each round (median over rounds)."""
    for rec in rows:
        ours = next((o for o in rows if o["system"] == f"ours-{rec['algo']}" and "wall_s" in o), None)
        if ours is None or "wall_s" not in rec:
            continue
        for kind in ("wall", "cpu"):
            rec[f"ours_over_{kind}"] = statistics.median(
                a / b for a, b in zip(ours[f"{kind}_rounds"], rec[f"{kind}_rounds"])
            )
        rec["sent_over_ours"] = rec["sent"] / ours["sent"] if ours["sent"] else None


def _timed(name: str, probed: dict) -> bool:
    """Exact systems are timed; a peer's fixed copy only where the peer as shipped fails or is wrong."""
    if "failed" in probed[name]:
        return False
    shipped = FIXED.get(name)
    return shipped is None or "failed" in probed.get(shipped, {"failed": "not run"})


def _kept(out_dir: str, algos) -> List[dict]:
    """With ``--algo``: the other algorithms' records already in ``out_dir/peers.json`` (a run of one algorithm
    replaces its own rows and keeps the rest)."""
    path = os.path.join(out_dir, "peers.json")
    if not algos or not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in json.load(f)["records"] if r["algo"] not in algos]


def _inside(problems, rounds, out_dir, algos=None) -> int:
    sys.path[:0] = [ROOT]
    kept, records = _kept(out_dir, algos), []
    for pb in problems:
        t0 = time.monotonic()
        reference(pb)  # once, here (2 threads), before any rank needs it
        names = [n for n in systems_for(pb) if not algos or ALGO[n] in algos]
        probed = _probe_all(pb, names)
        rows = [dict(pb, system=n, algo=ALGO[n], **probed[n]) for n in names]
        live = [n for n in names if _timed(n, probed)]
        n = rounds * (3 if pb["S"] <= 4096 else 1)  # short problems: more rounds for the same noise (cheap)
        res = launch(pb["P"], _time, pb, live, n, timeout=3600)
        if not res.ok:
            print("\n".join(res.errors), file=sys.stderr)
            return 1
        for rec in rows:
            if rec["system"] in live:
                name = rec["system"]
                rec["wall_rounds"] = [max(rk[name]["wall"][j] for rk in res.results) for j in range(n)]
                rec["cpu_rounds"] = [sum(rk[name]["cpu"][j] for rk in res.results) for j in range(n)]
                rec["wall_s"] = statistics.median(rec["wall_rounds"])
                rec["cpu_s"] = statistics.median(rec["cpu_rounds"])
        _ratios(rows)
        records += rows
        print(
            f"  P={pb['P']} S={pb['S']} heads {pb['heads']}/{pb['kv_heads']} {pb.get('dtype', 'float32')} "
            f"({time.monotonic() - t0:.0f} s): "
            + ", ".join(
                f"{r['system']} {'failed' if 'failed' in r else format(r.get('ours_over_cpu', 0), '.3f')}" for r in rows
            ),
            flush=True,
        )
        _write(kept + records, out_dir, rounds)  # after every problem: a stopped run keeps what it measured
    print(markdown(records, rounds))
    return 0


def _write(records: List[dict], out_dir: str, rounds: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "peers.json"), "w") as f:
        json.dump({"rounds": rounds, "records": records}, f, indent=1)
    with open(os.path.join(out_dir, "peers.md"), "w") as f:
        f.write(markdown(records, rounds))


def _problem(r: dict) -> str:
    return (
        f"{r['P']} | {r['S']}{' (unaligned)' if r.get('unaligned') else ''} | {r['heads']}/{r['kv_heads']} | "
        f"{r.get('dtype', 'float32')}"
    )


def summary(records: List[dict]) -> List[dict]:
    """Per problem and algorithm: ours against the fastest exact peer (by CPU time; a fixed copy of a peer counts
    only where the peer as shipped is wrong or fails, and is named so)."""
    out = []
    keys = list(dict.fromkeys((_problem(r), r["algo"]) for r in records))
    for key in keys:
        rows = [r for r in records if (_problem(r), r["algo"]) == key]
        ours = next((r for r in rows if r["system"].startswith("ours-")), None)
        peers = [r for r in rows if not r["system"].startswith("ours-") and "cpu_s" in r]
        if ours is None or "cpu_s" not in ours:
            continue
        failed = [f"{r['system']}: {r['failed']}" for r in rows if "failed" in r]
        if not peers:  # every peer refused, crashed or was wrong
            out.append(
                {
                    "problem": key[0],
                    "algo": key[1],
                    "peer": None,
                    "ours_error": ours["error"],
                    "ours_sent": ours["sent"],
                    "failed": failed,
                }
            )
            continue
        best = max(peers, key=lambda r: r["ours_over_cpu"])
        out.append(
            {
                "problem": key[0],
                "algo": key[1],
                "peer": best["system"],
                "ours_over_cpu": best["ours_over_cpu"],
                "ours_over_wall": best["ours_over_wall"],
                "ours_error": ours["error"],
                "peer_error": best["error"],
                "ours_sent": ours["sent"],
                "fewest_peer_sent": min(r["sent"] for r in peers),
                "failed": failed,
            }
        )
    return out


def markdown(records: List[dict], rounds: int) -> str:
    lines = [
        "# Peers side by side (CPU, gloo, one thread per rank, causal)",
        "",
        "Written by `make bench-peers` (benchmarks/peers.py; adapters and what they change: "
        "benchmarks/peer_systems.py). error = max |out, dq, dk, dv - float64| / max |float64| (the reference "
        "computed from the same rounded inputs); sent = bytes the busiest rank sends, forward + backward "
        "(c10d-level meter, the same for every system); time = forward + backward, median over "
        f"{rounds} interleaved rounds ({3 * rounds} for S <= 4096), each in a new order: CPU = summed "
        "over ranks, wall = the slowest rank; "
        "ours / peer = the median over rounds of the ratio within the round (< 1: ours is faster). "
        "`-fixed`: a peer's copy with the bug we found fixed (timed only in rows so labelled).",
        "",
        "## Ours against the fastest exact peer",
        "",
        "| P | S | heads q/kv | dtype | algorithm | fastest exact peer | ours / peer, CPU | ours / peer, wall "
        "| sent ours / fewest peer | failed or wrong |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(records):
        failed = "; ".join(f[:160] for f in s["failed"]) or "-"
        if s["peer"] is None:
            lines.append(f"| {s['problem']} | {s['algo']} | **no exact peer** | | | | {failed} |")
            continue
        lines.append(
            f"| {s['problem']} | {s['algo']} | {s['peer']} | {s['ours_over_cpu']:.3f} | "
            f"{s['ours_over_wall']:.3f} | {s['ours_sent'] / s['fewest_peer_sent']:.3f} | {failed} |"
        )
    lines += [
        "",
        "## Every system",
        "",
        "| P | S | heads q/kv | dtype | system | error | sent MiB | sent / ours | CPU ms | wall ms "
        "| ours / this, CPU | ours / this, wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        head = f"| {_problem(r)} | {r['system']} "
        if "failed" in r:
            err = f"{r['error']:.1e}" if "error" in r else ""
            lines.append(head + f"| {err} **{r['failed']}** | | | | | | |")
            continue
        if "cpu_s" not in r:
            lines.append(head + f"| {r['error']:.1e} | {r['sent'] / 2**20:.2f} | | | | | |")
            continue
        lines.append(
            head + f"| {r['error']:.1e} | {r['sent'] / 2**20:.2f} | {r.get('sent_over_ours') or 0:.3f} "
            f"| {1e3 * r['cpu_s']:.0f} | {1e3 * r['wall_s']:.0f} | {r.get('ours_over_cpu', 0):.3f} "
            f"| {r.get('ours_over_wall', 0):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None, help="default: benchmarks/results (quick: test-artifacts)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--algo", action="append", choices=sorted(set(ALGO.values())), help="only these (repeatable)")
    args = ap.parse_args(argv)
    problems, rounds = (QUICK, args.rounds or 1) if args.quick else (FULL, args.rounds or 9)
    args.out = args.out or os.path.join(ROOT, "test-artifacts" if args.quick else os.path.join("benchmarks", "results"))
    if args.inside:
        return _inside(problems, rounds, args.out, args.algo)
    python = ensure_venv()
    cmd = [python, "-m", "benchmarks.peers", "--inside", "--rounds", str(rounds), "--out", args.out]
    cmd += [f"--algo={a}" for a in args.algo or []]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, PYTHONPATH=ROOT, DS_BUILD_OPS="0", DS_ACCELERATOR="cpu")
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc == 0:
        with open(os.path.join(args.out, "peers.json")) as f:
            print("wrote", plot(json.load(f)["records"], os.path.join(args.out, "peers.png")))
    return rc


def plot(records: List[dict], path: str) -> str:
    """ours / fastest exact peer (CPU time) per problem and algorithm, one bar each (this venv's matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary(records) if s["peer"]]
    colors = {"ulysses": "tab:blue", "ring": "tab:orange", "hybrid": "tab:green", "kvallgather": "tab:red"}
    fig, ax = plt.subplots(figsize=(11, 4.2))
    labels = [
        f"{s['problem'].replace(' | ', ' ').replace('float32', 'fp32').replace('bfloat16', 'bf16')}\n{s['algo']}"
        for s in rows
    ]
    ax.bar(range(len(rows)), [s["ours_over_cpu"] for s in rows], color=[colors[s["algo"]] for s in rows])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylim(0.8, 1.2)
    ax.set_ylabel("ours / fastest exact peer (CPU time)")
    ax.set_title("Ours against the fastest exact peer of the same algorithm (< 1: ours faster); P S heads dtype")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=a) for a, c in colors.items()], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
