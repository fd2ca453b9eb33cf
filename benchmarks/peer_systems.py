"""The systems ``make bench-peers`` runs, each on this rank's shard: ours and the peers, behind one signature.

    fn = system("yunchang-ring-fixed", Groups(S))   # fn(q, k, v, dout) -> (out, [dq, dk, dv]), all [s, b, h, d]

Every system gets this rank's tokens in its algorithm's layout (:func:`layout`) as ``[s, b, h, d]`` tensors and
returns its output and gradients in the same layout, so one reference and one comparison serve all. Adapters
convert layouts at the boundary (``[b, s, h, d]`` for yunchang, ``[b, h, s, d]`` for PyTorch's ring); those
copies are outside the timed region's algorithm but inside the timing, the same for every peer of an algorithm
(one permute + contiguous per tensor, see :func:`_bshd`).

What each adapter changes in the peer, exactly:

* ``deepspeed-ulysses``: nothing. DeepSpeed's ``DistributedAttention`` (``scatter_idx=2, gather_idx=0``,
  ``batch_dim_idx=1``) around torch's SDPA (causal; ``enable_gqa`` when heads differ) - its CPU flash kernel.
  ``deepspeed.init_distributed()`` runs without building DeepSpeed's CPU shared-memory all-reduce op (never
  used by ``DistributedAttention``; see ``peers._setup``).
* ``yunchang-ulysses``: yunchang's ``UlyssesAttention`` is built with ``AttnType.TORCH_FLASH`` (the only type
  whose constructor does not assert flash-attn), then its ``attn_fn`` - with that type a *ring* over the default
  group - is replaced by the same SDPA local attention, called with flash-attn's ``[b, s, h, d]`` signature.
* ``yunchang-ring`` / ``usp`` (``LongContextAttention``, ``ring_impl_type="zigzag"``, groups from
  ``set_seq_parallel_pg``): ``AttnType.FA`` with the two functions yunchang's kernel selector returns for it
  (``yunchang.kernels.flash_attn_forward`` / ``flash_attn_backward``, flash-attn's CUDA calls) replaced by
  :func:`_fa_forward` / :func:`_fa_backward`: torch's CPU flash op with flash-attn's layout, LSE and
  write-into-buffers contract. Its torch backend is no alternative: its backward raises "Not implemented".
* ``yunchang-ring-fixed`` / ``usp-fixed``: the same, with the bug we found in yunchang 0.6.4's zigzag backward
  fixed: ``dq = dq_buffer.to(torch.float32)`` (likewise dk, dv) is the buffer itself for fp32 inputs, so later
  blocks overwrite the accumulated gradient (and the dK/dV being sent). :func:`_fixed_zigzag` compiles yunchang's
  own module source with those three calls made ``.to(torch.float32, copy=True)`` - nothing else.
* ``torch-ring``: PyTorch's private ring (:func:`benchmarks.ring_overhead.torch_ring`); nothing changed. (Its K/V
  exchange follows torch's ``_cp_options.rotate_method``, whose default in torch 2.13 is the all-gather.)
* ``torch-allgather``: the same private function with ``rotate_method`` set to all-gather explicitly (restored after
  the call): one all-gather of K/V, then the zigzag ring's steps on its chunks; backward gathers K/V again and passes
  dK/dV around by all-to-all. Nothing else changed.
* ``rfa-llama3``: ring-flash-attn's ``llama3_flash_attn_varlen_func`` (Llama 3's all-gather K/V, split by KV heads
  ``heads_k_stride``; contiguous layout, so causal work grows with the rank) with the two flash-attn calls it makes
  (``_flash_attn_varlen_forward`` / ``_backward`` from ``flash_attn.flash_attn_interface``) given by a stand-in module
  running torch's CPU flash op: per sequence, flash-attn's bottom-right causal as a full part and a causal square
  merged by LSE (:func:`_fa_varlen_forward`); the module is imported without the package's ``__init__`` (its
  Hugging Face adapter needs transformers). ring-flash-attn 0.1.8 gathers K and V (two all-gathers per stride)
  of the next stride while computing this one; backward gathers again and reduce-scatters dK, dV synchronously.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import types
from typing import Callable, Dict

import torch
import torch.distributed as dist

aten = torch.ops.aten

ALGO = {
    "ours-ulysses": "ulysses",
    "deepspeed-ulysses": "ulysses",
    "yunchang-ulysses": "ulysses",
    "ours-ring": "ring",
    "torch-ring": "ring",
    "yunchang-ring": "ring",
    "yunchang-ring-fixed": "ring",
    "ours-hybrid": "hybrid",
    "usp": "hybrid",
    "usp-fixed": "hybrid",
    "ours-kvallgather": "kvallgather",
    "torch-allgather": "kvallgather",
    "rfa-llama3": "kvallgather",
}
LAYOUT = {"rfa-llama3": "ulysses"}  # a system whose token layout is not its algorithm's: contiguous shards
HEADS_K_STRIDE = 2  # rfa-llama3's KV heads per gather (ours splits its gather into 2 KV-head groups likewise)
FIXED = {"yunchang-ring-fixed": "yunchang-ring", "usp-fixed": "usp"}  # a peer's fixed copy -> the peer as shipped
ULYSSES_DEGREE = 2  # Hybrid problems: U = 2 Ulysses x R = P/2 ring


def layout(algo: str, S: int, P: int, r: int) -> torch.Tensor:
    """Global positions of rank ``r``'s tokens: contiguous (Ulysses), zigzag (Ring), zigzag over the R ring
    ranks then contiguous over the U Ulysses ranks (Hybrid: ring position r // U, Ulysses position r % U, as
    :func:`mindspeed_cp.layout.sharding.token_indices` and yunchang's ``zigzag_extract_local`` both do)."""
    from mindspeed_cp.ring import zigzag_index

    if algo == "ulysses":
        return torch.tensor_split(torch.arange(S), P)[r]
    if algo in ("ring", "kvallgather"):
        if S % (2 * P):
            raise ValueError(f"S={S} is not a multiple of 2 x {P} (zigzag)")
        return zigzag_index(S, P, r)
    U = ULYSSES_DEGREE
    return torch.tensor_split(zigzag_index(S, P // U, r // U), U)[r % U]


class Groups:
    """One launch's problem context: the global length ``seq_len``, the world group, and for Hybrid the
    Ulysses groups (consecutive ranks) and ring groups (stride U) - created once, in the same order on every
    rank, shared by ours and yunchang."""

    def __init__(self, seq_len: int) -> None:
        P, r, U = dist.get_world_size(), dist.get_rank(), ULYSSES_DEGREE
        self.seq_len = seq_len
        self.world = dist.group.WORLD
        self.ulysses = self.ring = None
        if P >= 2 * U and P % U == 0:
            for i in range(P // U):
                g = dist.new_group(list(range(i * U, (i + 1) * U)))
                if r // U == i:
                    self.ulysses = g
            for j in range(U):
                g = dist.new_group(list(range(j, P, U)))
                if r % U == j:
                    self.ring = g


# ----------------------------------------------------------------------------- shared pieces
def _leaves(*ts):
    return [t.detach().requires_grad_() for t in ts]


def _sdpa_sbhd(q, k, v):
    """Causal SDPA on ``[s, b, h, d]`` (torch's CPU flash kernel), GQA by ``enable_gqa``."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3),
        k.permute(1, 2, 0, 3),
        v.permute(1, 2, 0, 3),
        is_causal=True,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.permute(2, 0, 1, 3)


def _bshd(*ts):
    """``[s, b, h, d]`` -> yunchang's ``[b, s, h, d]`` (contiguous copies, as a caller in that layout has)."""
    return [t.transpose(0, 1).contiguous() for t in ts]


def _fa_forward(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=None,
    alibi_slopes=None,
    return_softmax=False,
):
    """flash-attn's ``_flash_attn_forward`` contract on torch's CPU flash op: ``[b, s, h, d]`` in and out,
    LSE ``[b, h, s]`` float32."""
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal, scale=softmax_scale
    )[:2]
    return out.transpose(1, 2), lse


def _fa_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state,
):
    """flash-attn's ``_flash_attn_backward`` contract: gradients written into the given ``[b, s, h, d]`` buffers."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(dout), t(q), t(k), t(v), t(out), softmax_lse, dropout_p, causal, scale=softmax_scale
    )
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(t(g))


@functools.lru_cache(maxsize=None)
def _yunchang():
    """yunchang with its flash-attn kernel calls pointed at the CPU flash op (:func:`_fa_forward` / backward)."""
    import yunchang
    import yunchang.kernels as kernels

    kernels.flash_attn_forward, kernels.flash_attn_backward = _fa_forward, _fa_backward
    return yunchang


@functools.lru_cache(maxsize=None)
def _fixed_zigzag() -> types.ModuleType:
    """yunchang's ``ring/zigzag_ring_flash_attn.py`` compiled from its own source with the fp32 aliasing fixed."""
    import yunchang.ring.zigzag_ring_flash_attn as mod

    src = inspect.getsource(mod)
    calls = [f"{n}_buffer.to(torch.float32)" for n in ("dq", "dk", "dv")]
    for c in calls:
        if src.count(c) != 1:
            raise RuntimeError(f"yunchang's zigzag backward changed: {c!r} occurs {src.count(c)} times")
        src = src.replace(c, c[:-1] + ", copy=True)")
    fixed = types.ModuleType(mod.__name__ + "_fixed")
    fixed.__package__ = mod.__package__
    exec(compile(src, mod.__file__ + " (fixed)", "exec"), fixed.__dict__)  # noqa: S102 - the peer's own source
    return fixed


def _bottom_right(fn, q, k, v, scale, *rest):
    """Flash-attn's causal for ``sq <= sk`` (bottom-right: query i sees keys ``0 .. sk - sq + i``) on ``[1, h, s, d]``
    as torch's top-left causal CPU op can do it: the first ``sk - sq`` keys fully, the last ``sq`` causally."""
    split = k.shape[2] - q.shape[2]
    parts = [(slice(0, split), False)] if split else []
    return [
        fn(q, k[:, :, ks], v[:, :, ks], causal, ks, scale, *rest) for ks, causal in parts + [(slice(split, None), True)]
    ]


def _varlen(cu):
    cu = [int(x) for x in cu.tolist()]  # the peer's host-side sequence boundaries
    return list(zip(cu[:-1], cu[1:]))


def _fa_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
):
    """flash-attn 2.x's ``_flash_attn_varlen_forward`` contract on torch's CPU flash op: ``[t, h, d]`` in and out,
    LSE ``[h, t]`` float32, 8 return values (out, q, k, v, out_padded, lse, S_dmask, rng_state)."""
    bnsd = lambda x: x.transpose(0, 1)[None]  # noqa: E731 - [t, h, d] -> [1, h, t, d]
    outs, lses = [], []
    for (qa, qe), (ka, ke) in zip(_varlen(cu_seqlens_q), _varlen(cu_seqlens_k)):

        def part(q_, k_, v_, is_causal, ks, scale):
            return aten._scaled_dot_product_flash_attention_for_cpu(q_, k_, v_, 0.0, is_causal, scale=scale)[:2]

        qs, ks, vs = bnsd(q[qa:qe]), bnsd(k[ka:ke]), bnsd(v[ka:ke])
        pieces = (
            _bottom_right(part, qs, ks, vs, softmax_scale) if causal else [part(qs, ks, vs, False, None, softmax_scale)]
        )
        lse = torch.logsumexp(torch.stack([p[1] for p in pieces]), 0)  # [1, h, sq]
        out = sum(p[0].float() * (p[1] - lse).exp()[..., None] for p in pieces)
        outs.append(out[0].transpose(0, 1).to(q.dtype))
        lses.append(lse[0])
    out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return out, q, k, v, out, lse, None, None


def _fa_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    rng_state=None,
):
    """flash-attn's ``_flash_attn_varlen_backward`` contract: gradients written into the given ``[t, h, d]`` buffers."""
    bnsd = lambda x: x.transpose(0, 1)[None]  # noqa: E731
    back = lambda x: x[0].transpose(0, 1)  # noqa: E731
    dq.zero_(), dk.zero_(), dv.zero_()
    for (qa, qe), (ka, ke) in zip(_varlen(cu_seqlens_q), _varlen(cu_seqlens_k)):
        lse = softmax_lse[None, :, qa:qe].contiguous()
        do, qs, os_ = bnsd(dout[qa:qe]), bnsd(q[qa:qe]), bnsd(out[qa:qe])

        def part(q_, k_, v_, is_causal, ks, scale):
            g = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q_, k_, v_, os_, lse, 0.0, is_causal, scale=scale
            )
            dq[qa:qe] += back(g[0])
            dk[ka:ke][ks] += back(g[1])
            dv[ka:ke][ks] += back(g[2])

        ks_, vs_ = bnsd(k[ka:ke]), bnsd(v[ka:ke])
        if causal:
            _bottom_right(part, qs, ks_, vs_, softmax_scale)
        else:
            part(qs, ks_, vs_, False, slice(None), softmax_scale)


@functools.lru_cache(maxsize=None)
def _ring_flash_attn():
    """ring-flash-attn's llama3 module with flash-attn's interface given by :func:`_fa_varlen_forward` / backward."""
    if "flash_attn" not in sys.modules:

        def absent(*args, **kwargs):
            raise NotImplementedError("flash-attn is not installed: only the llama3 varlen calls are stood in for")

        iface = types.ModuleType("flash_attn.flash_attn_interface")
        iface.__getattr__ = lambda name: absent  # any other name the package imports: never run here
        iface._flash_attn_varlen_forward, iface._flash_attn_varlen_backward = _fa_varlen_forward, _fa_varlen_backward
        pkg = types.ModuleType("flash_attn")
        pkg.__path__ = []
        pkg.flash_attn_interface = iface
        pkg.__getattr__ = lambda name: absent
        sys.modules.update({"flash_attn": pkg, "flash_attn.flash_attn_interface": iface})
    if "ring_flash_attn" not in sys.modules:  # the package without its __init__ (its HF adapter needs transformers)
        found = importlib.util.find_spec("ring_flash_attn")
        rfa = types.ModuleType("ring_flash_attn")
        rfa.__path__ = list(found.submodule_search_locations)
        sys.modules["ring_flash_attn"] = rfa
    import ring_flash_attn.llama3_flash_attn_varlen as llama3

    return llama3


# ----------------------------------------------------------------------------- the systems
def _ours_ulysses(groups, q, k, v, dout):
    from mindspeed_cp.local import local_attention
    from mindspeed_cp.ulysses import UlyssesContextAttention

    leaves = _leaves(q, k, v)
    o = UlyssesContextAttention(
        lambda a, b, c: local_attention(a, b, c, causal=True),
        groups.world,
        gather_size_calculator=_Size(groups.seq_len),
    )(*leaves)
    o.backward(dout)
    return o.detach(), [t.grad for t in leaves]


class _Size:
    """Our Ulysses' gather-size calculator: the global length (unaligned problems)."""

    def __init__(self, S: int) -> None:
        self.S = S

    def calculate(self, *args, **kwargs):
        return self.S


def _deepspeed_ulysses(groups, q, k, v, dout):
    from deepspeed.sequence.layer import DistributedAttention

    leaves = _leaves(q, k, v)
    o = DistributedAttention(
        lambda a, b, c, *args, **kw: _sdpa_sbhd(a, b, c), groups.world, scatter_idx=2, gather_idx=0
    )(*leaves, batch_dim_idx=1)
    o.backward(dout)
    return o.detach(), [t.grad for t in leaves]


def _yunchang_ulysses(groups, q, k, v, dout):
    yc = _yunchang()
    attn = yc.UlyssesAttention(groups.world, attn_type=yc.kernels.AttnType.TORCH_FLASH)
    attn.attn_fn = lambda a, b, c, **kw: _sdpa_sbhd(*(x.transpose(0, 1) for x in (a, b, c))).transpose(0, 1)
    leaves = _leaves(*_bshd(q, k, v))
    o = attn(*leaves, causal=True)
    o.backward(dout.transpose(0, 1))
    return o.detach().transpose(0, 1), [t.grad.transpose(0, 1) for t in leaves]


def _yunchang_ring(fixed: bool):
    def run(groups, q, k, v, dout):
        yc = _yunchang()
        fn = (_fixed_zigzag() if fixed else yc.ring.zigzag_ring_flash_attn).zigzag_ring_flash_attn_func
        leaves = _leaves(*_bshd(q, k, v))
        o = fn(*leaves, causal=True, group=groups.world, attn_type=yc.kernels.AttnType.FA)
        o.backward(dout.transpose(0, 1))
        return o.detach().transpose(0, 1), [t.grad.transpose(0, 1) for t in leaves]

    return run


def _ours_hybrid(groups, q, k, v, dout):
    from mindspeed_cp.hybrid import hybrid_attention

    leaves = _leaves(q, k, v)
    o = hybrid_attention(*leaves, groups.ulysses, groups.ring, causal=True)
    o.backward(dout)
    return o.detach(), [t.grad for t in leaves]


def _usp(fixed: bool):
    def run(groups, q, k, v, dout):
        yc = _yunchang()
        from yunchang.globals import PROCESS_GROUP

        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = groups.ulysses, groups.ring  # = set_seq_parallel_pg's
        attn = yc.LongContextAttention(ring_impl_type="zigzag", attn_type=yc.kernels.AttnType.FA)
        if fixed:
            attn.ring_attn_fn = _fixed_zigzag().zigzag_ring_flash_attn_func
        leaves = _leaves(*_bshd(q, k, v))
        o = attn(*leaves, causal=True)
        o.backward(dout.transpose(0, 1))
        return o.detach().transpose(0, 1), [t.grad.transpose(0, 1) for t in leaves]

    return run


def _torch_ring(groups, q, k, v, dout):
    from .ring_overhead import torch_ring

    return torch_ring(groups.world, q, k, v, dout)


def _ours_ring(groups, q, k, v, dout):
    from .ring_overhead import ours_ring

    return ours_ring(groups.world, q, k, v, dout)


def _ours_kvallgather(groups, q, k, v, dout):
    from mindspeed_cp.kvallgather import kvallgather_attention

    leaves = _leaves(q, k, v)
    o = kvallgather_attention(*leaves, groups.world, causal=True)
    o.backward(dout)
    return o.detach(), [t.grad for t in leaves]


def _torch_allgather(groups, q, k, v, dout):
    from torch.distributed.tensor.experimental._context_parallel import _attention as tcp

    from .ring_overhead import torch_ring

    before = tcp._cp_options.rotate_method
    tcp._cp_options.rotate_method = tcp._RotateMethod.ALL_GATHER
    try:
        return torch_ring(groups.world, q, k, v, dout)
    finally:
        tcp._cp_options.rotate_method = before


def _rfa_llama3(groups, q, k, v, dout):
    """ring-flash-attn's Llama 3 all-gather on contiguous shards: ``[s, 1, h, d]`` -> its ``[t, h, d]`` (batch 1)."""
    llama3 = _ring_flash_attn()
    P, r = dist.get_world_size(groups.world), dist.get_rank(groups.world)
    cu = torch.tensor([0, groups.seq_len], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, local_k = llama3.llama3_flash_attn_prepare_cu_seqlens(cu, True, r, P)
    stride = HEADS_K_STRIDE if k.shape[2] % HEADS_K_STRIDE == 0 else k.shape[2]
    leaves = _leaves(*(t[:, 0] for t in (q, k, v)))
    o = llama3.llama3_flash_attn_varlen_func(
        *leaves, cu_q, cu_k, max_q, max_k, stride, local_k, causal=True, group=groups.world
    )
    o.backward(dout[:, 0])
    return o.detach()[:, None], [t.grad[:, None] for t in leaves]


SYSTEMS: Dict[str, Callable] = {
    "ours-ulysses": _ours_ulysses,
    "deepspeed-ulysses": _deepspeed_ulysses,
    "yunchang-ulysses": _yunchang_ulysses,
    "ours-ring": _ours_ring,
    "torch-ring": _torch_ring,
    "yunchang-ring": _yunchang_ring(False),
    "yunchang-ring-fixed": _yunchang_ring(True),
    "ours-hybrid": _ours_hybrid,
    "usp": _usp(False),
    "usp-fixed": _usp(True),
    "ours-kvallgather": _ours_kvallgather,
    "torch-allgather": _torch_allgather,
    "rfa-llama3": _rfa_llama3,
}
assert set(SYSTEMS) == set(ALGO)


def system(name: str, groups: Groups) -> Callable:
    """``fn(q, k, v, dout) -> (out, [dq, dk, dv])`` for system ``name`` on this rank."""
    return functools.partial(SYSTEMS[name], groups)
