"""Local attention blocks that also return the log-sum-exp, and the float32 merge of partial results.

Every backend has the same small interface, in the ``[b, n, s, d]`` layout ("bnsd")::

    out, lse = kernel.forward(q, k, v, scale=s, causal=c, mask=m)
    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, scale=s, causal=c, mask=m)

* ``q`` ``[b, n, sq, d]``, ``k`` ``[b, nk, sk, d]``, ``v`` ``[b, nk, sk, dv]`` with ``n % nk == 0`` (GQA by shape:
  query head ``h`` uses KV head ``h // (n // nk)``, Megatron's grouping); ``out`` ``[b, n, sq, dv]``. The value head
  size is its own (MLA: DeepSeek's ``d = 192``, ``dv = 128``); backends whose fused op wants one head size get zero
  columns appended (:func:`same_head_size`), which changes no score, output or gradient.
* ``causal``: top-left aligned (query ``i`` sees keys ``0..i``), meant for the square diagonal block.
* ``mask``: bool, broadcastable to ``[b, n, sq, sk]`` (each of the first two dims 1 or full), True = masked
  (Megatron's convention).
* ``dropout``: a :class:`mindspeed_cp.dropout.DropoutBlock` (the block's reproducible keep mask) or None;
  backends that cannot apply exactly that mask hand the call to the math kernel.
* ``lse`` ``[b, n, sq]`` is float32 (float64 for float64 inputs). A fully masked row gives ``out`` 0 and
  ``lse`` -inf, never NaN, and zero gradients. A row whose query or any visible key/value is not finite gives
  NaN ``out`` and ``lse`` (as dense attention does), so a merge never hides it.
* ``out`` and the gradients come back in the input dtype or wider (the math kernel returns float32).
* ``backward`` accepts the *global* ``out``/``lse`` of a row (merged over all key blocks): the ring passes
  those so each block's gradient is its exact share of the full attention gradient.

Backends (``get_kernel(name)``; ``None``/"auto" picks by device):

* ``"math"``  :class:`MathKernel`, plain torch, math in float32 (float64 for float64 inputs). Reference.
* ``"torch"`` :class:`TorchFusedKernel`, torch's fused ops that expose the LSE: on CPU
  ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward; masks, GQA, fp64/fp32/bf16/fp16
  verified here), on CUDA torch's flash kernel forward (sm80+, fp16/bf16) else the memory-efficient one,
  whose backward serves both (``make gpu-check`` verifies them where a GPU exists). Falls back to "math" per
  call where unsupported; :data:`ROUTES` counts every choice with its reason.
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
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "MathKernel",
    "TorchFusedKernel",
    "FlashAttnKernel",
    "NpuKernel",
    "get_kernel",
    "available_kernels",
    "merge",
    "acc_dtype",
    "dead_rows",
    "same_head_size",
    "KERNELS",
    "ROUTES",
]

# (kernel, "forward" | "backward", route taken, why not a faster one) -> calls, for every fused-kernel call
ROUTES: "Counter[Tuple[str, str, str, str]]" = Counter()


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
        raise ValueError(
            f"attention kernels take [b, n, s, d] tensors, got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention kernel shapes do not fit: q {list(q.shape)} [b, n, sq, d], "
            f"k {list(k.shape)} [b, nk, sk, d] and v {list(v.shape)} [b, nk, sk, dv]"
        )
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key/value heads {k.shape[1]}")


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # [b, nk, s, d] -> [b, nk*groups, s, d] (query head h uses KV head h // groups)
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fold_kv_grad(dx: Tensor, nk: int) -> Tensor:
    # [b, nk*groups, s, d] -> [b, nk, s, d]: the replicated heads' gradients sum back
    b, n, s, d = dx.shape
    return dx if n == nk else dx.reshape(b, nk, n // nk, s, d).sum(2)


def same_head_size(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q/k/v with one head size for fused ops that want it: V gets zero columns up to ``d`` (``dv < d``, MLA), or
    Q and K up to ``dv`` (``dv > d``). Exact: a zero column adds 0 to every score and its output column is 0.
    The caller keeps ``out[..., :dv]`` and the gradients' first ``d`` / ``dv`` columns (:func:`_trim`)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d == dv:
        return q, k, v
    if dv < d:
        return q, k, torch.nn.functional.pad(v, (0, d - dv))
    return torch.nn.functional.pad(q, (0, dv - d)), torch.nn.functional.pad(k, (0, dv - d)), v


def _widen(x: Tensor, size: int) -> Tensor:
    """``x`` [..., dv] with zero columns up to ``size`` (dout / out of a padded V)."""
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def _trim(grads, d: int, dv: int) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of a padded call cut back to the real head sizes."""
    dq, dk, dvv = grads
    return dq[..., :d], dk[..., :d], dvv[..., :dv]


def _fix_dead(out: Tensor, lse: Tensor, dead: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Force out 0 / lse -inf on fully masked rows (fused kernels report lse 0 or garbage there)."""
    if dead is None:
        return out, lse
    return out.masked_fill(dead[..., None], 0), lse.masked_fill(dead, -math.inf)


def _finite(x: Tensor) -> Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # one pass, no mask tensor


def _bad(x: Tensor) -> Tensor:
    """``[..., s, d]`` -> ``[..., s]``: True where any element is not finite. A float64 sum of 16/32-bit values
    cannot overflow (max 3.4e38 x d << 1.8e308), so it is finite exactly where every element is (measured on
    fresh blocks: 0.4 / 5.5 ms at 2k / 8k tokens x 4 heads, against 2.8 / 11.7 ms for ``isnan((x * 0).sum(-1))``,
    which float64 inputs still use: NaN exactly there, and a sum of zeros never overflows)."""
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return ~torch.isfinite(x.sum(-1, dtype=torch.float64))
    return torch.isnan((x * 0).sum(-1))


def _poison(
    out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """NaN (out and lse) on every row whose query, or any key/value it sees, is not finite - what dense
    attention gives. torch's CPU flash op drops a NaN key that is a row's only visible one (out 0, lse 0), and
    the merge would then hide it in a finite result. Elementwise and O(s d) per block, no host sync."""
    bad_kv = _bad(k) | _bad(v)  # [b, nk, sk]
    bad_kv = _expand_kv(bad_kv[..., None], q.shape[1] // k.shape[1])[..., 0] if k.shape[1] != q.shape[1] else bad_kv
    sq, sk = q.shape[2], k.shape[2]
    if mask is None and causal and sq == sk:
        rows = bad_kv.cummax(-1).values  # row i sees keys 0..i
    elif mask is None and not causal:
        rows = bad_kv.any(-1, keepdim=True).expand(-1, -1, sq)
    else:
        hidden = mask if mask is not None else torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
        if causal:
            hidden = hidden | _causal_mask(sq, sk, q.device)
        rows = (bad_kv[..., None, :] & ~hidden).any(-1)
    rows = rows | _bad(q)
    return out.masked_fill_(rows[..., None], math.nan), lse.masked_fill_(rows, math.nan)  # the kernel's own outputs


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

    @staticmethod
    def _kept(dropout, p: Tensor) -> Optional[Tensor]:
        """The block's keep mask scaled by 1/(1-p), ``[b, nk, g, sq, sk]`` like ``p``; None without dropout."""
        if dropout is None or dropout.p == 0:
            return None
        b, nk, g, sq, sk = p.shape
        keep = dropout.keep(b, p.device)
        if tuple(keep.shape) != (b, nk * g, sq, sk):
            raise ValueError(
                f"dropout block of shape {list(keep.shape)} for scores [b, n, sq, sk] = {[b, nk * g, sq, sk]}"
            )
        return keep.reshape(b, nk, g, sq, sk).to(p.dtype) * dropout.scale

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None):
        _check(q, k, v)
        dt = acc_dtype(q.dtype)
        b, n, sq, d = q.shape
        s = self._scores(q, k, scale, causal, mask, dt)
        lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
        p = torch.exp(s - _safe_lse(lse)[..., None])
        kept = self._kept(dropout, p)
        if kept is not None:  # dropout on the normalised probabilities; the LSE stays the undropped one
            p = p * kept
        out = torch.matmul(p, v.to(dt)[:, :, None])  # [b, nk, g, sq, dv]
        return out.reshape(b, n, sq, v.shape[-1]), lse.reshape(b, n, sq)

    def backward(
        self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None
    ):
        _check(q, k, v)
        dt = acc_dtype(q.dtype)
        b, n, sq, d = q.shape
        nk = k.shape[1]
        g = n // nk
        s = self._scores(q, k, scale, causal, mask, dt)
        p = torch.exp(s - _safe_lse(lse.to(dt)).reshape(b, nk, g, sq, 1))  # [b, nk, g, sq, sk]
        kept = self._kept(dropout, p)
        do5 = dout.to(dt).reshape(b, nk, g, sq, v.shape[-1])
        dv = torch.matmul((p if kept is None else p * kept).transpose(-1, -2), do5).sum(2)  # [b, nk, sk, dv]
        dp = torch.matmul(do5, v.to(dt)[:, :, None].transpose(-1, -2))
        if kept is not None:  # d(out)/d(p) goes through the same mask; delta = rowsum(dO * O) already has it
            dp = dp * kept
        delta = (do5 * out.to(dt).reshape(do5.shape)).sum(-1, keepdim=True)  # rowsum(dO * O)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, k.to(dt)[:, :, None]).reshape(b, n, sq, d)
        dk = torch.matmul(ds.transpose(-1, -2), q.to(dt).reshape(b, nk, g, sq, d)).sum(2)
        return dq, dk, dv


# ----------------------------------------------------------------------------------------------- torch fused
class TorchFusedKernel:
    """torch's own fused attention ops that return the LSE; falls back to :class:`MathKernel` per call.

    Routes, chosen per call (each choice is counted in :data:`ROUTES` with its reason):

    * CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward): masks (as an additive bias),
      GQA, fp64/fp32/bf16/fp16.
    * CUDA forward: ``aten._scaled_dot_product_flash_attention`` (fp16/bf16, sm80+, no mask, head dim a
      multiple of 8 up to 256), else ``aten._scaled_dot_product_efficient_attention`` (fp32 too, masks; causal
      only on square blocks). CUDA backward: the efficient kernel's backward - any exact backward serves,
      since it recomputes the probabilities from q, k and the (global) LSE.
    * Math (:class:`MathKernel`): dropout (its masks come from :mod:`mindspeed_cp.dropout`), other devices,
      shapes the fused ops refuse, or a fused op that failed once in this process (then it is not tried again).
    """

    name = "torch"

    def __init__(self) -> None:
        self.fallback = MathKernel()
        aten = torch.ops.aten
        self._cpu = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        self._cpu_bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
        self._flash = getattr(aten, "_scaled_dot_product_flash_attention", None)
        self._eff = getattr(aten, "_scaled_dot_product_efficient_attention", None)
        self._eff_bwd = getattr(aten, "_scaled_dot_product_efficient_attention_backward", None)
        self.broken: Dict[str, str] = {}  # route -> the error that disabled it

    def _route(self, phase: str, q: Tensor, causal: bool, sq: int, sk: int, mask, dropout, dv: int) -> str:
        route, reason = self._choose(phase, q, causal, sq, sk, mask, dropout, max(q.shape[-1], dv))
        ROUTES[(self.name, phase, route, reason)] += 1
        return route

    def _choose(self, phase, q, causal, sq, sk, mask, dropout, d: int) -> Tuple[str, str]:
        """(route, why not a faster one); ``d``: the head size the fused op sees (:func:`same_head_size`)."""
        if dropout is not None and dropout.p > 0:
            return "math", "dropout (reproducible masks)"
        dev = q.device.type
        if dev == "cpu":
            if self._cpu is None or self._cpu_bwd is None:
                return "math", "no CPU flash op in this torch"
            return ("math", f"cpu failed: {self.broken['cpu']}") if "cpu" in self.broken else ("cpu", "")
        if dev != "cuda":
            return "math", f"device {dev}"
        eff_ok = (
            self._eff is not None
            and self._eff_bwd is not None
            and "efficient" not in self.broken
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and (not causal or sq == sk)
        )
        if phase == "forward" and self._flash is not None and "flash" not in self.broken:
            why = (
                "mask"
                if mask is not None
                else "dtype"
                if q.dtype not in (torch.float16, torch.bfloat16)
                else "head dim"
                if d % 8 or d > 256
                else "pre-sm80"
                if _sm(q.device) < 80
                else ""
            )
            if not why:
                return "flash", ""
            if eff_ok:
                return "efficient", f"flash: {why}"
        if eff_ok:
            return "efficient", ""
        return "math", "efficient: " + (self.broken.get("efficient") or f"{q.dtype}, causal {sq}x{sk} block")

    def _try(self, route: str, fn):
        """Run a fused op; on failure remember why (the route is not tried again) and return None."""
        try:
            return fn()
        except (RuntimeError, TypeError, ValueError) as e:
            self.broken[route] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return None

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

    def _cuda_bias(self, mask, q: Tensor, sq: int, sk: int) -> Optional[Tensor]:
        bias = self._bias(mask, q.dtype, sq, sk, align=16)
        return None if bias is None else bias.expand(q.shape[0], q.shape[1], -1, -1)

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None):
        _check(q, k, v)
        sq, sk = q.shape[2], k.shape[2]
        route = self._route("forward", q, causal, sq, sk, mask, dropout, v.shape[-1])
        res = None if route == "math" else self._fused_forward(route, q, k, v, scale, causal, mask)
        if res is None:
            return self.fallback.forward(q, k, v, scale=scale, causal=causal, mask=mask, dropout=dropout)
        out, lse = res
        lse = lse[..., :sq]  # some kernels pad the LSE rows
        out, lse = _fix_dead(out[..., : v.shape[-1]], lse.to(acc_dtype(q.dtype)), dead_rows(mask, causal, sq, sk))
        return _poison(out, lse, q, k, v, causal, mask)

    def _fused_forward(self, route: str, q, k, v, scale: float, causal: bool, mask) -> Optional[Tuple[Tensor, Tensor]]:
        """(out, lse) of a fused route (out possibly with padded value columns), or None when the op failed."""
        sq, sk = q.shape[2], k.shape[2]
        # a non-finite key would reach masked rows through the additive bias (NaN + -inf = NaN), a non-finite
        # value through a masked probability (0 x inf = NaN): compute with zeros there, then give NaN exactly to
        # the rows that see it (_poison), as dense attention does. Measured on torch's CPU op: its own causal
        # mask never lets a key through, and without any mask every row sees every key.
        if mask is not None or route != "cpu":
            k = _finite(k)
        if mask is not None or causal or route != "cpu":
            v = _finite(v)
        q, k, v = same_head_size(q, k, v)
        if route == "cpu":
            return self._try(
                "cpu",
                lambda: self._cpu(q, k, v, 0.0, causal, attn_mask=self._bias(mask, q.dtype, sq, sk), scale=scale)[:2],
            )
        g = q.shape[1] // k.shape[1]  # no native GQA on CUDA: KV expanded per block
        kx, vx = _expand_kv(k, g), _expand_kv(v, g)
        res = (
            self._try("flash", lambda: self._flash(q, kx, vx, 0.0, causal, False, scale=scale)[:2])
            if route == "flash"
            else None
        )
        if res is None:
            res = self._try(
                "efficient",
                lambda: self._eff(q, kx, vx, self._cuda_bias(mask, q, sq, sk), True, 0.0, causal, scale=scale)[:2],
            )
        return res

    def backward(
        self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None
    ):
        _check(q, k, v)
        route = self._route("backward", q, causal, q.shape[2], k.shape[2], mask, dropout, v.shape[-1])
        res = None if route == "math" else self._fused_backward(route, dout, q, k, v, out, lse, scale, causal, mask)
        if res is None:
            return self.fallback.backward(
                dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask, dropout=dropout
            )
        return _trim(res, q.shape[-1], v.shape[-1])

    def _fused_backward(self, route: str, dout, q, k, v, out, lse, scale: float, causal: bool, mask):
        """dq, dk, dv of a fused route (padded head sizes, see :func:`same_head_size`), or None when it failed."""
        sq, sk = q.shape[2], k.shape[2]
        q, k, v = same_head_size(q, k, v)
        dout_, out_ = _widen(dout.to(q.dtype), v.shape[-1]), _widen(out.to(q.dtype), v.shape[-1])
        if route == "cpu":
            lse_ = lse.to(acc_dtype(q.dtype))
            lse_ = (lse_ if mask is None else _safe_lse(lse_)).contiguous()  # only a mask empties a row (-inf)
            return self._try(
                "cpu",
                lambda: self._cpu_bwd(
                    dout_, q, k, v, out_, lse_, 0.0, causal, attn_mask=self._bias(mask, q.dtype, sq, sk), scale=scale
                ),
            )
        nk, g = k.shape[1], q.shape[1] // k.shape[1]
        lse_ = _safe_lse(lse.float())
        pad = -(-sq // 32) * 32 - sq  # the efficient kernel's LSE has rows padded to 32
        if pad:
            lse_ = torch.nn.functional.pad(lse_, (0, pad), value=math.inf)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        grads = self._try(
            "efficient",
            lambda: self._eff_bwd(
                dout_,
                q,
                _expand_kv(k, g),
                _expand_kv(v, g),
                self._cuda_bias(mask, q, sq, sk),
                out_,
                lse_.contiguous(),
                seed,
                seed,
                0.0,
                [True, True, True, False],
                causal,
                scale=scale,
            ),
        )
        return None if grads is None else (grads[0], _fold_kv_grad(grads[1], nk), _fold_kv_grad(grads[2], nk))


def _sm(device) -> int:
    """Compute capability as 80, 90, ... (0 when unknown)."""
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    except Exception:  # noqa: BLE001
        return 0


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
            self._bwd_params = {
                "dout",
                "q",
                "k",
                "v",
                "out",
                "softmax_lse",
                "dq",
                "dk",
                "dv",
                "dropout_p",
                "softmax_scale",
                "causal",
                "window_size_left",
                "window_size_right",
                "softcap",
                "alibi_slopes",
                "deterministic",
                "rng_state",
            }

    @staticmethod
    def _ok(q: Tensor, v: Tensor, causal: bool, mask, dropout) -> bool:
        """flash-attn's fast path: fp16/bf16 CUDA, no mask, square causal blocks, one head size (its 2.x kernels;
        MLA's separate value head size goes to torch's kernels)."""
        return (
            q.device.type == "cuda"
            and q.dtype in (torch.float16, torch.bfloat16)
            and mask is None
            and (not causal or q.shape[2] == v.shape[2])
            and (dropout is None or dropout.p == 0)
            and q.shape[-1] == v.shape[-1]
        )

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None):
        _check(q, k, v)
        if not self._ok(q, v, causal, mask, dropout):
            return self.fallback.forward(q, k, v, scale=scale, causal=causal, mask=mask, dropout=dropout)
        t = lambda x: x.transpose(1, 2)  # noqa: E731  [b, n, s, d] <-> [b, s, n, d]
        out, lse, _ = self._iface.flash_attn_func(
            t(q), t(k), t(v), 0.0, softmax_scale=scale, causal=causal, return_attn_probs=True
        )
        return t(out), lse[..., : q.shape[2]].float()  # old versions pad the LSE to 128 rows

    def backward(
        self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None
    ):
        _check(q, k, v)
        if not self._ok(q, v, causal, mask, dropout):
            return self.fallback.backward(
                dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask, dropout=dropout
            )
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        qs, ks, vs = t(q), t(k), t(v)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs)
        args = dict(
            dout=t(dout.to(q.dtype)),
            q=qs,
            k=ks,
            v=vs,
            out=t(out.to(q.dtype)),
            softmax_lse=_safe_lse(lse.float()).contiguous(),
            dq=dq,
            dk=dk,
            dv=dv,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size=(-1, -1),
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
            rng_state=None,
        )
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

    def forward(self, q, k, v, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None):
        _check(q, k, v)
        if q.device.type != "npu" or (dropout is not None and dropout.p > 0):
            return self.fallback.forward(q, k, v, scale=scale, causal=causal, mask=mask, dropout=dropout)
        m = self._mask(mask, causal, q.shape[2], k.shape[2], q.device)
        qp, kp, vp = same_head_size(q, k, v)
        res = self._npu.npu_fusion_attention(
            qp,
            kp,
            vp,
            q.shape[1],
            "BNSD",
            atten_mask=m,
            scale=scale,
            keep_prob=1.0,
            pre_tockens=self._FULL,
            next_tockens=self._FULL,
            sparse_mode=0,
        )
        out, smax, ssum = res[0][..., : v.shape[-1]], res[1], res[2]
        lse = (smax[..., 0] + torch.log(ssum[..., 0])).float()
        return _fix_dead(out, lse, dead_rows(mask, causal, q.shape[2], k.shape[2]))

    def backward(
        self, dout, q, k, v, out, lse, *, scale: float, causal: bool, mask: Optional[Tensor] = None, dropout=None
    ):
        _check(q, k, v)
        if q.device.type != "npu" or (dropout is not None and dropout.p > 0):
            return self.fallback.backward(
                dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask, dropout=dropout
            )
        m = self._mask(mask, causal, q.shape[2], k.shape[2], q.device)
        smax = _safe_lse(lse.float())[..., None].expand(*lse.shape, 8).contiguous()
        ssum = torch.ones_like(smax)
        qp, kp, vp = same_head_size(q, k, v)
        width = vp.shape[-1]
        res = self._npu.npu_fusion_attention_grad(
            qp,
            kp,
            vp,
            _widen(dout.to(q.dtype), width),
            q.shape[1],
            "BNSD",
            atten_mask=m,
            softmax_max=smax,
            softmax_sum=ssum,
            attention_in=_widen(out.to(q.dtype), width),
            scale_value=scale,
            keep_prob=1.0,
            pre_tockens=self._FULL,
            next_tockens=self._FULL,
            sparse_mode=0,
        )
        return _trim(res[:3], q.shape[-1], v.shape[-1])


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
    or None/"auto" (NPU -> "npu", otherwise "torch": on CUDA torch's own flash / memory-efficient kernels first,
    flash-attn's only when asked for by name - torch's flash kernel is FlashAttention-2 already)."""
    if spec is not None and not isinstance(spec, str):
        if not (callable(getattr(spec, "forward", None)) and callable(getattr(spec, "backward", None))):
            raise TypeError(f"kernel {spec!r} has no forward/backward methods")
        return spec
    if spec in (None, "auto"):
        kind = torch.device(device).type if device is not None else "cpu"
        order = {"npu": ("npu", "torch")}.get(kind, ("torch",))
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
def merge(out: Optional[Tensor], lse: Optional[Tensor], block_out: Tensor, block_lse: Tensor) -> Tuple[Tensor, Tensor]:
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


def merge_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """:func:`merge` into ``out`` / ``lse`` themselves (float32/float64 accumulators, views allowed): the weights
    are computed on ``[..., s]``, the output is scaled and accumulated in place - no full-size temporary."""
    block_lse = block_lse.to(lse.dtype)
    top = torch.maximum(lse, block_lse)
    top = top.masked_fill_(top == -math.inf, 0.0)
    w_old, w_new = torch.exp(lse - top), torch.exp(block_lse - top)
    total = w_old + w_new
    torch.add(top, torch.log(total), out=lse)  # log 0 = -inf for rows empty in both
    total.masked_fill_(total == 0, 1.0)
    out.mul_((w_old / total)[..., None]).addcmul_(block_out.to(out.dtype), (w_new / total)[..., None])
