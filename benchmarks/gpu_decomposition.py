"""Decomposition efficiency on one GPU: how much of one full flash attention the CP pieces cost.

    python -m benchmarks.gpu_decomposition                     # one GPU: S = 32k, 64k, 128k, bf16, causal
    python -m benchmarks.gpu_decomposition --dry-run --out /tmp/gpu_dry.json     # tiny, on CPU (CI)

Everything is timed on ONE device with the plugin's kernel layer (:func:`mindspeed_cp.kernels.get_kernel`:
flash-attn when installed, else torch's CUDA fused attention); no communication is involved. For each
sequence length S and CP size P (forward + backward, causal):

* ``full``: one kernel call on the whole sequence, all heads (the work CP splits up).
* ``ring``: the P blocks one rank of a zigzag ring computes (its own causal ``2c x 2c`` block, ``r`` blocks
  ``2c x c`` from earlier ranks, ``P-1-r`` blocks ``c x 2c`` from later ones, ``c = S/2P``), timed block
  by block and summed; the slowest rank counts. Efficiency = ``(full / P) / ring``. With the float32
  log-sum-exp merges of the partial results (``ring+merge``) as a second figure.
* ``ulysses``: the local attention of one Ulysses rank: all S tokens, ``h/P`` query heads and
  ``max(hk, P)/P`` KV heads. Efficiency = ``(full / P) / ulysses``.
* CP=1 path vs Megatron: ``ring_attention`` over a one-rank group (what the plugin's ring path costs with
  nothing to split), the bare kernel, and Megatron's own core attention at CP=1 (Transformer Engine's
  ``TEDotProductAttention`` when installed, else the local-spec ``DotProductAttention``, which
  materialises ``b h S^2`` scores and runs out of memory at long S: reported as such).

Efficiencies near 1 mean the split costs no kernel efficiency (short blocks run at lower utilisation); the
anchors: ring-flash-attn reaches ~90% of ideal with zigzag, DeepSpeed-Ulysses 54% of A100 peak, USP 47% MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch

Tensor = torch.Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rand(shape, dtype, device, gen) -> Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def block_time(
    kernel, b: int, h: int, hk: int, sq: int, sk: int, d: int, causal: bool, dtype, device, reps: int, gen
) -> float:
    """Forward + backward of one ``[b, h, sq, d] x [b, hk, sk, d]`` block through the kernel layer."""
    q, dout = (_rand((b, h, sq, d), dtype, device, gen) for _ in range(2))
    k, v = (_rand((b, hk, sk, d), dtype, device, gen) for _ in range(2))
    scale = 1.0 / math.sqrt(d)

    def run():
        out, lse = kernel.forward(q, k, v, scale=scale, causal=causal)
        kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=causal)

    return timed(run, device, reps)


def merge_time(b: int, h: int, rows: int, d: int, device, reps: int, gen) -> float:
    """One float32 log-sum-exp merge of ``rows`` query rows (what the ring does after every block)."""
    from mindspeed_cp.kernels import merge

    o1, o2 = (_rand((b, h, rows, d), torch.float32, device, gen) for _ in range(2))
    l1, l2 = (_rand((b, h, rows), torch.float32, device, gen) for _ in range(2))
    return timed(lambda: merge(o1, l1, o2, l2), device, reps)


def ring_rank_times(P: int, t_diag: float, t_early: float, t_late: float) -> List[float]:
    """Per zigzag rank: own causal block + ``r`` blocks of earlier ranks + ``P-1-r`` of later ranks."""
    return [t_diag + r * t_early + (P - 1 - r) * t_late for r in range(P)]


# ----------------------------------------------------------------------------- CP=1 path and Megatron
def _init_one_rank(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def megatron_attention(h: int, hk: int, d: int, dtype, device):
    """(name, fn) of Megatron's own core attention at CP=1: TE's when installed, else the local spec's."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    import mindspeed_cp.megatron_adaptor  # noqa: F401  - the plugin (CP=1 leaves Megatron's attention alone)

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=h * d,
        num_attention_heads=h,
        num_query_groups=hk,
        kv_channels=d,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        context_parallel_size=1,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )
    te = None
    if device.type == "cuda":
        try:
            from megatron.core.extensions import transformer_engine as te
        except Exception:  # noqa: BLE001 - an unusable Transformer Engine install: the local spec
            te = None
    if te is not None and te.HAVE_TE:  # megatron-core substitutes a mock when TE is missing
        module, name = (
            te.TEDotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"),
            "TEDotProductAttention",
        )
    else:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        module, name = (
            DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"),
            "DotProductAttention (local spec)",
        )
    module = module.to(device)
    return name, lambda q, k, v: module(q, k, v, None)


def _fwd_bwd(fn, q, k, v, dout) -> Callable[[], None]:
    def run():
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(dout.reshape(out.shape))

    return run


def cp1_figures(
    S: int, b: int, h: int, hk: int, d: int, dtype, device, reps: int, kernel_name: Optional[str], gen
) -> dict:
    """Times at CP=1 on the whole sequence: ring_attention on one rank, Megatron's attention."""
    from mindspeed_cp.ring import ring_attention

    _init_one_rank(device)
    q, dout = (_rand((S, b, h, d), dtype, device, gen) for _ in range(2))
    k, v = (_rand((S, b, hk, d), dtype, device, gen) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_()
    row = {
        "time_s_ring_cp1": timed(
            _fwd_bwd(lambda a, c, e: ring_attention(a, c, e, causal=True, kernel=kernel_name), q, k, v, dout),
            device,
            reps,
        )
    }
    name, fn = megatron_attention(h, hk, d, dtype, device)
    row["megatron_attention"] = name
    try:
        row["time_s_megatron_cp1"] = timed(_fwd_bwd(fn, q, k, v, dout), device, reps)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # the local spec's b h S^2 scores
        if "memory" not in str(e).lower():
            raise
        row["time_s_megatron_cp1"] = None
        row["megatron_error"] = f"out of memory: {str(e).splitlines()[0][:160]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- main
def measure(
    seqs: List[int],
    cps: List[int],
    b: int,
    h: int,
    hk: int,
    d: int,
    dtype,
    device,
    reps: int,
    kernel_name: Optional[str] = None,
    cp1: bool = True,
    log=print,
) -> List[dict]:
    from mindspeed_cp.kernels import get_kernel

    kernel = get_kernel(kernel_name, device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for S in seqs:
        t_full = block_time(kernel, b, h, hk, S, S, d, True, dtype, device, reps, gen)
        base = {
            "seq": S,
            "batch": b,
            "heads": h,
            "kv_heads": hk,
            "head_dim": d,
            "dtype": str(dtype).split(".")[-1],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
            "kernel": kernel.name,
            "time_s_full": t_full,
        }
        if cp1:
            base.update(cp1_figures(S, b, h, hk, d, dtype, device, reps, kernel_name, gen))
        log(
            f"S={S}: full {t_full * 1e3:.1f} ms ({kernel.name})"
            + (
                f", ring at CP=1 {base['time_s_ring_cp1'] * 1e3:.1f} ms, {base['megatron_attention']} "
                + ("OOM" if base.get("time_s_megatron_cp1") is None else f"{base['time_s_megatron_cp1'] * 1e3:.1f} ms")
                if cp1
                else ""
            )
        )
        for P in cps:
            if S % (2 * P) or h % P:
                continue
            c = S // (2 * P)
            t_diag = block_time(kernel, b, h, hk, 2 * c, 2 * c, d, True, dtype, device, reps, gen)
            t_early = block_time(kernel, b, h, hk, 2 * c, c, d, False, dtype, device, reps, gen)
            t_late = block_time(kernel, b, h, hk, c, 2 * c, d, False, dtype, device, reps, gen)
            # merges: the diagonal block starts the accumulator; every further block merges 2c or c rows
            t_m2, t_m1 = (merge_time(b, h, rows, d, device, reps, gen) for rows in (2 * c, c))
            ranks = ring_rank_times(P, t_diag, t_early, t_late)
            merges = [r * t_m2 + (P - 1 - r) * t_m1 for r in range(P)]
            hk_u = max(hk, P) // P
            t_uly = block_time(kernel, b, h // P, hk_u, S, S, d, True, dtype, device, reps, gen)
            ideal = t_full / P
            row = dict(
                base,
                cp=P,
                time_s_ring_rank=max(ranks),
                time_s_ring_rank_with_merge=max(t + m for t, m in zip(ranks, merges)),
                time_s_ulysses_local=t_uly,
                ring_efficiency=ideal / max(ranks),
                ring_efficiency_with_merge=ideal / max(t + m for t, m in zip(ranks, merges)),
                ulysses_efficiency=ideal / t_uly,
                ring_block_times_s={"diag": t_diag, "early": t_early, "late": t_late},
            )
            rows.append(row)
            log(
                f"  P={P}: ring rank {max(ranks) * 1e3:.1f} ms (eff {row['ring_efficiency']:.2f}, with merges "
                f"{row['ring_efficiency_with_merge']:.2f}); ulysses local {t_uly * 1e3:.1f} ms "
                f"(eff {row['ulysses_efficiency']:.2f})"
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--cps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--kernel", default=None, help="kernel layer name (default: flash if installed, else torch)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-cp1", action="store_true", help="skip the CP=1 path / Megatron attention timings")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/gpu.json on a GPU)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.dry_run:
        device = torch.device("cpu")
        args.seqs, args.cps, args.heads, args.kv_heads, args.head_dim, args.reps = [256, 512], [2, 4], 4, 2, 16, 1
    elif not torch.cuda.is_available():
        print("gpu_decomposition: no CUDA device; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    rows = measure(
        args.seqs,
        args.cps,
        args.batch,
        args.heads,
        args.kv_heads,
        args.head_dim,
        dtype,
        device,
        args.reps,
        args.kernel,
        cp1=not args.no_cp1,
    )
    out = args.out or (
        None if args.dry_run else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu.json")
    )
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"gpu_decomposition: {len(rows)} records -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
