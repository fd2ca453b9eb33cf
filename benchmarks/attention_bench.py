"""What one attention call costs on each CP rank: bytes sent, work, memory saved for backward, time.

Run inside gloo ranks started by :mod:`mindspeed_cp.ranks` (world size = CP size)::

    per_rank = launch(4, measure_cases, cases, reps)     # each rank returns one dict per case

Groups are built the way the runtime builds them: :class:`mindspeed_cp.config.CPConfig` ->
``STATE.build_groups`` (:func:`mindspeed_cp.topology.layout_for`) -> the same lookups the Megatron glue
does (``STATE.double_ring_window()``). Megatron itself is not imported here (it only adds
start-up time); :func:`measure_single` runs Megatron's own attention at CP=1 for the speed reference.

Per case and rank, one counted pass (forward + backward) gives

* ``comm``: bytes this rank sent, by kind, from :func:`mindspeed_cp.stats.count_bytes` (the plugin's
  communication layer); "metadata" is the small input-agreement all-gather, kept apart.
* ``work``: attention score elements of the blocks this rank computed, forward + backward, masked ones
  inside computed blocks included (:func:`mindspeed_cp.ring.count_blocks`: ring blocks, and the blocks of
  Ulysses' local attention, :mod:`mindspeed_cp.local`), and how many computed
  blocks were entirely masked.
* ``saved``: bytes of the distinct storages autograd saved for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``; views of one storage count once).
* ``held``: the most bytes of the communication layer's buffers alive at once, forward and backward
  (:func:`mindspeed_cp.stats.count_held`: the ring's blocks in flight, the all-gather's receive buffers, gathered
  K/V, dK/dV accumulators and reduce-scatter buffers) - the memory beyond ``saved`` an algorithm needs.

then ``reps`` timed passes (wall clock and process CPU time).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, Iterator, List, Optional

import torch

Tensor = torch.Tensor

ALGO_FLAGS = {
    "ulysses": "ulysses_cp_algo",
    "ring": "megatron_cp_algo",
    "double_ring": "megatron_cp_algo",
    "hybrid": "hybrid_cp_algo",
    "kvallgather": "kvallgather_cp_algo",
}


# ----------------------------------------------------------------------------- local attention (kernel layer)
class KernelAttention:
    """Causal attention on the whole (local) sequence through the product's own
    :func:`mindspeed_cp.local.local_attention` (what Ulysses runs after its all-to-all): the local attention
    of the Ulysses cases, and the single-device figure for memory (same kernel type as the ring)."""

    def __init__(self, kernel: str = "torch", causal: bool = True) -> None:
        self.kernel_name, self.causal = kernel, causal

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
        from mindspeed_cp.local import local_attention

        return local_attention(q, k, v, causal=self.causal, kernel=self.kernel_name)  # [S, b, n, d]


# ----------------------------------------------------------------------------- saved-for-backward bytes
class SavedBytes:
    """Distinct storages saved for backward while active (a storage counted once however many views):
    :func:`mindspeed_cp.stats.count_saved`, which also sees through the Ulysses KV cache's own hooks."""

    def __init__(self) -> None:
        self.total = 0

    @contextlib.contextmanager
    def hooks(self) -> Iterator["SavedBytes"]:
        from mindspeed_cp.stats import count_saved

        with count_saved() as stats:
            yield self
        self.total = stats.total


# ----------------------------------------------------------------------------- groups and the algorithms
def _config(case: dict):
    from mindspeed_cp.config import CPConfig

    return CPConfig(
        context_parallel_size=case["cp"],
        context_parallel_algo=ALGO_FLAGS[case["algo"]],
        ulysses_degree_in_cp=case.get("ulysses") if case["algo"] == "hybrid" else None,
        cp_window_size=case.get("window", 1) if case["algo"] == "double_ring" else 1,
    )


def build_runner(case: dict, kernel: str = "torch"):
    """Groups for ``case`` (a collective: every rank calls it in the same order) and a function
    ``run(q, k, v) -> out`` on this rank's ``[s/CP, b, h|hk, d]`` shard."""
    import torch.distributed as dist

    from mindspeed_cp.hybrid import hybrid_attention
    from mindspeed_cp.kvallgather import kvallgather_attention
    from mindspeed_cp.megatron.state import STATE
    from mindspeed_cp.ring import ring_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention

    cfg = _config(case)
    STATE.reset()
    STATE.set_config(cfg)
    STATE.build_groups(
        dist.get_world_size(), dist.get_rank(), 1, 1, new_group=dist.new_group, cp_group=dist.group.WORLD
    )
    uly = STATE.group("ulysses") if cfg.ulysses_size > 1 else None
    gather = STATE.group("allgather") if case["algo"] == "kvallgather" else None
    ring = STATE.group("ring") if cfg.ring_size > 1 and gather is None else None
    window = STATE.double_ring_window() if ring is not None else None
    STATE.reset()  # the groups live on in this closure; nothing global is left behind
    algo, policy = case["algo"], case.get("kv_cache_policy")
    if algo == "ulysses":
        ulysses = UlyssesContextAttention(
            KernelAttention(kernel), uly, kv_cache_policy=policy, allgather_kv=case.get("allgather_kv", False)
        )
        return cfg, lambda q, k, v: ulysses(q, k, v)
    if algo == "kvallgather":
        return cfg, lambda q, k, v: kvallgather_attention(
            q, k, v, gather, causal=True, kernel=kernel, kv_cache_policy=policy
        )
    if algo in ("ring", "double_ring"):
        return cfg, lambda q, k, v: ring_attention(
            q, k, v, ring, causal=True, window=window, kernel=kernel, kv_cache_policy=policy
        )
    return cfg, lambda q, k, v: hybrid_attention(
        q, k, v, uly, ring, causal=True, window=window, kernel=kernel, kv_cache_policy=policy
    )


def _inputs(case: dict, s_local: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.get("dtype", "float32"))
    b, h, hk, d = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    dv = case.get("v_head_dim", d)  # MLA: the value head size its own
    q, k, v = (
        torch.randn(s_local, b, n, e, generator=g).to(dtype).requires_grad_() for n, e in ((h, d), (hk, d), (hk, dv))
    )
    dout = torch.randn(s_local, b, h, dv, generator=g).to(dtype)
    return q, k, v, dout


def _one_pass(run, q, k, v, dout) -> None:
    for t in (q, k, v):
        t.grad = None
    run(q, k, v).backward(dout)


def measure_cases(cases: List[dict], reps: int = 3, kernel: str = "torch") -> List[dict]:
    """On this rank: the counted pass and ``reps`` timed passes of every case (see the module doc)."""
    import torch.distributed as dist

    from mindspeed_cp.layout.sharding import token_indices
    from mindspeed_cp.ring import count_blocks
    from mindspeed_cp.stats import count_bytes, count_held

    out = []
    for i, case in enumerate(cases):
        cfg, run = build_runner(case, kernel)
        s_local = int(token_indices(cfg, dist.get_rank(), case["seq"]).numel())
        q, k, v, dout = _inputs(case, s_local, seed=1000 * i + dist.get_rank())
        saved = SavedBytes()
        with count_bytes() as comm, count_blocks() as blocks, count_held() as held:
            for t in (q, k, v):
                t.grad = None
            with saved.hooks():
                o = run(q, k, v)
            o.backward(dout)
            del o
        by_kind = dict(comm.by_kind)
        phases = ("forward", "backward")
        work = sum(blocks.scores[p] for p in phases)
        empty = sum(blocks.empty[p] for p in phases)
        wall, cpu = [], []
        for _ in range(reps):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            _one_pass(run, q, k, v, dout)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out.append(
            {
                "comm_by_kind": by_kind,
                "comm_messages": dict(comm.messages),
                "work_scores": int(work),
                "work_unmasked": int(work - sum(blocks.masked[p] for p in phases)),
                "blocks_computed": int(sum(blocks.blocks[p] for p in phases)),
                "empty_blocks": int(empty),
                "saved_bytes": saved.total,
                "held_peak_bytes": held.peak,
                "time_s": statistics.median(wall),
                "cpu_time_s": statistics.median(cpu),
            }
        )
        dist.barrier()
    return out


# ----------------------------------------------------------------------------- CP = 1 references
def _megatron_attention(h: int, hk: int, d: int, dv: int):
    """Megatron's own core attention (local spec ``DotProductAttention``) at CP=1, causal (MLA's head sizes as
    its local spec passes them)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import mindspeed_cp.megatron_adaptor  # noqa: F401  - CPU support for megatron-core; CP=1 leaves it alone

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(1234)  # its RNG tracker (attention dropout region)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=h * d,
        num_attention_heads=h,
        num_query_groups=hk,
        kv_channels=d,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        context_parallel_size=1,
    )
    sizes = {} if dv == d else dict(k_channels=d, v_channels=dv)
    module = DotProductAttention(
        config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", **sizes
    )
    return lambda q, k, v: module(q, k, v, None)  # [S, b, h, d] -> [S, b, h*d]


def measure_single(
    jobs: List[dict], reps: int = 3, kernel: str = "torch", megatron_max_seq: Optional[int] = None
) -> List[dict]:
    """One rank (world 1): the CP=1 figures of every job (a shape: ``seq, batch, heads, kv_heads, head_dim,
    dtype``): the kernel on the full sequence (its saved bytes are the memory reference; its time) and
    Megatron's own attention (its time is the speed reference; its saved bytes too). Megatron's attention
    materialises ``b h S^2`` scores: above ``megatron_max_seq`` it is skipped (None)."""
    local = KernelAttention(kernel)
    megatron: Dict[tuple, object] = {}
    results = []
    for job in jobs:
        S = job["seq"]
        key = (job["heads"], job["kv_heads"], job["head_dim"], job.get("v_head_dim", job["head_dim"]))
        if key not in megatron:
            megatron[key] = _megatron_attention(*key)
        q, k, v, dout = _inputs(job, S, seed=S)
        row = dict(job)
        for name, fn in (("kernel", local), ("megatron", megatron[key])):
            if name == "megatron" and megatron_max_seq is not None and S > megatron_max_seq:
                row[f"saved_bytes_{name}"] = row[f"time_s_{name}"] = None
                continue
            saved = SavedBytes()
            for t in (q, k, v):
                t.grad = None
            with saved.hooks():
                o = fn(q, k, v)
            o.backward(dout.reshape(o.shape))
            del o
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for t in (q, k, v):
                    t.grad = None
                o = fn(q, k, v)
                o.backward(dout.reshape(o.shape))
                del o
                times.append(time.perf_counter() - t0)
            row[f"saved_bytes_{name}"] = saved.total
            row[f"time_s_{name}"] = statistics.median(times)
        results.append(row)
    return results
