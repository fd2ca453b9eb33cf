"""``mindspeed-cp check``: validate a context-parallel launch (layout, heads, sequence) before any GPU work.

::

    mindspeed-cp check --world-size 32 --tp 8 --cp 4 --context-parallel-algo ulysses_cp_algo \\
        --num-attention-heads 64 --seq-length 32768 --sequence-parallel
    python -m mindspeed_cp.tools.check ...            # the same, without the mindspeed-cp command

Takes Megatron-LM's flag names (the CP flags are registered by :func:`mindspeed_cp.config.add_arguments`,
the same function that adds them to Megatron-LM's parser) and runs the same checks as Megatron-LM's
patched ``validate_args`` (:func:`mindspeed_cp.megatron.megatron_lm.check_args`). Prints a one-paragraph summary;
an impossible configuration, like a bad argument (sizes, heads, lengths: positive integers), exits with
status 2 and one line naming the flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ..cliargs import OneLineParser, UsageError, integer
from ..config import ALGORITHMS, KVALLGATHER, CPConfigError, add_arguments

PROG = "mindspeed-cp check"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--world-size", type=integer(1), required=True, metavar="W", help="number of ranks (nodes x devices)"
    )
    p.add_argument(
        "--tp",
        "--tensor-model-parallel-size",
        dest="tensor_model_parallel_size",
        type=integer(1),
        default=1,
        metavar="T",
        help="tensor-parallel size (default 1)",
    )
    p.add_argument(
        "--pp",
        "--pipeline-model-parallel-size",
        dest="pipeline_model_parallel_size",
        type=integer(1),
        default=1,
        metavar="P",
        help="pipeline-parallel size (default 1)",
    )
    p.add_argument(
        "--cp",
        "--context-parallel-size",
        dest="context_parallel_size",
        type=integer(1),
        default=1,
        metavar="C",
        help="context-parallel size (default 1)",
    )
    add_arguments(p)  # --context-parallel-algo, --ulysses-degree-in-cp, --cp-window-size, ...
    p.add_argument(
        "--cp-algo",
        dest="context_parallel_algo",
        default=argparse.SUPPRESS,
        choices=ALGORITHMS,
        help="short for --context-parallel-algo",
    )
    p.add_argument("--num-attention-heads", type=integer(1), default=None, metavar="H")
    p.add_argument(
        "--num-query-groups",
        type=integer(1),
        default=None,
        metavar="G",
        help="KV heads (grouped-query attention); default: --num-attention-heads",
    )
    p.add_argument("--seq-length", type=integer(1), default=None, metavar="S")
    p.add_argument(
        "--num-layers",
        type=integer(1),
        default=None,
        metavar="L",
        help="transformer layers (checks --context-parallel-cache-interval, lists the cached layers)",
    )
    p.add_argument("--sequence-parallel", action="store_true", help="Megatron's --sequence-parallel (with TP)")
    p.add_argument("--format", choices=("text", "json"), default="text")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``check`` on the ``mindspeed-cp`` subparsers (cli.py's dispatch table)."""
    p = subparsers.add_parser(
        "check",
        help="validate a CP launch: layout, heads, sequence length (exit 2 if impossible)",
        description="Validate a context-parallel configuration with the checks Megatron-LM's patched "
        "validate_args runs, before any GPU work.",
    )
    _add_arguments(p)
    return p


def summary(args: argparse.Namespace) -> dict:
    """The checked configuration and what each rank gets; raises CPConfigError."""
    from ..megatron.megatron_lm import check_args  # imports torch: only once the arguments parsed

    ns = argparse.Namespace(**vars(args))
    ns.group_query_attention = args.num_query_groups is not None
    config = check_args(ns)
    tp, pp, cp = ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size, config.cp
    out = {
        "world_size": args.world_size,
        "tp": tp,
        "pp": pp,
        "cp": cp,
        "dp": args.world_size // (tp * pp * cp),
        "context_parallel_algo": config.context_parallel_algo,
        "ulysses_size": config.ulysses_size,
        "ring_size": 1 if config.context_parallel_algo == KVALLGATHER else config.ring_size,
        "allgather_size": config.ring_size if config.context_parallel_algo == KVALLGATHER else 1,
        "cp_window_size": config.cp_window_size,
        "config": config.describe(),
    }
    if config.context_parallel_kv_cache_policy and config.cp > 1:
        out["kv_cache_policy"] = config.context_parallel_kv_cache_policy
        out["kv_cache_interval"] = config.context_parallel_cache_interval
        if args.num_layers is not None:
            out["kv_cache_layers"] = [n for n in range(1, args.num_layers + 1) if config.kv_cache_policy(n)]
    if args.num_attention_heads is not None:
        out["attention_heads_per_rank"] = args.num_attention_heads // (tp * config.ulysses_size)
    if args.seq_length is not None and config.uses_zigzag and args.seq_length % (2 * cp):
        from ..layout.sharding import padded_seq_len  # Ring/Hybrid at any length: padded at the end per batch

        out["padded_seq_length"] = padded_seq_len(config, args.seq_length)
        out["tokens_per_cp_rank"] = [out["padded_seq_length"] // cp]
    elif args.seq_length is not None:
        from ..layout.sharding import local_lengths

        out["tokens_per_cp_rank"] = sorted(set(local_lengths(config, args.seq_length)))
    return out


def _text(s: dict) -> str:
    lines = [
        f"ok: {s['config']}",
        f"  world {s['world_size']} = TP {s['tp']} x PP {s['pp']} x CP {s['cp']} x DP {s['dp']}",
        (
            f"  K/V all-gathered over {s['allgather_size']} rank(s), dK/dV reduce-scattered"
            if s["allgather_size"] > 1
            else f"  Ulysses group {s['ulysses_size']} rank(s), ring {s['ring_size']} rank(s)"
        )
        + (f", Double Ring windows of {s['cp_window_size']}" if s["cp_window_size"] > 1 else ""),
    ]
    if "attention_heads_per_rank" in s:
        lines.append(f"  attention heads per rank inside attention: {s['attention_heads_per_rank']}")
    if "kv_cache_policy" in s:
        layers = s.get("kv_cache_layers")
        every = layers is None or s.get("kv_cache_interval") == 0
        lines.append(
            f"  KV cache {s['kv_cache_policy']}"
            + (" on every layer" if every else f" on layers {', '.join(map(str, layers))}")
        )
    if "tokens_per_cp_rank" in s:
        lines.append(
            f"  tokens per CP rank: {'/'.join(map(str, s['tokens_per_cp_rank']))}"
            + (f" (each batch padded at its end to {s['padded_seq_length']})" if "padded_seq_length" in s else "")
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> str:
    """cli.py's command function: the summary text (or JSON); a bad configuration raises UsageError."""
    try:
        s = summary(args)
    except CPConfigError as e:
        raise UsageError(str(e)) from None
    return json.dumps(s) + "\n" if args.format == "json" else _text(s)


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    try:
        sys.stdout.write(run(parser.parse_args(argv)))
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
