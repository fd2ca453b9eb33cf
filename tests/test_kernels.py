"""Local attention kernels with LSE (mindspeed_cp.kernels) against the float64 reference, and the merge.

Tolerances, relative to max|reference| of each tensor: float64 1e-10, float32 1e-5, bfloat16 4e-2
(bf16 inputs round to 8 bits; the reference is computed in float64 from the same rounded inputs).
"""

from __future__ import annotations

import math

import pytest
import torch

from mindspeed_cp import kernels as K
from tests.attention_ref import attention_bhsd

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 4e-2}
LSE_TOL = 1e-5  # log-sum-exp, absolute
LSE_REL_TOL = 1e-6  # log-sum-exp ~1e4, relative
BACKENDS = K.available_kernels()  # math and torch here; flash / npu where installed


def _inputs(b, n, nk, sq, sk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype) for h, s in ((n, sq), (nk, sk), (nk, sk)))
    dout = torch.randn(b, n, sq, d, generator=g).to(dtype)
    return q, k, v, dout


def _random_mask(shape, seed, dead_rows=(1,)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.35
    for r in dead_rows:  # fully masked rows: must give out 0, lse -inf, zero grads
        mask[..., r, :] = True
    return mask


def _reference(q, k, v, dout, scale, causal, mask):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = attention_bhsd(*leaves, causal=causal, mask=mask, scale=scale, compute_dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), lse.detach(), grads


def _rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _lse_err(lse, ref):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "empty rows must have lse -inf, others finite"
    live = ~torch.isneginf(ref)
    return _rel(lse[live], ref[live]) if live.any() else 0.0


CASES = [  # (b, n, nk, sq, sk, causal, mask shape or None)
    (2, 4, 4, 16, 16, False, None),
    (2, 4, 4, 16, 16, True, None),
    (2, 4, 2, 16, 16, True, None),  # GQA
    (1, 4, 1, 16, 16, False, None),  # MQA
    (2, 4, 2, 8, 12, False, None),  # rectangular block
    (2, 4, 2, 12, 8, True, None),  # top-left causal, more queries than keys
    (2, 4, 2, 16, 16, False, (2, 1, 16, 16)),
    (2, 4, 2, 16, 16, False, (1, 4, 16, 16)),  # per-head mask with GQA
    (1, 4, 4, 16, 16, True, (1, 1, 16, 16)),  # causal and mask together
    (2, 4, 2, 8, 24, False, (1, 1, 8, 24)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_float64_reference(backend, dtype):
    kern = K.get_kernel(backend)
    worst = {}
    for i, (b, n, nk, sq, sk, causal, mshape) in enumerate(CASES):
        q, k, v, dout = _inputs(b, n, nk, sq, sk, 8, dtype, seed=i)
        mask = None if mshape is None else _random_mask(mshape, seed=i)
        scale = 0.7 / math.sqrt(8)
        ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, scale, causal, mask)
        out, lse = kern.forward(q, k, v, scale=scale, causal=causal, mask=mask)
        grads = kern.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
        assert lse.dtype == K.acc_dtype(dtype) and lse.shape == (b, n, sq)
        assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        for t in (out, lse, *grads):
            assert not torch.isnan(t).any()
        errs = {"out": _rel(out, ref_out), "lse": _lse_err(lse, ref_lse)}
        errs.update({name: _rel(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
        for name, e in errs.items():
            worst[name] = max(worst.get(name, 0.0), e)
            assert e <= TOL[dtype], f"case {i} {CASES[i]}: {name} relative error {e:.2e} > {TOL[dtype]:.0e}"
    print(f"\n{backend} {dtype}: max relative errors " + ", ".join(f"{k}={v:.1e}" for k, v in worst.items()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_and_no_nan(backend):
    kern = K.get_kernel(backend)
    q, k, v, dout = _inputs(1, 2, 1, 6, 6, 4, torch.float32)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = True  # one empty row
    mask[..., 4, 1:] = True  # with causal, row 4 keeps only key 0 ...
    mask[..., 5, :] = True
    for causal in (False, True):
        out, lse = kern.forward(q, k, v, scale=0.5, causal=causal, mask=mask)
        dq, dk, dv = kern.backward(dout, q, k, v, out, lse, scale=0.5, causal=causal, mask=mask)
        assert torch.all(out[:, :, [2, 5]] == 0) and torch.all(torch.isneginf(lse[:, :, [2, 5]]))
        assert torch.isfinite(lse[:, :, [0, 1, 3, 4]]).all()
        assert torch.all(dq[:, :, [2, 5]] == 0)
        for t in (out, dq, dk, dv):
            assert torch.isfinite(t).all()
    # everything masked: zero output, -inf lse, zero grads
    full = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    out, lse = kern.forward(q, k, v, scale=0.5, causal=False, mask=full)
    grads = kern.backward(dout, q, k, v, out, lse, scale=0.5, causal=False, mask=full)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_merge_of_key_blocks_equals_full_attention(dtype, tol):
    """Partial results over disjoint key blocks, merged in float32, equal attention over all keys;
    a block whose rows are all masked for some rows (lse -inf) merges without NaN."""
    kern = K.get_kernel("torch")
    q, k, v, _ = _inputs(2, 4, 2, 12, 20, 8, dtype, seed=3)
    mask = _random_mask((2, 1, 12, 20), seed=4, dead_rows=(5,))
    mask[..., 7, :9] = True  # row 7 sees nothing in the first two blocks
    ref_out, ref_lse, _ = _reference(q, k, v, torch.zeros_like(q), 0.3, False, mask)
    out = lse = None
    for cols in (slice(0, 4), slice(4, 9), slice(9, 20)):
        bo, bl = kern.forward(q, k[:, :, cols], v[:, :, cols], scale=0.3, causal=False, mask=mask[..., cols])
        out, lse = K.merge(out, lse, bo, bl)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel(out, ref_out) <= tol
    assert _lse_err(lse, ref_lse) <= LSE_TOL
    assert torch.all(out[:, :, 5] == 0)


def test_merge_lse_overflow():
    """Large logits: block LSEs around 1e4. exp(lse) overflows float32 (naive log(exp(a)+exp(b)) = inf);
    merge stays finite and matches float64, also from bf16 blocks."""
    q, k, v, _ = _inputs(1, 2, 2, 8, 16, 16, torch.float32, seed=5)
    q, k = q * 30, k * 30  # logits ~ 1e4 with scale 1
    kern = K.get_kernel("math")
    ref_out, ref_lse, _ = _reference(q, k, v, torch.zeros_like(q), 1.0, False, None)
    assert ref_lse.abs().min() > 1000
    naive = torch.log(torch.exp(ref_lse.float()) + torch.exp(ref_lse.float()))
    assert torch.isinf(naive).all()  # the overflow this guards against
    for dtype in (torch.float32, torch.bfloat16):
        out = lse = None
        for cols in (slice(0, 7), slice(7, 16)):
            bo, bl = kern.forward(
                q.to(dtype), k[:, :, cols].to(dtype), v[:, :, cols].to(dtype), scale=1.0, causal=False
            )
            out, lse = K.merge(out, lse, bo.to(dtype), bl)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        if dtype == torch.float32:
            assert _rel(out, ref_out) <= TOL[torch.float32]
            assert (lse.double() - ref_lse).abs().max() / ref_lse.abs().max() <= LSE_REL_TOL


def test_merge_handles_empty_parts():
    out = torch.randn(1, 1, 3, 2)
    lse = torch.tensor([[[0.5, -math.inf, -math.inf]]])
    empty_out, empty_lse = torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3), -math.inf)
    o, l_ = K.merge(out, lse, empty_out, empty_lse)
    assert torch.equal(o[..., 0, :], out[..., 0, :]) and l_[0, 0, 0] == 0.5
    assert torch.all(o[..., 1:, :] == 0) and torch.all(torch.isneginf(l_[..., 1:]))
    o2, l2 = K.merge(empty_out, empty_lse, out, lse)
    assert torch.equal(o2, o) and torch.equal(l2, l_)


def test_merge_in_place_equals_merge():
    """The ring's and the local tiles' in-place merge gives merge()'s values, empty rows and bf16 blocks included."""
    g = torch.Generator().manual_seed(3)
    out, bo = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    lse, bl = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    lse[0, 0, :2] = -math.inf  # empty so far
    bl[0, 0, 1:3] = -math.inf  # empty block rows (row 1: empty in both)
    out[0, 0, :2] = 0
    for block in (bo, bo.bfloat16()):
        want_o, want_l = K.merge(out, lse, block, bl)
        o, l_ = out.clone(), lse.clone()
        K.merge_(o[:, :, 1:], l_[:, :, 1:], block[:, :, 1:], bl[:, :, 1:])  # views, as the ring merges row tiles
        K.merge_(o[:, :, :1], l_[:, :, :1], block[:, :, :1], bl[:, :, :1])
        assert torch.allclose(o, want_o, atol=1e-6, rtol=0) and torch.equal(l_.isneginf(), want_l.isneginf())
        assert torch.allclose(l_[~l_.isneginf()], want_l[~want_l.isneginf()], atol=1e-6, rtol=0)


def test_get_kernel():
    assert K.get_kernel(None, "cpu").name == "torch"
    assert K.get_kernel("math").name == "math"
    custom = K.MathKernel()
    assert K.get_kernel(custom) is custom
    with pytest.raises(ValueError, match="unknown attention kernel"):
        K.get_kernel("nope")
    with pytest.raises(TypeError):
        K.get_kernel(object())
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        K.get_kernel("math").forward(*_inputs(1, 3, 2, 4, 4, 4, torch.float32)[:3], scale=1.0, causal=False)


@pytest.mark.parametrize("name", ["flash", "npu"])
def test_optional_backends_guarded(name):
    """flash-attn / torch_npu backends exist behind an import guard (UNTESTED numerically here)."""
    if name in BACKENDS:
        pytest.skip(f"{name} is installed: covered by the reference test")
    with pytest.raises(ImportError):
        K.get_kernel(name)
