"""mindspeed_cp.local (the attention Ulysses runs after its all-to-all) and mindspeed_cp.dropout, in one process,
against float64 references.

Tolerances (max |error| / max |reference|): float32 inputs 1e-5 (outputs and gradients). Dropout: the reference
applies the very masks ``AttentionDropout`` exports to float64 softmax probabilities and differentiates through
them with autograd; kept fractions within 4 sigma of the binomial's.
"""

from __future__ import annotations

import math

import pytest
import torch

from mindspeed_cp.dropout import AttentionDropout
from mindspeed_cp.local import local_attention
from tests.attention_ref import reference_attention
from tests.attention_ref import reference_attention_dropout as _reference_dropout

TOL = 1e-5


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(s=96, b=2, h=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, h, d, generator=g)
    k = torch.randn(s, b, hk, d, generator=g)
    v = torch.randn(s, b, hk, d, generator=g)
    dout = torch.randn(s, b, h, d, generator=g)
    return q, k, v, dout


def _grads(fn, q, k, v, dout, dtype=None):
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("kernel", ["math", "torch"])
@pytest.mark.parametrize("case", ["causal", "mask", "causal_tiled", "mask_tiled_uneven", "gqa_mha"])
def test_local_attention_matches_float64(kernel, case):
    s = 100 if "uneven" in case else 96
    q, k, v, dout = _inputs(s=s, hk=4 if case == "gqa_mha" else 2)
    mask = None
    if "mask" in case:
        g = torch.Generator().manual_seed(3)
        mask = torch.rand(2, 1, s, s, generator=g) < 0.3
        mask[..., 0] = False
    causal = mask is None
    tile = 32 if "tiled" in case else None
    got = _grads(
        lambda *t: local_attention(*t, causal=causal, attention_mask=mask, kernel=kernel, tile=tile), q, k, v, dout
    )
    want = _grads(lambda *t: reference_attention(*t, causal=causal, mask=mask), q, k, v, dout, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert _rel(a, b) < TOL, (case, kernel, name, _rel(a, b))


@pytest.mark.parametrize("dead", ["zero", "uniform"])
def test_fully_masked_rows_follow_the_replaced_attention(dead):
    """ "zero": flash attention's answer; "uniform": Megatron's local attention (-10000 fill), whose gradient
    reaches V only. Rows 5 and 40 see no key at all."""
    s = 64
    q, k, v, dout = _inputs(s=s)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(1, 1, s, s, generator=g) < 0.2
    mask[..., 0] = False
    mask[..., [5, 40], :] = True
    keep = torch.ones(2, 4, s, s, dtype=torch.bool)
    for tile in (None, 16):
        got = _grads(
            lambda *t: local_attention(*t, causal=False, attention_mask=mask, tile=tile, dead_rows=dead), q, k, v, dout
        )
        want = _grads(
            lambda *t: _reference_dropout(*t, keep, 0.0, causal=False, mask=mask[0, 0], dead=dead),
            q,
            k,
            v,
            dout,
            torch.float64,
        )
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert _rel(a, b) < TOL, (dead, tile, name, _rel(a, b))
    if dead == "uniform":
        assert got[0][5].abs().sum() > 0 and got[1][5].abs().max() == 0  # V's mean; no gradient to q


def test_saves_only_what_flash_attention_saves():
    """q, k, v, out and the float32 LSE - nothing S x S (Megatron's local attention keeps the probabilities)."""
    s, b, h, d = 512, 1, 2, 16
    q, k, v, dout = _inputs(s=s, b=b, h=h, hk=h, d=d)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    for kernel, mask in (("torch", None), ("math", None), ("torch", torch.rand(1, 1, s, s) < 0.1)):
        saved.clear()
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = local_attention(*leaves, causal=mask is None, attention_mask=mask, kernel=kernel, tile=128)
        io = 4 * s * b * h * d * 4 + b * h * s * 4  # q, k, v, out (fp32) + lse
        assert sum(saved) == io, (kernel, sum(saved), io)
        out.backward(dout)


# ----------------------------------------------------------------------------- dropout
def test_dropout_keep_fraction_and_independence():
    s = 256
    for p in (0.1, 0.5):
        spec = AttentionDropout(p, torch.tensor(11), torch.arange(8))
        keep = spec.block(torch.arange(s), torch.arange(s)).keep(2)  # [2, 8, s, s]
        n = keep.numel()
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(keep.sum().item() - n * (1 - p)) < 4 * sigma, p
        flat = keep.reshape(16, -1).float()
        corr = torch.corrcoef(flat)  # samples x heads: no two alike
        assert (corr - torch.eye(16)).abs().max() < 0.05, p
        # a sub-block regenerates exactly the matching part (how a ring block sees it)
        rows, cols = torch.arange(40, 72), torch.arange(100, 164)
        assert torch.equal(spec.block(rows, cols).keep(2), keep[:, :, 40:72, 100:164])
    other = AttentionDropout(0.5, torch.tensor(12), torch.arange(8)).block(torch.arange(s), torch.arange(s)).keep(2)
    assert (other != keep).float().mean() > 0.45  # another seed: another mask


@pytest.mark.parametrize("tile", [None, 32])
@pytest.mark.parametrize("causal", [True, False])
def test_dropout_gradients_equal_autograd_through_the_same_masks(tile, causal):
    s, p = 96, 0.3
    q, k, v, dout = _inputs(s=s)
    mask = None if causal else torch.rand(1, 1, s, s, generator=torch.Generator().manual_seed(5)) < 0.3
    spec = AttentionDropout(p, torch.tensor(2024), torch.arange(4))
    keep = spec.block(torch.arange(s), torch.arange(s)).keep(2)
    got = _grads(
        lambda *t: local_attention(*t, causal=causal, attention_mask=mask, dropout=spec, tile=tile), q, k, v, dout
    )
    want = _grads(
        lambda *t: _reference_dropout(*t, keep, p, causal=causal, mask=None if mask is None else mask[0, 0]),
        q,
        k,
        v,
        dout,
        torch.float64,
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert _rel(a, b) < TOL, (tile, causal, name, _rel(a, b))
    again = _grads(
        lambda *t: local_attention(*t, causal=causal, attention_mask=mask, dropout=spec, tile=tile), q, k, v, dout
    )
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # same seed: bit-identical
