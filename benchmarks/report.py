"""The markdown table and the plots of a benchmark run (``benchmarks/results/``)."""

from __future__ import annotations

import os
from typing import List, Optional

GOALS = {"comm": 1.02, "balance": 1.02, "memory": 1.10}
ALGO_ORDER = ["ulysses", "ring", "double_ring", "hybrid", "kvallgather"]
ALGO_NAME = {
    "ulysses": "Ulysses",
    "ring": "Ring",
    "double_ring": "Double Ring",
    "hybrid": "Hybrid",
    "kvallgather": "All-gather K/V",
}


def label(r: dict) -> str:
    """``Ulysses``, ``Double Ring K=2``, ``Hybrid U=2 x R=2``."""
    if r["algo"] == "double_ring":
        return f"Double Ring K={r['window']}"
    if r["algo"] == "hybrid":
        return f"Hybrid U={r['ulysses_degree']} x R={r['ring_degree']}"
    return ALGO_NAME[r["algo"]]


def _mla(r: dict) -> str:
    """`` MLA 96/64`` where the value head size differs from the query/key one."""
    dv = r.get("v_head_dim", r["head_dim"])
    return "" if dv == r["head_dim"] else f" MLA {r['head_dim']}/{dv}"


def _gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _mark(ok: bool) -> str:
    return "" if ok else " ✗"


def _peak(r: dict) -> str:
    return "-" if r.get("memory_peak_ratio") is None else f"{r['memory_peak_ratio']:.3f}"


def markdown(
    records: List[dict],
    scale: Optional[List[dict]],
    machine: str,
    runtime_s: float,
    notes: List[str],
    packed: Optional[List[dict]] = None,
    kv_cache: Optional[List[dict]] = None,
    windows: Optional[dict] = None,
) -> str:
    lines = [
        "# CPU benchmark (gloo ranks, one thread each)",
        "",
        f"Machine: {machine}. Whole run: {runtime_s:.0f} s. CPU times are relative only.",
        "",
        "Ratios: **comm** = bytes a rank sends (forward + backward, algorithm traffic) / textbook volume "
        f"(goal <= {GOALS['comm']}); **balance** = max / mean attention work per rank (goal <= {GOALS['balance']}); "
        "**masked** = fully masked blocks computed (goal 0); **memory** = bytes saved for backward per rank / "
        f"(single-device bytes / CP) (goal <= {GOALS['memory']}); **peak** = the same with the communication "
        "buffers alive at once added (the ring's blocks in flight; the all-gather's gathered K/V and dK/dV "
        "accumulators); **speed-up** = Megatron's own attention at "
        "CP=1 on the full sequence / this rank's forward + backward time (slowest rank); **par. eff.** = (the "
        "plugin's kernel at CP=1 / this time) / min(CP, cores): all ranks share this machine's cores; **CPU eff.** "
        "= the CP=1 kernel's time / the CPU seconds of all ranks together (1 = splitting cost nothing). "
        "✗ = goal not met (see the notes).",
        "",
        "| algorithm | CP | heads (q/kv) | S | comm | balance | masked | memory | peak | time ms | CP=1 Megatron ms "
        "| CP=1 kernel ms | speed-up | par. eff. | CPU eff. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        g = r["goals"]
        comm = r["comm_bytes"] / r["comm_bytes_textbook"]
        speed = "-" if not r["time_s_single"] else f"{r['time_s_single'] / r['time_s']:.2f}"
        lines.append(
            f"| {label(r)}{_mla(r)} | {r['cp']} | {r['heads']}/{r['kv_heads']} | {r['seq']} "
            f"| {comm:.3f}{_mark(g['comm'])} "
            f"| {r['work_imbalance']:.3f}{_mark(g['balance'])} | {r['masked_blocks_computed']}{_mark(g['masked'])} "
            f"| {r['memory_ratio']:.3f}{_mark(g['memory'])} | {_peak(r)} | {_ms(r['time_s'])} "
            f"| {_ms(r['time_s_single'])} "
            f"| {_ms(r['time_s_single_kernel'])} | {speed} | {r['parallel_efficiency']:.2f} "
            f"| {r['cpu_efficiency']:.2f} |"
        )
    if scale:
        lines += [
            "",
            "## Scale: longest sequence a tiny GPT trains at, CP=4",
            "",
            f"Tiny megatron-core GPT ({scale[0]['num_layers']} layers, hidden {scale[0]['hidden']}, "
            f"{scale[0]['heads']} heads, batch {scale[0]['batch']}, local layer spec), one training step per "
            f"length, doubling; memory budget {_gib(scale[0]['mem_budget_bytes_per_rank'])} GiB per rank "
            f"(x4 ranks), time cap {scale[0]['time_cap_cpu_s']:.0f} CPU-seconds of the busiest rank per algorithm.",
            "",
            "| algorithm | longest S trained | stopped by | step s (wall / CPU) at longest "
            "| peak RSS GiB/rank | memory-bound S (estimate) |",
            "|---|---|---|---|---|---|",
        ]
        for s in scale:
            est = s.get("memory_bound_seq_estimate")
            step = "-" if s["step_s_at_max"] is None else f"{s['step_s_at_max']:.1f} / {s['step_cpu_s_at_max']:.1f}"
            lines.append(
                f"| {ALGO_NAME[s['algo']]}{' K=2' if s['algo'] == 'double_ring' else ''}"
                f"{' U=2 x R=2' if s['algo'] == 'hybrid' else ''} | {s['max_seq']} | {s['stopped_by']} "
                f"| {step} | {_gib(s['peak_rss_bytes_at_max'])} | {'-' if not est else f'~{est}'} |"
            )
    if packed:
        lines += [
            "",
            "## Packed documents (per-document zigzag, arithmetic: benchmarks/bench_packing.py)",
            "",
            "Lognormal document lengths (mean ~2k). Work = unmasked (query, key) pairs per rank; computed = "
            "score elements the ring hands its kernels (row tiles, key columns the tiles' documents reach).",
            "",
            "| S | CP | documents/sample | work imbalance (worst) | global zigzag | contiguous | padding mean / "
            "worst | computed / useful | computed / whole blocks | computed imbalance | tiles skipped |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in packed:
            s = p["summary"]
            lines.append(
                f"| {p['seq']} | {p['cp']} | {p['mean_documents']:.0f} | {s['per_document_zigzag']['worst']:.3f} "
                f"| {s['global_zigzag']['worst']:.2f} | {s['contiguous']['worst']:.2f} "
                f"| {100 * s['padding']['mean']:.2f} % / {100 * s['padding']['worst']:.2f} % "
                f"| {s['computed_over_useful']['mean']:.2f} | {100 * s['computed_over_full_blocks']['mean']:.1f} % "
                f"| {s['computed_imbalance']['worst']:.3f} | {s['skipped_tiles']['mean']:.0f} |"
            )
    if kv_cache:
        from .bench_kv_cache import markdown as kv_markdown

        lines += kv_markdown(kv_cache)
    if windows:
        from .bench_windows import markdown as windows_markdown

        lines += windows_markdown(windows)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plots(records: List[dict], scale: Optional[List[dict]], out_dir: str) -> List[str]:
    """PNG plots of the ratios against CP and against S; returns the written paths."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(
            "benchmarks: the plots need matplotlib (pip install matplotlib; `make setup` installs it)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [
        r
        for r in records
        if r["textbook_assumption_holds"]
        and r["kv_heads"] == r["heads"]
        and r.get("v_head_dim", r["head_dim"]) == r["head_dim"]
    ] or records
    written = []
    ratios = [
        ("comm_ratio", "comm bytes / textbook", GOALS["comm"]),
        ("work_imbalance", "work max / mean", GOALS["balance"]),
        ("memory_ratio", "saved bytes / (single / CP)", GOALS["memory"]),
    ]
    speed = [
        ("speedup", "speed-up vs CP=1 Megatron attention", None),
        ("parallel_efficiency", "speed-up vs CP=1 kernel / min(CP, cores)", None),
        ("cpu_efficiency", "CP=1 kernel time / CPU time of all ranks", None),
    ]
    labels = sorted(
        {label(r) for r in main}, key=lambda n: (ALGO_ORDER.index(next(r["algo"] for r in main if label(r) == n)), n)
    )
    markers = "osD^v<>px*"
    styles = ["-", "--", "-.", ":"]

    def draw(xkey: str, rows: List[dict], title: str, fname: str, metrics: list) -> None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.2))
        for ax, (key, ylabel, goal) in zip(axes, metrics):
            for i, name in enumerate(labels):
                pts = sorted((r[xkey], r[key]) for r in rows if label(r) == name and r.get(key) is not None)
                if pts:
                    # equal values overlap: shrinking markers and varied dashes keep every series visible
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker=markers[i % len(markers)],
                        markersize=max(10 - i, 5),
                        ls=styles[i % len(styles)],
                        label=name,
                        alpha=0.8,
                    )
            if goal is not None:
                ax.axhline(goal, color="red", ls="--", lw=1, label="goal")
                ax.axhline(1.0, color="grey", ls=":", lw=1)
                lo = min([r[key] for r in rows if r.get(key) is not None] + [1.0])
                ax.set_ylim(min(0.95, lo - 0.02), max(goal + 0.05, max(r[key] for r in rows) + 0.02))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r[xkey] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("CP size" if xkey == "cp" else "sequence length S")
            ax.set_title(ylabel, fontsize=10)
            ax.grid(alpha=0.3)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    s_max = max(r["seq"] for r in main)
    cp_mid = 4 if any(r["cp"] == 4 for r in main) else max(r["cp"] for r in main)
    by_cp, by_seq = [r for r in main if r["seq"] == s_max], [r for r in main if r["cp"] == cp_mid]
    draw("cp", by_cp, f"Ratios against CP size (S = {s_max})", "ratios_vs_cp.png", ratios)
    draw("seq", by_seq, f"Ratios against sequence length (CP = {cp_mid})", "ratios_vs_seq.png", ratios)
    draw(
        "cp",
        by_cp,
        f"CPU speed against CP size (S = {s_max}; {main[0].get('cores')} cores shared by all ranks)",
        "speed_vs_cp.png",
        speed,
    )
    draw("seq", by_seq, f"CPU speed against sequence length (CP = {cp_mid})", "speed_vs_seq.png", speed)
    if scale:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = [ALGO_NAME[s["algo"]] for s in scale]
        vals = [max(s["max_seq"], 1) for s in scale]
        bars = ax.bar(names, vals, color=["#d62728" if s["stopped_by"] == "memory" else "#1f77b4" for s in scale])
        for b, s in zip(bars, scale):
            ax.annotate(
                f"{s['max_seq']}\n({s['stopped_by']})",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_yscale("log", base=2)
        ax.set_ylabel("longest S trained (CP=4)")
        ax.set_ylim(min(vals) / 2, max(vals) * 4)
        ax.set_yticks(sorted(set(vals)))
        ax.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_yaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title("Tiny GPT, CP=4: longest sequence (red: memory-bound, blue: time cap)", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, "scale_cp4.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
