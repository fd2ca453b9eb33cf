"""``make gpu-check``: the plugin's GPU code paths checked and timed on ONE GPU, in under 8 minutes.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu.md]   # on a machine with a GPU
    python -m benchmarks.gpu_check --device cpu --quick                # the same tables, tiny, on the CPU (tests)

Needs only torch and this package (no megatron-core, no flash-attn, nothing from the network). Prints and writes
one Markdown page with four tables:

1. **Kernels vs float64.** Every kernel backend available here (``math``, ``torch`` with the route it took per
   call - flash / efficient / math, from ``mindspeed_cp.kernels.ROUTES`` -, ``flash`` when flash-attn is
   installed) in fp16 / bf16 / fp32 on causal, general-mask (with fully masked rows), GQA and dropout blocks, and
   MLA's shapes (q/k head 192, v head 128: causal, masked, GQA):
   forward + backward errors of out, dq, dk, dv relative to the largest float64 reference value.
2. **Ring on one GPU.** The P ring-step blocks of one zigzag rank computed one after another and merged, vs one
   full flash attention (``benchmarks.gpu_decomposition``): the decomposition efficiency (full / P) / rank.
3. **Ulysses' local attention vs Megatron's.** ``mindspeed_cp.local.local_attention`` on S tokens and h/P heads
   vs what Megatron's local ``DotProductAttention`` computes (baddbmm, softmax, dropout, bmm: the S x S scores),
   forward + backward time and peak memory; Megatron's runs out of memory first.
4. **Sliding windows and sinks.** ``local_attention`` with ``window_size`` (causal 128, two-sided 64/64) and
   sinks (off-by-one, learnable, and with a window) vs float64 (out, dq, dk, dv, d sink), bf16 and fp32, and its
   peak memory next to the causal call's (a window keeps it linear in S).
5. **All-gather K/V on one device.** Every rank of ``kvallgather_cp_algo`` emulated in turn on the gathered
   sequence: its tiles (``mindspeed_cp.layout.gather.block_tiles``: rectangular full tiles and square causal
   diagonals) through the kernel, merged, then backward with the merged out / LSE, dK / dV summed over ranks as
   the reduce-scatter sums them: out, dq, dk, dv against float64 (fp32, bf16), and the slowest rank's time against
   one full attention: ``(full / P) / rank``, the all-gather's decomposition efficiency.

Peak memory of the kernels per case (``torch.cuda.max_memory_allocated``) is in tables 1 and 4.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, List, Optional

import torch

Tensor = torch.Tensor
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- 1. kernels vs float64
def _ref(q, k, v, dout, causal, mask, keep, p):
    """float64 attention on [b, n, s, d] (+ dropout keep mask), out and grads; fully masked rows give 0."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    qq, kk, vv = leaves
    g = qq.shape[1] // kk.shape[1]
    kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
    s = qq @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    sq, sk = s.shape[-2:]
    masked = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        masked = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
    if mask is not None:
        masked = masked | mask
    probs = torch.softmax(s.masked_fill(masked, -math.inf), -1).nan_to_num(0.0)
    if keep is not None:
        probs = probs * keep.double() / (1 - p)
    out = probs @ vv
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


def _case_tensors(case: str, dtype, device, quick: bool):
    from mindspeed_cp.dropout import AttentionDropout

    s = 256 if quick else 1024
    b, n, nk, d = 2, 8, (2 if case in ("gqa", "mla-gqa") else 8), 64
    dv = d
    if case.startswith("mla"):  # MLA: DeepSeek's q/k head 128 + 64 rope, v head 128 (quick: a quarter)
        d, dv = (48, 32) if quick else (192, 128)
    gen = torch.Generator(device=device).manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    q, k, v, dout = rnd(b, n, s, d), rnd(b, nk, s, d), rnd(b, nk, s, dv), rnd(b, n, s, dv)
    mask, drop, causal = None, None, case not in ("mask", "mla-mask")
    if case in ("mask", "mla-mask"):
        mask = torch.rand(b, 1, s, s, generator=gen, device=device) < 0.3
        mask[:, :, [3, s - 5]] = True  # fully masked rows: 0, never NaN
    if case == "dropout":
        spec = AttentionDropout(0.1, torch.tensor(7, device=device), torch.arange(n, device=device))
        drop = spec.block(torch.arange(s, device=device), torch.arange(s, device=device))
    return q, k, v, dout, causal, mask, drop


def kernel_table(device, quick: bool) -> List[dict]:
    from mindspeed_cp.kernels import ROUTES, available_kernels, get_kernel

    rows = []
    for name in available_kernels():
        if name == "npu":
            continue
        kernel = get_kernel(name)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            if device.type == "cpu" and dtype == torch.float16 and name != "math":
                continue
            for case in ("causal", "mask", "gqa", "dropout", "mla", "mla-mask", "mla-gqa"):
                q, k, v, dout, causal, mask, drop = _case_tensors(case, dtype, device, quick)
                scale = q.shape[-1] ** -0.5
                before = dict(ROUTES)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    out, lse = kernel.forward(q, k, v, scale=scale, causal=causal, mask=mask, dropout=drop)
                    grads = kernel.backward(
                        dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask, dropout=drop
                    )
                except Exception as e:  # noqa: BLE001 - reported in the table
                    rows.append(dict(kernel=name, dtype=str(dtype)[6:], case=case, error=f"{type(e).__name__}: {e}"))
                    continue
                keep = None if drop is None else drop.keep(q.shape[0], device)
                want = _ref(q, k, v, dout, causal, mask, keep, 0.1 if drop is not None else 0.0)
                errs = {}
                for label, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
                    errs[label] = float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                used = sorted(
                    {
                        f"{ph}:{route}" + (f" ({why})" if why else "")
                        for (kn, ph, route, why), c in ROUTES.items()
                        if c > before.get((kn, ph, route, why), 0)
                    }
                )
                rows.append(
                    dict(
                        kernel=name,
                        dtype=str(dtype)[6:],
                        case=case,
                        **errs,
                        finite=bool(torch.isfinite(out).all()),
                        routes=", ".join(used) or "-",
                        peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None),
                    )
                )
    return rows


# ----------------------------------------------------------------------------- 3. Ulysses local vs Megatron
def _timed(fn: Callable[[], None], device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps


def megatron_local_attention(q, k, v, scale: float):
    """What Megatron's local DotProductAttention computes: [s, b, n, d] -> [s, b, n*d], S x S scores in between."""
    s, b, n, d = q.shape
    g = n // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    qb = q.reshape(s, b * n, d).transpose(0, 1)  # [b*n, s, d]
    kb = k.reshape(s, b * n, d).transpose(0, 1)
    scores = torch.baddbmm(
        torch.empty(b * n, s, s, dtype=q.dtype, device=q.device), qb, kb.transpose(1, 2), beta=0.0, alpha=scale
    )
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, -10000.0).float(), -1).to(q.dtype)
    vb = v.reshape(s, b * n, d).transpose(0, 1)
    return torch.bmm(probs, vb).transpose(0, 1).reshape(s, b, n * d)


def ulysses_table(device, quick: bool) -> List[dict]:
    from mindspeed_cp.local import local_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seqs = [512, 1024] if quick else [8192, 16384, 32768, 65536]
    heads, kv, d, b, P, reps = (8, 2, 64, 1, 4, 1) if quick else (32, 8, 128, 1, 8, 3)
    rows = []
    for s in seqs:
        n, nk = heads // P, max(kv, P) // P
        gen = torch.Generator(device=device).manual_seed(2)
        q, k, v = (
            torch.randn(s, b, h, d, generator=gen, device=device).to(dtype).requires_grad_(True) for h in (n, nk, nk)
        )
        dout = torch.randn(s, b, n, d, generator=gen, device=device).to(dtype)
        row = dict(seq=s, heads_per_rank=n, kv_heads_per_rank=nk, head_dim=d, dtype=str(dtype)[6:])
        for label, fn in (
            ("plugin", lambda: local_attention(q, k, v, causal=True)),
            ("megatron", lambda: megatron_local_attention(q, k, v, d**-0.5)),
        ):

            def step():
                for t in (q, k, v):
                    t.grad = None
                out = fn()
                out.backward(dout.reshape(out.shape))

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row[f"{label}_ms"] = _timed(step, device, reps) * 1e3
                row[f"{label}_peak_mib"] = (
                    torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                )
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if "memory" not in str(e).lower():
                    raise
                row[f"{label}_ms"], row[f"{label}_peak_mib"] = None, "OOM"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 5. the all-gather on one device
def _allgather_rank(kernel, r: int, P: int, q, k, v, dout, scale: float, grads=None):
    """Rank ``r`` of ``P`` of the all-gather on ``[b, n|nk, S, d]`` tensors (global order): every rank's K/V block as
    the gather delivers it (its zigzag tokens, contiguous), its tiles (own block first) forward, merged, then
    backward; dq into its rows, dk / dv added into ``grads`` (the reduce-scatter's sum) at the blocks' positions."""
    from mindspeed_cp.kernels import acc_dtype, merge_
    from mindspeed_cp.layout.gather import block_tiles
    from mindspeed_cp.layout.sharding import zigzag_index

    b, n, S = q.shape[:3]
    pos = [zigzag_index(S, P, j, q.device) for j in range(P)]
    blocks = [(k[:, :, p].contiguous(), v[:, :, p].contiguous()) for p in pos]  # what the gather delivers
    rows = pos[r]
    qr, dr = q[:, :, rows], dout[:, :, rows]
    tiles = block_tiles(P, r, S // P)
    src = [r if t.own else t.block for t in tiles]
    out = torch.zeros(b, n, S // P, v.shape[3], dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.full((b, n, S // P), -math.inf, dtype=acc_dtype(q.dtype), device=q.device)
    for t, j in zip(tiles, src):
        kb, vb = (x[:, :, t.key_slice] for x in blocks[j])
        bo, bl = kernel.forward(qr[:, :, t.row_slice], kb, vb, scale=scale, causal=t.causal)
        merge_(out[:, :, t.row_slice], lse[:, :, t.row_slice], bo, bl)
    out = out.to(q.dtype)
    dq = torch.zeros_like(out[..., :1].expand(*qr.shape), dtype=acc_dtype(q.dtype))
    for t, j in zip(tiles, src):
        kb, vb = (x[:, :, t.key_slice] for x in blocks[j])
        gq, gk, gv = kernel.backward(
            dr[:, :, t.row_slice],
            qr[:, :, t.row_slice],
            kb,
            vb,
            out[:, :, t.row_slice],
            lse[:, :, t.row_slice],
            scale=scale,
            causal=t.causal,
        )
        dq[:, :, t.row_slice] += gq
        if grads is not None:
            keys = pos[j][t.key_slice]
            grads[0][:, :, keys] += gk
            grads[1][:, :, keys] += gv
    return rows, out, dq


def allgather_table(device, quick: bool) -> List[dict]:
    from mindspeed_cp.kernels import acc_dtype, get_kernel

    kernel = get_kernel(None, device)
    rows = []
    exact = [(256 if quick else 2048, 4)]
    timing = [] if quick or device.type != "cuda" else [(32768, 8), (65536, 8), (131072, 8)]
    b, n, nk, d = (1, 4, 2, 32) if quick else (1, 32, 8, 128)
    for S, P in exact + timing:
        for dtype in (torch.float32, torch.bfloat16) if (S, P) in exact else (torch.bfloat16,):
            gen = torch.Generator(device=device).manual_seed(3)
            q, k, v, dout = (torch.randn(b, h, S, d, generator=gen, device=device).to(dtype) for h in (n, nk, nk, n))
            scale = d**-0.5
            row = dict(seq=S, cp=P, dtype=str(dtype)[6:], heads=f"{n}/{nk}")
            if (S, P) in exact:
                grads = [torch.zeros(t.shape, dtype=acc_dtype(dtype), device=device) for t in (k, v)]
                outs, dqs = torch.empty(b, n, S, d, dtype=dtype, device=device), torch.empty(b, n, S, d, device=device)
                for r in range(P):
                    idx, out, dq = _allgather_rank(kernel, r, P, q, k, v, dout, scale, grads)
                    outs[:, :, idx], dqs[:, :, idx] = out, dq.float()
                want = _ref(q, k, v, dout, True, None, None, 0.0)
                for label, got, ref in zip(("out", "dq", "dk", "dv"), (outs, dqs, *grads), want):
                    row[label] = float((got.double() - ref).abs().max() / ref.abs().max())
            full = _timed(
                lambda: kernel.backward(
                    dout, q, k, v, *kernel.forward(q, k, v, scale=scale, causal=True), scale=scale, causal=True
                ),
                device,
                1 if quick else 3,
            )
            worst = max(
                _timed(lambda r=r: _allgather_rank(kernel, r, P, q, k, v, dout, scale), device, 1 if quick else 3)
                for r in range(P)
            )
            row.update(full_ms=full * 1e3, rank_ms=worst * 1e3, efficiency=(full / P) / worst)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 4. windows and sinks
WINDOW_CASES = {  # name -> (window_size, softmax type)
    "window": ((128, 0), None),
    "two-sided": ((64, 64), None),
    "off-by-one": (None, "off-by-one"),
    "learnable": (None, "learnable"),
    "window+learnable": ((128, 0), "learnable"),
}


def _window_ref(q, k, v, dout, window, sink):
    """float64 dense attention on [s, b, h, d] with Megatron's window mask and a sink logit per head."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    sk = None if sink is None else sink.detach().double().requires_grad_(True)
    qq, kk, vv = (t.permute(1, 2, 0, 3) for t in leaves)  # [b, h, s, d]
    g = qq.shape[1] // kk.shape[1]
    kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
    scores = qq @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    S = scores.shape[-1]
    i, j = torch.arange(S, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
    left, right = window if window is not None else (S, 0)
    scores = scores.masked_fill((j < i - left) | (j > i + right), -math.inf)
    if sk is not None:
        col = sk.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, col], -1), -1)[..., :S]
    else:
        probs = torch.softmax(scores, -1)
    out = (probs @ vv).permute(2, 0, 1, 3)
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves] + ([sk.grad] if sk is not None else [])


def window_table(device, quick: bool) -> List[dict]:
    """``local_attention`` (Ulysses' kernel on the whole sequence) with sliding windows and sinks vs float64, and its
    peak memory against the causal call's (a window keeps memory linear in S: no S x S scores)."""
    from mindspeed_cp.local import local_attention

    s, b, n, nk, d = (512, 1, 8, 2, 64) if quick else (8192, 1, 8, 2, 128)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator(device=device).manual_seed(3)
        rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
        q, k, v, dout = rnd(s, b, n, d), rnd(s, b, nk, d), rnd(s, b, nk, d), rnd(s, b, n, d)
        for case, (window, softmax) in WINDOW_CASES.items():
            sink = None
            if softmax == "learnable":
                sink = torch.randn(n, generator=gen, device=device).float().requires_grad_(True)
            elif softmax == "off-by-one":
                sink = torch.zeros(n, device=device, requires_grad=True)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                out = local_attention(*leaves, causal=True, window_size=window, softmax_offset=sink)
                out.backward(dout)
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append(dict(dtype=str(dtype)[6:], case=case, error=f"{type(e).__name__}: {e}"))
                continue
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            got = [out] + [t.grad for t in leaves] + ([sink.grad] if sink is not None else [])
            want = _window_ref(q, k, v, dout, window, sink)
            labels = ("out", "dq", "dk", "dv", "dsink")
            errs = {
                lab: float((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-30))
                for lab, g, w in zip(labels, got, want)
            }
            rows.append(dict(dtype=str(dtype)[6:], case=case, seq=s, **errs, peak_mib=peak))
        if device.type == "cuda":  # the causal call's peak, for the memory comparison
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            local_attention(*leaves, causal=True).backward(dout)
            rows.append(dict(dtype=str(dtype)[6:], case="causal (memory reference)", seq=s,
                             peak_mib=torch.cuda.max_memory_allocated(device) / 2**20))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- report
def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if abs(x) < 0.01 else f"{x:.3g}"
    return str(x)


def markdown(title: str, rows: List[dict], cols: List[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu (tiny tables, for tests)")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--out", default=None, help="Markdown page (default benchmarks/results/gpu.md on a GPU)")
    args = ap.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print(
            "gpu-check: no GPU on this machine (torch.cuda.is_available() is False): nothing to check. "
            "`python -m benchmarks.gpu_check --device cpu --quick` runs the same tables on the CPU."
        )
        return 0
    device = torch.device(args.device or "cuda")
    quick = args.quick or device.type == "cpu"
    start = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    parts = [f"# gpu-check: {name}, torch {torch.__version__}\n"]
    kernels = kernel_table(device, quick)
    parts.append(
        markdown(
            "1. Kernels vs float64 (forward + backward, max error / max |reference|)",
            kernels,
            ["kernel", "dtype", "case", "out", "dq", "dk", "dv", "finite", "routes", "peak_mib", "error"],
        )
    )
    print(parts[-1], flush=True)
    if device.type == "cuda":
        from benchmarks.gpu_decomposition import measure

        ring = measure(
            [32768] if quick else [32768, 65536, 131072],
            [4, 8],
            1,
            32,
            8,
            128,
            torch.bfloat16,
            device,
            2 if quick else 3,
            cp1=False,
            log=lambda m: None,
        )
        parts.append(
            markdown(
                "2. Ring on one GPU: decomposition efficiency (bf16, causal, 32 heads / 8 KV heads of 128)",
                ring,
                [
                    "seq",
                    "cp",
                    "kernel",
                    "time_s_full",
                    "time_s_ring_rank",
                    "ring_efficiency",
                    "ring_efficiency_with_merge",
                    "time_s_ulysses_local",
                    "ulysses_efficiency",
                ],
            )
        )
        print(parts[-1], flush=True)
    uly = ulysses_table(device, quick)
    parts.append(
        markdown(
            "3. Ulysses' local attention (S tokens, h/P heads) vs Megatron's local attention math",
            uly,
            [
                "seq",
                "heads_per_rank",
                "kv_heads_per_rank",
                "dtype",
                "plugin_ms",
                "plugin_peak_mib",
                "megatron_ms",
                "megatron_peak_mib",
            ],
        )
    )
    print(parts[-1], flush=True)
    windows = window_table(device, quick)
    parts.append(
        markdown(
            "4. Sliding windows and sinks: local_attention vs float64 (max error / max |reference|), peak memory",
            windows,
            ["dtype", "case", "seq", "out", "dq", "dk", "dv", "dsink", "peak_mib", "error"],
        )
    )
    print(parts[-1], flush=True)
    gather = allgather_table(device, quick)
    parts.append(
        markdown(
            "5. All-gather K/V on one device: every rank's tiles vs float64, the slowest rank vs one full attention",
            gather,
            ["seq", "cp", "dtype", "heads", "out", "dq", "dk", "dv", "full_ms", "rank_ms", "efficiency"],
        )
    )
    print(parts[-1], flush=True)
    parts.append(f"\n{time.time() - start:.0f} s in all.\n")
    out = args.out or (os.path.join(HERE, "results", "gpu.md") if device.type == "cuda" else None)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
        print(f"gpu-check: wrote {out}")
    checked = [r for r in kernels + windows + gather if r.get("dtype") == "float32" and "error" not in r]
    worst = max((max(r.get(c) or 0.0 for c in ("out", "dq", "dk", "dv", "dsink")) for r in checked), default=0.0)
    return 0 if worst < 1e-4 and not any("error" in r for r in kernels + windows) else 1


if __name__ == "__main__":
    sys.exit(main())
