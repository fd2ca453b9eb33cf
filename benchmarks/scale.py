"""Scale: the longest sequence a tiny megatron-core GPT trains at with CP, per algorithm (doubling search).

Each rank is a gloo process with a hard memory budget per attempt (``RLIMIT_DATA`` = its writable private
memory before the attempt plus ``mem_budget_bytes``; an allocation beyond it raises instead of waking the
OOM killer). For each algorithm
the ranks go through Megatron's own entry points exactly as a user's script does::

    configure(context_parallel_size=CP, context_parallel_algo=...)     # the plugin
    parallel_state.initialize_model_parallel(context_parallel_size=CP)
    GPTModel(local layer spec) ; get_batch_on_this_cp_rank(batch) ; loss.backward() ; Adam step

at S = ``start``, 2*start, ... One attempt is one training step (forward, backward, CP gradient all-reduce,
optimizer step) that must give a finite loss. The search for an algorithm stops at the first length that
fails (``memory``: an allocation refused; ``error``: anything else) or when the next step, predicted as 4x
the last one (attention is quadratic), would overrun the algorithm's time cap (``time cap``): then the
largest length is a lower bound. The cap counts CPU seconds of the busiest rank (process CPU time), not
wall time, so that other work on the machine does not change the answer, only how long it takes. Every
decision is taken on all-reduced numbers so all ranks agree.

Every algorithm runs in fresh ranks (a 64k step leaves the allocator in a state that doubles the CPU time of
the next algorithm's steps); a failed rank leaves its peers waiting in a collective: the launcher kills the
ranks, and the search goes on with the algorithms not yet done.
"""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import time
from typing import Dict, List

import torch

from mindspeed_cp.ranks import launch, progress

ALGOS = {
    "ulysses": dict(context_parallel_algo="ulysses_cp_algo"),
    "ring": dict(context_parallel_algo="megatron_cp_algo"),
    "double_ring": dict(context_parallel_algo="megatron_cp_algo", cp_window_size=2),
    "hybrid": dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
    "kvallgather": dict(context_parallel_algo="kvallgather_cp_algo"),
}

MODEL = dict(num_layers=2, hidden=64, heads=4, vocab=128, batch=1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS, so the next attempt's peak RSS starts from what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets VmHWM (peak resident set) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _limit_memory(budget: int) -> None:
    """Allow this process ``budget`` more bytes of writable private memory than it holds now.

    ``RLIMIT_DATA`` counts writable private mappings (heap, anonymous mmap: torch's CPU tensors), not address
    space merely reserved by malloc arenas. Set afresh before every attempt: process groups of earlier
    attempts that Megatron does not destroy keep their threads' stacks mapped (virtual, not resident).
    """
    if budget:
        cap = _status_kib("VmData") * 1024 + int(budget)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.RLIM_INFINITY))


def _train_step(algo: str, cp: int, seq: int, mem_budget_bytes: int) -> Dict[str, float]:
    """Build the tiny GPT for ``algo`` at length ``seq`` and run one training step; agreed numbers."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank

    import mindspeed_cp.megatron_adaptor as adaptor  # first: the patches

    m = MODEL
    t0, c0 = time.perf_counter(), time.process_time()
    _release_freed_memory()
    _limit_memory(mem_budget_bytes)
    _reset_peak_rss()
    adaptor.configure(context_parallel_size=cp, **ALGOS[algo])
    ps.initialize_model_parallel(context_parallel_size=cp)
    model = opt = None
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        config = TransformerConfig(
            num_layers=m["num_layers"],
            hidden_size=m["hidden"],
            num_attention_heads=m["heads"],
            ffn_hidden_size=4 * m["hidden"],
            hidden_dropout=0.0,
            attention_dropout=0.0,
            context_parallel_size=cp,
        )
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(),
            vocab_size=m["vocab"],
            max_sequence_length=seq,
            position_embedding_type="rope",
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seq)
        stream = torch.randint(0, m["vocab"], (m["batch"], seq + 1), generator=g)
        batch = get_batch_on_this_cp_rank(
            {
                "tokens": stream[:, :-1].contiguous(),
                "labels": stream[:, 1:].contiguous(),
                "loss_mask": torch.ones(m["batch"], seq),
                "position_ids": torch.arange(seq).expand(m["batch"], seq).contiguous(),
            }
        )
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        group = ps.get_data_parallel_group(with_context_parallel=True)
        for p in model.parameters():  # what Megatron's DDP does over the data-parallel-with-CP group
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
        opt.step()
        stats = torch.tensor(
            [
                time.perf_counter() - t0,
                _status_kib("VmHWM") * 1024.0,
                float(not math.isfinite(loss.item())),
                time.process_time() - c0,
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        loss_sum = loss.detach().double().reshape(1)
        dist.all_reduce(loss_sum, group=group)
        return {
            "step_s": stats[0].item(),
            "step_cpu_s": stats[3].item(),
            "peak_rss_bytes": stats[1].item(),
            "nonfinite": bool(stats[2].item()),
            "loss": loss_sum.item() / dist.get_world_size(group),
        }
    finally:
        del model, opt
        ps.destroy_model_parallel()
        _release_freed_memory()


def memory_at(points: List[tuple], seq: int) -> float:
    """Memory at ``seq`` from (seq, bytes above baseline) points: least squares of ``a S + c S^2`` (c >= 0;
    Megatron's own attention materialises S^2 scores, the kernel path is linear)."""
    if not points:
        return 0.0
    if len(points) == 1:
        return points[0][1] * seq / points[0][0]
    xs = torch.tensor([[s, s * s] for s, _ in points], dtype=torch.float64)
    ys = torch.tensor([m for _, m in points], dtype=torch.float64)
    a, c = torch.linalg.lstsq(xs, ys[:, None]).solution[:, 0].tolist()
    if c < 0:  # memory does not shrink with length: fall back to linear through the last two points
        (s0, m0), (s1, m1) = points[-2:]
        a, c = (m1 - m0) / (s1 - s0), 0.0
        return m1 + a * (seq - s1)
    return a * seq + c * seq * seq


def memory_bound_seq(points: List[tuple], budget: float) -> int:
    """Where :func:`memory_at` reaches ``budget``: doubling from the last point, then bisection to 1024 tokens."""
    lo, hi = points[-1][0], points[-1][0]
    while memory_at(points, hi) < budget and hi < (1 << 30):
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_at(points, mid) < budget else (lo, mid)
    return lo


def search(algos: List[str], cp: int, start: int, max_seq: int, cap_s: float, mem_budget_bytes: int) -> dict:
    """Rank body: the doubling search of every algorithm in ``algos``, in order; reports each attempt."""
    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: F401

    import mindspeed_cp.megatron_adaptor  # noqa: F401  - import first: the baseline includes Megatron

    base = torch.tensor([_status_kib("VmRSS") * 1024.0], dtype=torch.float64)
    dist.all_reduce(base, op=dist.ReduceOp.MAX)
    progress({"event": "base", "algo": None, "rss_bytes": base.item()})
    for algo in algos:
        seq, spent, points = start, 0.0, []
        while True:
            progress({"event": "start", "algo": algo, "seq": seq})
            res = _train_step(algo, cp, seq, mem_budget_bytes)
            spent += res["step_cpu_s"]
            points.append((seq, res["peak_rss_bytes"] - base.item()))
            progress({"event": "done", "algo": algo, "seq": seq, **res})
            if res["nonfinite"]:
                progress({"event": "stop", "algo": algo, "reason": "non-finite loss"})
                break
            if 2 * seq > max_seq:
                progress({"event": "stop", "algo": algo, "reason": f"max_seq {max_seq}"})
                break
            # the next length is tried if it fits the time cap, or if it should exceed the memory budget
            # anyway (then the first large allocation fails, long before the step would end)
            over_budget = memory_at(points, 2 * seq) > mem_budget_bytes > 0
            if spent + 4 * res["step_cpu_s"] > cap_s and not over_budget:
                progress({"event": "stop", "algo": algo, "reason": "time cap"})
                break
            seq *= 2
        dist.barrier()
    return {}


def run_scale(
    algos=tuple(ALGOS),
    cp: int = 4,
    start: int = 4096,
    max_seq: int = 1 << 20,
    cap_s: float = 60.0,
    mem_budget_bytes: int = 4 << 30,
    log=print,
) -> List[dict]:
    """The search for every algorithm (relaunching after a failure); one summary per algorithm."""
    todo, summary, base_rss = list(algos), {}, 0.0
    attempts: Dict[str, List[dict]] = {a: [] for a in algos}
    while todo:
        # each algorithm in fresh ranks: the allocator state a long step of one leaves would slow the next
        res = launch(
            cp, search, todo[:1], cp, start, max_seq, cap_s, mem_budget_bytes, timeout=max(1800.0, 10 * cap_s)
        )  # wall time: generous on a busy machine
        current = None
        for item in res.progress:
            algo = item["algo"]
            if item["event"] == "base":
                base_rss = item["rss_bytes"]
            elif item["event"] == "start":
                current = item
            elif item["event"] == "done":
                attempts[algo].append({k: v for k, v in item.items() if k not in ("event", "algo")})
                current = None
            elif item["event"] == "stop":
                summary[algo] = item["reason"]
                log(f"  scale {algo}: stopped ({item['reason']}) after {attempts[algo][-1]['seq']}")
        if not res.ok:
            if current is None:
                raise RuntimeError("scale search failed outside an attempt:\n" + "\n".join(res.errors))
            algo = current["algo"]
            reason = "memory" if res.out_of_memory else "error"
            if res.timed_out:
                reason = "timeout"
            # the failing rank's own error, not a peer's broken connection
            first = next((e for e in res.errors if res.is_memory_error(e)), res.errors[0]).splitlines()[0]
            summary[algo] = reason
            attempts[algo].append({"seq": current["seq"], "failed": reason, "error": first[:300]})
            log(f"  scale {algo}: failed at {current['seq']} ({reason}): {first[:160]}")
        todo = [a for a in todo if a not in summary]
    out = []
    for algo in algos:
        ok = [a for a in attempts[algo] if "failed" not in a]
        best = ok[-1] if ok else None
        row = {
            "algo": algo,
            "cp": cp,
            **MODEL,
            "max_seq": best["seq"] if best else 0,
            "stopped_by": summary[algo],
            "step_s_at_max": best["step_s"] if best else None,
            "step_cpu_s_at_max": best["step_cpu_s"] if best else None,
            "peak_rss_bytes_at_max": best["peak_rss_bytes"] if best else None,
            "mem_budget_bytes_per_rank": mem_budget_bytes,
            "time_cap_cpu_s": cap_s,
            "attempts": attempts[algo],
        }
        if summary[algo] == "time cap" and len(ok) >= 2:
            # where the budget would run out: fit of the peak resident memory above the post-import baseline
            row["memory_bound_seq_estimate"] = memory_bound_seq(
                [(a["seq"], a["peak_rss_bytes"] - base_rss) for a in ok], mem_budget_bytes
            )
        row["baseline_rss_bytes"] = base_rss
        out.append(row)
    return out
