"""The rank layout: every process group as lists of global ranks. Pure (no torch.distributed).

One function, :func:`rank_layout`, serves the runtime (``parallel_state`` patch creates the groups from
it) and the picture (``mindspeed-cp groups``), so what you see is what runs.

Megatron's default order is ``tp-cp-ep-dp-pp`` with TP fastest: global rank =
``tp_rank + TP*(cp_rank + CP*(dp_rank + DP*pp_rank))`` (EP = 1 for dense models). Worked example,
world 8, TP 2, CP 2, DP 2, PP 1::

    tp    [0,1] [2,3] [4,5] [6,7]
    cp    [0,2] [1,3] [4,6] [5,7]
    dp    [0,4] [1,5] [2,6] [3,7]
    dp_cp [0,2,4,6] [1,3,5,7]

Context-parallel sub-groups, for each CP group ``L`` (ranks TP apart):

* ``ulysses_cp_algo``: ``ulysses`` = ``L``.
* ``megatron_cp_algo``: ``ring`` = ``L``.
* ``hybrid_cp_algo`` with Ulysses degree U: ``ulysses`` = ``L[m*U:(m+1)*U]`` (neighbours: the all-to-all is
  the bandwidth-hungry part), ``ring`` = ``L[m::U]``.
* Double Ring with window K over each ring list ``Rg``: ``ring_intra_window`` = ``Rg[x*K:(x+1)*K]``,
  ``ring_inter_window`` = ``Rg[a::K]`` (the same position in every window).
"""
from __future__ import annotations

from math import prod
from typing import Dict, List, Optional, Sequence

from .config import HYBRID, RING, ULYSSES, CPConfig, CPConfigError

Groups = List[List[int]]

BASE_KINDS = ("tp", "cp", "dp", "pp", "dp_cp")
CP_KINDS = ("ulysses", "ring", "ring_intra_window", "ring_inter_window")
# Kinds whose groups carry ring send/recv traffic (they get a second communicator under overlap).
RING_KINDS = ("ring", "ring_intra_window", "ring_inter_window")


class LayoutError(CPConfigError):
    """An impossible rank layout (sizes that do not multiply out, bad sub-group degrees)."""


def orthogonal_groups(sizes: Sequence[int], mask: Sequence[bool]) -> Groups:
    """Groups of ranks that differ only in the masked dimensions (dimension 0 varies fastest).

    Same enumeration as Megatron's ``generate_masked_orthogonal_rank_groups``: groups are ordered by
    the unmasked coordinates (first fastest), ranks inside a group by the masked ones (first fastest).
    """
    strides = [prod(sizes[:i]) for i in range(len(sizes))]
    inner = [i for i, m in enumerate(mask) if m]
    outer = [i for i, m in enumerate(mask) if not m]

    def offsets(dims):
        out = [0]
        for d in dims:  # the first dim ends up fastest
            out = [o + k * strides[d] for k in range(sizes[d]) for o in out]
        return out

    return [[base + off for off in offsets(inner)] for base in offsets(outer)]


def _split(groups: Groups, size: int) -> Groups:
    return [g[i:i + size] for g in groups for i in range(0, len(g), size)]


def _strided(groups: Groups, stride: int) -> Groups:
    return [g[a::stride] for g in groups for a in range(stride)]


def rank_layout(
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    cp_algo: str = ULYSSES,
    ulysses_degree: Optional[int] = None,
    window: int = 1,
) -> Dict[str, Groups]:
    """Every group kind -> list of rank lists, for Megatron's order ``tp-cp-ep-dp-pp``.

    Always returns ``tp, cp, dp, pp, dp_cp``; adds ``ulysses``, ``ring``, ``ring_intra_window`` and
    ``ring_inter_window`` where the algorithm has them (CP > 1). Raises :class:`LayoutError` (a
    ``ValueError``) naming the flags when the layout is impossible.
    """
    config = CPConfig(context_parallel_size=cp, context_parallel_algo=cp_algo,
                      ulysses_degree_in_cp=ulysses_degree, cp_window_size=window)
    try:
        config.validate(world_size=world_size, tensor_model_parallel_size=tp,
                        pipeline_model_parallel_size=pp)
    except LayoutError:
        raise
    except CPConfigError as e:
        raise LayoutError(str(e)) from None
    return layout_for(config, world_size, tp, pp)


def layout_for(config: CPConfig, world_size: int, tp: int = 1, pp: int = 1) -> Dict[str, Groups]:
    """:func:`rank_layout` for an already validated :class:`CPConfig`."""
    cp = config.cp
    dp = world_size // (tp * pp * cp)
    sizes = [tp, cp, 1, dp, pp]  # tp-cp-ep-dp-pp

    def kind(*names):
        return orthogonal_groups(sizes, [n in names for n in ("tp", "cp", "ep", "dp", "pp")])

    layout: Dict[str, Groups] = {
        "tp": kind("tp"), "cp": kind("cp"), "dp": kind("dp"), "pp": kind("pp"), "dp_cp": kind("dp", "cp"),
    }
    if cp == 1:
        return layout
    algo = config.context_parallel_algo
    u = config.ulysses_size
    if algo == ULYSSES:
        layout["ulysses"] = [list(g) for g in layout["cp"]]
        return layout
    if algo == HYBRID:
        layout["ulysses"] = _split(layout["cp"], u)
        rings = _strided(layout["cp"], u)
    else:
        assert algo == RING
        rings = [list(g) for g in layout["cp"]]
    layout["ring"] = rings
    k = config.cp_window_size
    if k > 1:
        layout["ring_intra_window"] = _split(rings, k)
        layout["ring_inter_window"] = _strided(rings, k)
    return layout


def groups_of_rank(layout: Dict[str, Groups], rank: int) -> Dict[str, List[int]]:
    """For one rank: kind -> the rank list of the group it belongs to."""
    out = {}
    for name, groups in layout.items():
        for g in groups:
            if rank in g:
                out[name] = g
                break
    return out
