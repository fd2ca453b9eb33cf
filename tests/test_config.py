"""CPConfig validation: table-driven, every error names the flags and values involved."""

import argparse
import re

import pytest

from mindspeed_cp.config import CPConfig, CPConfigError

U, R, H, KV = "ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo", "kvallgather_cp_algo"

# (config kwargs, validate kwargs, regex the message must match)
BAD = [
    (dict(context_parallel_algo="ring"), {}, r"--context-parallel-algo 'ring' is not one of"),
    (dict(context_parallel_size=0), {}, r"--context-parallel-size 0 must be a positive integer"),
    (dict(context_parallel_size=2.0), {}, r"--context-parallel-size 2.0 must be a positive integer"),
    (dict(attention_mask_type="padding"), {}, r"--attention-mask-type 'padding' is not one of causal, general"),
    (dict(cp_window_size=0, context_parallel_algo=R, context_parallel_size=4), {}, r"--cp-window-size 0 must be"),
    (dict(context_parallel_size=4, context_parallel_algo=H), {}, r"hybrid_cp_algo needs --ulysses-degree-in-cp"),
    (
        dict(context_parallel_size=8, context_parallel_algo=H, ulysses_degree_in_cp=3),
        {},
        r"--ulysses-degree-in-cp 3 does not divide --context-parallel-size 8",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=H, ulysses_degree_in_cp=4),
        {},
        r"--ulysses-degree-in-cp 4 equals --context-parallel-size 4.*use --context-parallel-algo ulysses_cp_algo",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=H, ulysses_degree_in_cp=1),
        {},
        r"--ulysses-degree-in-cp 1 .*use --context-parallel-algo megatron_cp_algo",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=H, ulysses_degree_in_cp=0),
        {},
        r"--ulysses-degree-in-cp 0 must be a positive integer",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=R, ulysses_degree_in_cp=2),
        {},
        r"--ulysses-degree-in-cp 2 only applies to --context-parallel-algo hybrid_cp_algo",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=U, cp_window_size=2),
        {},
        r"--cp-window-size 2 only apply to the ring level",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=U, use_cp_send_recv_overlap=True),
        {},
        r"--use-cp-send-recv-overlap only apply to the ring level",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=U, megatron_cp_in_bnsd=True),
        {},
        r"--megatron-cp-in-bnsd only apply to the ring level",
    ),
    (
        dict(context_parallel_size=6, context_parallel_algo=R, cp_window_size=4),
        {},
        r"--cp-window-size 4 does not divide --context-parallel-size \(6\)",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=R, cp_window_size=4),
        {},
        r"--cp-window-size 4 must be smaller than --context-parallel-size \(4\)",
    ),
    (
        dict(context_parallel_size=8, context_parallel_algo=H, ulysses_degree_in_cp=2, cp_window_size=3),
        {},
        r"--cp-window-size 3 does not divide the ring size .*\(4\)",
    ),
    (
        dict(context_parallel_size=8, context_parallel_algo=H, ulysses_degree_in_cp=4, cp_window_size=2),
        {},
        r"--cp-window-size 2 must be smaller than the ring size .*\(2\)",
    ),
    # KV cache (MindSpeed's rules, its validate_args; the all-gather's head rule is ours)
    (
        dict(context_parallel_size=4, context_parallel_kv_cache_policy="quarter"),
        {},
        r"--context-parallel-kv-cache-policy 'quarter' is not one of full, half",
    ),
    (
        dict(context_parallel_kv_cache_policy="quarter"),
        {},  # at CP=1 too: type checks stay
        r"--context-parallel-kv-cache-policy 'quarter' is not one of full, half",
    ),
    (
        dict(context_parallel_size=4, context_parallel_cache_interval=2),
        {},
        r"--context-parallel-cache-interval 2 only applies with --context-parallel-kv-cache-policy",
    ),
    (
        dict(context_parallel_size=4, context_parallel_kv_cache_policy="half", context_parallel_cache_interval=-1),
        {},
        r"--context-parallel-cache-interval -1 must be an integer >= 0",
    ),
    (
        dict(context_parallel_size=4, context_parallel_kv_cache_policy="half", context_parallel_cache_interval=4),
        dict(num_layers=4),
        r"--context-parallel-cache-interval 4 must be smaller than --num-layers 4",
    ),
    (dict(use_ulysses_allgather_kv=1), {}, r"--use-ulysses-allgather-kv must be True or False"),
    (
        dict(context_parallel_size=4, context_parallel_algo=R, use_ulysses_allgather_kv=True),
        {},
        r"--use-ulysses-allgather-kv needs --context-parallel-algo ulysses_cp_algo \(got megatron_cp_algo\)",
    ),
    (
        dict(context_parallel_size=4, use_ulysses_allgather_kv=True),
        dict(num_attention_heads=8),
        r"--use-ulysses-allgather-kv needs grouped-query attention",
    ),
    (
        dict(context_parallel_size=4, use_ulysses_allgather_kv=True),
        dict(num_attention_heads=16, num_query_groups=8),
        r"--use-ulysses-allgather-kv gathers all 8 KV heads .* at most --context-parallel-size 4",
    ),
    (
        dict(context_parallel_size=4, use_ulysses_allgather_kv="yes"),
        {},
        r"--use-ulysses-allgather-kv must be True or False",
    ),
    # model facts
    (
        dict(context_parallel_size=4),
        dict(tensor_model_parallel_size=2, num_attention_heads=5),
        r"--num-attention-heads 5 is not divisible by --tensor-model-parallel-size 2$",
    ),
    (
        dict(context_parallel_size=4),
        dict(tensor_model_parallel_size=2, num_attention_heads=6),
        r"^--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 2 x "
        r"--context-parallel-size 4 \(ulysses_cp_algo\)$",
    ),
    (
        dict(context_parallel_size=4),
        dict(tensor_model_parallel_size=2, num_attention_heads=12),
        r"^--num-attention-heads 12 is not divisible by --tensor-model-parallel-size 2 x "
        r"--context-parallel-size 4 \(ulysses_cp_algo\)$",
    ),
    (
        dict(context_parallel_size=8, context_parallel_algo=H, ulysses_degree_in_cp=4),
        dict(tensor_model_parallel_size=2, num_attention_heads=4),
        r"--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 2 x --ulysses-degree-in-cp 4 "
        r"\(hybrid_cp_algo\)",
    ),
    (
        dict(context_parallel_size=4),
        dict(num_attention_heads=8, num_query_groups=3),
        r"--num-query-groups 3 does not divide --num-attention-heads 8",
    ),
    (
        dict(context_parallel_size=2),
        dict(tensor_model_parallel_size=2, num_attention_heads=8, num_query_groups=1),
        r"--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2",
    ),
    (
        dict(context_parallel_size=4),
        dict(num_attention_heads=12, num_query_groups=3),
        r"--num-query-groups 3 / --tensor-model-parallel-size 1 = 3 KV heads .* --context-parallel-size 4 Ulysses",
    ),
    (
        dict(context_parallel_size=4),
        dict(num_attention_heads=12, num_query_groups=6),
        r"6 KV heads per tensor-parallel rank cannot be shared evenly",
    ),
    (
        dict(context_parallel_size=8, context_parallel_algo=H, ulysses_degree_in_cp=4),
        dict(num_attention_heads=12, num_query_groups=6),
        r"--ulysses-degree-in-cp 4 Ulysses ranks .*\(hybrid_cp_algo\)",
    ),
    (dict(context_parallel_size=4), dict(seq_length=3), r"--seq-length 3 is shorter than --context-parallel-size 4"),
    # model facts are positive integers, named (configure() reads them off Megatron's args)
    (dict(), dict(num_attention_heads=0), r"^--num-attention-heads 0 must be a positive integer$"),
    (
        dict(context_parallel_size=2),
        dict(num_attention_heads="8"),
        r"^--num-attention-heads '8' must be a positive integer \(got str\)$",
    ),
    (dict(), dict(num_attention_heads=8, num_query_groups=0), r"^--num-query-groups 0 must be a positive integer"),
    (dict(), dict(seq_length=3.5), r"^--seq-length 3.5 must be a positive integer \(got float\)$"),
    (dict(), dict(seq_length=-32768), r"^--seq-length -32768 must be a positive integer$"),
    (dict(), dict(num_layers=True), r"^--num-layers True must be a positive integer"),
    (dict(), dict(world_size=0), r"^world size 0 must be a positive integer$"),
    # layout
    (
        dict(context_parallel_size=4),
        dict(world_size=12, tensor_model_parallel_size=2),
        r"world size 12 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1 x "
        r"--context-parallel-size 4 \(= 8\)",
    ),
    (dict(context_parallel_size=2), dict(tensor_model_parallel_size=0), r"--tensor-model-parallel-size 0 must be"),
    # kvallgather_cp_algo: the ring-only options are refused by name, its own switch elsewhere too
    (
        dict(context_parallel_size=4, context_parallel_algo=KV, megatron_cp_in_bnsd=True),
        dict(),
        r"^--megatron-cp-in-bnsd only apply to the ring level .* kvallgather_cp_algo would ignore them$",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=R, cp_allgather_overlap=False),
        dict(),
        r"^--no-cp-allgather-overlap only applies to --context-parallel-algo kvallgather_cp_algo",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=KV, cp_allgather_overlap="no"),
        dict(),
        r"^--cp-allgather-overlap must be True or False, got 'no'",
    ),
    # --hybrid-outer-cp-algo: Hybrid's outer level; the all-gather there has no ring options
    (
        dict(context_parallel_size=4, context_parallel_algo=R, hybrid_outer_cp_algo=KV),
        dict(),
        r"^--hybrid-outer-cp-algo kvallgather_cp_algo only applies to --context-parallel-algo hybrid_cp_algo "
        r"\(got megatron_cp_algo",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=H, ulysses_degree_in_cp=2, hybrid_outer_cp_algo=U),
        dict(),
        r"^--hybrid-outer-cp-algo 'ulysses_cp_algo' is not one of megatron_cp_algo, kvallgather_cp_algo",
    ),
    (
        dict(
            context_parallel_size=8,
            context_parallel_algo=H,
            ulysses_degree_in_cp=2,
            hybrid_outer_cp_algo=KV,
            cp_window_size=2,
            use_cp_send_recv_overlap=True,
        ),
        dict(),
        r"^--use-cp-send-recv-overlap, --cp-window-size 2 only apply to a ring; --hybrid-outer-cp-algo "
        r"kvallgather_cp_algo has none",
    ),
    (
        dict(context_parallel_size=4, context_parallel_algo=H, ulysses_degree_in_cp=2, cp_allgather_overlap=False),
        dict(),
        r"^--no-cp-allgather-overlap only applies to .* hybrid_cp_algo with --hybrid-outer-cp-algo kvallgather_cp_algo",
    ),
]


@pytest.mark.parametrize("config,facts,pattern", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_configurations_name_their_flags(config, facts, pattern):
    with pytest.raises(CPConfigError) as info:
        CPConfig(**config).validate(**facts)
    msg = str(info.value)
    assert re.search(pattern, msg), f"{msg!r} does not match {pattern!r}"
    assert "\n" not in msg


def test_at_least_twenty_bad_configurations():
    assert len(BAD) >= 20


GOOD = [
    (dict(), dict(num_attention_heads=5, seq_length=7)),
    (dict(context_parallel_size=4), dict(tensor_model_parallel_size=2, num_attention_heads=16, seq_length=4097)),
    (dict(context_parallel_size=4), dict(num_attention_heads=8, num_query_groups=2)),  # KV replicated x2
    (dict(context_parallel_size=4), dict(num_attention_heads=16, num_query_groups=8)),  # KV scattered
    (dict(context_parallel_size=4), dict(num_attention_heads=8, num_query_groups=1)),  # MQA
    (
        dict(
            context_parallel_size=4,
            context_parallel_algo=R,
            cp_window_size=2,
            use_cp_send_recv_overlap=True,
            megatron_cp_in_bnsd=True,
            attention_mask_type="general",
        ),
        dict(tensor_model_parallel_size=2, num_attention_heads=6, num_query_groups=2, seq_length=64, world_size=8),
    ),
    (
        dict(context_parallel_size=8, context_parallel_algo=H, ulysses_degree_in_cp=2, cp_window_size=2),
        dict(num_attention_heads=6, seq_length=32, world_size=16),
    ),
    (dict(context_parallel_size=4, context_parallel_algo=R), dict(num_attention_heads=3, seq_length=8)),
    # CP=1 runs no CP algorithm: every CP option is type-checked only (a script's CP=1 baseline keeps its flags)
    (dict(context_parallel_kv_cache_policy="full", context_parallel_cache_interval=1), dict(num_layers=4)),
    (dict(use_ulysses_allgather_kv=True, context_parallel_algo=R), dict(num_attention_heads=8)),
    # kvallgather: any heads (GQA, MQA: K/V are gathered as they are), any length (padded per batch as Ring)
    (
        dict(context_parallel_size=8, context_parallel_algo=KV, context_parallel_kv_cache_policy="full"),
        dict(num_attention_heads=6, num_query_groups=1, seq_length=1000, world_size=16),
    ),
    (dict(context_parallel_size=4, context_parallel_algo=KV, cp_allgather_overlap=False), dict(num_attention_heads=3)),
    (dict(context_parallel_algo=R, cp_allgather_overlap=False), dict()),  # CP=1: type checks only
    (
        dict(
            context_parallel_size=4,
            context_parallel_algo=H,
            ulysses_degree_in_cp=2,
            hybrid_outer_cp_algo=KV,
            cp_allgather_overlap=False,
            context_parallel_kv_cache_policy="full",
        ),
        dict(num_attention_heads=8, num_query_groups=2, seq_length=100),
    ),
]


@pytest.mark.parametrize("config,facts", GOOD)
def test_good_configurations(config, facts):
    assert CPConfig(**config).validate(**facts).context_parallel_size == config.get("context_parallel_size", 1)


def test_defaults_follow_mindspeed():
    c = CPConfig()
    assert (
        c.context_parallel_size,
        c.context_parallel_algo,
        c.ulysses_degree_in_cp,
        c.cp_window_size,
        c.use_cp_send_recv_overlap,
        c.megatron_cp_in_bnsd,
        c.attention_mask_type,
    ) == (1, "ulysses_cp_algo", None, 1, False, False, "causal")


def test_derived_sizes():
    assert (CPConfig(context_parallel_size=8).ulysses_size, CPConfig(context_parallel_size=8).ring_size) == (8, 1)
    ring = CPConfig(context_parallel_size=8, context_parallel_algo=R, cp_window_size=2)
    assert (ring.ulysses_size, ring.ring_size, ring.is_double_ring, ring.uses_zigzag) == (1, 8, True, True)
    hyb = CPConfig(context_parallel_size=8, context_parallel_algo=H, ulysses_degree_in_cp=2)
    assert (hyb.ulysses_size, hyb.ring_size, hyb.uses_zigzag) == (2, 4, True)
    kv = CPConfig(context_parallel_size=8, context_parallel_algo=KV)  # the zigzag over its all-gather group
    assert (kv.ulysses_size, kv.ring_size, kv.uses_zigzag, kv.is_double_ring, kv.padded_seq_len(1000)) == (
        1,
        8,
        True,
        False,
        1008,
    )


def test_from_namespace_and_flags():
    ns = argparse.Namespace(
        context_parallel_size=4,
        context_parallel_algo="megatron_cp_algo",
        cp_window_size=None,
        use_cp_send_recv_overlap=True,
        unrelated=3,
    )
    c = CPConfig.from_namespace(ns, cp_window_size=2)
    assert (c.context_parallel_size, c.context_parallel_algo, c.cp_window_size, c.use_cp_send_recv_overlap) == (
        4,
        "megatron_cp_algo",
        2,
        True,
    )
    with pytest.raises(CPConfigError, match="unknown context-parallel option.*cp_size"):
        CPConfig.from_namespace(None, cp_size=2)
