"""KV-cache policies (MindSpeed's ``--context-parallel-kv-cache-policy``): which keys and values backward keeps
instead of communicating them again. The memory <-> communication knob of long-context training.

Per rank and attention layer (P ranks of a level, ``B = 2 s b hk d e`` one K+V block of a ring rank; the
formulas in ``docs/performance.md``, measured by ``benchmarks/bench_kv_cache.py``):

============  =======================================================  ==========================================
policy        ring level (``ring_attention``)                          Ulysses level (``UlyssesContextAttention``)
============  =======================================================  ==========================================
None          backward sends K/V around the ring again: 3 (P-1) B      the local attention keeps the K/V the
              sent; only the rank's own K/V kept                        all-to-all produced ``[S, b, hk'/P, d]``
``full``      every received K/V block kept (P-1) B: backward sends    the input K/V ``[s, b, hk, d]`` kept (before
              only dK/dV, 2 (P-1) B                                     the all-to-all, before any GQA repeat);
                                                                        backward runs their all-to-all again
``half``      received K blocks kept (P-1) B/2, V travels again:      K as ``full``, V as None
              2.5 (P-1) B
============  =======================================================  ==========================================

Hybrid applies its policy at both levels (``hybrid_attention(kv_cache_policy=, ring_kv_cache_policy=)``);
Double Ring keeps the blocks of both its rings. Which layers: ``--context-parallel-cache-interval N`` gives
the policy to layers with ``layer_number % (N+1) == 1`` only (:meth:`mindspeed_cp.config.CPConfig.kv_cache_policy`).

Decisions
- The Ulysses level works with *any* local attention (the plugin's kernels, the ring level of Hybrid,
  Megatron's own attention): :class:`RecomputedKV` is a pair of ``saved_tensors_hooks`` around the local
  attention that replace every saved tensor living in the storage of an all-to-all output K/V by a note
  (its shape, strides, offset); backward rebuilds that storage once by running the same exchange on the
  kept input, and hands out the views. Tensors of other storages pass through untouched. So the local
  attention's own saving rules stay as they are, and nothing of it is re-implemented.
- Rebuilding from the input needs the input unchanged and the output never modified in place: both are
  checked (version counters, as autograd does), an in-place change raises instead of a wrong gradient.
- The rebuilt storage is dropped as soon as the last of its views has been handed out; an input whose output
  the local attention did not save at all (Megatron's own attention copies K/V for GQA) is not kept either.
- With GQA and fewer KV heads than ranks the all-to-all output holds one replicated head per rank
  (``[S, b, 1, d]``) while the input holds ``hk`` heads of ``S/P`` tokens: ``full`` keeps P/hk times less.
  With as many KV heads as ranks or more the two are the same size (the all-to-all moves, it does not
  grow): ``full`` then only costs communication - see the table in ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional

import torch

from .stats import note_saved

Tensor = torch.Tensor

__all__ = ["RecomputedKV"]


class _Kept:
    """One all-to-all output that backward rebuilds from its kept input."""

    def __init__(self, post: Tensor, pre: Tensor, rebuild: Callable[[Tensor], Tensor]) -> None:
        self.pre, self.rebuild = pre, rebuild
        self.pre_version, self.post_version = pre._version, post._version
        self.layout = (tuple(post.shape), post.stride(), post.dtype)
        self.post: Optional[Tensor] = post  # forward only: dropped by RecomputedKV.hooks on exit
        self.views = 0  # saved views not yet handed out in backward
        self.rebuilt: Optional[Tensor] = None

    def view(self, size, stride, offset) -> Tensor:
        if self.rebuilt is None:
            if self.pre._version != self.pre_version:
                raise RuntimeError(
                    "mindspeed-cp KV cache: the key/value given to the Ulysses attention were modified "
                    "in place after its forward; backward cannot rebuild its all-to-all from them"
                )
            with torch.no_grad():
                self.rebuilt = self.rebuild(self.pre)
            got = (tuple(self.rebuilt.shape), self.rebuilt.stride(), self.rebuilt.dtype)
            if got != self.layout:
                raise RuntimeError(
                    f"mindspeed-cp KV cache: the rebuilt K/V is laid out as {got}, the forward's as {self.layout}"
                )
        out = self.rebuilt.as_strided(size, stride, offset)
        self.views -= 1
        if self.views <= 0:
            self.rebuilt = None  # the last view holds the storage from here
        return out


class RecomputedKV:
    """Saved-tensor hooks for one Ulysses call (see the module docstring)::

    kept = RecomputedKV()
    k = kept.add(all_to_all(key), key, lambda t: all_to_all(t))   # registers the output, returns it
    with kept.hooks():
        out = local_attention(q, k, v)
    """

    def __init__(self) -> None:
        self._by_storage: Dict[int, _Kept] = {}

    def add(self, post: Tensor, pre: Tensor, rebuild: Callable[[Tensor], Tensor]) -> Tensor:
        self._by_storage[post.untyped_storage().data_ptr()] = _Kept(post, pre, rebuild)
        return post

    def _pack(self, t: Tensor):
        kept = self._by_storage.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if kept is None:
            note_saved(t)
            return t
        kept.views += 1
        return kept, tuple(t.shape), t.stride(), t.storage_offset()

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        kept, size, stride, offset = packed
        return kept.view(size, stride, offset)

    @contextlib.contextmanager
    def hooks(self) -> Iterator["RecomputedKV"]:
        if not self._by_storage:  # no policy: no hooks (they would shadow the caller's, e.g. checkpointing)
            yield self
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self
        for kept in self._by_storage.values():
            if kept.post is not None and kept.post._version != kept.post_version:
                raise RuntimeError(
                    "mindspeed-cp KV cache: the local attention modified the all-to-all's K/V in "
                    "place, so backward cannot rebuild what it saved; run without "
                    "--context-parallel-kv-cache-policy for this attention"
                )
            kept.post = None  # forget the forward's tensor: its storage is freed once the caller drops it
            if kept.views:
                note_saved(kept.pre)
            else:  # the local attention saved no view of it (e.g. it saved a copy): nothing to rebuild, keep nothing
                kept.pre = None
        self._by_storage = {}  # notes already packed keep their _Kept; no new packing after the forward
