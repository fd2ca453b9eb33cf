"""``make demo``: a small megatron-core GPT trained with each CP algorithm on gloo ranks, compared with CP=1.

    python -m mindspeed_cp.tools.demo [--ranks 4] [--steps 5] [--seq 512] [--hidden 128] ...

Every configuration starts from the same weights and trains on the same mock batch (synthetic token
sequences with learnable structure), so the loss curves must coincide with CP=1 up to float32 rounding.
Rank 0 prints progress while it runs and a table at the end: loss per step, the largest difference from
CP=1, tokens/s, activations saved for backward per rank and peak RSS per rank. Exits 1 if any algorithm
differs from CP=1 by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Dict, List

from ..cliargs import OneLineParser, UsageError, integer, real
from ..ranks import free_port, init_rank

RUNS = [  # (label, configure() flags); CP comes from --ranks
    ("CP=1 (reference)", None),
    ("ulysses", dict(context_parallel_algo="ulysses_cp_algo")),
    ("ring", dict(context_parallel_algo="megatron_cp_algo", use_cp_send_recv_overlap=True)),
    ("double ring", dict(context_parallel_algo="megatron_cp_algo", cp_window_size=2)),
    ("hybrid", dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)),
    ("kv all-gather", dict(context_parallel_algo="kvallgather_cp_algo")),
]


LABELS = [label for label, _ in RUNS]


def _label(text: str) -> str:
    """argparse ``type`` of ``--only``: a run label (the CP=1 reference always runs)."""
    if text not in LABELS[1:]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a run label (one of {', '.join(map(repr, LABELS[1:]))}; {LABELS[0]} always runs)"
        )
    return text


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mindspeed-cp demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=integer(2, 64), default=4, help="gloo ranks (= CP size of the CP runs), 2 to 64")
    p.add_argument("--steps", type=integer(1), default=5)
    p.add_argument("--seq", type=integer(1), default=512)
    p.add_argument("--batch", type=integer(1), default=2)
    p.add_argument("--layers", type=integer(1), default=2)
    p.add_argument("--hidden", type=integer(1), default=128)
    p.add_argument("--heads", type=integer(1), default=8)
    p.add_argument("--kv-heads", type=integer(1), default=4)
    p.add_argument("--vocab", type=integer(2), default=256)
    p.add_argument("--lr", type=real(0.0, open_low=True), default=3e-3)
    p.add_argument("--tolerance", type=real(0.0), default=1e-4, help="largest allowed |loss - loss at CP=1|")
    p.add_argument(
        "--only",
        nargs="+",
        type=_label,
        metavar="LABEL",
        help=f"labels of the CP runs to do (default: all): {', '.join(map(repr, LABELS[1:]))}",
    )
    return p


_NAMES = {
    "--context-parallel-size": "--ranks",
    "--num-attention-heads": "--heads",
    "--num-query-groups": "--kv-heads",
    "--seq-length": "--seq",
}  # Megatron's flag -> the demo's


def _demo_names(message: str) -> str:
    for flag, ours in _NAMES.items():
        message = message.replace(flag, ours)
    return message


def _check_model(args) -> None:
    """What Megatron's GPT needs of the model flags (--heads / --kv-heads / --hidden), as one line."""
    if args.hidden % args.heads:
        raise UsageError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise UsageError(f"--kv-heads {args.kv_heads} does not divide --heads {args.heads}")


def mock_batch(batch: int, seq: int, vocab: int, seed: int = 1234):
    """Mock data: noisy arithmetic token sequences (learnable), the same on every rank."""
    import torch

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    step = torch.randint(1, 7, (batch, 1), generator=g)
    stream = (start + step * torch.arange(seq + 1)) % vocab
    noise = torch.rand(batch, seq + 1, generator=g) < 0.1
    stream = torch.where(noise, torch.randint(0, vocab, (batch, seq + 1), generator=g), stream)
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": torch.ones(batch, seq),
        "position_ids": torch.arange(seq).expand(batch, seq).contiguous(),
    }


def _saved_bytes():
    """Context manager counting bytes saved for backward (unique storages) during a step."""
    import torch

    seen: Dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - sparse / meta tensors
            pass
        return t

    return seen, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _rss() -> int:
    """Current resident set size in bytes (Linux /proc; elsewhere the process peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _train(args, label: str, flags, state_dict, log) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank

    import mindspeed_cp.megatron_adaptor as adaptor

    cp = 1 if flags is None else args.ranks
    adaptor.configure(context_parallel_size=cp, **(flags or {}))
    ps.initialize_model_parallel(context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.kv_heads,
        ffn_hidden_size=4 * args.hidden,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        context_parallel_size=cp,
        params_dtype=torch.float32,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        position_embedding_type="rope",
    )
    if state_dict is not None:
        model.load_state_dict(state_dict)
    initial = {k: (v.clone() if v is not None else None) for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    full = mock_batch(args.batch, args.seq, args.vocab)
    data = get_batch_on_this_cp_rank(dict(full))
    tokens = args.batch * args.seq
    group = ps.get_data_parallel_group(with_context_parallel=True)
    dp = ps.get_data_parallel_world_size()
    losses, times, saved, peak_rss = [], [], 0, _rss()
    for step in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        seen, hooks = _saved_bytes()
        with hooks:
            per_token = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
            loss = (per_token * data["loss_mask"]).sum() / tokens  # this rank's share of the global mean
        peak_rss = max(peak_rss, _rss())  # activations are alive here
        loss.backward()
        saved = max(saved, sum(seen.values()))
        for p in model.parameters():  # CP ranks hold partial sums; DP replicas (CP=1 run) hold copies
            dist.all_reduce(p.grad, group=group)
            p.grad /= dp
        opt.step()
        report = loss.detach().clone()
        dist.all_reduce(report, group=ps.get_context_parallel_group())
        losses.append(float(report))
        times.append(time.perf_counter() - t0)
        log(f"  [{label}] step {step + 1}/{args.steps}  loss {losses[-1]:.6f}  ({times[-1]:.2f} s)")
    steady = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    result = dict(
        label=label,
        cp=cp,
        layout=_layout(flags, cp, dist.get_world_size()),
        losses=losses,
        tokens_per_s=tokens / steady,
        saved_bytes=saved,
        peak_rss=peak_rss,
    )
    ps.destroy_model_parallel()
    return result, initial


def _layout(flags, cp: int, world: int) -> str:
    if flags is None:
        return f"DP {world}, full sequence each"
    from ..config import CPConfig

    c = CPConfig(context_parallel_size=cp, **flags)
    if c.context_parallel_algo == "ulysses_cp_algo":
        return f"Ulysses {cp}"
    if c.context_parallel_algo == "kvallgather_cp_algo":
        return f"K/V all-gathered over {cp}"
    text = f"Ulysses {c.ulysses_size} x ring {c.ring_size}" if c.ulysses_size > 1 else f"ring {c.ring_size}"
    if c.cp_window_size > 1:
        text += f", window {c.cp_window_size}"
    if c.use_cp_send_recv_overlap:
        text += ", overlap"
    return text


def _rank_main(rank: int, world: int, port: int, args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    init_rank(rank, world, port, timeout_s=600)
    import torch.distributed as dist

    import mindspeed_cp.megatron_adaptor  # noqa: F401  - before Megatron's names are bound

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    runs = [r for r in RUNS if not args.only or r[0] in args.only or r[1] is None]
    results, weights = [], None
    for label, flags in runs:
        log(f"{label}: {_layout(flags, 1 if flags is None else world, world)}")
        result, initial = _train(args, label, flags, weights, log)
        weights = weights or initial
        results.append(result)
    gathered = [None] * world
    dist.all_gather_object(gathered, [(r["saved_bytes"], r["peak_rss"]) for r in results])
    if rank == 0:
        for i, r in enumerate(results):
            r["saved_bytes"] = max(g[i][0] for g in gathered)
            r["peak_rss"] = max(g[i][1] for g in gathered)
        ok = _report(args, world, results)
        with open(os.environ.get("MSCP_DEMO_STATUS", os.devnull), "w") as f:
            f.write("ok" if ok else "mismatch")
    dist.barrier()
    dist.destroy_process_group()


def _report(args, world: int, results: List[dict]) -> bool:
    ref = results[0]["losses"]
    mib = 1 / 2**20
    print()
    print(
        f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} KV), RoPE, "
        f"seq {args.seq}, batch {args.batch}, {world} gloo ranks on CPU, fp32, Adam lr {args.lr}"
    )
    steps = " ".join(f"{'step ' + str(i + 1):>10}" for i in range(args.steps))
    header = (
        f"{'algorithm':<17} {'layout':<28} {steps} {'max|Δ| vs CP=1':>15} {'tokens/s':>9} "
        f"{'saved act/rank':>15} {'peak RSS/rank':>14}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for r in results:
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref))
        ok &= diff <= args.tolerance
        losses = " ".join(f"{x:>10.6f}" for x in r["losses"])
        print(
            f"{r['label']:<17} {r['layout']:<28} {losses} {diff:>15.2e} {r['tokens_per_s']:>9.0f} "
            f"{r['saved_bytes'] * mib:>11.1f} MiB {r['peak_rss'] * mib:>10.0f} MiB"
        )
    print()
    print("saved act/rank: tensors autograd keeps for backward on one rank (its tokens only: ~1/CP of CP=1).")
    print("peak RSS/rank: resident memory after the forward pass, incl. the interpreter, torch and megatron-core;")
    print("  the runs share one process per rank, so later rows include memory the allocator kept from earlier ones.")
    print("tokens/s: global tokens per second of the whole job; the CP=1 run computes the full sequence on every rank.")
    print("Every CP run matches CP=1" if ok else f"MISMATCH: some run differs from CP=1 by more than {args.tolerance}")
    return ok


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from ..config import CPConfig, CPConfigError

    try:
        _check_model(args)
        for label, flags in RUNS[1:]:
            if not args.only or label in args.only:
                CPConfig(context_parallel_size=args.ranks, **flags).validate(
                    num_attention_heads=args.heads,
                    num_query_groups=args.kv_heads,
                    seq_length=args.seq,
                    world_size=args.ranks,
                )
    except CPConfigError as e:
        print(f"mindspeed-cp demo: {label}: {_demo_names(str(e))}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"mindspeed-cp demo: {e}", file=sys.stderr)
        return 2
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile("r", suffix=".status") as status:
        os.environ["MSCP_DEMO_STATUS"] = status.name
        print(
            f"mindspeed-cp demo: {args.ranks} gloo ranks, {args.steps} steps per run "
            f"({len(RUNS) if not args.only else len(set(args.only)) + 1} runs)",
            flush=True,
        )
        mp.start_processes(_rank_main, args=(args.ranks, free_port(), args), nprocs=args.ranks, start_method="spawn")
        return 0 if status.read() == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
