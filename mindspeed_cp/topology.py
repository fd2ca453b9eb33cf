"""The rank layout: every process group as lists of global ranks. Pure (no torch.distributed).

One function, :func:`rank_layout`, serves the runtime (``parallel_state`` patch creates the groups from
it) and the picture (``mindspeed-cp groups``), so what you see is what runs. :func:`rank_groups` answers
for one rank (the planner: rank 0's groups for every candidate) by the same rules applied to the one CP group
holding that rank, in time linear in the group sizes; both are linear in the world size overall.

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
* ``kvallgather_cp_algo``: ``allgather`` = ``L`` (K/V all-gathered, dK/dV reduce-scattered over it).
* ``hybrid_cp_algo`` with Ulysses degree U: ``ulysses`` = ``L[m*U:(m+1)*U]`` (neighbours: the all-to-all is
  the bandwidth-hungry part), ``ring`` = ``L[m::U]``.
* Double Ring with window K over each ring list ``Rg``: ``ring_intra_window`` = ``Rg[x*K:(x+1)*K]``,
  ``ring_inter_window`` = ``Rg[a::K]`` (the same position in every window).
"""

from __future__ import annotations

from math import prod
from typing import Dict, List, Optional, Sequence

from .config import HYBRID, KVALLGATHER, RING, ULYSSES, CPConfig, CPConfigError

Groups = List[List[int]]

CP_KINDS = ("ulysses", "ring", "ring_intra_window", "ring_inter_window", "allgather")
# Kinds whose groups carry ring send/recv traffic (they get a second communicator under overlap).
RING_KINDS = ("ring", "ring_intra_window", "ring_inter_window")


class LayoutError(CPConfigError):
    """An impossible rank layout (sizes that do not multiply out, bad sub-group degrees)."""


def _offsets(sizes: Sequence[int], dims: Sequence[int]) -> List[int]:
    """Rank offsets spanned by ``dims`` (the first dim ends up fastest)."""
    strides = [prod(sizes[:i]) for i in range(len(sizes))]
    out = [0]
    for d in dims:
        out = [o + k * strides[d] for k in range(sizes[d]) for o in out]
    return out


def orthogonal_groups(sizes: Sequence[int], mask: Sequence[bool]) -> Groups:
    """Groups of ranks that differ only in the masked dimensions (dimension 0 varies fastest).

    Same enumeration as Megatron's ``generate_masked_orthogonal_rank_groups``: groups are ordered by
    the unmasked coordinates (first fastest), ranks inside a group by the masked ones (first fastest).
    """
    inner = _offsets(sizes, [i for i, m in enumerate(mask) if m])
    return [[base + off for off in inner] for base in _offsets(sizes, [i for i, m in enumerate(mask) if not m])]


def orthogonal_group_of(sizes: Sequence[int], mask: Sequence[bool], rank: int) -> Sequence[int]:
    """The group of :func:`orthogonal_groups` that holds ``rank``, without building the others (a ``range`` when
    one dimension is masked: the group is then an arithmetic progression)."""
    base, stride, strides = 0, 1, []
    for size, masked in zip(sizes, mask):
        if not masked:
            base += (rank // stride) % size * stride
        strides.append(stride)
        stride *= size
    dims = [i for i, m in enumerate(mask) if m]
    if len(dims) == 1:
        return range(base, base + sizes[dims[0]] * strides[dims[0]], strides[dims[0]])
    return [base + off for off in _offsets(sizes, dims)]


def _split(groups: Groups, size: int, rank: Optional[int] = None) -> Groups:
    """Pieces of ``size`` consecutive members; with ``rank``: only the piece holding it (``groups``: its group)."""
    if rank is not None:
        first = groups[0].index(rank) // size * size
        return [groups[0][first : first + size]]
    return [g[i : i + size] for g in groups for i in range(0, len(g), size)]


def _strided(groups: Groups, stride: int, rank: Optional[int] = None) -> Groups:
    """Every ``stride``-th member from each offset; with ``rank``: only the one holding it."""
    if rank is not None:
        return [groups[0][groups[0].index(rank) % stride :: stride]]
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

    Always returns ``tp, cp, dp, pp, dp_cp``; adds ``ulysses``, ``ring``, ``ring_intra_window``,
    ``ring_inter_window`` and ``allgather`` where the algorithm has them (CP > 1). Raises :class:`LayoutError` (a
    ``ValueError``) naming the flags when the layout is impossible.
    """
    return layout_for(_checked(world_size, tp, pp, cp, cp_algo, ulysses_degree, window), world_size, tp, pp)


def rank_groups(
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    cp_algo: str = ULYSSES,
    ulysses_degree: Optional[int] = None,
    window: int = 1,
    rank: int = 0,
) -> Dict[str, List[int]]:
    """For one rank, kind -> its group: ``groups_of_rank(rank_layout(...), rank)`` without building the
    layout (linear in the group sizes). Same arguments and errors as :func:`rank_layout`."""
    config = _checked(world_size, tp, pp, cp, cp_algo, ulysses_degree, window)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise LayoutError(f"rank {rank!r} is not one of 0..{world_size - 1}")
    return {kind: list(g) for kind, g in groups_for(config, world_size, tp, pp, rank).items()}


def _checked(world_size, tp, pp, cp, cp_algo, ulysses_degree, window) -> CPConfig:
    config = CPConfig(
        context_parallel_size=cp,
        context_parallel_algo=cp_algo,
        ulysses_degree_in_cp=ulysses_degree,
        cp_window_size=window,
    )
    try:
        config.validate(world_size=world_size, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    except LayoutError:
        raise
    except CPConfigError as e:
        raise LayoutError(str(e)) from None
    return config


def layout_for(config: CPConfig, world_size: int, tp: int = 1, pp: int = 1) -> Dict[str, Groups]:
    """:func:`rank_layout` for an already validated :class:`CPConfig`."""
    sizes = _sizes(config, world_size, tp, pp)
    layout = {kind: orthogonal_groups(sizes, mask) for kind, mask in _MASKS.items()}
    layout.update(_cp_subgroups(config, layout["cp"]))
    return layout


def groups_for(
    config: CPConfig, world_size: int, tp: int = 1, pp: int = 1, rank: int = 0, kinds: Optional[Sequence[str]] = None
) -> Dict[str, Sequence[int]]:
    """``groups_of_rank(layout_for(...), rank)`` (only ``kinds``, default all) without building the layout: the
    same rules applied to the one CP group holding ``rank``. Groups that are arithmetic progressions come as
    ``range`` objects, so the planner's question for every candidate costs next to nothing at any world size."""
    sizes = _sizes(config, world_size, tp, pp)
    wanted = set(kinds or (*_MASKS, *CP_KINDS))
    out = {
        kind: orthogonal_group_of(sizes, mask, rank) for kind, mask in _MASKS.items() if kind in wanted or kind == "cp"
    }
    out.update({kind: groups[0] for kind, groups in _cp_subgroups(config, [out["cp"]], rank).items()})
    return {kind: g for kind, g in out.items() if kind in wanted}


# tp-cp-ep-dp-pp (EP = 1): the dimensions each base kind spans
_MASKS = {
    kind: [n in names for n in ("tp", "cp", "ep", "dp", "pp")]
    for kind, names in (("tp", ("tp",)), ("cp", ("cp",)), ("dp", ("dp",)), ("pp", ("pp",)), ("dp_cp", ("dp", "cp")))
}


def _sizes(config: CPConfig, world_size: int, tp: int, pp: int) -> List[int]:
    return [tp, config.cp, 1, world_size // (tp * pp * config.cp), pp]  # tp-cp-ep-dp-pp


def _cp_subgroups(config: CPConfig, cp_groups: Groups, rank: Optional[int] = None) -> Dict[str, Groups]:
    """The Ulysses / ring / Double Ring kinds carved out of ``cp_groups`` (none at CP = 1); with ``rank``, of the
    one CP group holding it, only the groups holding it."""
    if config.cp == 1:
        return {}
    algo = config.context_parallel_algo
    own = [list(g) if isinstance(g, list) else g for g in cp_groups]  # the same members, not the same list
    if algo == ULYSSES:
        return {"ulysses": own}
    if algo == KVALLGATHER:
        return {"allgather": own}
    out: Dict[str, Groups] = {}
    if algo == HYBRID:
        out["ulysses"] = _split(cp_groups, config.ulysses_size, rank)
        rings = _strided(cp_groups, config.ulysses_size, rank)
    else:
        assert algo == RING
        rings = own
    out["ring"] = rings
    k = config.cp_window_size
    if k > 1:
        out["ring_intra_window"] = _split(rings, k, rank)
        out["ring_inter_window"] = _strided(rings, k, rank)
    return out


def groups_of_rank(layout: Dict[str, Groups], rank: int) -> Dict[str, List[int]]:
    """For one rank: kind -> the rank list of the group it belongs to."""
    out = {}
    for name, groups in layout.items():
        for g in groups:
            if rank in g:
                out[name] = g
                break
    return out
