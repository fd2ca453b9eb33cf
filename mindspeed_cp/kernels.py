"""Local attention blocks that also return the log-sum-exp, and the float32 merge of partial results.

Every backend has the same small interface, in the ``[b, n, s, d]`` layout ("bnsd")::

    out, lse = kernel.forward(q, k, v, scale=s, causal=c, mask=m)
    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, scale=s, causal=c, mask=m)

* ``q`` ``[b, n, sq, d]``, ``k``/``v`` ``[b, nk, sk, d]`` with ``n % nk == 0`` (GQA by shape: query head
  ``h`` uses KV head ``h // (n // nk)``, Megatron's grouping).
* ``causal``: top-left aligned (query ``i`` sees keys ``0..i``), meant for the square diagonal block.
* ``mask``: bool, broadcastable to ``[b, n, sq, sk]`` (each of the first two dims 1 or full), True = masked
  (Megatron's convention).
* ``lse`` ``[b, n, sq]`` is float32 (float64 for float64 inputs). A fully masked row gives ``out`` 0 and
  ``lse`` -inf, never NaN, and zero gradients.
* ``out`` and the gradients come back in the input dtype or wider (the math kernel returns float32).
* ``backward`` accepts the *global* ``out``/``lse`` of a row (merged over all key blocks): the ring passes
  those so each block's gradient is its exact share of the full attention gradient.

Backends (``get_kernel(name)``; ``None``/"auto" picks by device):

* ``"math"``  :class:`MathKernel`, plain torch, math in float32 (float64 for float64 inputs). Reference.
* ``"torch"`` :class:`TorchFusedKernel`, torch's fused ops that expose the LSE: on CPU
  ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward; masks, GQA, fp64/fp32/bf16/fp16
  verified here), on CUDA ``aten._scaled_dot_product_efficient_attention`` (+ backward; UNTESTED here, no
  GPU). Falls back to "math" per call where unsupported.
* ``"flash"`` :class:`FlashAttnKernel`, ``flash_attn`` when installed (UNTESTED here), fp16/bf16 CUDA, no
  mask; falls back to "torch" per call.
* ``"npu"``   :class:`NpuKernel`, ``torch_npu.npu_fusion_attention`` / ``npu_fusion_attention_grad`` on
  Ascend (UNTESTED here).

:func:`merge` combines two partial results in float32 log-sum-exp arithmetic whatever the input dtype
(bf16 merges overflow in peers: ring-flash-attention #42); -inf (empty) parts are handled without NaN.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "MathKernel", "TorchFusedKernel", "FlashAttnKernel", "NpuKernel", "get_kernel", "available_kernels",
    "merge", "acc_dtype", "dead_rows", "KERNELS",
]


# ----------------------------------------------------------------------------------------------- helpers
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for outputs/LSE of inputs in ``dtype``: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_mask(sq: int, sk: int, device) -> Tensor:
    # [sq, sk], True above the diagonal (top-left aligned): query i sees keys 0..i
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu_(1)


def dead_rows(mask: Optional[Tensor], causal: bool, sq: int, sk: int) -> Optional[Tensor]:
    """Rows with every key masked, ``[B|1, N|1, sq]`` bool, or None when no row can be (no mask).

    Top-left causal alone never empties a row (key 0 is always visible), so only a mask can.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[None, None]
    if causal:
        mask = mask | _causal_mask(sq, sk, mask.device)
    return mask.all(-1)


def _safe_lse(lse: Tensor) -> Tensor:
    # An empty row (lse = -inf) has every score -inf: with lse -> +inf every exp(s - lse) is 0, never NaN.
    return torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention kernels take [b, n, s, d] tensors, got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention kernel shapes do not fit: q {list(q.shape)} [b, n, sq, d], "
                         f"k {list(k.shape)} and v {list(v.shape)} [b, nk, sk, d]")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # [b, nk, s, d] -> [b, nk*groups, s, d] (query head h uses KV head h // groups)
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fold_kv_grad(dx: Tensor, nk: int) -> Tensor:
    # [b, nk*groups, s, d] -> [b, nk, s, d]: the replicated heads' gradients sum back
    b, n, s, d = dx.shape
    return dx if n == nk else dx.reshape(b, nk, n // nk, s, d).sum(2)


def _fix_dead(out: Tensor, lse: Tensor, dead: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Force out 0 / lse -inf on fully masked rows (fused kernels report lse 0 or garbage there)."""
    if dead is None:
        return out, lse
    return out.masked_fill(dead[..., None], 0), lse.masked_fill(dead, -math.inf)


# ----------------------------------------------------------------------------------------------- math
class MathKernel:
    """Plain-torch attention with LSE; the reference every other backend is tested against."""

    name = "math"

    @staticmethod
    def _scores(q: Tensor, k: Tensor, scale: float, causal: bool, mask: Optional[Tensor], dt) -> Tensor:
        b, n, sq, d = q.shape
        nk, sk = k.shape[1], k.shape[2]
        q5 = q.to(dt).reshape(b, nk, n // nk, sq, d)  # [b, nk, g, sq, d]
        s = torch.matmul(q5, k.to(dt)[:, :, None].transpose(-1, -2)) * scale  # [b, nk, g, sq, sk]
        if causal:
            s.masked_fill_(_causal_mask(sq, sk, s.device), -math.inf)
        if mask is not None:
            m = mask[None, None] if mask.dim() == 2 else mask
            # [B|1, N|1, sq, sk] -> [B|1, nk|1, g|1, sq, sk]
            m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], nk, n // nk, sq, sk)
            s.masked_fill_(m, -math.inf)
        return s

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        dt = acc_dtype(q.dtype)
        b, n, sq, d = q.shape
        s = self._scores(q, k, scale, causal, mask, dt)
        lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
        p = torch.exp(s - _safe_lse(lse)[..., None])
        out = torch.matmul(p, v.to(dt)[:, :, None])  # [b, nk, g, sq, d]
        return out.reshape(b, n, sq, d), lse.reshape(b, n, sq)

    def backward(self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        dt = acc_dtype(q.dtype)
        b, n, sq, d = q.shape
        nk = k.shape[1]
        g = n // nk
        s = self._scores(q, k, scale, causal, mask, dt)
        p = torch.exp(s - _safe_lse(lse.to(dt)).reshape(b, nk, g, sq, 1))  # [b, nk, g, sq, sk]
        do5 = dout.to(dt).reshape(b, nk, g, sq, d)
        dv = torch.matmul(p.transpose(-1, -2), do5).sum(2)  # [b, nk, sk, d]
        dp = torch.matmul(do5, v.to(dt)[:, :, None].transpose(-1, -2))
        delta = (do5 * out.to(dt).reshape(b, nk, g, sq, d)).sum(-1, keepdim=True)  # rowsum(dO * O)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, k.to(dt)[:, :, None]).reshape(b, n, sq, d)
        dk = torch.matmul(ds.transpose(-1, -2), q.to(dt).reshape(b, nk, g, sq, d)).sum(2)
        return dq, dk, dv


# ----------------------------------------------------------------------------------------------- torch fused
class TorchFusedKernel:
    """torch's own fused attention ops that return the LSE; falls back to :class:`MathKernel` per call."""

    name = "torch"

    def __init__(self) -> None:
        self.fallback = MathKernel()
        aten = torch.ops.aten
        self._cpu = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        self._cpu_bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
        self._eff = getattr(aten, "_scaled_dot_product_efficient_attention", None)
        self._eff_bwd = getattr(aten, "_scaled_dot_product_efficient_attention_backward", None)

    def _route(self, q: Tensor, causal: bool, sq: int, sk: int) -> str:
        if q.device.type == "cpu" and self._cpu is not None and self._cpu_bwd is not None:
            return "cpu"
        if (q.device.type == "cuda" and self._eff is not None and self._eff_bwd is not None
                and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and (not causal or sq == sk)):
            return "cuda"
        return "math"

    @staticmethod
    def _bias(mask: Optional[Tensor], dtype, sq: int, sk: int, align: int = 1) -> Optional[Tensor]:
        # bool (True = masked) -> additive [B|1, N|1, sq, sk] in the query dtype (what the fused ops take);
        # ``align`` pads the row stride (the CUDA memory-efficient kernel wants 16-element aligned rows)
        if mask is None:
            return None
        m = mask[None, None] if mask.dim() == 2 else mask
        width = -(-sk // align) * align
        bias = torch.zeros(*m.shape[:2], sq, width, dtype=dtype, device=m.device)[..., :sk]
        return bias.masked_fill_(m, -math.inf)

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        route = self._route(q, causal, q.shape[2], k.shape[2])
        if route == "math":
            return self.fallback.forward(q, k, v, scale=scale, causal=causal, mask=mask)
        dead = dead_rows(mask, causal, q.shape[2], k.shape[2])
        if route == "cpu":
            out, lse = self._cpu(q, k, v, 0.0, causal, attn_mask=self._bias(mask, q.dtype, q.shape[2], k.shape[2]),
                                 scale=scale)
        else:  # cuda, memory-efficient kernel (UNTESTED here): no native GQA, LSE padded to 32 rows
            g = q.shape[1] // k.shape[1]
            bias = self._bias(mask, q.dtype, q.shape[2], k.shape[2], align=16)
            if bias is not None:
                bias = bias.expand(q.shape[0], q.shape[1], -1, -1)
            out, lse = self._eff(q, _expand_kv(k, g), _expand_kv(v, g), bias, True, 0.0, causal, scale=scale)[:2]
            lse = lse[..., :q.shape[2]]
        return _fix_dead(out, lse.to(acc_dtype(q.dtype)), dead)

    def backward(self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        route = self._route(q, causal, q.shape[2], k.shape[2])
        if route == "math":
            return self.fallback.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        if route == "cpu":
            lse = _safe_lse(lse.to(acc_dtype(q.dtype))).contiguous()
            return self._cpu_bwd(dout, q, k, v, out, lse, 0.0, causal,
                                 attn_mask=self._bias(mask, q.dtype, q.shape[2], k.shape[2]), scale=scale)
        # cuda (UNTESTED here)
        nk, g, sq = k.shape[1], q.shape[1] // k.shape[1], q.shape[2]
        lse = _safe_lse(lse.float())
        pad = -(-sq // 32) * 32 - sq
        if pad:
            lse = torch.nn.functional.pad(lse, (0, pad), value=math.inf)
        bias = self._bias(mask, q.dtype, q.shape[2], k.shape[2], align=16)
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], -1, -1)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = self._eff_bwd(dout, q, _expand_kv(k, g), _expand_kv(v, g), bias, out, lse.contiguous(),
                                      seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
        return dq, _fold_kv_grad(dk, nk), _fold_kv_grad(dv, nk)


# ----------------------------------------------------------------------------------------------- flash-attn
class FlashAttnKernel:
    """``flash_attn`` (Dao-AILab) when installed. UNTESTED here (no GPU); written against its API.

    flash_attn takes ``[b, s, n, d]``, supports GQA natively, has no boolean mask, and its causal mask is
    bottom-right aligned when ``sq != sk``: masks, non-square causal blocks and dtypes other than
    fp16/bf16 go to :class:`TorchFusedKernel`.
    """

    name = "flash"

    def __init__(self) -> None:
        self.fallback = TorchFusedKernel()
        self._iface = importlib.import_module("flash_attn.flash_attn_interface")
        try:
            self._bwd_params = set(inspect.signature(self._iface._flash_attn_backward).parameters)
        except (TypeError, ValueError):  # a wrapped custom op without a signature: the 2.7 names
            self._bwd_params = {"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                                "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
                                "alibi_slopes", "deterministic", "rng_state"}

    @staticmethod
    def _ok(q: Tensor, causal: bool, sq: int, sk: int, mask) -> bool:
        return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and mask is None
                and (not causal or sq == sk))

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        if not self._ok(q, causal, q.shape[2], k.shape[2], mask):
            return self.fallback.forward(q, k, v, scale=scale, causal=causal, mask=mask)
        t = lambda x: x.transpose(1, 2)  # noqa: E731  [b, n, s, d] <-> [b, s, n, d]
        out, lse, _ = self._iface.flash_attn_func(t(q), t(k), t(v), 0.0, softmax_scale=scale, causal=causal,
                                                  return_attn_probs=True)
        return t(out), lse[..., :q.shape[2]].float()  # old versions pad the LSE to 128 rows

    def backward(self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        if not self._ok(q, causal, q.shape[2], k.shape[2], mask):
            return self.fallback.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        qs, ks, vs = t(q), t(k), t(v)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs)
        args = dict(dout=t(dout.to(q.dtype)), q=qs, k=ks, v=vs, out=t(out.to(q.dtype)),
                    softmax_lse=_safe_lse(lse.float()).contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0,
                    softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1,
                    window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
        # the private signature moved between releases (window_size -> window_size_left/right, softcap)
        self._iface._flash_attn_backward(**{k_: v_ for k_, v_ in args.items() if k_ in self._bwd_params})
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ----------------------------------------------------------------------------------------------- Ascend NPU
class NpuKernel:
    """``torch_npu.npu_fusion_attention`` / ``npu_fusion_attention_grad`` (BNSD). UNTESTED here.

    The NPU op returns ``softmax_max`` and ``softmax_sum`` (``[b, n, sq, 8]``, replicated); the LSE is
    ``max + log(sum)``. For the backward the global LSE is passed as ``max = lse, sum = 1``.
    """

    name = "npu"
    _FULL = 2147483647

    def __init__(self) -> None:
        self.fallback = MathKernel()
        self._npu = importlib.import_module("torch_npu")

    def _mask(self, mask, causal, sq, sk, device):
        # bool, True = masked (the NPU op's convention too); causal as an explicit top-left mask
        if causal:
            c = _causal_mask(sq, sk, device)
            mask = c if mask is None else (mask | c)
        return mask

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        if q.device.type != "npu":
            return self.fallback.forward(q, k, v, scale=scale, causal=causal, mask=mask)
        m = self._mask(mask, causal, q.shape[2], k.shape[2], q.device)
        res = self._npu.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", atten_mask=m, scale=scale,
                                             keep_prob=1.0, pre_tockens=self._FULL, next_tockens=self._FULL,
                                             sparse_mode=0)
        out, smax, ssum = res[0], res[1], res[2]
        lse = (smax[..., 0] + torch.log(ssum[..., 0])).float()
        return _fix_dead(out, lse, dead_rows(mask, causal, q.shape[2], k.shape[2]))

    def backward(self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None):
        _check(q, k, v)
        if q.device.type != "npu":
            return self.fallback.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
        m = self._mask(mask, causal, q.shape[2], k.shape[2], q.device)
        smax = _safe_lse(lse.float())[..., None].expand(*lse.shape, 8).contiguous()
        ssum = torch.ones_like(smax)
        res = self._npu.npu_fusion_attention_grad(
            q, k, v, dout.to(q.dtype), q.shape[1], "BNSD", atten_mask=m, softmax_max=smax, softmax_sum=ssum,
            attention_in=out.to(q.dtype), scale_value=scale, keep_prob=1.0, pre_tockens=self._FULL,
            next_tockens=self._FULL, sparse_mode=0)
        return res[0], res[1], res[2]


# ----------------------------------------------------------------------------------------------- selection
KERNELS = {"math": MathKernel, "torch": TorchFusedKernel, "flash": FlashAttnKernel, "npu": NpuKernel}
_INSTANCES: dict = {}


def _instance(name: str):
    if name not in _INSTANCES:
        _INSTANCES[name] = KERNELS[name]()  # raises ImportError for flash/npu when not installed
    return _INSTANCES[name]


def available_kernels() -> list:
    """Names of the backends that can be built in this environment."""
    names = []
    for name in KERNELS:
        try:
            _instance(name)
            names.append(name)
        except ImportError:
            pass
    return names


def get_kernel(spec=None, device=None):
    """A kernel object: ``spec`` is a name from :data:`KERNELS`, an object with ``forward``/``backward``,
    or None/"auto" (NPU -> "npu", CUDA -> "flash" if installed else "torch", otherwise "torch")."""
    if spec is not None and not isinstance(spec, str):
        if not (callable(getattr(spec, "forward", None)) and callable(getattr(spec, "backward", None))):
            raise TypeError(f"kernel {spec!r} has no forward/backward methods")
        return spec
    if spec in (None, "auto"):
        kind = torch.device(device).type if device is not None else "cpu"
        order = {"npu": ("npu", "torch"), "cuda": ("flash", "torch")}.get(kind, ("torch",))
        for name in order:
            try:
                return _instance(name)
            except Exception:  # noqa: BLE001 - optional backend missing or broken: take the next one
                continue
        return _instance("math")
    if spec not in KERNELS:
        raise ValueError(f"unknown attention kernel {spec!r}; known: {', '.join(KERNELS)}, auto")
    return _instance(spec)


# ----------------------------------------------------------------------------------------------- merge
def merge(out: Optional[Tensor], lse: Optional[Tensor], block_out: Tensor, block_lse: Tensor
          ) -> Tuple[Tensor, Tensor]:
    """Combine two softmax-normalised partial results over disjoint key sets.

    ``out`` ``[..., s, d]`` and ``lse`` ``[..., s]`` (None: nothing yet). Arithmetic in float32 (float64
    for float64 inputs) whatever the inputs' dtype; weights are ``exp(lse_i - max)`` <= 1, so nothing
    overflows, and a row empty in both parts (-inf, -inf) stays out 0, lse -inf.
    """
    parts = (block_out, block_lse) if out is None else (out, lse, block_out, block_lse)
    dt = torch.float64 if any(t.dtype == torch.float64 for t in parts) else torch.float32
    if out is None:
        return block_out.to(dt), block_lse.to(dt)
    lse, block_lse = lse.to(dt), block_lse.to(dt)
    top = torch.maximum(lse, block_lse)
    top = torch.where(top == -math.inf, torch.zeros_like(top), top)
    w_old, w_new = torch.exp(lse - top), torch.exp(block_lse - top)
    total = w_old + w_new
    new_lse = top + torch.log(total)  # log 0 = -inf for rows empty in both
    total = torch.where(total == 0, torch.ones_like(total), total)
    new_out = out.to(dt) * (w_old / total)[..., None] + block_out.to(dt) * (w_new / total)[..., None]
    return new_out, new_lse
