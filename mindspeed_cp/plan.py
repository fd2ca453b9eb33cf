"""``mindspeed-cp plan``: which TP / CP / algorithm / Ulysses degree / window / overlap / KV-cache policy to run.

::

    mindspeed-cp plan --model gpt3-30b --seq-length 32768 --world-size 32 --gpus-per-node 8 --device h100
    mindspeed-cp plan --model configs/models/gpt3-1.3b.conf --seq-length 32768 --world-size 8 --device a100 \\
        --tp 1 --format json --write-preset configs/cp/mine.conf

Every configuration of the layout is enumerated (TP over the divisors of a node that divide the heads - or
the one ``--tp`` given -, CP over what remains after TP x PP, then each algorithm, Ulysses degree, Double Ring
window, send/recv overlap and KV-cache policy); those :meth:`mindspeed_cp.config.CPConfig.validate` refuses or
that do not fit in device memory are dropped (listed with ``--show-rejected``), the rest ranked by the predicted
tokens per second per device (:mod:`mindspeed_cp.costmodel`: one transformer layer forward + backward on one
rank, times TP x CP devices per sequence; ``--rank-by attention``: the core attention alone). Groups and link
classes come from :func:`mindspeed_cp.topology.rank_layout`, the function the runtime builds its groups with.

Decisions
- The model is a ranking tool, not a stopwatch: its constants (``mindspeed_cp/devices/*.json``, each citing its
  source; any of them overridable with ``--set KEY=VALUE``) are datasheet peaks scaled by published
  efficiencies. What it gets right and wrong against published comparisons is in docs/planner.md.
- Ties (within 1 %) prefer fewer moving parts: no KV-cache policy, no window, Ulysses over Hybrid over Ring
  (the order of the enumeration, kept by a stable sort).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Dict, List, Optional

from .config import CPConfig, CPConfigError, HYBRID, RING, ULYSSES
from .costmodel import (Attention, Device, Model, activation_bytes_per_layer, attention_time, layer_time,
                        ring_kv_cache, weight_bytes)
from .topology import rank_layout

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = os.path.join(HERE, "devices")
ROOT = os.path.dirname(HERE)
MODELS = os.path.join(ROOT, "configs", "models")
USABLE_HBM = 0.9  # what a training job can use of a device's memory (allocator, NCCL buffers, fragmentation)


# ----------------------------------------------------------------------------- inputs
def device(spec: str, overrides: Optional[Dict[str, str]] = None) -> Device:
    """A preset name (``mindspeed_cp/devices/NAME.json``) or a JSON file; ``cpu-here`` is measured."""
    if spec == "cpu-here":
        from .calibrate import cpu_here

        data = cpu_here()
    else:
        path = spec if os.path.exists(spec) else os.path.join(DEVICES, f"{spec}.json")
        if not os.path.exists(path):
            raise ValueError(f"--device {spec!r}: no such preset ({', '.join(presets())}) or file")
        with open(path) as f:
            data = json.load(f)
    fields = {f.name: f for f in dataclasses.fields(Device)}
    for key, value in (overrides or {}).items():
        if key not in fields or key in ("name", "sources", "description"):
            raise ValueError(f"--set {key}=...: not a device constant (one of "
                             f"{', '.join(k for k in fields if k not in ('name', 'sources', 'description'))})")
        data[key] = int(value) if key in ("gpus_per_node", "cores") else float(value)
    return Device(**{k: v for k, v in data.items() if k in fields})


def presets() -> List[str]:
    return sorted(n[:-5] for n in os.listdir(DEVICES) if n.endswith(".json"))


def read_conf(path: str) -> Dict[str, str]:
    """KEY=VALUE lines of a ``configs/*.conf`` file (comments and blank lines skipped)."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip()
    return out


def model_from(args: argparse.Namespace) -> Model:
    """``--model NAME|FILE.conf`` (configs/models), then any explicit model flag wins."""
    conf: Dict[str, str] = {}
    if args.model:
        path = args.model if os.path.exists(args.model) else os.path.join(MODELS, f"{args.model}.conf")
        if not os.path.exists(path):
            names = sorted(n[:-5] for n in os.listdir(MODELS) if n.endswith(".conf")) if os.path.isdir(MODELS) else []
            raise ValueError(f"--model {args.model!r}: no such file or preset ({', '.join(names)})")
        conf = read_conf(path)
    get = lambda flag, key: getattr(args, flag) if getattr(args, flag) is not None else (  # noqa: E731
        int(conf[key]) if key in conf else None)
    values = dict(num_layers=get("num_layers", "NUM_LAYERS"), hidden_size=get("hidden_size", "HIDDEN_SIZE"),
                  num_attention_heads=get("num_attention_heads", "NUM_ATTENTION_HEADS"),
                  num_query_groups=get("num_query_groups", "NUM_QUERY_GROUPS"),
                  ffn_hidden_size=get("ffn_hidden_size", "FFN_HIDDEN_SIZE"))
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if values[k] is None]
    if missing:
        raise ValueError("the model needs " + ", ".join("--" + k.replace("_", "-") for k in missing)
                         + " (or --model NAME|FILE.conf)")
    vocab = args.vocab_size or int(conf.get("VOCAB_SIZE", 50304))
    name = os.path.basename(args.model)[:-5] if args.model and args.model.endswith(".conf") else (args.model or "")
    return Model(vocab_size=vocab, swiglu=args.swiglu, name=name, **values, **_head_sizes(conf.get("MODEL_ARGS", "")))


def _head_sizes(model_args: str) -> Dict[str, int]:
    """MLA's head sizes from a model conf's Megatron-LM flags (``--multi-latent-attention --qk-head-dim 24
    --qk-pos-emb-head-dim 8 --v-head-dim 16``): the query/key head is qk + rope, the value head its own."""
    flags = model_args.split()
    if "--multi-latent-attention" not in flags:
        return {}
    value = lambda flag, default: int(flags[flags.index(flag) + 1]) if flag in flags else default  # noqa: E731
    qk = value("--qk-head-dim", 128) + value("--qk-pos-emb-head-dim", 64)  # Megatron-LM's defaults
    return {"kv_channels": qk, "v_head_dim": value("--v-head-dim", 128)}


# ----------------------------------------------------------------------------- enumeration
def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(model: Model, S: int, world: int, gpus_per_node: int, tp: Optional[int] = None, pp: int = 1,
               kv_policies=(None, "half", "full"), fixed_cp: Optional[int] = None):
    """Every (tp, CPConfig) of the layout, valid or not (the caller validates): the enumeration order is the
    tie-break order (simplest first)."""
    tps = [tp] if tp else [t for t in _divisors(gpus_per_node) if model.num_attention_heads % t == 0]
    for t in tps:
        if world % (t * pp):
            continue
        for cp in ([fixed_cp] if fixed_cp else _divisors(world // (t * pp))):
            if world % (t * pp * cp):
                continue  # a fixed CP that this TP leaves no room for
            if cp == 1:
                yield t, CPConfig()
                continue
            for policy in kv_policies:
                yield t, CPConfig(context_parallel_size=cp, context_parallel_algo=ULYSSES,
                                  context_parallel_kv_cache_policy=policy)
                for algo, degrees in ((HYBRID, [u for u in _divisors(cp) if 1 < u < cp]), (RING, [None])):
                    for u in degrees:
                        R = cp // (u or 1)
                        for window in [1] + [k for k in _divisors(R) if 1 < k < R]:
                            for overlap in (False, True):
                                yield t, CPConfig(context_parallel_size=cp, context_parallel_algo=algo,
                                                  ulysses_degree_in_cp=u, cp_window_size=window,
                                                  use_cp_send_recv_overlap=overlap,
                                                  context_parallel_kv_cache_policy=policy)


def _attention(config: CPConfig, tp: int, pp: int, world: int) -> Attention:
    """The cost model's view of ``config``: its algorithm, degrees and the groups of global rank 0's layout."""
    algo = {ULYSSES: "ulysses", RING: "ring", HYBRID: "hybrid"}[config.context_parallel_algo]
    if config.cp == 1:
        return Attention(algo="ulysses", cp=1, tp=tp)
    layout = rank_layout(world, tp=tp, pp=pp, cp=config.cp, cp_algo=config.context_parallel_algo,
                         ulysses_degree=config.ulysses_degree_in_cp, window=config.cp_window_size)
    cp_group = layout["cp"][0]
    ring = layout.get("ring", [cp_group])[0] if algo != "ulysses" else ()
    uly = layout.get("ulysses", [cp_group])[0] if algo != "ring" else ()
    return Attention(algo=algo, cp=config.cp, ulysses=config.ulysses_size, window=config.cp_window_size,
                     overlap=config.use_cp_send_recv_overlap, kv_cache=config.context_parallel_kv_cache_policy,
                     tp=tp, ulysses_group=uly, ring_group=ring)


def cp_attention_time(dev: Device, model: Model, S: int, b: int, world: int, ulysses: int, *, window: int = 1,
                      overlap: bool = False, kv_cache: Optional[str] = None, forward_only: bool = False,
                      e: int = 2) -> dict:
    """The core attention of a pure-CP layout (TP 1, CP = world = U x R) on ``dev``: Ulysses when U = world,
    Ring when U = 1, else Hybrid - with the groups of :func:`rank_layout`."""
    algo = ULYSSES if ulysses == world else RING if ulysses == 1 else HYBRID
    config = CPConfig(context_parallel_size=world, context_parallel_algo=algo, cp_window_size=window,
                      ulysses_degree_in_cp=ulysses if algo == HYBRID else None, use_cp_send_recv_overlap=overlap,
                      context_parallel_kv_cache_policy=kv_cache)
    return attention_time(dev.for_ranks(world), model, S, b, _attention(config, 1, 1, world), e=e,
                          forward_only=forward_only)


def memory(model: Model, dev: Device, S: int, b: int, tp: int, pp: int, world: int, config: CPConfig,
           recompute: str, distributed_optimizer: bool, e: int = 2) -> Dict[str, float]:
    """Bytes per device: weights + gradients + optimizer, activations of the layers in flight (1F1B: the first
    stage holds ``pp`` micro-batches of ``L/pp`` layers = L layers), what a KV-cache policy keeps, the logits."""
    cp = config.cp
    dp = world // (tp * pp * cp)
    weights = weight_bytes(model.params() / (tp * pp), dp * cp, distributed_optimizer)  # optimizer over DP x CP
    tokens = S // cp
    act = model.num_layers * activation_bytes_per_layer(tokens, b, model.hidden_size, tp, recompute)
    if recompute == "full":  # one layer's whole activations while it is recomputed
        act += activation_bytes_per_layer(tokens, b, model.hidden_size, tp, "none")
    kv = 0.0
    if config.context_parallel_kv_cache_policy and cp > 1 and config.ring_size > 1:
        hk = max(model.kv_heads / tp, config.ulysses_size) / config.ulysses_size
        per_layer = ring_kv_cache(S, config.ring_size, b, hk, model.head_dim, e,
                                  config.context_parallel_kv_cache_policy, dv=model.v_dim)["saved"]
        kv = per_layer * (1 if recompute == "full" else model.num_layers)
    logits = 4 * tokens * b * model.vocab_size / tp  # fp32 logits of the last stage
    total = weights + act + kv + logits
    return {"weights": weights, "activations": act, "kv_cache": kv, "logits": logits, "total": total,
            "fits": total <= USABLE_HBM * dev.hbm_gb * 1e9}


def plan(model: Model, dev: Device, S: int, world: int, *, tp: Optional[int] = None, pp: int = 1, b: int = 1,
         recompute: str = "none", distributed_optimizer: bool = True, rank_by: str = "layer",
         kv_policies=(None, "half", "full"), cp: Optional[int] = None) -> Dict[str, list]:
    """``{"ranked": [...], "rejected": [...]}``; each entry a dict with the flags, the prediction and memory."""
    ranked, rejected = [], []
    dev = dev.for_ranks(world)
    for t, config in candidates(model, S, world, dev.gpus_per_node, tp, pp, kv_policies, cp):
        entry = {"tp": t, "pp": pp, "cp": config.cp, "dp": world // (t * pp * config.cp), "config": config}
        try:
            config.validate(tensor_model_parallel_size=t, num_attention_heads=model.num_attention_heads,
                            num_query_groups=model.num_query_groups, seq_length=S, world_size=world,
                            pipeline_model_parallel_size=pp)
        except CPConfigError as e:
            rejected.append(dict(entry, why=str(e)))
            continue
        mem = memory(model, dev, S, b, t, pp, world, config, recompute, distributed_optimizer)
        if not mem["fits"]:
            rejected.append(dict(entry, why=f"needs {mem['total'] / 1e9:.1f} GB of {dev.hbm_gb:g} GB "
                                            f"(x {USABLE_HBM} usable)", memory=mem))
            continue
        a = _attention(config, t, pp, world)
        tp_group = rank_layout(world, tp=t, pp=pp, cp=config.cp)["tp"][0] if t > 1 else ()
        pred = layer_time(dev, model, S, b, a, tp_group)
        per_sequence = pred["total" if rank_by == "layer" else "attention"] * t * config.cp
        entry.update(predicted=pred, memory=mem, rank_time=per_sequence,
                     tokens_per_s_per_device=S * b / (model.num_layers * pred["total"] * t * config.cp))
        ranked.append(entry)
    if ranked:  # 1 % buckets of the best time, stable: within a bucket the simpler configuration stays first
        best = min(r["rank_time"] for r in ranked)
        ranked.sort(key=lambda x: round(x["rank_time"] / best, 2))
    return {"ranked": ranked, "rejected": rejected}


# ----------------------------------------------------------------------------- output
def _settings(entry: dict) -> List[tuple]:
    """(Megatron-LM flag, ``configs/cp/*.conf`` line) of every CP option ``entry`` sets."""
    c: CPConfig = entry["config"]
    if c.cp == 1:
        return []
    out = [(f"--context-parallel-algo {c.context_parallel_algo}", f"CP_ALGO={c.context_parallel_algo}")]
    if c.context_parallel_algo == HYBRID:
        out.append((f"--ulysses-degree-in-cp {c.ulysses_degree_in_cp}", f"ULYSSES_DEGREE={c.ulysses_degree_in_cp}"))
    if c.cp_window_size > 1:
        out.append((f"--cp-window-size {c.cp_window_size}", f"CP_WINDOW={c.cp_window_size}"))
    if c.use_cp_send_recv_overlap:
        out.append(("--use-cp-send-recv-overlap", "CP_OVERLAP=1"))
    if c.context_parallel_kv_cache_policy:
        policy = c.context_parallel_kv_cache_policy
        out.append((f"--context-parallel-kv-cache-policy {policy}", f"CP_KV_CACHE={policy}"))
    return out


def flags(entry: dict) -> str:
    out = [f"--tensor-model-parallel-size {entry['tp']}", f"--context-parallel-size {entry['config'].cp}"]
    if entry["pp"] > 1:
        out.append(f"--pipeline-model-parallel-size {entry['pp']}")
    return " ".join(out + [flag for flag, _ in _settings(entry)])


def preset(entry: dict, world: int, gpus_per_node: int, model: Model, S: int) -> str:
    """A ``configs/cp/*.conf`` preset for ``scripts/pretrain_gpt_cp.sh``."""
    lines = [f"# written by mindspeed-cp plan: {model.name or 'model'} at {S} tokens on {world} devices "
             f"({gpus_per_node} per node)", f"# {flags(entry)}",
             f"NNODES={max(world // gpus_per_node, 1)}", f"TP={entry['tp']}", f"PP={entry['pp']}",
             f"CP={entry['config'].cp}"] + [line for _, line in _settings(entry)]
    if entry["tp"] > 1:
        lines.append("SEQUENCE_PARALLEL=1")
    return "\n".join(lines) + "\n"


def _distinct(ranked: List[dict]) -> List[dict]:
    """Drop a configuration predicted exactly as one already listed that differs from it only by the overlap flag."""
    seen, out = set(), []
    for e in ranked:
        key = (e["tp"], dataclasses.replace(e["config"], use_cp_send_recv_overlap=False), e["rank_time"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _row(i: int, e: dict) -> str:
    p, m = e["predicted"], e["memory"]
    return (f"{i:>3} {e['tokens_per_s_per_device']:>10.0f} {1e3 * p['total']:>8.2f} {1e3 * p['compute']:>8.2f} "
            f"{1e3 * p['dense']:>7.2f} {p['intra_bytes'] / 2**20:>8.1f} {p['inter_bytes'] / 2**20:>8.1f} "
            f"{1e3 * (p['a2a'] + p['ring_exposed'] + p['tp_comm']):>8.2f} {m['total'] / 1e9:>6.1f}  {flags(e)}")


def text(result: dict, model: Model, dev: Device, S: int, world: int, top: int, show_rejected: bool) -> str:
    lines = [f"{model.name or 'model'}: {model.num_layers} layers, hidden {model.hidden_size}, "
             f"{model.num_attention_heads} heads / {model.kv_heads} KV heads, {model.params() / 1e9:.1f}B params; "
             f"{S} tokens; {world} x {dev.name} ({dev.gpus_per_node} per node)",
             f"{len(result['ranked'])} feasible configurations, {len(result['rejected'])} rejected. Per layer, "
             "forward + backward, one rank (ms); bytes sent per rank (MiB) by link class; exposed = "
             "communication not hidden behind compute.", "",
             "  # tok/s/dev  layer ms  attn ms dense ms intra MiB inter MiB exposed ms  GB   flags"]
    shown = _distinct(result["ranked"])
    lines += [_row(i + 1, e) for i, e in enumerate(shown[:top])]
    if len(shown) < len(result["ranked"]):
        lines.append(f"  ({len(result['ranked']) - len(shown)} more predicted exactly as a simpler one above - the "
                     "same but for --use-cp-send-recv-overlap - not shown; --format json lists all)")
    if show_rejected:
        lines += ["", "rejected:"] + [f"  TP {r['tp']} CP {r['cp']} {r['config'].describe()}: {r['why']}"
                                      for r in result["rejected"]]
    return "\n".join(lines) + "\n"


def as_json(result: dict, top: int) -> str:
    def clean(e):
        out = {k: v for k, v in e.items() if k != "config"}
        out["config"] = dataclasses.asdict(e["config"])
        out["flags"] = flags(e)
        return out
    return json.dumps({"ranked": [clean(e) for e in result["ranked"][:top]],
                       "rejected": [clean(e) for e in result["rejected"]]}, indent=1) + "\n"


# ----------------------------------------------------------------------------- command
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="rank TP / CP / algorithm / degrees / window / overlap / KV-cache policy for a model",
        description="Enumerate the feasible CP configurations for a model on a cluster and rank them by the "
                    "cost model's predicted throughput (docs/planner.md).")
    p.add_argument("--model", default=None, metavar="NAME|FILE.conf", help="configs/models/NAME.conf or a file")
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-attention-heads", type=int, default=None)
    p.add_argument("--num-query-groups", type=int, default=None, help="KV heads (GQA)")
    p.add_argument("--ffn-hidden-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--seq-length", type=int, required=True, metavar="S")
    p.add_argument("--world-size", type=int, required=True, metavar="W")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="default: the device preset's")
    p.add_argument("--device", default="h100", metavar="NAME|FILE",
                   help="a preset (mindspeed_cp/devices: a100, h100, h200, 910b, cpu-here = measured here) or a "
                        "JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a device constant, e.g. --set inter_node_gbps=25 (repeatable)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=None,
                   help="fix TP (default: every divisor of a node that divides the heads)")
    p.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=None,
                   help="fix CP (default: every divisor of what TP x PP leave)")
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--recompute", choices=("none", "full"), default="none",
                   help="activation memory: none, or Megatron's --recompute-granularity full")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--no-kv-cache", action="store_true", help="do not consider KV-cache policies")
    p.add_argument("--rank-by", choices=("layer", "attention"), default="layer")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--show-rejected", action="store_true")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--write-preset", default=None, metavar="FILE", help="write the best as a configs/cp preset")
    return p


def run(args: argparse.Namespace) -> str:
    from .cli import UsageError  # lazy: cli imports this module

    try:
        overrides = dict(kv.split("=", 1) for kv in args.set)
    except ValueError:
        raise UsageError(f"--set takes KEY=VALUE, got {args.set}") from None
    try:
        model = model_from(args)
        dev = device(args.device, overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if args.gpus_per_node:
        dev.gpus_per_node = args.gpus_per_node
    result = plan(model, dev, args.seq_length, args.world_size, tp=args.tp, pp=args.pp, b=args.micro_batch_size,
                  recompute=args.recompute, distributed_optimizer=not args.no_distributed_optimizer,
                  rank_by=args.rank_by, kv_policies=(None,) if args.no_kv_cache else (None, "half", "full"),
                  cp=args.cp)
    if not result["ranked"]:
        reasons = sorted({r["why"] for r in result["rejected"]})[:3]
        raise UsageError("no feasible configuration: " + "; ".join(reasons))
    if args.write_preset:
        with open(args.write_preset, "w") as f:
            f.write(preset(result["ranked"][0], args.world_size, dev.gpus_per_node, model, args.seq_length))
    if args.format == "json":
        return as_json(result, args.top)
    return text(result, model, dev, args.seq_length, args.world_size, args.top, args.show_rejected)
