"""The parallel-groups picture behind ``mindspeed-cp groups``: a terminal table and a one-file HTML page.

Nothing here computes a group. Every picture is drawn from a layout returned by
:func:`mindspeed_cp.topology.rank_layout` (the function the runtime builds its process groups from), so
what you see is what runs. This module only places ranks on a nodes x devices grid (rank = node * D +
device, the usual launcher assignment), numbers the groups of each kind in the layout's order, and
colours them.

The explanations follow the seed visualiser (a HuggingFace space drawing Megatron's TP/DP/PP/CP groups):
one colour per group, ranks of one colour talk to each other for that kind.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import cached_property
from math import gcd
from typing import Dict, List, Optional

Groups = List[List[int]]


@dataclass(frozen=True)
class KindInfo:
    title: str  # short name
    traffic: str  # what the group all-reduces or exchanges
    detail: str  # a few sentences for the page


KINDS: Dict[str, KindInfo] = {
    "tp": KindInfo(
        "tensor parallel",
        "all-reduce of activations in forward and backward",
        "Each rank holds a slice of every layer's weights; after the sliced matmuls the partial "
        "activations are all-reduced (reduce-scatter / all-gather with sequence parallel) in the forward "
        "pass, and their gradients again in the backward pass, every layer. This is the heaviest and most "
        "latency-bound traffic, so TP groups belong inside one node (TP \u2264 8).",
    ),
    "cp": KindInfo(
        "context parallel",
        "ranks that share one sequence",
        "The ranks of a CP group split one sequence: each holds the Q, K and V of its own tokens. Everything "
        "outside attention is token-local; attention exchanges K/V (ring, all-gather) or re-shards heads "
        "(Ulysses) inside this group, see the ulysses / ring / allgather kinds. CP cuts activation memory, "
        "which grows with sequence length; the weights are the same on every CP rank, so CP only shrinks the DP "
        "size.",
    ),
    "dp": KindInfo(
        "data parallel",
        "gradient all-reduce",
        "Same weights, different micro-batches. Once per step, in the backward pass, the weight gradients "
        "are all-reduced across the group (usually overlapped with compute). This is far less traffic "
        "than TP's per-layer all-reduces, so grow DP first when memory allows. With CP > 1 the gradient "
        "reduction actually runs over dp_cp.",
    ),
    "pp": KindInfo(
        "pipeline parallel",
        "point-to-point activations between stages",
        "Consecutive layers live on consecutive stages; a stage sends its output activations to the next "
        "stage and receives gradients back (send/recv between neighbours). Micro-batches keep all stages "
        "busy. Each contiguous block of world / PP ranks is one stage, so a PP group has one rank in every "
        "block.",
    ),
    "dp_cp": KindInfo(
        "data x context parallel",
        "gradient all-reduce across DP and CP",
        "CP ranks hold the same weights (they only saw different tokens of the same sequences), so weight "
        "gradients are all-reduced over DP and CP together; the distributed optimizer (ZeRO) shards its "
        "state over this group.",
    ),
    "ulysses": KindInfo(
        "Ulysses all-to-all",
        "all-to-all of q/k/v: sequence -> heads, and the output back",
        "Before attention an all-to-all turns q, k, v from [s/U, heads] into [s, heads/U] so each rank "
        "attends over the whole sequence for a subset of heads; after attention a second all-to-all "
        "brings the output back to [s/U, heads]. Bandwidth-hungry, so the group is made of neighbouring "
        "CP ranks.",
    ),
    "ring": KindInfo(
        "ring attention",
        "K/V blocks passed around the ring (send/recv)",
        "Each rank keeps its query block and passes its K/V block to the next rank, ring-size - 1 hops, "
        "merging partial results with log-sum-exp; the backward pass sends dK/dV around too. The "
        "sequence is cut in 2 x ring-size zigzag chunks so causal work is balanced.",
    ),
    "ring_intra_window": KindInfo(
        "Double Ring: inner ring",
        "K/V passed around inside windows of --cp-window-size neighbouring ring ranks",
        "Double Ring splits each ring into windows of --cp-window-size neighbouring ranks (typically one "
        "node). K/V circulate inside a window over fast intra-node links.",
    ),
    "allgather": KindInfo(
        "all-gather K/V",
        "K/V all-gathered, dK/dV reduce-scattered (kvallgather_cp_algo)",
        "Each rank keeps its queries and all-gathers every rank's K/V once per layer (split by KV heads so the "
        "gather overlaps compute), attends to exactly the keys its queries may see, and reduce-scatters dK/dV in "
        "the backward pass. The sequence is cut in 2 x CP zigzag chunks so causal work is balanced; with few KV "
        "heads (GQA) this moves less than Ulysses, which also moves Q and the output.",
    ),
    "ring_inter_window": KindInfo(
        "Double Ring: outer ring",
        "K/V passed across windows (one rank per window)",
        "The ranks at the same position of every window form the outer ring: it moves a whole window's "
        "worth of K/V to the next window across nodes, overlapped with the inner ring's compute.",
    ),
}


def kind_info(kind: str) -> KindInfo:
    return KINDS.get(kind, KindInfo(kind, "", ""))


# ----------------------------------------------------------------------------- colours
def group_colours(n: int) -> List[str]:
    """``n`` distinct light CSS colours: evenly spaced hues, dealt so neighbouring groups differ a lot."""
    if n < 1:
        return []
    step = max(1, round(n * 0.381966))  # golden-ratio stride through the hue circle
    while gcd(step, n) != 1:  # a stride coprime to n visits every hue exactly once
        step += 1
    colours = []
    for g in range(n):
        hue = (g * step % n) * 360.0 / n
        light = 80 if g % 2 == 0 else 70
        colours.append(f"hsl({hue:.2f}, 72%, {light}%)")
    return colours


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ----------------------------------------------------------------------------- the picture
@dataclass(frozen=True)
class Picture:
    """A rank layout (from :func:`~mindspeed_cp.topology.rank_layout`) placed on nodes x devices."""

    layout: Dict[str, Groups]
    devices_per_node: int
    cp_algo: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.layout or "tp" not in self.layout:
            raise ValueError("a rank layout needs at least the 'tp' kind")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ValueError(f"--devices-per-node {self.devices_per_node!r} must be a positive integer")
        world = self.world_size
        for kind, groups in self.layout.items():
            ranks = sorted(r for g in groups for r in g)
            if ranks != list(range(world)):
                raise ValueError(f"layout kind {kind!r} does not cover ranks 0..{world - 1} exactly once")

    # ---------------------------------------------------------------- sizes read off the layout
    @cached_property
    def world_size(self) -> int:
        return sum(len(g) for g in self.layout["tp"])

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.devices_per_node)

    def size(self, kind: str) -> int:
        """Ranks per group of ``kind`` (1 when the layout lacks it)."""
        groups = self.layout.get(kind)
        return len(groups[0]) if groups else 1

    def group_index(self, kind: str) -> List[int]:
        """rank -> index of its group in ``layout[kind]``."""
        index = [0] * self.world_size
        for g, ranks in enumerate(self.layout[kind]):
            for r in ranks:
                index[r] = g
        return index

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def cross_node_groups(self, kind: str) -> int:
        return sum(1 for g in self.layout[kind] if len({self.node_of(r) for r in g}) > 1)

    def rows(self) -> List[List[Optional[int]]]:
        """The rank grid, one row per node; a partly filled last node is padded with None."""
        d = self.devices_per_node
        return [[r if r < self.world_size else None for r in range(n * d, (n + 1) * d)] for n in range(self.nodes)]

    # ---------------------------------------------------------------- words
    def summary(self) -> List[str]:
        """Configuration lines shared by the text and HTML pictures."""
        tp, cp, dp, pp = (self.size(k) for k in ("tp", "cp", "dp", "pp"))
        lines = [
            f"world {self.world_size} = TP {tp} x CP {cp} x DP {dp} x PP {pp} "
            f"(Megatron order tp-cp-ep-dp-pp, TP fastest)"
        ]
        if cp > 1:
            parts = [f"context-parallel algo {self.cp_algo or '?'}"]
            if "ulysses" in self.layout and "ring" in self.layout:
                parts.append(f"Ulysses {self.size('ulysses')} x ring {self.size('ring')}")
            if "ring_intra_window" in self.layout:
                parts.append(
                    f"Double Ring: windows of {self.size('ring_intra_window')}, "
                    f"outer ring of {self.size('ring_inter_window')}"
                )
            lines.append(", ".join(parts))
        part = ", last node partly filled" if self.world_size % self.devices_per_node else ""
        lines.append(
            f"{_count(self.nodes, 'node')} x {_count(self.devices_per_node, 'device')} "
            f"(rank = node x {self.devices_per_node} + device{part})"
        )
        return lines

    def kind_heading(self, kind: str) -> str:
        groups = self.layout[kind]
        n, size = len(groups), self.size(kind)
        if size == 1:
            where = "one rank each: no communication"
        else:
            crossing = self.cross_node_groups(kind)
            where = "all inside one node" if crossing == 0 else f"{crossing} of {n} span nodes"
        return f"{_count(n, 'group')} of {_count(size, 'rank')}, {where}"


# ----------------------------------------------------------------------------- text
def render_text(picture: Picture) -> str:
    """A terminal picture: the rank grid, then per kind its groups and each device's group index."""
    world = picture.world_size
    width = max(len(str(world - 1)), len(f"d{picture.devices_per_node - 1}")) + 1
    label_w = len(f"node {picture.nodes - 1}") + 2

    def grid(values_of_rank) -> List[str]:
        head = " " * label_w + "".join(f"d{d}".rjust(width) for d in range(picture.devices_per_node))
        out = [head]
        for n, row in enumerate(picture.rows()):
            cells = "".join(("" if r is None else str(values_of_rank(r))).rjust(width) for r in row)
            out.append((f"node {n}".ljust(label_w) + cells).rstrip())
        return ["  " + line for line in out]

    lines = ["Parallel groups: " + picture.summary()[0], *picture.summary()[1:], "", "ranks:"]
    lines += grid(lambda r: r)
    for kind, groups in picture.layout.items():
        info = kind_info(kind)
        index = picture.group_index(kind)
        lines += ["", f"== {kind}: {info.title} - {picture.kind_heading(kind)}"]
        if info.traffic:
            lines.append(f"   {info.traffic}")
        if all(g == [i] for i, g in enumerate(groups)):
            lines.append("  each rank is its own group (group index = rank)")
            continue
        gw = len(str(len(groups) - 1))
        lines.append("  group -> ranks")
        lines += [f"  {str(g).rjust(max(gw, 5))} -> {' '.join(map(str, ranks))}" for g, ranks in enumerate(groups)]
        lines.append("  group index of each device:")
        lines += grid(lambda r: index[r])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- html
_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 16px 24px;
       color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 6px; }
header .summary { margin: 2px 0; font-family: ui-monospace, Menlo, Consolas, monospace; }
header .intro { max-width: 70em; color: #444; }
nav { margin: 6px 0 12px; font-size: 13px; }
nav a { margin-right: 10px; }
main { display: grid; gap: 16px; align-items: start;
       grid-template-columns: repeat(auto-fill, minmax(min(100%, var(--card)), 1fr)); }
section.kind { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 10px 14px;
               box-sizing: border-box; overflow-x: auto; }
section.kind h2 { font-size: 16px; margin: 0 0 2px; }
section.kind h2 code { font-size: 15px; background: #eef; padding: 0 4px; border-radius: 3px; }
.stats { color: #555; font-size: 12px; margin: 0 0 4px; }
.traffic { font-weight: 600; margin: 2px 0; }
.detail { color: #444; font-size: 12px; margin: 2px 0 8px; }
table.grid { border-collapse: separate; border-spacing: 3px; }
table.grid th { font-size: 11px; color: #666; font-weight: normal; padding: 0 4px; }
td.cell { width: 44px; height: 38px; text-align: center; border-radius: 5px; border: 1px solid #0002;
          color: #111; cursor: default; }
td.cell b { display: block; font-size: 14px; }
td.cell span { display: block; font-size: 10px; color: #333; }
td.empty { border: 1px dashed #ccc; border-radius: 5px; }
ul.legend { list-style: none; padding: 0; margin: 8px 0 0; display: flex; flex-wrap: wrap; gap: 4px 12px;
            font-size: 12px; max-width: 60em; }
ul.legend li { white-space: nowrap; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #0003; border-radius: 3px;
          vertical-align: -2px; margin-right: 4px; }
section.hl td.cell, section.hl ul.legend li { opacity: .25; }
section.hl .on { opacity: 1 !important; outline: 2px solid #111; }
"""

# Hovering a cell or a legend entry highlights its group (no network, no external code).
_JS = """
document.querySelectorAll('section.kind').forEach(function (sec) {
  function mark(g) {
    sec.classList.toggle('hl', g !== null);
    sec.querySelectorAll('[data-group]').forEach(function (el) {
      el.classList.toggle('on', g !== null && el.getAttribute('data-group') === g);
    });
  }
  sec.addEventListener('mouseover', function (e) {
    var el = e.target.closest('[data-group]');
    mark(el ? el.getAttribute('data-group') : null);
  });
  sec.addEventListener('mouseleave', function () { mark(null); });
});
"""


def render_html(picture: Picture) -> str:
    """One self-contained HTML page: a coloured nodes x devices grid and a legend per group kind."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mindspeed-cp groups: {e(picture.summary()[0])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>Parallel groups</h1>",
    ]
    out += [f'<p class="summary">{e(line)}</p>' for line in picture.summary()]
    out.append(
        '<p class="intro">Each grid is the cluster: one row per node, one cell per device, showing the '
        "global rank and (small) the index of its group of that kind. Cells of the same colour are one "
        "process group and communicate with each other for that kind of parallelism; the legend lists "
        "each group's ranks. Hover a cell to highlight its group.</p>"
    )
    out.append("<nav>" + " ".join(f'<a href="#kind-{e(k)}">{e(k)}</a>' for k in picture.layout) + "</nav>")
    card = max(380, 100 + 50 * picture.devices_per_node)  # px: the grid of one node row fits
    out.append(f'</header><main style="--card: {card}px">')
    for kind, groups in picture.layout.items():
        info = kind_info(kind)
        colours = group_colours(len(groups))
        index = picture.group_index(kind)
        members = [_members(ranks) for ranks in groups]  # once per group, not per cell: linear in the world
        ek = e(kind)
        out.append(f'<section class="kind" id="kind-{ek}" data-kind="{ek}" data-groups="{len(groups)}">')
        out.append(f"<h2><code>{ek}</code> {e(info.title)}</h2>")
        out.append(f'<p class="stats">{e(picture.kind_heading(kind))}</p>')
        if info.traffic:
            out.append(f'<p class="traffic">{e(info.traffic)}</p>')
        if info.detail:
            out.append(f'<p class="detail">{e(info.detail)}</p>')
        out.append(f'<table class="grid" data-kind="{ek}"><thead><tr><th></th>')
        out += [f"<th>dev {d}</th>" for d in range(picture.devices_per_node)]
        out.append("</tr></thead><tbody>")
        for n, row in enumerate(picture.rows()):
            out.append(f"<tr><th>node {n}</th>")
            for r in row:
                if r is None:
                    out.append('<td class="empty"></td>')
                    continue
                g = index[r]
                out.append(
                    f'<td class="cell" data-kind="{ek}" data-rank="{r}" data-group="{g}" '
                    f'style="background-color: {colours[g]}" title="rank {r}: {ek} group {g} = '
                    f'{members[g]}"><b>{r}</b><span>g{g}</span></td>'
                )
            out.append("</tr>")
        out.append(f'</tbody></table><ul class="legend" data-kind="{ek}">')
        for g, ranks in enumerate(groups):
            out.append(
                f'<li data-group="{g}" data-ranks="{" ".join(map(str, ranks))}">'
                f'<span class="swatch" style="background-color: {colours[g]}"></span>'
                f"g{g}: {', '.join(map(str, ranks))}</li>"
            )
        out.append("</ul></section>")
    out.append(f"</main><script>{_JS}</script></body></html>")
    return "\n".join(out) + "\n"


def _members(ranks: List[int], most: int = 16) -> str:
    """A group's ranks for a cell's tooltip: all of them up to ``most``, else the first and last few (the
    legend lists every rank once)."""
    if len(ranks) <= most:
        return " ".join(map(str, ranks))
    return f"{' '.join(map(str, ranks[:4]))} ... {' '.join(map(str, ranks[-2:]))} ({len(ranks)} ranks)"


def default_devices_per_node(world_size: int) -> int:
    """8 devices per node (one GPU/NPU server), or the whole world when it is smaller."""
    return min(8, max(1, world_size))


def devices_for(world_size: int, nodes: Optional[int] = None, devices_per_node: Optional[int] = None) -> int:
    """Devices per node from ``--nodes`` or ``--devices-per-node`` (at most one given)."""
    if nodes is not None and devices_per_node is not None:
        raise ValueError("give --nodes or --devices-per-node, not both")
    if nodes is not None:
        if nodes < 1 or world_size % nodes:
            raise ValueError(f"--nodes {nodes} does not divide world size {world_size} into equal nodes")
        return world_size // nodes
    if devices_per_node is None:
        return default_devices_per_node(world_size)
    if devices_per_node < 1:
        raise ValueError(f"--devices-per-node {devices_per_node} must be a positive integer")
    return devices_per_node


__all__ = [
    "KINDS",
    "KindInfo",
    "Picture",
    "default_devices_per_node",
    "devices_for",
    "group_colours",
    "kind_info",
    "render_html",
    "render_text",
]
