"""The ``mindspeed-cp`` command (also ``python -m mindspeed_cp``).

Subcommands (one function each, looked up in :data:`COMMANDS`)::

    mindspeed-cp groups --world-size 16 --tp 2 --cp 8 --cp-algo hybrid_cp_algo --ulysses-degree-in-cp 2 \\
        --cp-window-size 2 --format html --output groups.html
    mindspeed-cp patches [--format json]
    mindspeed-cp check --world-size 32 --tp 8 --cp 4 --num-attention-heads 64 --seq-length 32768 ...
    mindspeed-cp plan --model gpt3-30b --seq-length 32768 --world-size 32 --gpus-per-node 8 --device h100
    mindspeed-cp demo [--ranks 4 --steps 5 --seq 512 ...]

``groups`` draws the layout of :func:`mindspeed_cp.topology.rank_layout` (the function the runtime creates
its process groups from). Every argument is checked where it is parsed (:mod:`mindspeed_cp.cliargs`: the
error names the argument and its valid range); an impossible layout, like any bad input, exits with status 2
and one line on stderr naming the flags. Megatron's long flag names are accepted next to the short ones
(``--tp`` = ``--tensor-model-parallel-size`` ...) so the flags named in an error always exist here.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Callable, Dict, List, Optional

from ..cliargs import OneLineParser, UsageError, integer, output_file, write_text
from ..config import ALGORITHMS, ULYSSES
from ..planner import plan
from ..topology import rank_layout
from . import check

PROG = "mindspeed-cp"
MAX_WORLD = 2**22  # groups: 4,194,304 ranks (the JSON is ~0.3 GB there; ~2 s per million ranks)


# ----------------------------------------------------------------------------- groups
def _add_groups(sub) -> None:
    p = sub.add_parser(
        "groups",
        help="draw the TP/CP/DP/PP and context-parallel sub-groups of a layout",
        description="Print the process groups Megatron + mindspeed-cp create for a layout (order "
        "tp-cp-ep-dp-pp, TP fastest), as a text picture, JSON or a self-contained HTML page.",
    )
    p.add_argument(
        "--world-size",
        type=integer(1, MAX_WORLD),
        required=True,
        metavar="W",
        help=f"number of ranks (1 to {MAX_WORLD:,})",
    )
    p.add_argument(
        "--tp",
        "--tensor-model-parallel-size",
        dest="tp",
        type=integer(1),
        default=1,
        metavar="T",
        help="tensor-parallel size (default 1)",
    )
    p.add_argument(
        "--pp",
        "--pipeline-model-parallel-size",
        dest="pp",
        type=integer(1),
        default=1,
        metavar="P",
        help="pipeline-parallel size (default 1)",
    )
    p.add_argument(
        "--cp",
        "--context-parallel-size",
        dest="cp",
        type=integer(1),
        default=1,
        metavar="C",
        help="context-parallel size (default 1); DP = W / (T x P x C)",
    )
    p.add_argument(
        "--cp-algo",
        "--context-parallel-algo",
        dest="cp_algo",
        default=ULYSSES,
        choices=ALGORITHMS,
        metavar="A",
        help=f"one of {', '.join(ALGORITHMS)} (default {ULYSSES})",
    )
    p.add_argument(
        "--ulysses-degree-in-cp",
        type=integer(1),
        default=None,
        metavar="U",
        help="hybrid_cp_algo: ranks per Ulysses group; the ring gets C / U",
    )
    p.add_argument(
        "--cp-window-size",
        type=integer(1),
        default=1,
        metavar="K",
        help="ring/hybrid: K > 1 draws Double Ring windows of K ring ranks (default 1)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=integer(1), default=None, metavar="N", help="number of nodes (must divide W)")
    where.add_argument(
        "--devices-per-node",
        type=integer(1),
        default=None,
        metavar="D",
        help="devices per node (default 8, or W when W < 8)",
    )
    p.add_argument(
        "--format",
        choices=("text", "json", "html"),
        default="text",
        help="text picture (default), JSON {kind: [[rank, ...], ...]}, or one HTML page",
    )
    add_output(p)


def add_output(p) -> None:
    p.add_argument(
        "--output", "-o", type=output_file, default=None, metavar="FILE", help="write to FILE instead of stdout"
    )


def cmd_groups(args: argparse.Namespace) -> str:
    # millions of small rank lists and no reference cycles: the cyclic collector would only walk them again and
    # again (at 1,048,576 ranks it doubled the JSON's time)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _groups(args)
    finally:
        if enabled:
            gc.enable()


def _groups(args: argparse.Namespace) -> str:
    from .visualize import Picture, devices_for, render_html, render_text

    try:
        layout = rank_layout(
            args.world_size, args.tp, args.pp, args.cp, args.cp_algo, args.ulysses_degree_in_cp, args.cp_window_size
        )
    except ValueError as e:  # LayoutError / CPConfigError name the flags
        raise UsageError(str(e)) from None
    if args.format == "json":
        return json.dumps(layout) + "\n"
    try:
        picture = Picture(layout, devices_for(args.world_size, args.nodes, args.devices_per_node), cp_algo=args.cp_algo)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return render_html(picture) if args.format == "html" else render_text(picture)


# ----------------------------------------------------------------------------- patches
def _add_patches(sub) -> None:
    p = sub.add_parser(
        "patches",
        help="list what the plugin replaces in Megatron, with status",
        description="Import mindspeed_cp.megatron_adaptor (which patches Megatron) and list "
        "every patch: target, status, when it acts and why.",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    add_output(p)


def cmd_patches(args: argparse.Namespace) -> str:
    import warnings

    with warnings.catch_warnings():  # megatron-core warns about optional TE/Apex at import time
        warnings.simplefilter("ignore")
        from .. import megatron_adaptor
    patches = megatron_adaptor.PATCHES
    if args.format == "json":
        return json.dumps(patches.table(), indent=2) + "\n"
    return patches.format() + "\n"


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        add_help=False,
        help="train a small GPT with each CP algorithm on CPU gloo ranks "
        "and compare with CP=1 (`mindspeed-cp demo --help`)",
    )
    p.add_argument("demo_args", nargs=argparse.REMAINDER)


# ----------------------------------------------------------------------------- dispatch
COMMANDS: Dict[str, Callable[[argparse.Namespace], str]] = {
    "groups": cmd_groups,
    "patches": cmd_patches,
    "check": check.run,
    "plan": plan.run,
}
_ADDERS = (_add_groups, _add_patches, check.add_parser, plan.add_parser, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Context parallelism for Megatron: tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo owns its flags (argparse REMAINDER drops leading options)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        text = COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # e.g. `patches` (megatron-core) or `check` (torch) in an environment without them
        print(
            f"{PROG} {args.command}: cannot import {e.name or e} - install mindspeed-cp's requirements into this "
            f"environment (torch>=2.1, megatron-core>=0.12: pip install -e <mindspeed-cp checkout>)",
            file=sys.stderr,
        )
        return 2
    output = getattr(args, "output", None)
    if output:
        try:
            write_text(output, text, "--output")
        except UsageError as e:
            print(f"{PROG} {args.command}: {e}", file=sys.stderr)
            return 2
        print(f"{PROG} {args.command}: wrote {output}", file=sys.stderr)
        return 0
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `mindspeed-cp groups ... | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
