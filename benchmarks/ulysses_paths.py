"""Ulysses' two local attentions through megatron-core: the plugin's kernels vs Megatron's own attention.

    python -m benchmarks.ulysses_paths [--seqs 2048 4096 8192] [--cp 4]     # writes results/ulysses_paths.json

On CP gloo ranks, one megatron-core ``DotProductAttention`` (local spec, causal) built under
``configure(context_parallel_algo="ulysses_cp_algo")`` runs forward + backward on this rank's tokens, twice:
as the plugin runs it (the all-to-all, then :func:`mindspeed_cp.local.local_attention` on the kernels) and
with the kernels switched off for the module (``megatron_only`` set: the all-to-all, then Megatron's own
local attention, which materialises the ``b h/CP S x S`` scores and probabilities - what Ulysses ran before).
Reported per S: the slowest rank's median wall and CPU time, bytes autograd saved on a rank, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import List

from mindspeed_cp.ranks import launch

from .attention_bench import SavedBytes

HERE = os.path.dirname(os.path.abspath(__file__))


def _measure(seqs: List[int], cp: int, heads: int, kv_heads: int, head_dim: int, reps: int) -> List[dict]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.megatron.state import STATE

    adaptor.configure(context_parallel_size=cp, context_parallel_algo="ulysses_cp_algo")
    ps.initialize_model_parallel(context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        context_parallel_size=cp,
    )
    module = DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    rows = []
    for S in seqs:
        STATE.seq_len = S
        s_local = S // cp
        g = torch.Generator().manual_seed(dist.get_rank())
        q = torch.randn(s_local, 1, heads, head_dim, generator=g).requires_grad_()
        k, v = (torch.randn(s_local, 1, kv_heads, head_dim, generator=g).requires_grad_() for _ in range(2))
        dout = torch.randn(s_local, 1, heads * head_dim, generator=g)
        row = {"seq": S, "cp": cp, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
        for path, only in (("kernels", None), ("megatron", "benchmark: Megatron's own attention")):
            module._mindspeed_cp.megatron_only = only
            saved = SavedBytes()
            with saved.hooks():
                out = module(q, k, v, None)
            out.backward(dout)
            wall, cpu = [], []
            for _ in range(reps):
                for t in (q, k, v):
                    t.grad = None
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                module(q, k, v, None).backward(dout)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            slowest = torch.tensor(
                [statistics.median(wall), statistics.median(cpu), float(saved.total)], dtype=torch.float64
            )
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            row.update(
                {
                    f"{path}_time_s": slowest[0].item(),
                    f"{path}_cpu_s": slowest[1].item(),
                    f"{path}_saved_bytes": int(slowest[2].item()),
                }
            )
        row["time_ratio"] = row["kernels_time_s"] / row["megatron_time_s"]
        row["cpu_ratio"] = row["kernels_cpu_s"] / row["megatron_cpu_s"]
        row["saved_ratio"] = row["kernels_saved_bytes"] / row["megatron_saved_bytes"]
        rows.append(row)
    return rows


def run(
    seqs: List[int], cp: int = 4, heads: int = 8, kv_heads: int = 4, head_dim: int = 64, reps: int = 3, log=print
) -> List[dict]:
    res = launch(cp, _measure, seqs, cp, heads, kv_heads, head_dim, reps, timeout=3600)
    if not res.ok:
        raise RuntimeError("ulysses_paths failed:\n" + "\n".join(res.errors))
    rows = res.results[0]
    for r in rows:
        log(
            f"  ulysses S={r['seq']}: kernels {r['kernels_time_s'] * 1e3:.0f} ms vs Megatron's attention "
            f"{r['megatron_time_s'] * 1e3:.0f} ms (wall {r['time_ratio']:.2f}, CPU {r['cpu_ratio']:.2f}); saved "
            f"{r['kernels_saved_bytes'] / 2**20:.1f} vs {r['megatron_saved_bytes'] / 2**20:.1f} MiB"
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ulysses_paths", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ulysses_paths.json"))
    args = ap.parse_args(argv)
    rows = run(args.seqs, cp=args.cp, reps=args.reps)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"ulysses_paths: {len(rows)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
