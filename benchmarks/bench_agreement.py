"""The cost of the input agreement: time per attention call, and its share of a GPT training step.

    python -m benchmarks.bench_agreement [--cp 4] [--seqs 512 4096] [--calls 200]    # -> results/agreement.json

On CP gloo ranks, for every algorithm, a megatron-core GPT (local spec, the demo's shape: 2 layers, hidden 128,
4 heads) trains through the plugin as a user's script does. Measured in the same ranks, one after another:

* ``step_s``: median wall time of one training step (forward + backward + Adam), checks on (the default);
* ``agree_us``: median wall time of the agreement function the algorithm's attention call runs (the same
  function on the same tensors and groups: ``mindspeed_cp.agreement``'s ``agree_ulysses``, ``agree_ring``,
  ``agree_hybrid`` over the CP group or over its two groups), ``calls`` times after a barrier;
* ``calls_per_step``: agreement exchanges in one step (one per attention layer call, from the metadata
  messages :mod:`mindspeed_cp.stats` counts; backward does not agree);
* ``share``: ``calls_per_step * agree_us / step_s``. The goal is <= 1 % of the step.

Wall time on a shared CPU is noisy; the medians of one run are compared as ratios.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ALGOS = {
    "ulysses": dict(context_parallel_algo="ulysses_cp_algo"),
    "ring": dict(context_parallel_algo="megatron_cp_algo"),
    "hybrid": dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
    "hybrid_two_groups": dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
}
MODEL = dict(layers=2, hidden=128, heads=4, vocab=256, batch=1)


def _agree_once(name: str, q, k, v):
    """The agreement the algorithm's attention call runs, on these tensors (a closure to time)."""
    from mindspeed_cp.agreement import agree_hybrid, agree_ring, agree_ulysses
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.options import CallInputs, RingOptions, UlyssesOptions

    scale, inputs, ring = q.shape[-1] ** -0.5, CallInputs(), RingOptions(dead_rows="uniform")
    if name == "ulysses":
        return lambda: agree_ulysses(
            (q, k, v), 0, 2, lambda: None, STATE.group("ulysses"), UlyssesOptions(), STATE.agree_group
        )
    if name == "ring":
        return lambda: agree_ring(q, k, v, inputs, ring, STATE.group("ring"), scale, STATE.agree_group)
    whole = STATE.agree_group if name == "hybrid" else None
    return lambda: agree_hybrid(
        q, k, v, inputs, UlyssesOptions(), ring, scale, STATE.group("ulysses"), STATE.group("ring"), whole
    )


def _measure(names: List[str], cp: int, seqs: List[int], calls: int, steps: int) -> List[dict]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp import stats as comm_stats

    rows = []
    for name in names:
        adaptor.configure(context_parallel_size=cp, **ALGOS[name])
        ps.initialize_model_parallel(context_parallel_size=cp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        m = MODEL
        for S in seqs:
            config = TransformerConfig(
                num_layers=m["layers"],
                hidden_size=m["hidden"],
                num_attention_heads=m["heads"],
                ffn_hidden_size=4 * m["hidden"],
                hidden_dropout=0.0,
                attention_dropout=0.0,
                context_parallel_size=cp,
                params_dtype=torch.float32,
            )
            model = GPTModel(
                config=config,
                transformer_layer_spec=get_gpt_layer_local_spec(),
                vocab_size=m["vocab"],
                max_sequence_length=S,
                position_embedding_type="rope",
            )
            if name == "hybrid_two_groups":  # the public-API path: no CP group at hand, two exchanges
                for mod in model.modules():
                    if hasattr(mod, "_mindspeed_cp"):
                        mod._mindspeed_cp.agree_group = None
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, m["vocab"], (m["batch"], S + 1), generator=g)
            batch = {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(m["batch"], S),
                "position_ids": torch.arange(S).expand(m["batch"], S).contiguous(),
            }
            data = get_batch_on_this_cp_rank(dict(batch))
            times, per_step = [], 0
            for step in range(steps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                with comm_stats.count_bytes() as stats:
                    opt.zero_grad(set_to_none=True)
                    loss = model(data["tokens"], data["position_ids"], None, labels=data["labels"]).sum() / S
                    loss.backward()
                    for p in model.parameters():
                        dist.all_reduce(p.grad, group=ps.get_context_parallel_group())
                    opt.step()
                if step:  # the first step warms up
                    times.append(time.perf_counter() - t0)
                per_step = stats.messages.get("metadata", 0)
            s_local, d = S // cp, m["hidden"] // m["heads"]
            q, k, v = (torch.randn(s_local, m["batch"], m["heads"], d, requires_grad=True) for _ in range(3))
            once = _agree_once(name, q, k, v)
            for _ in range(5):
                once()
            dist.barrier()
            wall = []
            for _ in range(calls):
                t0 = time.perf_counter()
                once()
                wall.append(time.perf_counter() - t0)
            exchanges = 2 if name == "hybrid_two_groups" else 1
            slowest = torch.tensor([statistics.median(times), statistics.median(wall)], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            step_s, agree_s = slowest.tolist()
            calls_per_step = per_step // exchanges
            rows.append(
                {
                    "algo": name,
                    "cp": cp,
                    "seq": S,
                    **MODEL,
                    "step_s": step_s,
                    "agree_us": agree_s * 1e6,
                    "exchanges_per_call": exchanges,
                    "calls_per_step": calls_per_step,
                    "share": calls_per_step * agree_s / step_s,
                }
            )
        ps.destroy_model_parallel()
    return rows


def run(cp: int = 4, seqs: List[int] = (512, 4096), calls: int = 200, steps: int = 3, log=print) -> List[dict]:
    names = [n for n in ALGOS if cp >= 4 or not n.startswith("hybrid")]  # Hybrid needs 1 < U < CP
    res = launch(cp, _measure, names, cp, list(seqs), calls, steps, timeout=3600)
    if not res.ok:
        raise RuntimeError("agreement benchmark failed:\n" + "\n".join(res.errors))
    rows = res.results[0]
    for r in rows:
        log(
            f"  agreement {r['algo']} CP={r['cp']} S={r['seq']}: {r['agree_us']:.0f} us per call "
            f"({r['exchanges_per_call']} exchange(s)), {r['calls_per_step']} calls per step of "
            f"{r['step_s'] * 1e3:.0f} ms = {100 * r['share']:.2f} % of the step"
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "agreement.json"))
    args = ap.parse_args(argv)
    rows = run(args.cp, args.seqs, args.calls, args.steps)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"agreement: {len(rows)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
