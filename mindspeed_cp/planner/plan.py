"""``mindspeed-cp plan``: which TP / CP / algorithm / Ulysses degree / window / overlap / KV-cache policy to run.

::

    mindspeed-cp plan --model gpt3-30b --seq-length 32768 --world-size 32 --gpus-per-node 8 --device h100
    mindspeed-cp plan --model configs/models/gpt3-1.3b.conf --seq-length 32768 --world-size 8 --device a100 \\
        --tp 1 --format json --write-preset configs/cp/mine.conf

Every configuration of the layout is enumerated (TP over the divisors of a node that divide the heads - or
the one ``--tp`` given -, CP over what remains after TP x PP, then each algorithm, Ulysses degree, Double Ring
window, send/recv overlap and KV-cache policy); those :meth:`mindspeed_cp.config.CPConfig.validate` refuses or
that do not fit in device memory are dropped (listed with ``--show-rejected``), the rest ranked by the predicted
tokens per second per device (:mod:`mindspeed_cp.planner.costmodel`: one transformer layer forward + backward on one
rank, times TP x CP devices per sequence; ``--rank-by attention``: the core attention alone). Groups and link
classes come from :func:`mindspeed_cp.topology.groups_for` - the rules the runtime builds its groups with
(:func:`~mindspeed_cp.topology.rank_layout`), for rank 0 only, so each candidate costs its group sizes, not the
world (a million ranks in ~2.5 s; benchmarks/cli_scale.py). Every argument is checked up front (a bad one: exit 2,
one line naming it).

Decisions
- The model is a ranking tool, not a stopwatch: its constants (``mindspeed_cp/planner/devices/*.json``, each citing its
  source; any of them overridable with ``--set KEY=VALUE``) are datasheet peaks scaled by published
  efficiencies. What it gets right and wrong against published comparisons is in docs/planner.md.
- Row order (:func:`order`): tiers by speed - the fastest remaining configuration and every one within 1 % of
  its time - each tier listed simplest first: the enumeration order (smaller TP, smaller CP, no KV-cache policy
  before half before full, Ulysses before Hybrid before Ring before the K/V all-gather, no window, no overlap
  first).
- What the memory check assumes is part of every row's flags and of ``--write-preset`` (micro-batch, sequence
  parallelism under TP, distributed optimizer, recomputation), so a written preset runs as planned.
- Ring, Hybrid and the K/V all-gather are costed at the length they pad a batch to (the next multiple of 2 x CP).
- ``kvallgather_cp_algo`` is enumerated with its gather overlapped (``--no-cp-allgather-overlap`` is never faster in
  the model); its memory counts one layer's gathered K/V (:func:`memory`). Hybrid is enumerated with the ring and,
  without a window or send/recv overlap, with the K/V all-gather as its outer level (``--hybrid-outer-cp-algo``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections import Counter
from typing import Any, Dict, List, Optional

from ..cliargs import UsageError, integer, output_file, real, write_text
from ..config import HYBRID, KVALLGATHER, RING, ULYSSES, CPConfig, CPConfigError
from ..topology import groups_for
from .costmodel import (
    Attention,
    Device,
    Model,
    activation_bytes_per_layer,
    attention_time,
    head_groups,
    kvallgather_kv_cache,
    layer_time,
    ring_kv_cache,
    weight_bytes,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = os.path.join(HERE, "devices")
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository (configs/models)
MODELS = os.path.join(ROOT, "configs", "models")
USABLE_HBM = 0.9  # what a training job can use of a device's memory (allocator, NCCL buffers, fragmentation)


# ----------------------------------------------------------------------------- inputs
_ANY, _RATE, _FRACTION = real(0.0), real(0.0, open_low=True), real(0.0, 1.0, open_low=True)
# what each device constant may be (--set KEY=VALUE, a --device FILE, the presets): its parser states the range
DEVICE_CONSTANTS = dict(
    peak_tflops=_RATE,
    hbm_gb=_RATE,
    intra_node_gbps=_RATE,
    inter_node_gbps=_RATE,
    intra_node_latency_us=_ANY,
    inter_node_latency_us=_ANY,
    attention_efficiency=_FRACTION,
    attention_half_tokens=_ANY,
    matmul_efficiency=_RATE,  # > 1 allowed: cpu-here measures it against the attention kernel's rate
    link_efficiency=_FRACTION,
    inter_link_efficiency=_FRACTION,
    intra_node_pair_gbps=_ANY,
    kernel_call_us=_ANY,
    attention_call_us=_ANY,
    gpus_per_node=integer(1),
    fast_domain=integer(0),
    cores=integer(0),
)


def device(spec: str, overrides: Optional[Dict[str, str]] = None) -> Device:
    """A preset name (``mindspeed_cp/planner/devices/NAME.json``) or a JSON file; ``cpu-here`` is measured. Every
    constant is checked against :data:`DEVICE_CONSTANTS` (ValueError naming it and its range)."""
    data = _device_data(spec)
    for key, value in (overrides or {}).items():
        if key not in DEVICE_CONSTANTS:
            raise ValueError(f"--set {key}=...: not a device constant (one of {', '.join(DEVICE_CONSTANTS)})")
        data[key] = _constant(key, value, f"--set {key}={value}")
    for key in DEVICE_CONSTANTS.keys() & data.keys() - (overrides or {}).keys():
        data[key] = _constant(key, str(data[key]), f"--device {spec}: {key}")
    fields = {f.name for f in dataclasses.fields(Device)}
    missing = [k for k in ("name", "peak_tflops", "hbm_gb", "intra_node_gbps", "inter_node_gbps") if k not in data]
    if missing:
        raise ValueError(f"--device {spec}: no {', '.join(missing)} (see mindspeed_cp/planner/devices/h100.json)")
    return Device(**{k: v for k, v in data.items() if k in fields})


def _device_data(spec: str) -> dict:
    if spec == "cpu-here":
        from .calibrate import cpu_here

        return cpu_here()
    path = spec if os.path.exists(spec) else os.path.join(DEVICES, f"{spec}.json")
    if not os.path.isfile(path):
        raise ValueError(f"--device {spec!r}: no such preset ({', '.join(presets())}, cpu-here) or file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--device {spec}: not a device JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--device {spec}: not a device JSON file (an object of constants expected)")
    return data


def _constant(key: str, value: str, where: str):
    try:
        return DEVICE_CONSTANTS[key](value)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{where}: {e}") from None


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


MODEL_KEYS = dict(
    num_layers="NUM_LAYERS",
    hidden_size="HIDDEN_SIZE",
    num_attention_heads="NUM_ATTENTION_HEADS",
    num_query_groups="NUM_QUERY_GROUPS",
    ffn_hidden_size="FFN_HIDDEN_SIZE",
    vocab_size="VOCAB_SIZE",
)


def model_from(args: argparse.Namespace) -> Model:
    """``--model NAME|FILE.conf`` (configs/models), then any explicit model flag wins."""
    conf: Dict[str, str] = {}
    if args.model:
        path = args.model if os.path.isfile(args.model) else os.path.join(MODELS, f"{args.model}.conf")
        if not os.path.isfile(path):
            names = sorted(n[:-5] for n in os.listdir(MODELS) if n.endswith(".conf")) if os.path.isdir(MODELS) else []
            raise ValueError(f"--model {args.model!r}: no such file or preset ({', '.join(names)})")
        conf = read_conf(path)
    values = {k: _model_value(args, k, conf) for k in MODEL_KEYS}
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if values[k] is None]
    if missing:
        raise ValueError(
            "the model needs " + ", ".join("--" + k.replace("_", "-") for k in missing) + " (or --model NAME|FILE.conf)"
        )
    heads, kv = values["num_attention_heads"], values["num_query_groups"] or values["num_attention_heads"]
    if values["hidden_size"] % heads:
        raise ValueError(f"--hidden-size {values['hidden_size']} is not divisible by --num-attention-heads {heads}")
    if heads % kv:
        raise ValueError(f"--num-query-groups {kv} does not divide --num-attention-heads {heads}")
    values["vocab_size"] = values["vocab_size"] or 50304
    name = os.path.basename(args.model)[:-5] if args.model and args.model.endswith(".conf") else (args.model or "")
    return Model(swiglu=args.swiglu, name=name, **values, **_model_args(conf.get("MODEL_ARGS", "")))


def _model_args(model_args: str) -> Dict[str, Any]:
    """What the plan needs of a model conf's own Megatron-LM flags: MLA's head sizes (``--multi-latent-attention
    --qk-head-dim 24 --qk-pos-emb-head-dim 8 --v-head-dim 16``: the query/key head is qk + rope, the value head its
    own) and the attention features not every algorithm computes (``--softmax-type``, ``--window-size``)."""
    flags = model_args.split()
    value = lambda flag, default: flags[flags.index(flag) + 1] if flag in flags else default  # noqa: E731
    out: Dict[str, Any] = {
        "softmax_type": value("--softmax-type", "vanilla"),
        "window_size": value("--window-size", None),
        "window_attn_skip_freq": value("--window-attn-skip-freq", None),
    }
    if "--multi-latent-attention" in flags:
        qk = int(value("--qk-head-dim", 128)) + int(value("--qk-pos-emb-head-dim", 64))  # Megatron-LM's defaults
        out.update(kv_channels=qk, v_head_dim=int(value("--v-head-dim", 128)))
    return out


def _model_value(args: argparse.Namespace, key: str, conf: Dict[str, str]) -> Optional[int]:
    """A flag's value, else the model file's (a positive integer, named with its file and key)."""
    if getattr(args, key) is not None:
        return getattr(args, key)
    if MODEL_KEYS[key] not in conf:
        return None
    try:
        return integer(1)(conf[MODEL_KEYS[key]])
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--model {args.model}: {MODEL_KEYS[key]} {e}") from None


# ----------------------------------------------------------------------------- enumeration
def _divisors(n: int) -> List[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def tp_sizes(model: Model, gpus_per_node: int, tp: Optional[int] = None) -> List[int]:
    """The TP sizes considered: the one ``--tp`` given, else the divisors of a node that divide the heads."""
    return [tp] if tp else [t for t in _divisors(gpus_per_node) if model.num_attention_heads % t == 0]


def candidates(
    model: Model,
    S: int,
    world: int,
    gpus_per_node: int,
    tp: Optional[int] = None,
    pp: int = 1,
    kv_policies=(None, "half", "full"),
    fixed_cp: Optional[int] = None,
):
    """Every (tp, CPConfig) of the layout, valid or not (the caller validates): the enumeration order is the
    tie-break order (simplest first). A model with sliding-window layers also gets each configuration with its
    windowed layers on another algorithm (``--window-attn-cp-algo``: the window-aware ring under Ulysses or
    Hybrid, Ulysses under Ring)."""
    for t, config in _layouts(model, S, world, gpus_per_node, tp, pp, kv_policies, fixed_cp):
        yield t, config
        if config.cp > 1 and model.windowed_layers():
            other = ULYSSES if config.context_parallel_algo in (RING, KVALLGATHER) else RING
            yield t, dataclasses.replace(config, window_attn_cp_algo=other)


def _layouts(model, S, world, gpus_per_node, tp, pp, kv_policies, fixed_cp):
    tps = tp_sizes(model, gpus_per_node, tp)
    for t in tps:
        if world % (t * pp):
            continue
        for cp in [fixed_cp] if fixed_cp else _divisors(world // (t * pp)):
            if world % (t * pp * cp):
                continue  # a fixed CP that this TP leaves no room for
            if cp == 1:
                yield t, CPConfig()
                continue
            for policy in kv_policies:
                yield (
                    t,
                    CPConfig(
                        context_parallel_size=cp, context_parallel_algo=ULYSSES, context_parallel_kv_cache_policy=policy
                    ),
                )
                for algo, degrees in ((HYBRID, [u for u in _divisors(cp) if 1 < u < cp]), (RING, [None])):
                    for u in degrees:
                        R = cp // (u or 1)
                        for window in [1] + [k for k in _divisors(R) if 1 < k < R]:
                            for overlap in (False, True):
                                yield (
                                    t,
                                    CPConfig(
                                        context_parallel_size=cp,
                                        context_parallel_algo=algo,
                                        ulysses_degree_in_cp=u,
                                        cp_window_size=window,
                                        use_cp_send_recv_overlap=overlap,
                                        context_parallel_kv_cache_policy=policy,
                                    ),
                                )
                        if algo == HYBRID:  # the K/V all-gather as the outer level
                            yield (
                                t,
                                CPConfig(
                                    context_parallel_size=cp,
                                    context_parallel_algo=HYBRID,
                                    ulysses_degree_in_cp=u,
                                    hybrid_outer_cp_algo=KVALLGATHER,
                                    context_parallel_kv_cache_policy=policy,
                                ),
                            )
                yield (
                    t,
                    CPConfig(
                        context_parallel_size=cp,
                        context_parallel_algo=KVALLGATHER,
                        context_parallel_kv_cache_policy=policy,
                    ),
                )


_ALGO = {ULYSSES: "ulysses", RING: "ring", HYBRID: "hybrid", KVALLGATHER: "kvallgather"}  # the cost model's names


def _attention(config: CPConfig, tp: int, groups: Dict[str, List[int]]) -> Attention:
    """The cost model's view of ``config``: its algorithm, degrees and ``groups`` (global rank 0's, from
    :func:`mindspeed_cp.topology.groups_for`: the runtime's rules for that one rank, linear in the group sizes)."""
    algo = _ALGO[config.context_parallel_algo]
    if config.cp == 1:
        return Attention(algo="ulysses", cp=1, tp=tp)
    ring = groups.get("ring", groups.get("allgather", groups["cp"])) if algo != "ulysses" else ()
    uly = groups.get("ulysses", groups["cp"]) if algo in ("ulysses", "hybrid") else ()
    return Attention(
        algo=algo,
        cp=config.cp,
        ulysses=config.ulysses_size,
        window=config.cp_window_size,
        overlap=config.cp_allgather_overlap if config.gathers_kv else config.use_cp_send_recv_overlap,
        outer="kvallgather" if config.gathers_kv and algo == "hybrid" else "ring",
        kv_cache=config.context_parallel_kv_cache_policy,
        tp=tp,
        ulysses_group=uly,
        ring_group=ring,
        cp_group=groups["cp"],
    )


def _groups(config: CPConfig, tp: int, pp: int, world: int) -> Dict[str, List[int]]:
    return groups_for(config, world, tp, pp, rank=0, kinds=("tp", "cp", "ulysses", "ring", "allgather"))


def cp_attention_time(
    dev: Device,
    model: Model,
    S: int,
    b: int,
    world: int,
    ulysses: int,
    *,
    window: int = 1,
    overlap: bool = False,
    kv_cache: Optional[str] = None,
    forward_only: bool = False,
    e: int = 2,
) -> dict:
    """The core attention of a pure-CP layout (TP 1, CP = world = U x R) on ``dev``: Ulysses when U = world,
    Ring when U = 1, else Hybrid - with the groups of :func:`rank_layout`."""
    algo = ULYSSES if ulysses == world else RING if ulysses == 1 else HYBRID
    config = CPConfig(
        context_parallel_size=world,
        context_parallel_algo=algo,
        cp_window_size=window,
        ulysses_degree_in_cp=ulysses if algo == HYBRID else None,
        use_cp_send_recv_overlap=overlap,
        context_parallel_kv_cache_policy=kv_cache,
    )
    return attention_time(
        dev.for_ranks(world),
        model,
        S,
        b,
        _attention(config, 1, _groups(config, 1, 1, world)),
        e=e,
        forward_only=forward_only,
    )


def memory(
    model: Model,
    dev: Device,
    S: int,
    b: int,
    tp: int,
    pp: int,
    world: int,
    config: CPConfig,
    recompute: str,
    distributed_optimizer: bool,
    e: int = 2,
) -> Dict[str, float]:
    """Bytes per device: weights + gradients + optimizer, activations of the layers in flight (1F1B: the first
    stage holds ``pp`` micro-batches of ``L/pp`` layers = L layers), what a KV-cache policy keeps, the logits, and
    for ``kvallgather_cp_algo`` the gathered K/V of the layer at hand (``S b hk (d + dv) e``) with its head group's
    float32 dK/dV accumulators in backward."""
    cp = config.cp
    dp = world // (tp * pp * cp)
    weights = weight_bytes(model.params() / (tp * pp), dp * cp, distributed_optimizer)  # optimizer over DP x CP
    tokens = S // cp
    act = model.num_layers * activation_bytes_per_layer(tokens, b, model.hidden_size, tp, recompute)
    if recompute == "full":  # one layer's whole activations while it is recomputed
        act += activation_bytes_per_layer(tokens, b, model.hidden_size, tp, "none")
    kv, gathered = 0.0, 0.0
    hk = max(model.kv_heads / tp, config.ulysses_size) / config.ulysses_size
    policy, gather = config.context_parallel_kv_cache_policy, config.gathers_kv
    if policy and cp > 1 and config.ring_size > 1:
        cache = kvallgather_kv_cache if gather else ring_kv_cache
        per_layer = cache(S, config.ring_size, b, hk, model.head_dim, e, policy, dv=model.v_dim)["saved"]
        kv = per_layer * (1 if recompute == "full" else model.num_layers)
    if gather and cp > 1:
        heads = S * b * hk * (model.head_dim + model.v_dim)
        gathered = heads * e + heads * 4 / head_groups(hk, config.cp_allgather_overlap, bool(dev.cores))
    logits = 4 * tokens * b * model.vocab_size / tp  # fp32 logits of the last stage
    total = weights + act + kv + gathered + logits
    return {
        "weights": weights,
        "activations": act,
        "kv_cache": kv,
        "gathered_kv": gathered,
        "logits": logits,
        "total": total,
        "fits": total <= USABLE_HBM * dev.hbm_gb * 1e9,
    }


def plan(
    model: Model,
    dev: Device,
    S: int,
    world: int,
    *,
    tp: Optional[int] = None,
    pp: int = 1,
    b: int = 1,
    recompute: str = "none",
    distributed_optimizer: bool = True,
    rank_by: str = "layer",
    kv_policies=(None, "half", "full"),
    cp: Optional[int] = None,
) -> Dict[str, list]:
    """``{"ranked": [...], "rejected": [...]}``; each entry a dict with the flags, what the memory check assumed
    (``assumes``), the prediction and memory. ``ranked`` is in the documented order (:func:`order`)."""
    ranked, rejected = [], []
    dev = dev.for_ranks(world)
    assumes = dict(micro_batch_size=b, recompute=recompute, distributed_optimizer=distributed_optimizer)
    for t, config in candidates(model, S, world, dev.gpus_per_node, tp, pp, kv_policies, cp):
        entry = {
            "tp": t,
            "pp": pp,
            "cp": config.cp,
            "dp": world // (t * pp * config.cp),
            "config": config,
            "assumes": assumes,
        }
        why = _evaluate(entry, model, dev, S, world, rank_by)
        if why is None:
            ranked.append(entry)
        else:
            rejected.append(dict(entry, why=why))
    return {"ranked": order(ranked), "rejected": rejected}


def _evaluate(entry: dict, model: Model, dev: Device, S: int, world: int, rank_by: str) -> Optional[str]:
    """Fill ``entry`` with its memory and prediction; return why it is rejected (None: feasible)."""
    t, pp, config, a = entry["tp"], entry["pp"], entry["config"], entry["assumes"]
    try:
        config.validate(
            tensor_model_parallel_size=t,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups,
            seq_length=S,
            world_size=world,
            pipeline_model_parallel_size=pp,
        )
    except CPConfigError as e:
        return str(e)
    feature = config.feature_problem(model.softmax_type, model.window_size)
    if feature is not None:  # what the model build would refuse
        return feature
    if config.window_attn_cp_algo and not model.windowed_layers():
        return "--window-attn-cp-algo without sliding-window layers (--window-size)"
    padded, b = config.padded_seq_len(S), a["micro_batch_size"]  # Ring/Hybrid compute, send and keep the padding
    entry["memory"] = mem = memory(
        model, dev, padded, b, t, pp, world, config, a["recompute"], a["distributed_optimizer"]
    )
    if not mem["fits"]:
        return f"needs {mem['total'] / 1e9:.1f} GB of {dev.hbm_gb:g} GB (x {USABLE_HBM} usable)"
    groups = _groups(config, t, pp, world)
    pred = layer_time(dev, model, padded, b, _attention(config, t, groups), groups["tp"] if t > 1 else ())
    windowed = model.windowed_layers()
    if windowed and config.cp > 1:  # the average layer: full ones and windowed ones (by their halo)
        algo = _ALGO[config.layer_algo(True)]
        win = layer_time(dev, model, padded, b, _attention(config, t, groups), groups["tp"] if t > 1 else (), 2, algo)
        share = windowed / model.num_layers
        pred = {k: (1 - share) * v + share * win[k] for k, v in pred.items()}
        pred["windowed_attention"] = win["attention"]
    entry.update(
        predicted=pred,
        rank_time=pred["total" if rank_by == "layer" else "attention"] * t * config.cp,
        tokens_per_s_per_device=S * b / (model.num_layers * pred["total"] * t * config.cp),
    )
    return None


TIER = 1.01  # configurations within 1 % of the fastest remaining one are listed simplest first


def order(ranked: List[dict]) -> List[dict]:
    """The documented row order (docs/planner.md): tiers by speed - the fastest remaining configuration and every
    one within 1 % of its time - each tier simplest first (the enumeration order of :func:`candidates`)."""
    index = {id(e): i for i, e in enumerate(ranked)}
    by_time, out, i = sorted(ranked, key=lambda e: e["rank_time"]), [], 0
    while i < len(by_time):
        j, limit = i, TIER * by_time[i]["rank_time"]
        while j < len(by_time) and by_time[j]["rank_time"] <= limit:
            j += 1
        out += sorted(by_time[i:j], key=lambda e: index[id(e)])
        i = j
    return out


# ----------------------------------------------------------------------------- output
def _settings(entry: dict) -> List[tuple]:
    """(Megatron-LM flag, ``configs/cp/*.conf`` line) of every CP option ``entry`` sets."""
    c: CPConfig = entry["config"]
    if c.cp == 1:
        return []
    out = [(f"--context-parallel-algo {c.context_parallel_algo}", f"CP_ALGO={c.context_parallel_algo}")]
    if c.context_parallel_algo == HYBRID:
        out.append((f"--ulysses-degree-in-cp {c.ulysses_degree_in_cp}", f"ULYSSES_DEGREE={c.ulysses_degree_in_cp}"))
        if c.hybrid_outer_cp_algo != RING:
            outer = c.hybrid_outer_cp_algo
            out.append((f"--hybrid-outer-cp-algo {outer}", f"HYBRID_OUTER_CP_ALGO={outer}"))
    if c.cp_window_size > 1:
        out.append((f"--cp-window-size {c.cp_window_size}", f"CP_WINDOW={c.cp_window_size}"))
    if c.use_cp_send_recv_overlap:
        out.append(("--use-cp-send-recv-overlap", "CP_OVERLAP=1"))
    if not c.cp_allgather_overlap:
        out.append(("--no-cp-allgather-overlap", "CP_ALLGATHER_OVERLAP=0"))
    if c.window_attn_cp_algo:
        out.append((f"--window-attn-cp-algo {c.window_attn_cp_algo}", f"WINDOW_CP_ALGO={c.window_attn_cp_algo}"))
    if c.context_parallel_kv_cache_policy:
        policy = c.context_parallel_kv_cache_policy
        out.append((f"--context-parallel-kv-cache-policy {policy}", f"CP_KV_CACHE={policy}"))
    return out


def _assumed(entry: dict) -> List[tuple]:
    """(Megatron-LM flags, preset line) of what the memory check assumed: the micro-batch, sequence parallelism
    under TP (activations / TP), the distributed optimizer, full recomputation."""
    a = entry.get("assumes") or dict(micro_batch_size=1, recompute="none", distributed_optimizer=False)
    out = [(f"--micro-batch-size {a['micro_batch_size']}", f"MICRO_BATCH_SIZE={a['micro_batch_size']}")]
    if entry["tp"] > 1:
        out.append(("--sequence-parallel", "SEQUENCE_PARALLEL=1"))
    extra = (["--use-distributed-optimizer"] if a["distributed_optimizer"] else []) + (
        [RECOMPUTE_FULL] if a["recompute"] == "full" else []
    )
    if extra:
        out.append((" ".join(extra), f"EXTRA_ARGS={' '.join(extra)}"))
    return out


RECOMPUTE_FULL = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"


def flags(entry: dict) -> str:
    """Every Megatron-LM flag the prediction and the memory check assumed."""
    out = [f"--tensor-model-parallel-size {entry['tp']}", f"--context-parallel-size {entry['config'].cp}"]
    if entry["pp"] > 1:
        out.append(f"--pipeline-model-parallel-size {entry['pp']}")
    return " ".join(out + [flag for flag, _ in _settings(entry) + _assumed(entry)])


def preset(entry: dict, world: int, gpus_per_node: int, model: Model, S: int, path: str = "THIS_FILE") -> str:
    """A preset for ``scripts/pretrain_gpt_cp.sh`` with everything the plan assumed: the layout, the CP options,
    the sequence and model shape, batch sizes (the global batch: one micro-batch per data-parallel rank),
    sequence parallelism, the distributed optimizer and recomputation."""
    nodes, per_node = (1, world) if world <= gpus_per_node else (world // gpus_per_node, gpus_per_node)
    model_lines = [
        f"{key}={getattr(model, field)}" for field, key in MODEL_KEYS.items() if getattr(model, field) is not None
    ]
    lines = [
        f"# written by mindspeed-cp plan: {model.name or 'model'} at {S} tokens on {world} devices "
        f"({per_node} per node); run: bash scripts/pretrain_gpt_cp.sh {model.name or 'MODEL'} {path}",
        f"# {flags(entry)}",
        f"NNODES={nodes}",
        f"GPUS_PER_NODE={per_node}",
        f"TP={entry['tp']}",
        f"PP={entry['pp']}",
        f"CP={entry['config'].cp}",
        *[line for _, line in _settings(entry)],
        f"SEQ_LENGTH={S}",
        f"MAX_POSITION_EMBEDDINGS={S}",
        *model_lines,
        *[line for _, line in _assumed(entry)],
        f"GLOBAL_BATCH_SIZE={entry['assumes']['micro_batch_size'] * entry['dp']}",
    ]
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
    return (
        f"{i:>3} {e['tokens_per_s_per_device']:>10.0f} {1e3 * p['total']:>8.2f} {1e3 * p['compute']:>8.2f} "
        f"{1e3 * p['dense']:>7.2f} {p['intra_bytes'] / 2**20:>8.1f} {p['inter_bytes'] / 2**20:>8.1f} "
        f"{1e3 * (p['a2a'] + p['ring_exposed'] + p['tp_comm']):>8.2f} {m['total'] / 1e9:>6.1f}  {flags(e)}"
    )


def text(result: dict, model: Model, dev: Device, S: int, world: int, top: int, show_rejected: bool) -> str:
    lines = [
        f"{model.name or 'model'}: {model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads / {model.kv_heads} KV heads, {model.params() / 1e9:.1f}B params; "
        f"{S} tokens; {world} x {dev.name} ({dev.gpus_per_node} per node)",
        f"{len(result['ranked'])} feasible configurations, {len(result['rejected'])} rejected. Per layer, "
        "forward + backward, one rank (ms); bytes sent per rank (MiB) by link class; exposed = "
        "communication not hidden behind compute. Fastest first; within 1 % of the fastest remaining, "
        "simplest first.",
        "",
        "  # tok/s/dev  layer ms  attn ms dense ms intra MiB inter MiB exposed ms  GB   flags",
    ]
    shown = _distinct(result["ranked"])
    lines += [_row(i + 1, e) for i, e in enumerate(shown[:top])]
    if len(shown) < len(result["ranked"]):
        lines.append(
            f"  ({len(result['ranked']) - len(shown)} more predicted exactly as a simpler one above - the "
            "same but for --use-cp-send-recv-overlap - not shown; --format json lists all)"
        )
    if show_rejected:
        lines += ["", "rejected:"] + [
            f"  TP {r['tp']} CP {r['cp']} {r['config'].describe()}: {r['why']}" for r in result["rejected"]
        ]
    return "\n".join(lines) + "\n"


def as_json(result: dict) -> str:
    """Every ranked row (in the documented order) and every rejected one, each with its complete flags."""

    def clean(e):
        out = {k: v for k, v in e.items() if k != "config"}
        out["config"] = dataclasses.asdict(e["config"])
        out["flags"] = flags(e)
        return out

    return (
        json.dumps(
            {"ranked": [clean(e) for e in result["ranked"]], "rejected": [clean(e) for e in result["rejected"]]},
            indent=1,
        )
        + "\n"
    )


# ----------------------------------------------------------------------------- command
MAX_WORLD = 2**22


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="rank TP / CP / algorithm / degrees / window / overlap / KV-cache policy for a model",
        description="Enumerate the feasible CP configurations for a model on a cluster and rank them by the "
        "cost model's predicted throughput (docs/planner.md).",
    )
    p.add_argument("--model", default=None, metavar="NAME|FILE.conf", help="configs/models/NAME.conf or a file")
    for flag in (
        "--num-layers",
        "--hidden-size",
        "--num-attention-heads",
        "--num-query-groups",
        "--ffn-hidden-size",
        "--vocab-size",
    ):
        p.add_argument(flag, type=integer(1), default=None, help="overrides --model's")
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--seq-length", type=integer(1), required=True, metavar="S")
    p.add_argument("--world-size", type=integer(1, MAX_WORLD), required=True, metavar="W")
    p.add_argument("--gpus-per-node", type=integer(1), default=None, metavar="G", help="default: the device preset's")
    p.add_argument(
        "--device",
        default="h100",
        metavar="NAME|FILE",
        help=f"a preset ({', '.join(presets())}: mindspeed_cp/devices), cpu-here (this machine, "
        f"measured in ~15 s) or a JSON file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a device constant, e.g. --set inter_node_gbps=25 (repeatable)",
    )
    p.add_argument(
        "--tp",
        "--tensor-model-parallel-size",
        dest="tp",
        type=integer(1),
        default=None,
        help="fix TP (default: every divisor of a node that divides the heads)",
    )
    p.add_argument(
        "--cp",
        "--context-parallel-size",
        dest="cp",
        type=integer(1),
        default=None,
        help="fix CP (default: every divisor of what TP x PP leave)",
    )
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=integer(1), default=1)
    p.add_argument("--micro-batch-size", type=integer(1), default=1)
    p.add_argument(
        "--recompute",
        choices=("none", "full"),
        default="none",
        help="activation memory: none, or Megatron's --recompute-granularity full",
    )
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--no-kv-cache", action="store_true", help="do not consider KV-cache policies")
    p.add_argument("--rank-by", choices=("layer", "attention"), default="layer")
    p.add_argument("--top", type=integer(1), default=10, help="rows of the text table (JSON lists every row)")
    p.add_argument("--show-rejected", action="store_true")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument(
        "--write-preset",
        type=output_file,
        default=None,
        metavar="FILE",
        help="write the best as a preset for scripts/pretrain_gpt_cp.sh",
    )
    return p


def run(args: argparse.Namespace) -> str:
    try:
        model = model_from(args)
        dev = device(args.device, _overrides(args.set))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.gpus_per_node is not None:
        dev.gpus_per_node = args.gpus_per_node
    _check_layout(args, model, dev.gpus_per_node)
    result = plan(
        model,
        dev,
        args.seq_length,
        args.world_size,
        tp=args.tp,
        pp=args.pp,
        b=args.micro_batch_size,
        recompute=args.recompute,
        distributed_optimizer=not args.no_distributed_optimizer,
        rank_by=args.rank_by,
        kv_policies=(None,) if args.no_kv_cache else (None, "half", "full"),
        cp=args.cp,
    )
    if not result["ranked"]:
        raise UsageError("no feasible configuration: " + why_none(result["rejected"]))
    if args.write_preset:
        text_ = preset(
            result["ranked"][0], args.world_size, dev.gpus_per_node, model, args.seq_length, args.write_preset
        )
        write_text(args.write_preset, text_, "--write-preset")
    if args.format == "json":
        return as_json(result)
    return text(result, model, dev, args.seq_length, args.world_size, args.top, args.show_rejected)


def _overrides(pairs: List[str]) -> Dict[str, str]:
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise ValueError(f"--set {bad[0]}: expected KEY=VALUE (a device constant, e.g. --set inter_node_gbps=25)")
    return dict(kv.split("=", 1) for kv in pairs)


def _check_layout(args: argparse.Namespace, model: Model, gpus_per_node: int) -> None:
    """Whole nodes, and a world that the fixed sizes divide for at least one TP considered."""
    world, pp, cp = args.world_size, args.pp, args.cp
    if world > gpus_per_node and world % gpus_per_node:
        raise UsageError(
            f"--world-size {world} is not a multiple of --gpus-per-node {gpus_per_node} (whole nodes; "
            f"or at most one node)"
        )
    tps = tp_sizes(model, gpus_per_node, args.tp)
    if not any(world % (t * pp * (cp or 1)) == 0 for t in tps):
        fixed = f" x --cp {cp}" if cp else ""
        considered = f"--tp {args.tp}" if args.tp else f"the divisors of a node dividing the heads: {tps}"
        raise UsageError(
            f"no feasible configuration: --world-size {world} is not divisible by TP x --pp {pp}"
            f"{fixed} for any TP considered ({considered})"
        )


def why_none(rejected: List[dict]) -> str:
    """The main reasons nothing is feasible: what memory needed at the least, the most frequent rule refusals."""
    memory_bound = [r for r in rejected if "memory" in r]
    rules = Counter(r["why"] for r in rejected if "memory" not in r)
    parts = []
    if memory_bound:
        least = min(memory_bound, key=lambda r: r["memory"]["total"])
        parts.append(
            f"{len(memory_bound)} configuration(s) do not fit in memory (the smallest: TP {least['tp']} "
            f"CP {least['cp']} {least['why']}; try --recompute full, --micro-batch-size 1, more devices)"
        )
    parts += [f"{n} x {why}" for why, n in rules.most_common(3)]
    if len(rules) > 3:
        parts.append(f"{len(rules) - 3} other reasons (--show-rejected lists them)")
    return "; ".join(parts)
