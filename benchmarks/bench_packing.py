"""Packed documents: work balance and padding of the per-document zigzag layout (pure arithmetic, no ranks).

    python -m benchmarks.bench_packing [--seq 32768] [--cp 8] [--samples 20]    # -> results/packing.json

Documents with long-tailed lengths (lognormal, mean ~2k tokens, length-1 documents allowed) fill each sample
of ``seq`` tokens. Per layout, the unmasked (query, key) pairs of the document-causal attention that each CP
rank computes (Ulysses splits the same work by heads, so only the ring level matters):

* ``per_document_zigzag`` (what the plugin does, :mod:`mindspeed_cp.layout.packing`): each document padded to a
  multiple of 2R and split into 2R chunks, ring position j holding chunks j and 2R-1-j of every document;
* ``global_zigzag``: the plain sequence's zigzag with document masks (no padding) - for comparison;
* ``contiguous``: S/CP consecutive tokens per rank (llama3-style all-gather CP) - for comparison.

Reported: work imbalance (max / mean over ranks; goal <= 1.05) and padding overhead (pad tokens / real
tokens; goal <= 2 %), worst sample and mean over samples. For the plugin's layout also what the ring really
hands its kernels (``mindspeed_cp.layout.packing.computed_scores``, row tiles of ``ring.TILE``): score elements
computed (the key columns each tile's documents reach) against the useful ones and against whole blocks,
their imbalance over ranks, and the row tiles skipped because they reach no key of an owner; and the same for the
all-gather (``kvallgather_cp_algo``, :func:`mindspeed_cp.layout.gather.document_scores`: one sample, so one
layout: the tiles of :func:`mindspeed_cp.layout.gather.document_tiles`, per document its rows against themselves
causally and against each gap of its keys before them, no mask), with its kernel calls per rank against the ring's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))


def sample_lengths(seq: int, rng: random.Random, mu: float = 7.1, sigma: float = 1.0) -> List[int]:
    """Document lengths filling ``seq`` tokens (lognormal: median e^mu ~ 1.2k, mean ~2k)."""
    out, left = [], seq
    while left > 0:
        n = min(left, max(1, int(rng.lognormvariate(mu, sigma))))
        out.append(n)
        left -= n
    return out


def _work_by_owner(lengths: List[int], owner) -> List[int]:
    """Unmasked pairs per rank when token t (global position) lives on rank owner(t): row t sees its document's
    tokens up to itself (t - start + 1 keys)."""
    work, start = {}, 0
    for n in lengths:
        for t in range(start, start + n):
            r = owner(t)
            work[r] = work.get(r, 0) + (t - start + 1)
        start += n
    return [work.get(r, 0) for r in range(max(work) + 1)]


def measure(seq: int = 32768, cp: int = 8, samples: int = 20, seed: int = 0) -> dict:
    from mindspeed_cp.kvallgather import TILE as GATHER_TILE
    from mindspeed_cp.layout.gather import document_scores
    from mindspeed_cp.layout.packing import Documents, computed_scores, layout_work
    from mindspeed_cp.ring import TILE

    rng = random.Random(seed)
    rows = []
    for _ in range(samples):
        lengths = sample_lengths(seq, rng)
        docs = Documents.from_lengths(lengths, cp=cp, ring=cp)
        mine = layout_work(docs)
        c = seq // (2 * cp)
        zig = _work_by_owner(lengths, lambda t: min(t // c, 2 * cp - 1 - t // c))
        cont = _work_by_owner(lengths, lambda t: t // (seq // cp))
        imb = lambda w: max(w) / (sum(w) / len(w))  # noqa: E731
        tiles = computed_scores(docs, TILE)
        gathered = document_scores(docs, GATHER_TILE)
        ring_calls = cp * cp * -(-(docs.padded_len // cp) // TILE) - sum(tiles["skipped_tiles"])
        rows.append(
            dict(
                documents=len(lengths),
                shortest=min(lengths),
                longest=max(lengths),
                per_document_zigzag=imb(mine),
                global_zigzag=imb(zig),
                contiguous=imb(cont),
                padding=docs.padding_overhead(),
                tokens_per_rank=docs.padded_len // cp,
                computed_over_useful=sum(tiles["computed"]) / sum(mine),
                computed_over_full_blocks=sum(tiles["computed"]) / sum(tiles["full"]),
                computed_imbalance=imb(tiles["computed"]),
                skipped_tiles=sum(tiles["skipped_tiles"]),
                tiles=cp * cp * -(-(docs.padded_len // cp) // TILE),
                gather_computed_over_useful=sum(gathered["computed"]) / sum(mine),
                gather_computed_imbalance=imb(gathered["computed"]),
                gather_calls_over_ring=sum(gathered["calls"]) / ring_calls,
            )
        )
    keys = (
        "per_document_zigzag",
        "global_zigzag",
        "contiguous",
        "padding",
        "computed_over_useful",
        "computed_over_full_blocks",
        "computed_imbalance",
        "skipped_tiles",
        "gather_computed_over_useful",
        "gather_computed_imbalance",
        "gather_calls_over_ring",
    )
    summary = {k: {"worst": max(r[k] for r in rows), "mean": statistics.mean(r[k] for r in rows)} for k in keys}
    return dict(
        seq=seq,
        cp=cp,
        samples=samples,
        tile=TILE,
        mean_documents=statistics.mean(r["documents"] for r in rows),
        summary=summary,
        rows=rows,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_packing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--cp", type=int, default=8)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "packing.json"))
    args = ap.parse_args(argv)
    res = measure(args.seq, args.cp, args.samples)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    s = res["summary"]
    print(
        f"packing S={args.seq} CP={args.cp}, {args.samples} samples of ~{res['mean_documents']:.0f} documents: "
        f"work imbalance per-document zigzag {s['per_document_zigzag']['worst']:.3f} (worst), global zigzag "
        f"{s['global_zigzag']['worst']:.2f}, contiguous {s['contiguous']['worst']:.2f}; padding "
        f"{100 * s['padding']['mean']:.2f} % mean, {100 * s['padding']['worst']:.2f} % worst; the ring computes "
        f"{s['computed_over_useful']['mean']:.2f}x the useful scores = "
        f"{100 * s['computed_over_full_blocks']['mean']:.1f} % "
        f"of whole blocks (imbalance {s['computed_imbalance']['worst']:.3f} worst), "
        f"{s['skipped_tiles']['mean']:.0f} row tiles skipped per sample; the all-gather computes "
        f"{s['gather_computed_over_useful']['mean']:.2f}x the useful scores (imbalance "
        f"{s['gather_computed_imbalance']['worst']:.3f} worst) in {s['gather_calls_over_ring']['mean']:.2f}x the "
        f"ring's kernel calls -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
