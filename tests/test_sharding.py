"""Which tokens each CP rank holds: every token exactly once, balanced causal work, hybrid re-assembly."""

import pytest
import torch

from mindspeed_cp.config import CPConfig, CPConfigError
from mindspeed_cp.layout.sharding import local_lengths, split_batch, token_indices

CONFIGS = [
    CPConfig(context_parallel_size=4),
    CPConfig(context_parallel_size=4, context_parallel_algo="megatron_cp_algo"),
    CPConfig(context_parallel_size=8, context_parallel_algo="megatron_cp_algo", cp_window_size=2),
    CPConfig(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2),
    CPConfig(context_parallel_size=8, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_every_token_exactly_once(cfg):
    seq = 64
    held = torch.cat([token_indices(cfg, r, seq) for r in range(cfg.cp)])
    assert sorted(held.tolist()) == list(range(seq))
    assert local_lengths(cfg, seq) == [seq // cfg.cp] * cfg.cp


def test_worked_examples_of_the_docstring():
    ring = CPConfig(context_parallel_size=4, context_parallel_algo="megatron_cp_algo")
    assert token_indices(ring, 1, 16).tolist() == [2, 3, 12, 13]
    hyb = CPConfig(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    assert [token_indices(hyb, r, 16).tolist() for r in range(4)] == [
        [0, 1, 2, 3],
        [12, 13, 14, 15],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]
    uly = CPConfig(context_parallel_size=4)
    assert [token_indices(uly, r, 13).numel() for r in range(4)] == [4, 3, 3, 3]


def test_hybrid_ulysses_group_reassembles_one_ring_ranks_zigzag_pair():
    hyb = CPConfig(context_parallel_size=8, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    ring = CPConfig(context_parallel_size=4, context_parallel_algo="megatron_cp_algo")
    for m in range(4):  # Ulysses group m = CP ranks 2m, 2m+1; ring rank m
        pair = torch.cat([token_indices(hyb, 2 * m + u, 64) for u in range(2)])
        assert pair.tolist() == token_indices(ring, m, 64).tolist()


def test_zigzag_balances_causal_work():
    ring = CPConfig(context_parallel_size=4, context_parallel_algo="megatron_cp_algo")
    work = [int((token_indices(ring, r, 64) + 1).sum()) for r in range(4)]  # keys visible per query
    assert len(set(work)) == 1
    contiguous = [int((token_indices(CPConfig(context_parallel_size=4), r, 64) + 1).sum()) for r in range(4)]
    assert max(contiguous) > 3 * min(contiguous)  # what zigzag avoids


def test_split_batch_slices_sequence_dims_and_mask_rows():
    cfg = CPConfig(context_parallel_size=2, context_parallel_algo="megatron_cp_algo")
    s = 8
    batch = {
        "tokens": torch.arange(2 * s).view(2, s),
        "position_ids": torch.arange(s).expand(2, s),
        "attention_mask": torch.triu(torch.ones(s, s, dtype=torch.bool), 1).expand(2, 1, s, s),
        "extra": "kept",
    }
    out = split_batch(batch, cfg, 1)
    assert out["position_ids"][0].tolist() == [2, 3, 4, 5]
    assert out["tokens"][1].tolist() == [10, 11, 12, 13]
    assert out["attention_mask"].shape == (2, 1, 4, 8)  # rows of this rank, keys global
    assert torch.equal(out["attention_mask"][0, 0, 0], batch["attention_mask"][0, 0, 2])
    assert out["extra"] == "kept"


@pytest.mark.parametrize(
    "batch,match",
    [
        ({"tokens": torch.zeros(2, 8), "labels": torch.zeros(2, 6)}, "labels has 6"),
        (
            {"tokens": torch.zeros(2, 8), "attention_mask": torch.zeros(2, 8, 8, dtype=torch.bool)},
            "attention_mask of shape",
        ),
        ({"tokens": torch.zeros(2, 6)}, r"--seq-length 6 is not divisible by 2 x --context-parallel-size 2"),
    ],
)
def test_split_batch_errors(batch, match):
    cfg = CPConfig(context_parallel_size=2, context_parallel_algo="megatron_cp_algo")
    with pytest.raises(CPConfigError, match=match):
        split_batch(batch, cfg, 0)


def test_local_lengths_are_the_sizes_of_token_indices():
    """local_lengths (O(CP), used by check at thousands of ranks) = what token_indices gives every rank."""
    configs = [
        CPConfig(context_parallel_size=cp, context_parallel_algo=algo, ulysses_degree_in_cp=u)
        for cp, algo, u in (
            (1, "ulysses_cp_algo", None),
            (3, "ulysses_cp_algo", None),
            (5, "ulysses_cp_algo", None),
            (4, "megatron_cp_algo", None),
            (6, "hybrid_cp_algo", 2),
            (8, "hybrid_cp_algo", 4),
        )
    ]
    for cfg in configs:
        for seq in (2 * cfg.cp * 3, 2 * cfg.cp * 5) if cfg.uses_zigzag else (cfg.cp, 13, 64, 97):
            assert local_lengths(cfg, seq) == [token_indices(cfg, r, seq).numel() for r in range(cfg.cp)], (cfg, seq)
    with pytest.raises(CPConfigError, match="shorter than --context-parallel-size"):
        local_lengths(configs[2], 4)
