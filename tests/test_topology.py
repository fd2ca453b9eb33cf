"""The pure rank layout vs the groups megatron-core itself builds, and our runtime sub-groups on gloo ranks."""

import itertools

import pytest

from mindspeed_cp.config import CPConfig
from mindspeed_cp.topology import LayoutError, groups_of_rank, orthogonal_groups, rank_layout
from tests.dist import run_on_ranks

MEGATRON_KINDS = {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp", "dp_cp": "dp-cp"}


def _shapes():
    for world in (1, 2, 4, 8, 12, 16, 24, 32):
        for tp, pp, cp in itertools.product((1, 2, 4), (1, 2, 3), (1, 2, 4, 8)):
            if world % (tp * pp * cp) == 0:
                yield world, tp, pp, cp


@pytest.mark.parametrize("world,tp,pp,cp", list(_shapes()))
def test_base_kinds_equal_megatron_rank_generator(world, tp, pp, cp):
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp * cp), pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    layout = rank_layout(world, tp=tp, pp=pp, cp=cp)
    for ours, token in MEGATRON_KINDS.items():
        assert layout[ours] == gen.get_ranks(token), (ours, world, tp, pp, cp)


def test_orthogonal_groups_worked_example():
    # docstring of topology: world 8, TP 2, CP 2, DP 2
    assert orthogonal_groups([2, 2, 1, 2, 1], [False, True, False, False, False]) == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_cp_subgroups_follow_design():
    lay = rank_layout(16, tp=2, cp=8, cp_algo="hybrid_cp_algo", ulysses_degree=2, window=2)
    # CP group [0,2,...,14]: Ulysses = neighbours, ring = stride U, windows of K over each ring
    assert lay["ulysses"][:4] == [[0, 2], [4, 6], [8, 10], [12, 14]]
    assert lay["ring"][:2] == [[0, 4, 8, 12], [2, 6, 10, 14]]
    assert lay["ring_intra_window"][:2] == [[0, 4], [8, 12]]
    assert lay["ring_inter_window"][:2] == [[0, 8], [4, 12]]
    ring = rank_layout(8, cp=8, cp_algo="megatron_cp_algo", window=4)
    assert ring["ring"] == ring["cp"] and "ulysses" not in ring
    assert ring["ring_intra_window"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ring["ring_inter_window"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    uly = rank_layout(8, tp=2, cp=4)
    assert uly["ulysses"] == uly["cp"] and "ring" not in uly


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(cp=4, cp_algo="hybrid_cp_algo", ulysses_degree=2),
        dict(cp=8, cp_algo="hybrid_cp_algo", ulysses_degree=4),
        dict(cp=8, cp_algo="megatron_cp_algo", window=2),
        dict(cp=8, tp=2, cp_algo="hybrid_cp_algo", ulysses_degree=2, window=2),
    ],
)
def test_every_rank_in_exactly_one_group_per_kind(kwargs):
    lay = rank_layout(32, **kwargs)
    for kind, groups in lay.items():
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(32)), kind
        assert len({len(g) for g in groups}) == 1, kind
        # every sub-group lies inside one CP group
        if kind in ("ulysses", "ring", "ring_intra_window", "ring_inter_window"):
            for g in groups:
                assert any(set(g) <= set(c) for c in lay["cp"]), (kind, g)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(world_size=12, tp=2, cp=4), "world size 12 is not divisible"),
        (
            dict(world_size=8, cp=8, cp_algo="hybrid_cp_algo", ulysses_degree=3),
            "--ulysses-degree-in-cp 3 does not divide",
        ),
        (dict(world_size=8, cp=8, cp_algo="megatron_cp_algo", window=3), "--cp-window-size 3 does not divide"),
        (dict(world_size=8, cp=4, cp_algo="nope"), "--context-parallel-algo 'nope'"),
    ],
)
def test_impossible_layouts(args, match):
    with pytest.raises(LayoutError, match=match):
        rank_layout(**args)


# --------------------------------------------------------------------------- on real gloo ranks
RUNTIME_SHAPES = [
    dict(tp=2, pp=1, cp=2, algo="ulysses_cp_algo"),
    dict(tp=1, pp=2, cp=4, algo="megatron_cp_algo", window=2, overlap=True),
    dict(tp=2, pp=1, cp=4, algo="hybrid_cp_algo", ulysses=2, overlap=True),
    dict(tp=1, pp=1, cp=8, algo="hybrid_cp_algo", ulysses=2, window=2),
    dict(tp=1, pp=1, cp=8, algo="megatron_cp_algo", window=4),
    dict(tp=2, pp=2, cp=1),
]


def _groups_on_rank(shapes):
    """Initialize Megatron + our groups for each shape; report group members as seen through the communicators."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor
    from mindspeed_cp.megatron.state import STATE

    out = []
    for s in shapes:
        adaptor.configure(
            context_parallel_size=s["cp"],
            context_parallel_algo=s.get("algo", "ulysses_cp_algo"),
            ulysses_degree_in_cp=s.get("ulysses"),
            cp_window_size=s.get("window", 1),
            use_cp_send_recv_overlap=s.get("overlap", False),
        )
        ps.initialize_model_parallel(
            tensor_model_parallel_size=s["tp"], pipeline_model_parallel_size=s["pp"], context_parallel_size=s["cp"]
        )
        megatron = {
            "tp": ps.get_tensor_model_parallel_group(),
            "cp": ps.get_context_parallel_group(),
            "dp": ps.get_data_parallel_group(),
            "pp": ps.get_pipeline_model_parallel_group(),
            "dp_cp": ps.get_data_parallel_group(with_context_parallel=True),
        }
        seen = {k: dist.get_process_group_ranks(g) for k, g in megatron.items()}
        for kind in ("ulysses", "ring", "ring_intra_window", "ring_inter_window"):
            if STATE.has(kind):
                # members in group order, as the communicator itself reports them (a real collective)
                g = STATE.group(kind)
                gathered = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(g))]
                dist.all_gather(gathered, torch.tensor([dist.get_rank()]), group=g)
                seen[kind] = [int(t) for t in gathered]
                assert STATE.ranks(kind) == seen[kind]
                if s.get("overlap") and kind.startswith("ring"):
                    seen[kind + "/overlap"] = dist.get_process_group_ranks(STATE.overlap_group(kind))
        out.append(seen)
        ps.destroy_model_parallel()
        assert not STATE.groups_built
    return out


def test_runtime_groups_match_layout_on_8_gloo_ranks():
    per_rank = run_on_ranks(8, _groups_on_rank, RUNTIME_SHAPES)
    for i, s in enumerate(RUNTIME_SHAPES):
        cfg = CPConfig(
            context_parallel_size=s["cp"],
            context_parallel_algo=s.get("algo", "ulysses_cp_algo"),
            ulysses_degree_in_cp=s.get("ulysses"),
            cp_window_size=s.get("window", 1),
        )
        layout = rank_layout(
            8,
            tp=s["tp"],
            pp=s["pp"],
            cp=s["cp"],
            cp_algo=cfg.context_parallel_algo,
            ulysses_degree=cfg.ulysses_degree_in_cp,
            window=cfg.cp_window_size,
        )
        for rank, seen_all in enumerate(per_rank):
            seen = seen_all[i]
            expected = groups_of_rank(layout, rank)
            for kind, ranks in expected.items():
                assert seen[kind] == ranks, (s, rank, kind)
                if s.get("overlap") and kind.startswith("ring"):
                    assert seen[kind + "/overlap"] == ranks
            assert set(seen) - {k for k in seen if k.endswith("/overlap")} == set(expected), (s, rank)


def _mismatched_cp():
    from megatron.core import parallel_state as ps

    import mindspeed_cp.megatron_adaptor as adaptor

    adaptor.configure(context_parallel_size=4)
    ps.initialize_model_parallel(context_parallel_size=2)


def test_initialize_with_a_different_cp_size_is_refused_on_every_rank():
    from tests.dist import expect_error_on_every_rank

    expect_error_on_every_rank(
        4, _mismatched_cp, match=r"context_parallel_size=2\) contradicts configure\(context_parallel_size=4\)"
    )


def _small_layouts():
    """Every valid (world, tp, pp, cp, algo, U, window) with world <= 48 and the degrees below."""
    for world, tp, pp, cp in itertools.product((1, 2, 6, 8, 12, 16, 24, 48), (1, 2, 3), (1, 2), (1, 2, 4, 6, 8)):
        if world % (tp * pp * cp):
            continue
        yield world, tp, pp, cp, "ulysses_cp_algo", None, 1
        for u, k in itertools.product((None, 2, 3), (1, 2, 3)):
            algo = "megatron_cp_algo" if u is None else "hybrid_cp_algo"
            ring = cp // (u or 1)
            if cp > 1 and (u is None or (cp % u == 0 and 1 < u < cp)) and (k == 1 or (ring % k == 0 and k < ring)):
                yield world, tp, pp, cp, algo, u, k


def test_rank_groups_equal_rank_layout_for_every_rank_of_many_layouts():
    """The planner's per-rank answer (rank_groups: the one CP group of a rank) is the runtime's layout."""
    from mindspeed_cp.topology import rank_groups

    shapes = list(_small_layouts())
    assert len(shapes) > 150 and {s[4] for s in shapes} == {"ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo"}
    for shape in shapes:
        layout = rank_layout(*shape)
        for rank in range(shape[0]):
            assert rank_groups(*shape, rank=rank) == groups_of_rank(layout, rank), (shape, rank)
    with pytest.raises(LayoutError, match=r"rank 8 is not one of 0..7"):
        rank_groups(8, cp=2, rank=8)
    with pytest.raises(LayoutError, match="world size 12 is not divisible"):
        rank_groups(12, tp=2, cp=4)
