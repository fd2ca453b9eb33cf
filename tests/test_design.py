"""The package's shape (docs/design.md): every documented import works, no import cycles, layers import downwards.

The import graph is read from the source (every ``import`` / ``from ... import`` of a ``mindspeed_cp`` module,
at module level or inside a function), so a function-level import that closes a cycle counts as one.
"""

from __future__ import annotations

import ast
import importlib
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mindspeed_cp")

# what the README and docs/design.md promise (module, names)
DOCUMENTED = [
    (
        "mindspeed_cp",
        [
            "UlyssesContextAttention",
            "DistributedAttention",
            "GatherSizeCalculator",
            "DefaultGatherSizeCalculator",
            "DynamicGatherSizeCalculator",
            "ring_attention",
            "DoubleRingWindow",
            "hybrid_attention",
            "kvallgather_attention",
            "CPConfig",
            "CPConfigError",
            "rank_layout",
        ],
    ),
    ("mindspeed_cp.megatron_adaptor", ["configure", "PATCHES", "apply", "undo"]),
    (
        "mindspeed_cp.ring",
        [
            "ring_attention",
            "ring_attention_with",
            "DoubleRingWindow",
            "RingOptions",
            "RingAttentionError",
            "count_blocks",
            "zigzag_index",
        ],
    ),
    ("mindspeed_cp.hybrid", ["hybrid_attention", "hybrid_attention_with"]),
    (
        "mindspeed_cp.kvallgather",
        ["kvallgather_attention", "kvallgather_attention_with", "KVAllGatherOptions", "KVAllGatherError"],
    ),
    ("mindspeed_cp.ulysses", ["UlyssesContextAttention", "DistributedAttention", "UlyssesError", "kv_head_repeats"]),
    ("mindspeed_cp.local", ["local_attention"]),
    ("mindspeed_cp.dropout", ["AttentionDropout"]),
    ("mindspeed_cp.kernels", ["ROUTES", "get_kernel", "merge"]),
    (
        "mindspeed_cp.comm",
        ["PeerFailure", "all_to_all", "all_gather", "RingExchanger", "shift_left", "start_all_gather"],
    ),
    ("mindspeed_cp.topology", ["rank_layout", "LayoutError"]),
    ("mindspeed_cp.options", ["RingOptions", "UlyssesOptions", "KVAllGatherOptions", "CallInputs", "DoubleRingWindow"]),
    (
        "mindspeed_cp.agreement",
        ["agree", "agree_ulysses", "agree_ring", "agree_hybrid", "agree_kvallgather", "TensorSig"],
    ),
    ("mindspeed_cp.stats", ["count_bytes", "count_saved", "count_blocks"]),
    ("mindspeed_cp.layout.sharding", ["token_indices", "padded_seq_len", "zigzag_index", "split_sizes"]),
    ("mindspeed_cp.layout.packing", ["Documents"]),
    ("mindspeed_cp.layout.gather", ["Tile", "causal_tiles", "full_tiles", "document_tiles", "gather_order"]),
    ("mindspeed_cp.layout.shift", ["plan_shift", "ShiftPlan"]),
    ("mindspeed_cp.megatron.state", ["STATE"]),
    ("mindspeed_cp.device", ["has_accelerator", "PATCHES"]),
    ("mindspeed_cp.planner.plan", ["plan", "device", "model_from"]),
    (
        "mindspeed_cp.planner.costmodel",
        ["ring_bytes", "ulysses_bytes", "kvallgather_bytes", "kvallgather_kv_cache", "textbook_bytes"],
    ),
    ("mindspeed_cp.tools.demo_megatron_lm", ["run_pretrain_gpt", "TINY_GPT"]),
]


def _layers_of_the_design_page() -> List[tuple]:
    """The layers table of docs/design.md, lowest first: ``[(layer, [module prefixes])]`` (``layout/`` ->
    ``layout``, ``planner/costmodel`` -> ``planner.costmodel``, "the package root" -> ``""``)."""
    import re

    page = open(os.path.join(os.path.dirname(ROOT), "docs", "design.md"), encoding="utf-8").read()
    table = page.split("| layer | modules | may use |", 1)[1].split("\n\n", 1)[0]
    layers = []
    for row in table.strip().splitlines()[1:]:
        _, layer, modules, _ = (c.strip() for c in row.split("|", 3))
        names = [m.strip("/").replace("/", ".") for m in re.findall(r"`([^`]+)`", modules)]
        layers.append((layer, names + ([""] if "package root" in modules else [])))
    return layers


# the layers, lowest first: a module imports only from its own layer or lower ones (read from docs/design.md)
LAYERS = _layers_of_the_design_page()


@pytest.mark.parametrize("module,names", DOCUMENTED, ids=[m for m, _ in DOCUMENTED])
def test_documented_imports(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def _modules() -> Dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith("__init__") else ("" if rel == "__init__" else rel)] = path
    return out


def import_graph() -> Dict[str, Set[str]]:
    """module (relative to mindspeed_cp, "" = the package) -> the package's modules it imports anywhere."""
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.endswith("__init__.py") and mod else mod.split(".")[:-1] if mod else []
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets: List[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("mindspeed_cp"):
                    target = node.module[len("mindspeed_cp.") :] if node.module != "mindspeed_cp" else ""
                else:
                    continue
                targets = [f"{target}.{a.name}".lstrip(".") for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                targets = [a.name[len("mindspeed_cp.") :] for a in node.names if a.name.startswith("mindspeed_cp.")]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod and not (t == "" and mod):  # a submodule's package: not an edge
                    graph[mod].add(t)
                    break
    return graph


def test_no_import_cycles():
    graph = import_graph()
    seen, stack, cycles = {}, [], []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if seen.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in seen:
                visit(n)
        stack.pop()
        seen[m] = "done"

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def _layer(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".") or (p == "" and module == "")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"mindspeed_cp.{module} is in no layer of docs/design.md"
    return level


def test_layers_import_downwards():
    upward = [(m, n) for m, targets in import_graph().items() for n in targets if _layer(n) > _layer(m)]
    assert not upward, "imports from a higher layer: " + ", ".join(
        f"mindspeed_cp.{m} ({LAYERS[_layer(m)][0]}) -> mindspeed_cp.{n} ({LAYERS[_layer(n)][0]})" for m, n in upward
    )


def test_the_pure_layer_needs_no_torch_distributed():
    """config, topology, options, layout, stats and the cost model run anywhere (the CLI, the planner)."""
    for mod, path in _modules().items():
        if _layer(mod) == 0:
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                assert not any(n.startswith("torch.distributed") for n in names), mod
