"""Peak memory of document-causal ring attention vs plain causal, at long S (fresh gloo ranks per variant).

    python -m benchmarks.packing_memory [--seq 32768] [--cp 4]       # -> results/packing_memory.json

One forward + backward of :func:`mindspeed_cp.ring.ring_attention` (fp32, batch 1, 4 heads of 64) on CP ranks,
each variant in fresh processes: ``causal`` (no documents) and ``documents`` (lognormal document lengths, mean
~2k, per-document zigzag). Reported per variant: the busiest rank's peak resident memory above what it held
before the call (``VmHWM`` - ``VmRSS``), and the wall time. Goal: documents <= 1.1 x causal - the block masks
are built one row tile (TILE x s_local) at a time, never S x S.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from mindspeed_cp.ranks import launch

from .scale import _status_kib as _kib

HERE = os.path.dirname(os.path.abspath(__file__))


def _measure(variant: str, seq: int, heads: int, head_dim: int) -> dict:
    import torch
    import torch.distributed as dist

    from mindspeed_cp.layout.packing import Documents
    from mindspeed_cp.ring import ring_attention

    from .bench_packing import sample_lengths

    P, r = dist.get_world_size(), dist.get_rank()
    docs = Documents.from_lengths(sample_lengths(seq, random.Random(0)), cp=P) if variant == "documents" else None
    s = docs.local_len(r) if docs is not None else seq // P
    g = torch.Generator().manual_seed(r)
    q, k, v = (torch.randn(s, 1, heads, head_dim, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(s, 1, heads, head_dim, generator=g)
    dist.barrier()
    before = _kib("VmRSS")
    t0 = time.perf_counter()
    ring_attention(q, k, v, None, causal=True, documents=docs).backward(dout)
    wall = time.perf_counter() - t0
    peak = torch.tensor([(_kib("VmHWM") - before) * 1024.0, wall], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    inputs = 4 * s * heads * head_dim * 4  # q, k, v, dout
    return {
        "variant": variant,
        "seq": seq,
        "cp": P,
        "s_local": s,
        "peak_bytes": peak[0].item(),
        "wall_s": peak[1].item(),
        "inputs_bytes": inputs,
        "padding": docs.padding_overhead() if docs is not None else 0.0,
    }


def run(seq: int = 32768, cp: int = 4, heads: int = 4, head_dim: int = 64, log=print) -> list:
    rows = []
    for variant in ("causal", "documents"):
        res = launch(cp, _measure, variant, seq, heads, head_dim, timeout=3600)
        if not res.ok:
            raise RuntimeError("packing_memory failed:\n" + "\n".join(res.errors))
        rows.append(res.results[0])
    ratio = rows[1]["peak_bytes"] / rows[0]["peak_bytes"]
    for row in rows:
        row["ratio_to_causal"] = row["peak_bytes"] / rows[0]["peak_bytes"]
        log(
            f"  ring S={seq} CP={cp} {row['variant']}: peak +{row['peak_bytes'] / 2**20:.0f} MiB per rank, "
            f"{row['wall_s']:.1f} s"
        )
    log(f"  documents / causal peak memory: {ratio:.2f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.packing_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "packing_memory.json"))
    args = ap.parse_args(argv)
    rows = run(args.seq, args.cp)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"packing_memory: {len(rows)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
