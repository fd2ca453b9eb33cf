"""Megatron glue: the core attention runs the configured CP algorithm (batches and RoPE:
:mod:`mindspeed_cp.megatron.batch`).

Megatron's local-spec ``DotProductAttention`` refuses CP (it asserts ``context_parallel_size == 1``). With CP
active, the patched constructor builds it as a CP=1 *local* attention and attaches a :class:`CPCoreAttention`
that the patched ``forward`` hands the call to:

* ``ulysses_cp_algo``: ``UlyssesContextAttention`` around Megatron's own attention, which now sees the full
  sequence and ``heads / (TP*CP)`` heads (its per-partition head counts are set for that);
* ``megatron_cp_algo``: ring attention (zigzag causal or general mask) over the ring group;
* ``hybrid_cp_algo``: Ulysses over the Ulysses group around ring attention over the ring group;
* ``kvallgather_cp_algo``: all-gather K/V attention over the all-gather group (the CP group).

Process groups come from :data:`mindspeed_cp.megatron.state.STATE`, looked up once per module at construction. A
packed THD call (``packed_seq_params``, q/k/v ``[t, heads, d]``) runs as a batch of one with the documents its
batch split recorded there.

Attention dropout under Ulysses: Megatron draws it from the model-parallel RNG stream, seeded per *TP* rank
only, so every CP rank would draw the same masks for its different heads (global heads j and j + h/CP always
equal). ``model_parallel_cuda_manual_seed`` therefore also adds one stream per CP rank
(:data:`ULYSSES_RNG`, seed ``seed + 2718 + tp_rank + 1_000_003 * (cp_rank + 1)``: deterministic, distinct from
Megatron's own seeds), and the local attention runs with that stream in the place Megatron draws from: the
model-parallel slot of the tracker (or, with sequence parallelism, where Megatron uses the default generator,
a fork of it). It lives in the tracker, so activation recompute (full and selective) replays it exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..config import HYBRID, KVALLGATHER, RING, ULYSSES, CPConfig, CPConfigError
from ..hybrid import gather_mask_rows, hybrid_attention_with
from ..kvallgather import kvallgather_attention_with
from ..layout.window import layout_positions
from ..local import local_attention
from ..options import CallInputs, KVAllGatherOptions, RingOptions, UlyssesOptions
from ..ring import ring_attention_with
from ..ulysses import GatherSizeCalculator, UlyssesContextAttention
from ..window_ring import window_ring_attention_with
from .batch import batch_layout, check_packed
from .state import STATE


class _StateGatherSize(GatherSizeCalculator):
    """Ulysses gather size for Megatron: the batch length recorded by ``get_batch_on_this_cp_rank``.

    None (aligned) when no batch was split through it. The all-to-all re-checks the value against every
    rank's local length, so a stale or wrong value is an error on every rank.
    """

    def __init__(self, s_local: int = 0, cp: int = 1) -> None:
        self.s_local, self.cp = s_local, cp

    def calculate(self, attention_mask=None, *args, **kwargs) -> Optional[int]:
        # The mask rides along to the local attention (its rows gathered after the all-to-all); a wrong
        # one raised here is agreed like any bad input, naming the rank, before the first all-to-all.
        seq = STATE.seq_len if STATE.seq_len is not None else self.s_local * self.cp
        if isinstance(attention_mask, torch.Tensor) and self.s_local:
            shape = list(attention_mask.shape)
            if len(shape) != 4 or shape[2] not in (self.s_local, seq) or shape[3] != seq:
                raise ValueError(
                    f"attention_mask {shape} does not fit this rank's {self.s_local} tokens of a "
                    f"{seq}-token sequence: expected [b|1, 1, {self.s_local}|{seq}, {seq}]"
                )
        return STATE.seq_len


def _unsupported(module, cfg: CPConfig) -> Optional[str]:
    """What of this attention's semantics the plugin's kernels cannot compute, or None."""
    from megatron.core.transformer.enums import AttnMaskType

    if (
        cfg.attention_mask_type == "causal"
        and getattr(module, "attn_mask_type", AttnMaskType.causal) != AttnMaskType.causal
    ):
        return (
            f"attn_mask_type={module.attn_mask_type.name} with --attention-mask-type causal (the CP algorithms "
            f"compute causal attention, or the explicit mask of --attention-mask-type general)"
        )
    return None


def _megatron_only(module, cfg: CPConfig) -> Optional[str]:
    """Why Ulysses must run this module's own attention instead of the plugin's kernels, or None; raises where
    the ring level (which has no such fallback) would compute something else than the module."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    why = _unsupported(module, cfg)
    problem = cfg.feature_problem(getattr(module.config, "softmax_type", "vanilla"), layer_window(module))
    if problem is not None:
        raise CPConfigError(problem)
    if cfg.context_parallel_algo != ULYSSES:
        if why is not None:  # attn_mask_type: no fallback either
            problem = (
                f"--context-parallel-algo {cfg.context_parallel_algo} cannot compute {why}: use "
                f"ulysses_cp_algo, which runs Megatron's own attention for it"
            )
        if problem is not None:
            raise CPConfigError(problem)
        return None
    if why is None and not isinstance(module, DotProductAttention):
        why = f"{type(module).__name__} is not Megatron's local DotProductAttention (its own kernels run)"
    return why


def layer_window(module):
    """The sliding window of this attention layer (Megatron's ``window_size`` where ``--window-attn-skip-freq``
    leaves the layer windowed), or None."""
    softmax = getattr(module, "scale_mask_softmax", None)
    if softmax is not None and hasattr(softmax, "window_size"):
        return softmax.window_size  # the local spec: Megatron decided it per layer
    config = module.config
    window = getattr(config, "window_size", None)
    if window is None:
        return None
    try:
        from megatron.core.transformer.utils import is_layer_window_attention
    except ImportError:  # releases without the skip pattern: every layer is windowed
        return window
    windowed = is_layer_window_attention(window, getattr(config, "window_attn_skip_freq", None), module.layer_number)
    return window if windowed else None


_TOLD: set = set()


def _tell_once(reason: str) -> None:
    if reason not in _TOLD:
        _TOLD.add(reason)
        warnings.warn(
            f"mindspeed-cp: Ulysses runs Megatron's own local attention here (S x S scores in memory) "
            f"because of {reason}; the plugin's kernels cover vanilla causal / masked attention",
            stacklevel=3,
        )


@dataclass
class CPCoreAttention:
    """Runs one attention layer under the active CP algorithm (attached to a ``DotProductAttention``).

    Every algorithm computes with :mod:`mindspeed_cp.kernels` (Ulysses through :mod:`mindspeed_cp.local` on the
    whole sequence after its all-to-all), attention dropout included (:mod:`mindspeed_cp.dropout`, seeded from
    Megatron's model-parallel RNG stream), and fully masked rows as the replaced attention gives them
    (``dead_rows``: Megatron's local spec averages V, TE's attention returns 0). Under Ulysses, Megatron's own
    local attention runs only where the kernels cannot follow it (``megatron_only``, said once). The levels'
    options are built once per module (:class:`mindspeed_cp.options.RingOptions`, ``UlyssesOptions``); each call
    brings its own inputs (mask, documents, dropout).
    """

    config: CPConfig
    softmax_scale: float
    ring: RingOptions = RingOptions()
    ulysses: UlyssesOptions = UlyssesOptions()
    kvallgather: KVAllGatherOptions = KVAllGatherOptions()
    megatron_only: Optional[str] = None
    ulysses_group: Any = None
    ring_group: Any = None
    gather_group: Any = None  # kvallgather_cp_algo's all-gather group
    agree_group: Any = None  # where every call agrees on its inputs (CPU metadata): STATE.agree_group
    algo: str = ULYSSES  # this layer's algorithm (--window-attn-cp-algo for a windowed one)
    window_size: Any = None  # this layer's sliding window, or None
    softmax_type: str = "vanilla"  # off-by-one / learnable: sinks (the module's softmax_offset)
    cp_group: Any = None  # the whole CP group: a windowed layer's algorithm other than the configured one

    @property
    def kv_cache_policy(self) -> Optional[str]:
        """This layer's KV-cache policy (--context-parallel-cache-interval picks the layers)."""
        if self.config.context_parallel_algo == KVALLGATHER:
            return self.kvallgather.kv_cache_policy
        return self.ulysses.kv_cache_policy if self.config.ulysses_size > 1 else self.ring.kv_cache_policy

    @property
    def dead_rows(self) -> str:
        return self.ring.dead_rows

    @classmethod
    def for_module(cls, module, cfg: CPConfig) -> "CPCoreAttention":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        policy = cfg.kv_cache_policy(getattr(module, "layer_number", 1) or 1)
        dead = "uniform" if isinstance(module, DotProductAttention) else "zero"
        window = layer_window(module)
        algo = cfg.layer_algo(window is not None)
        if algo != cfg.context_parallel_algo:
            from megatron.core import parallel_state

            groups_cp = dict(cp_group=parallel_state.get_context_parallel_group())
        else:
            groups_cp = {}
        groups, ring = {}, RingOptions(dead_rows=dead, kv_cache_policy=policy)
        if cfg.ulysses_size > 1:
            groups["ulysses_group"] = STATE.group("ulysses")
        if cfg.context_parallel_algo == KVALLGATHER:
            groups["gather_group"] = STATE.group("allgather")
        elif cfg.ring_size > 1:
            groups["ring_group"] = STATE.group("ring")
            ring = RingOptions(
                bnsd=cfg.megatron_cp_in_bnsd,
                dead_rows=dead,
                kv_cache_policy=policy,
                overlap_group=STATE.overlap_group("ring") if cfg.use_cp_send_recv_overlap else None,
                window=STATE.double_ring_window(),
            )
        scale = getattr(module, "softmax_scale", None) or module.config.kv_channels**-0.5
        # apply_query_key_layer_scaling divides Megatron's softmax_scale by the layer number and its softmax
        # multiplies it back: the effective scale is the product
        scale *= getattr(getattr(module, "scale_mask_softmax", None), "scale", None) or 1.0
        return cls(
            config=cfg,
            softmax_scale=scale,
            ring=ring,
            ulysses=UlyssesOptions(kv_cache_policy=policy, allgather_kv=cfg.use_ulysses_allgather_kv),
            kvallgather=KVAllGatherOptions(overlap=cfg.cp_allgather_overlap, dead_rows=dead, kv_cache_policy=policy),
            megatron_only=_megatron_only(module, cfg),
            agree_group=STATE.agree_group,
            algo=algo,
            window_size=None if window is None else tuple(window),
            softmax_type=getattr(module.config, "softmax_type", "vanilla") or "vanilla",
            **groups,
            **groups_cp,
        )

    def _mask(self, attention_mask):
        """(causal, mask): the explicit mask only under ``--attention-mask-type general``."""
        if self.config.attention_mask_type != "general":
            return True, None
        if attention_mask is None:
            raise CPConfigError(
                "--attention-mask-type general needs an attention_mask in the batch "
                "([b, 1, S, S] bool, True = masked); got None"
            )
        return False, attention_mask

    @staticmethod
    def _documents():
        """The packed documents of the current batch (None unless ``configure(documents=...)``)."""
        if STATE.documents_from is None:
            return STATE.documents  # None, or a THD batch's documents
        if STATE.documents is None:
            raise CPConfigError(
                "packed documents (--reset-attention-mask / configure(documents=...)): no batch went "
                "through get_batch_on_this_cp_rank, so the document boundaries are unknown"
            )
        return STATE.documents

    def _inputs(self, attention_mask, dropout) -> CallInputs:
        """This call's inputs: the batch's documents, else the mask of ``--attention-mask-type``."""
        docs = self._documents()
        causal, mask = (True, None) if docs is not None else self._mask(attention_mask)
        return CallInputs(
            causal=causal, attention_mask=mask, softmax_scale=self.softmax_scale, dropout=dropout, documents=docs
        )

    @staticmethod
    def _dropout(module, query):
        """This call's attention dropout (None when not training or p = 0); its seed is drawn from Megatron's
        model-parallel RNG stream, so recompute replays it and the CP ranks of a group agree on it."""
        p = module.config.attention_dropout
        if not module.training or not p:
            return None
        import torch
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        from ..dropout import AttentionDropout

        with get_cuda_rng_tracker().fork():
            seed = torch.randint(-(1 << 62), 1 << 62, (), dtype=torch.int64, device=query.device)
        return AttentionDropout(p, seed, torch.arange(query.shape[2], device=query.device))

    def __call__(self, module, local_forward, query, key, value, attention_mask, *args, **kwargs):
        cfg = self.config
        thd = check_packed(kwargs.get("packed_seq_params", args[2] if len(args) > 2 else None), "attention")
        if thd:  # a batch of one: [t, np, hn] -> [t, 1, np, hn]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        s_local, b = query.shape[0], query.shape[1]
        algo = cfg.context_parallel_algo
        if algo == ULYSSES and self.megatron_only is not None:
            if STATE.documents_from is not None or thd:
                raise CPConfigError(
                    f"packed documents under ulysses_cp_algo need the plugin's kernels, which cannot "
                    f"follow this attention ({self.megatron_only})"
                )
            _tell_once(self.megatron_only)
            return self._ulysses_megatron(module, local_forward, query, key, value, attention_mask, *args, **kwargs)
        inputs = self._inputs(attention_mask, self._dropout(module, query))
        inputs = inputs.replace(window_size=self.window_size, softmax_offset=self._sink(module, query))
        if self.algo != algo:  # a windowed layer under its own algorithm, over the whole CP group
            out = self._other_algorithm(query, key, value, inputs)
        elif algo == RING:  # [s/cp, b, n, d] -> [s/cp, b, n, d]
            out = ring_attention_with(
                query, key, value, self.ring_group, inputs, self.ring, agree_group=self.agree_group
            )
        elif algo == KVALLGATHER:  # [s/cp, b, n, d] -> [s/cp, b, n, d]
            out = kvallgather_attention_with(
                query, key, value, self.gather_group, inputs, self.kvallgather, agree_group=self.agree_group
            )
        elif algo == HYBRID:
            out = hybrid_attention_with(
                query,
                key,
                value,
                self.ulysses_group,
                self.ring_group,
                inputs,
                self.ulysses,
                self.ring,
                agree_group=self.agree_group,
                gather=self.kvallgather if cfg.hybrid_outer_cp_algo == KVALLGATHER else None,
            )
        else:
            assert algo == ULYSSES
            out = self._ulysses(query, key, value, inputs)  # [s/cp, b, h, d]
        return out.reshape(s_local, b, -1)

    def _sink(self, module, query):
        """This call's sink logits ``[h/TP]`` (None for vanilla softmax): the learnable parameter (whole on every CP
        rank, :func:`_full_softmax_offset`), or zeros for off-by-one."""
        if self.softmax_type == "learnable":
            return module.softmax_offset
        if self.softmax_type == "off-by-one":
            zeros = getattr(self, "_zeros", None)
            if zeros is None or zeros.shape[0] != query.shape[2] or zeros.device != query.device:
                zeros = self._zeros = torch.zeros(query.shape[2], device=query.device)
            return zeros
        return None

    def _ulysses(self, query, key, value, inputs: CallInputs, group=None, positions=None):
        """Ulysses around the plugin's kernels on the whole sequence (``group``: default the Ulysses group;
        ``positions``: the gathered sequence's global positions when the layout is not contiguous)."""
        allgather_kv = self.ulysses.allgather_kv and group is None  # (the CP group: a layer's own algorithm)
        group = self.ulysses_group if group is None else group
        s_local = query.shape[0]
        seq = STATE.seq_len if STATE.seq_len is not None else s_local * self.config.cp
        rank = group.rank()

        def local(q, k, v, mask_rows):
            # the whole sequence, h/(tp*cp) heads: [S, b, h', d] -> [S, b, h', d]
            drop, sink = inputs.dropout, inputs.softmax_offset
            return local_attention(
                q,
                k,
                v,
                causal=inputs.causal,
                softmax_scale=inputs.softmax_scale,
                attention_mask=gather_mask_rows(mask_rows, group, seq),
                dropout=None if drop is None else drop.for_rank(rank, q.shape[2]),
                dead_rows=self.dead_rows,
                documents=inputs.documents,
                window_size=inputs.window_size,
                softmax_offset=None if sink is None else sink.narrow(0, rank * q.shape[2], q.shape[2]),
                positions=positions,
            )

        ulysses = self._ulysses_module(local, s_local, group, allgather_kv)
        return ulysses(query, key, value, inputs.attention_mask)

    def _ulysses_module(self, local, s_local: int, group=None, allgather_kv=None) -> UlyssesContextAttention:
        return UlyssesContextAttention(
            local,
            self.ulysses_group if group is None else group,
            agree_group=self.agree_group,
            gather_size_calculator=_StateGatherSize(s_local, self.config.cp),
            kv_cache_policy=self.ulysses.kv_cache_policy,
            allgather_kv=self.ulysses.allgather_kv if allgather_kv is None else allgather_kv,
        )

    def _other_algorithm(self, query, key, value, inputs: CallInputs):
        """A windowed layer whose ``--window-attn-cp-algo`` differs from the batch's algorithm: over the whole CP
        group, on the layout the batch has (every CP rank's positions)."""
        layout = batch_layout(self.config, query.shape[0])
        if self.algo in (RING, KVALLGATHER):  # a windowed layer's all-gather is the halo exchange
            options = RingOptions(kv_cache_policy=self.kv_cache_policy)
            return window_ring_attention_with(
                query, key, value, self.cp_group, inputs, options, layout, agree_group=self.agree_group
            )
        assert self.algo == ULYSSES
        positions = None if inputs.documents is not None else layout_positions(layout)
        return self._ulysses(query, key, value, inputs, self.cp_group, positions)

    def _ulysses_megatron(self, module, local_forward, query, key, value, attention_mask, *args, **kwargs):
        """Ulysses around Megatron's own attention (which then sees the full sequence and h/(TP*CP) heads)."""
        s_local, b = query.shape[0], query.shape[1]
        seq = STATE.seq_len if STATE.seq_len is not None else s_local * self.config.cp

        def local(q, k, v, mask, *a, **kw):
            # Megatron's attention on the full sequence, h/(tp*cp) heads: [S, b, h', d] -> [S, b, h'*d]
            with ulysses_dropout_stream(module):
                return local_forward(q, k, v, gather_mask_rows(mask, self.ulysses_group, seq), *a, **kw)

        out = self._ulysses_module(local, s_local)(query, key, value, attention_mask, *args, **kwargs)  # [s/cp, b, h*d]
        return out.reshape(s_local, b, -1)


# ------------------------------------------------------------------------------------ dropout RNG
ULYSSES_RNG = "mindspeed-cp-ulysses-rng"
_CP_SEED_STRIDE = 1_000_003  # larger than any of Megatron's own seed offsets (2718 + tp, 1024 + 100 ep + etp)


def model_parallel_cuda_manual_seed(original, seed, *args, **kwargs):
    """Megatron's seeding, then the Ulysses level's per-CP-rank dropout stream (see the module docstring)."""
    result = original(seed, *args, **kwargs)
    if STATE.groups_built and STATE.config.ulysses_size > 1:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        bound = inspect.signature(original).bind(seed, *args, **kwargs).arguments
        tp_rank = bound.get("tp_rank")
        tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
        cp_rank = STATE.group("ulysses").rank()
        get_cuda_rng_tracker().add(ULYSSES_RNG, seed + 2718 + tp_rank + _CP_SEED_STRIDE * (cp_rank + 1))
    return result


@contextlib.contextmanager
def ulysses_dropout_stream(module):
    """Run Megatron's local attention with this CP rank's dropout stream where Megatron draws from."""
    if not (module.training and module.config.attention_dropout > 0):
        yield
        return
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    if ULYSSES_RNG not in states:
        raise CPConfigError(
            f"--attention-dropout {module.config.attention_dropout} with {STATE.config.context_parallel_algo}: "
            f"each CP rank needs its own dropout stream; call model_parallel_cuda_manual_seed(seed) after "
            f"parallel_state.initialize_model_parallel (Megatron-LM does)"
        )
    if module.config.sequence_parallel:  # Megatron draws from the default generator here
        with tracker.fork(ULYSSES_RNG):
            yield
        return
    mp = "model-parallel-rng"

    def swapped(current):
        return {**current, mp: current[ULYSSES_RNG], ULYSSES_RNG: current[mp]}

    tracker.set_states(swapped(states))
    try:
        yield
    finally:
        tracker.set_states(swapped(tracker.get_states()))


# ------------------------------------------------------------------------------------ patches
def _active_cp_config(transformer_config) -> Optional[CPConfig]:
    """The CP config a module built with ``transformer_config`` must run, or None for CP = 1."""
    cp = getattr(transformer_config, "context_parallel_size", 1) or 1
    cfg = STATE.config
    if cp == 1:
        if STATE.groups_built and cfg.cp > 1:
            # the attention would see only this rank's tokens: a silently wrong model (Megatron-Bridge #2665)
            raise CPConfigError(
                f"TransformerConfig.context_parallel_size=1 while parallel_state was initialized with "
                f"--context-parallel-size {cfg.cp}: set context_parallel_size={cfg.cp} in the model config"
            )
        return None
    if not STATE.groups_built or cfg.cp != cp:
        raise CPConfigError(
            f"TransformerConfig.context_parallel_size={cp} but mindspeed-cp's groups are "
            f"{'not built' if not STATE.groups_built else f'for --context-parallel-size {cfg.cp}'}: call "
            f"mindspeed_cp.megatron_adaptor.configure(...) and parallel_state.initialize_model_parallel("
            f"context_parallel_size={cp}) before building the model"
        )
    return cfg


def local_attention_config(config, cfg: CPConfig):
    """The TransformerConfig Megatron's attention is built from under CP: CP = 1 (its own CP stays off) and,
    under a Ulysses level of U ranks, the heads one rank sees after the all-to-all: h/U query heads and
    max(kv/(TP*U), 1) KV heads per TP rank (fewer KV heads than ranks are replicated). A learnable softmax offset
    is not initialised there: :func:`_full_softmax_offset` makes the whole one, as at CP = 1."""
    import dataclasses

    tp, u = config.tensor_model_parallel_size, cfg.ulysses_size
    heads, kv = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    changes = dict(context_parallel_size=1)
    if u > 1:
        changes.update(
            num_attention_heads=heads // u, num_query_groups=max(kv // (tp * u), 1) * tp, kv_channels=config.kv_channels
        )
        if getattr(config, "softmax_type", "vanilla") == "learnable":
            changes.update(perform_initialization=False)
    return dataclasses.replace(config, **changes)


class _HeadSlice(torch.nn.Module):
    """Megatron's softmax, handed this Ulysses rank's heads of the whole softmax offset (``[h/TP]``, the
    parameter a CP = 1 checkpoint holds) instead of an offset of its own heads only. No state of its own."""

    def __init__(self, softmax: torch.nn.Module, start: int, count: int) -> None:
        super().__init__()
        self.softmax, self.start, self.count = softmax, start, count

    def forward(self, scores, mask, softmax_offset=None):
        if softmax_offset is not None:
            softmax_offset = softmax_offset.narrow(0, self.start, self.count)
        return self.softmax(scores, mask, softmax_offset)


def _full_softmax_offset(module, config, cfg: CPConfig) -> None:
    """Under a Ulysses level Megatron's attention sees h/U heads, and would keep a learnable offset (gpt-oss's
    sinks) of h/U heads: a CP = 1 checkpoint would not load, and the DP x CP gradient reduction would add up the
    gradients of different heads. Keep the whole ``[h/TP]`` offset on every CP rank (made and initialised as
    Megatron does at CP = 1, drawing the same random numbers) and hand each rank's softmax its heads' slice: the
    gradient of a slice reaches its heads only, so the reduction over DP x CP sums each head's gradient once.
    (``off-by-one`` offsets are zeros, not parameters: Megatron's own of h/U heads is right.)"""
    if (
        cfg.ulysses_size == 1
        or getattr(config, "softmax_type", "vanilla") != "learnable"
        or not hasattr(module, "scale_mask_softmax")
    ):  # TE's attention keeps its own (untested here)
        return
    heads = config.num_attention_heads // config.tensor_model_parallel_size
    module.softmax_offset = torch.nn.Parameter(
        torch.empty(heads, device=torch.cuda.current_device(), dtype=config.params_dtype)
    )
    if config.perform_initialization:
        module.softmax_offset = config.init_method(module.softmax_offset)
    local = module.num_attention_heads_per_partition
    module.scale_mask_softmax = _HeadSlice(module.scale_mask_softmax, STATE.group("ulysses").rank() * local, local)


def _pop_head_sizes(original, kwargs: dict):
    """``(k_channels, v_channels)`` given to a core attention whose constructor does not take them (Megatron's local
    ``DotProductAttention``; MLA's local spec passes them, TE's attention takes them), removed from ``kwargs``."""
    if "k_channels" not in kwargs and "v_channels" not in kwargs:
        return None
    if "k_channels" in inspect.signature(original).parameters:
        return None
    return kwargs.pop("k_channels", None), kwargs.pop("v_channels", None)


def _set_head_sizes(module, channels, scale_given: bool) -> None:
    """Megatron's local attention with MLA's head sizes: scores over ``k_channels``, output ``v_channels`` per head
    (it assumes ``kv_channels`` for both). The default softmax scale is then ``k_channels ** -0.5``."""
    k_channels, v_channels = channels
    if k_channels is not None:
        module.hidden_size_per_attention_head = k_channels
        if not scale_given:
            module.softmax_scale = k_channels**-0.5 / (
                module.layer_number if module.config.apply_query_key_layer_scaling else 1
            )
    if v_channels is not None:
        module.hidden_size_per_partition = v_channels * module.num_attention_heads_per_partition


def core_attention_init(original, self, config, *args, **kwargs):
    """Build Megatron's core attention (local or TE) as the local attention, then attach the CP algorithm.

    Megatron's local attention also takes MLA's ``k_channels`` / ``v_channels`` here (the local MLA spec passes
    them; without this it does not build, CP or not)."""
    channels = _pop_head_sizes(original, kwargs)
    scale_given = inspect.signature(original).bind(self, config, *args, **kwargs).arguments.get("softmax_scale")
    cfg = _active_cp_config(config)
    if cfg is not None:
        cfg.validate(
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups,
            num_layers=getattr(config, "num_layers", None),
        )
    original(self, config if cfg is None else local_attention_config(config, cfg), *args, **kwargs)
    if channels is not None:
        _set_head_sizes(self, channels, scale_given is not None)
    if cfg is not None:
        self._mindspeed_cp = CPCoreAttention.for_module(self, cfg)
        _full_softmax_offset(self, config, cfg)


def core_attention_forward(original, self, query, key, value, attention_mask, *args, **kwargs):
    runner = getattr(self, "_mindspeed_cp", None)
    if runner is None:
        return original(self, query, key, value, attention_mask, *args, **kwargs)
    local_forward = lambda *a, **kw: original(self, *a, **kw)  # noqa: E731
    return runner(self, local_forward, query, key, value, attention_mask, *args, **kwargs)
