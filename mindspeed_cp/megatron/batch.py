"""Megatron glue: the batch split and the RoPE positions follow the active algorithm's token layout.

Three ways a batch reaches the ranks, each a patch of megatron-core's own function (listed in
``mindspeed_cp.megatron_adaptor.PATCHES``):

* ``get_batch_on_this_cp_rank`` - ``[b, S]`` batches: contiguous (Ulysses, any length), zigzag (Ring), zigzag
  then contiguous (Hybrid) from :mod:`mindspeed_cp.layout.sharding`; with ``configure(documents=...)`` the documents
  read from position resets or EOD tokens and the per-document layout of :mod:`mindspeed_cp.layout.packing`; a causal
  Ring/Hybrid batch of a length 2 x CP does not divide becomes one document padded at its end.
* ``get_thd_batch_on_this_cp_rank`` - megatron-core's packed THD batches (one ``[1, T]`` row, documents given
  by ``cu_seqlens``, or ``cu_seqlens_padded`` where the dataloader padded them): the per-document layout too,
  returning the ``PackedSeqParams`` Megatron's version returns. The model then calls core attention with 3-D
  ``[t, heads, d]`` tensors and those params; :class:`mindspeed_cp.megatron.attention.CPCoreAttention` runs them as a
  batch of one with the documents of :data:`STATE`.
* RoPE: ``get_pos_emb_on_this_cp_rank`` (``[s, b]`` batches: the original position of every token the rank
  holds) and ``apply_rotary_pos_emb`` for THD, where Megatron's own code assumes Transformer Engine's layout;
  here positions restart at every document as Megatron's THD RoPE gives them at CP=1 (or run through the
  whole packed row when its table covers it, Megatron's "exact mapping").

Each split records the batch's layout in :data:`STATE` (``seq_len``, ``documents``, ``packed``); every layer
of the following forward and backward reads it, and the next split replaces it. Reading document boundaries
(``.tolist()`` of ``position_ids`` / ``cu_seqlens``) happens here, once per micro-batch, as Megatron's own
THD split reads ``max_seqlen``; nothing per layer synchronises the device.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from ..comm import shift_left
from ..config import CPConfig, CPConfigError
from ..layout.sharding import batch_seq_len, padded_seq_len, split_batch, token_indices
from ..layout.shift import plan_shift
from .state import STATE

THD_KEEP = ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "max_seqlen")  # left as given, as Megatron does


def _new_batch() -> None:
    STATE.documents = None
    STATE.packed = None


def check_packed(packed, where: str) -> bool:
    """Is this call packed THD (``packed_seq_params``)? Its batch must be the one :func:`get_thd_batch_on_this_cp_rank`
    laid out (its documents are in STATE), and after such a batch every call must be."""
    thd = getattr(packed, "qkv_format", None) == "thd"
    if thd and packed is not STATE.packed:
        raise CPConfigError(
            f"{where}: a packed THD call (packed_seq_params) whose batch did not come from megatron.core.utils."
            f"get_thd_batch_on_this_cp_rank: under CP its documents must be laid out by it (call it on the "
            f"micro-batch and pass the params it returns to the model)"
        )
    if not thd and STATE.packed is not None:
        raise CPConfigError(
            f"{where}: the micro-batch was split by get_thd_batch_on_this_cp_rank (THD) but the model got no "
            f"packed_seq_params: pass the PackedSeqParams it returned to the model's forward"
        )
    return thd


def get_batch_on_this_cp_rank(original, batch, *args, **kwargs):
    """Split tokens / labels / loss_mask / position_ids / attention_mask for the active algorithm."""
    from megatron.core import parallel_state as ps

    # (batch, cp_group=None) up to 0.16; (batch, is_hybrid_cp, cp_group=None, ...) in 0.19: read by name
    # (0.19 requires is_hybrid_cp; a 0.16-style call without it is served the same)
    given = inspect.signature(original).bind_partial(batch, *args, **kwargs).arguments
    cp_group = given.get("cp_group")
    size = cp_group.size() if cp_group is not None else ps.get_context_parallel_world_size()
    if size == 1:
        return batch
    if given.get("is_hybrid_cp") or isinstance(batch.get("cu_seqlens"), torch.Tensor):
        raise CPConfigError(
            "get_batch_on_this_cp_rank with a packed batch (cu_seqlens) or Megatron's dynamic hybrid CP "
            "(megatron-core 0.19's per-document split): not supported by mindspeed-cp yet; packed documents: "
            "--reset-attention-mask / configure(documents=...), or get_thd_batch_on_this_cp_rank up to 0.18"
        )
    cfg = STATE.config
    if cfg.cp != size:
        raise CPConfigError(
            f"get_batch_on_this_cp_rank: CP group of {size} ranks but --context-parallel-size {cfg.cp} is configured"
        )
    rank = cp_group.rank() if cp_group is not None else ps.get_context_parallel_rank()
    seq_len = batch_seq_len(batch)
    _new_batch()
    if STATE.documents_from is not None:
        return _split_documents(batch, cfg, rank)
    padded = padded_seq_len(cfg, seq_len)
    if padded != seq_len:  # Ring/Hybrid at a length 2 x CP does not divide
        _pad_batch(batch, seq_len, padded, general=cfg.attention_mask_type == "general")
        seq_len = padded
    batch.update(split_batch(batch, cfg, rank, seq_len))
    STATE.seq_len = seq_len  # Megatron's version updates the dict in place and returns it
    return batch


def _pad_batch(batch, seq_len: int, padded: int, general: bool) -> None:
    """Pad every sequence tensor at its end to ``padded`` tokens, in place: tokens, labels, loss_mask (so pads
    never count) and position_ids 0; a ``[.., S, S]`` mask gets pad columns masked for every row and pad rows
    that see only themselves. Exact: under causal attention no real token sees a later pad, under a general
    mask none sees a masked one. A real row the mask leaves without any key is refused under a general mask:
    Megatron's local attention averages V over *all* keys there, which the pads would change."""
    n = padded - seq_len
    for key, val in list(batch.items()):
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        if key == "attention_mask":
            if general and bool(val.all(-1).any()):  # once per micro-batch, only for unaligned general masks
                raise CPConfigError(
                    f"--attention-mask-type general at --seq-length {seq_len} (padded to {padded} for the zigzag): "
                    f"a row of the mask masks every key, and its output (Megatron averages V over all keys) would "
                    f"change with the pads; use a length divisible by 2 x --context-parallel-size"
                )
            m = torch.ones(*val.shape[:-2], padded, padded, dtype=val.dtype, device=val.device)
            m[..., :seq_len, :seq_len] = val
            pads = torch.arange(seq_len, padded, device=val.device)
            m[..., pads, pads] = False
            batch[key] = m
        else:
            batch[key] = torch.cat([val, val.new_zeros((val.shape[0], n) + tuple(val.shape[2:]))], dim=1)


def _split_documents(batch, cfg: CPConfig, rank: int):
    """Packed documents: this rank's tokens of the per-document zigzag layout (:mod:`mindspeed_cp.layout.packing`), pads
    with loss_mask 0; the dense document mask a dataloader may have built is dropped (never needed)."""
    from ..layout.packing import Documents, lengths_from_eod, lengths_from_position_ids

    if STATE.documents_from == "position_ids":
        if not isinstance(batch.get("position_ids"), torch.Tensor):
            raise CPConfigError("packed documents from position_ids (--reset-position-ids): the batch has none")
        lengths = lengths_from_position_ids(batch["position_ids"])
    else:
        if STATE.eod_token is None:  # Megatron-LM: the tokenizer's EOD
            from megatron.training import get_tokenizer

            STATE.eod_token = int(get_tokenizer().eod)
        lengths = lengths_from_eod(batch["tokens"], STATE.eod_token)
    ring = cfg.ring_size if cfg.uses_zigzag else 1
    if ring > 1 and len({tuple(row) for row in lengths}) > 1:
        raise CPConfigError(
            f"packed documents under {cfg.context_parallel_algo}: the samples of a micro-batch have different "
            f"documents, so each would need its own token layout (and RoPE positions); use --micro-batch-size 1"
        )
    if "attention_mask" in batch:
        batch["attention_mask"] = None
    _lay_out(batch, Documents(lengths, cfg.cp, ring), rank, keep=("attention_mask",))
    return batch


def _lay_out(batch, docs, rank: int, keep=()) -> None:
    """This rank's tokens of every ``[b, S, ...]`` tensor of ``batch`` (in place; pads 0, loss_mask too) in the
    layout of ``docs``, which every layer of the step then reads from STATE. ``keep``: keys left as they are."""
    for key, val in list(batch.items()):
        if key not in keep and isinstance(val, torch.Tensor) and val.dim() >= 2:
            batch[key] = docs.shard(val, rank, seq_dim=1, fill=0)  # [b, S] -> [b, s_local]
    STATE.documents = docs.to(batch["tokens"].device)
    STATE.seq_len = docs.padded_len


def get_rotary_seq_len(original, self, *args, **kwargs):
    """RoPE table length: the recorded global length when Ulysses lengths are unaligned (THD: Megatron's,
    the longest document)."""
    n = original(self, *args, **kwargs)
    cfg = STATE.config
    if cfg.cp > 1 and not cfg.uses_zigzag and STATE.seq_len is not None and STATE.packed is None:
        return max(n, STATE.seq_len)
    return n


def rotary_forward(original, self, *args, **kwargs):
    """Megatron caches RoPE tables by length (``lru_cache`` on ``RotaryEmbedding.forward``), this rank's slice
    included; with packed documents (or a padded batch) the slice follows each batch's layout, so it is
    computed afresh (once per model forward, not per layer)."""
    if STATE.documents is not None:
        return getattr(original, "__wrapped__", original)(self, *args, **kwargs)
    return original(self, *args, **kwargs)


def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group=None):
    """The rotary positions of the tokens this CP rank holds (contiguous, zigzag or hybrid). ``cp_group``:
    megatron-core >= 0.13 passes it; before, the CP group of parallel_state."""
    if cp_group is None:
        from megatron.core import parallel_state as ps

        cp_group = ps.get_context_parallel_group()
    cfg = STATE.config
    size = cp_group.size()
    if cfg.cp != size:
        raise CPConfigError(f"RoPE: CP group of {size} ranks but --context-parallel-size {cfg.cp} is configured")
    check_packed(None, "RoPE")
    seq = pos_emb.shape[seq_dim]
    docs = STATE.documents
    if docs is not None:  # the original positions of this rank's tokens (pads: 0); one layout per micro-batch
        idx = docs.source.gather(1, docs.positions(cp_group.rank()).to(docs.source.device))[0].clamp(min=0)
        return pos_emb.index_select(seq_dim, idx.to(pos_emb.device))
    if STATE.seq_len is not None:
        if not cfg.uses_zigzag:
            seq = STATE.seq_len
    elif not STATE.warned_unsplit:
        STATE.warned_unsplit = True
        warnings.warn(
            f"mindspeed-cp: RoPE runs before any batch went through the patched get_batch_on_this_cp_rank; "
            f"positions assume this rank holds the tokens of {cfg.context_parallel_algo}'s layout "
            f"(mindspeed_cp.layout.sharding.token_indices). Import mindspeed_cp.megatron_adaptor before binding "
            f"Megatron's get_batch_on_this_cp_rank.",
            stacklevel=2,
        )
    idx = token_indices(cfg, cp_group.rank(), seq).to(pos_emb.device)
    return pos_emb.index_select(seq_dim, idx)


# ------------------------------------------------------------------------------------ MTP shift
def roll_tensor(original, tensor, *args, **kwargs):
    """megatron-core's multi-token-prediction shift ``roll_tensor(tensor, shifts=-1, dims=-1, cp_group=None,
    packed_seq_params=None)`` (``cp_group`` from 0.14, ``packed_seq_params`` from 0.16) under the active layout:
    by global position (:mod:`mindspeed_cp.layout.shift`), stopping at document ends for THD batches as Megatron does on
    one device. Returns Megatron's pair (shifted tensor, its sum); under CP the sum is the CP group's total / CP:
    the count Megatron divides the MTP loss by, so that its average over the DP x CP ranks is the one-device mean
    whatever each rank holds (Megatron's own is each rank's count: exact only for equal counts)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    given = inspect.signature(original).bind(tensor, *args, **kwargs).arguments
    group = given.get("cp_group")
    if group is None and STATE.groups_built and STATE.config.cp > 1:
        group = ps.get_context_parallel_group()  # megatron-core < 0.14 passes none: it shifted locally
    if group is None or group.size() == 1:
        return original(tensor, *args, **kwargs)
    shifts, dims = given.get("shifts", -1), given.get("dims", -1)
    if shifts != -1:
        raise CPConfigError(
            f"roll_tensor(shifts={shifts}) under context parallelism: only the one-position shift "
            f"of multi-token prediction (shifts=-1) is laid out"
        )
    within = check_packed(given.get("packed_seq_params"), "multi-token prediction")
    rolled = shift_left(tensor, dims, _shift_plan(group.rank(), tensor.shape[dims], within), group)
    count = rolled.sum()
    dist.all_reduce(count, group=group)
    return rolled, count / group.size()


def _shift_plan(rank: int, s_local: int, within_documents: bool):
    docs = STATE.documents
    if docs is not None:
        return docs.shift_plan(rank, within_documents)
    cfg = STATE.config
    return _layout_shift_plan(cfg, rank, STATE.seq_len if STATE.seq_len is not None else s_local * cfg.cp)


@functools.lru_cache(maxsize=64)
def _layout_shift_plan(cfg: CPConfig, rank: int, seq_len: int):
    return plan_shift([token_indices(cfg, q, seq_len) for q in range(cfg.cp)], rank, seq_len)


# ------------------------------------------------------------------------------------ the layout as runs
def batch_layout(cfg: CPConfig, s_local: int):
    """Every CP rank's tokens of the current batch as runs (:func:`mindspeed_cp.layout.window.layout_runs`): what a
    windowed layer running over the whole CP group plans its halo from. Cached per layout, never per layer."""
    from ..window_ring import documents_layout

    docs = STATE.documents
    if docs is not None:
        return documents_layout(docs, ring=False)
    return _token_layout(cfg, STATE.seq_len if STATE.seq_len is not None else s_local * cfg.cp)


@functools.lru_cache(maxsize=64)
def _token_layout(cfg: CPConfig, seq_len: int):
    from ..layout.window import layout_runs

    return layout_runs([token_indices(cfg, q, seq_len) for q in range(cfg.cp)])


# ------------------------------------------------------------------------------------ THD
def get_thd_batch_on_this_cp_rank(original, batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs):
    """A packed THD batch -> this rank's tokens of the per-document layout, and the ``PackedSeqParams``.

    ``batch``: ``[1, T]`` tensors (one packed row: THD has no batch dimension); ``cu_seqlens`` the cumulative
    document lengths, ``cu_seqlens_padded`` (optional) the same where the dataloader padded every document (its
    pads sit at each document's end and, like the layout's own pads, are never seen by a real token; keep them
    out of the loss, as Megatron's SFT dataset does). ``max_seqlen`` ``[1]``: the longest document (RoPE's
    table length). The params returned are Megatron's: global ``cu_seqlens``, ``max_seqlen`` as an int.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from ..layout.packing import Documents, lengths_from_cu_seqlens

    cp_size = kwargs.get("cp_size", args[0] if args else None)
    cp_rank = kwargs.get("cp_rank", args[1] if len(args) > 1 else None)
    size = ps.get_context_parallel_world_size() if cp_size is None else cp_size
    if size == 1:
        return original(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, *args, **kwargs)
    cfg = STATE.config
    if cfg.cp != size:
        raise CPConfigError(
            f"get_thd_batch_on_this_cp_rank: CP size {size} but --context-parallel-size {cfg.cp} is configured"
        )
    rank = ps.get_context_parallel_rank() if cp_rank is None else cp_rank
    _new_batch()
    tokens = batch.get("tokens")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != 1:
        raise CPConfigError(
            f"THD batch: tokens must be one packed row [1, T] (--micro-batch-size 1), got "
            f"{None if tokens is None else tuple(tokens.shape)}"
        )
    T = tokens.shape[1]
    if cu_seqlens is None or max_seqlen is None:
        raise CPConfigError("THD batch: cu_seqlens and max_seqlen are required")
    real = lengths_from_cu_seqlens(cu_seqlens.reshape(-1).tolist())  # once per micro-batch
    segments = real if cu_seqlens_padded is None else lengths_from_cu_seqlens(cu_seqlens_padded.reshape(-1).tolist())
    if sum(segments) != T:
        name = "cu_seqlens" if cu_seqlens_padded is None else "cu_seqlens_padded"
        raise CPConfigError(f"THD batch: {name} covers {sum(segments)} tokens but the packed row has {T}")
    if cu_seqlens_padded is not None and (len(real) != len(segments) or any(r > p for r, p in zip(real, segments))):
        raise CPConfigError(f"THD batch: cu_seqlens {real} (lengths) do not fit cu_seqlens_padded {segments}")
    longest = int(max_seqlen.reshape(-1)[0])
    if max(real) > longest:
        raise CPConfigError(
            f"THD batch: max_seqlen {longest} is shorter than a document of {max(real)} tokens "
            f"(RoPE's table would not cover it)"
        )
    _lay_out(batch, Documents([segments], cfg.cp, cfg.ring_size if cfg.uses_zigzag else 1), rank, keep=THD_KEEP)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens_padded,
        cu_seqlens_kv_padded=cu_seqlens_padded,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    STATE.packed = params
    return batch, params


def apply_rotary_pos_emb(original, t, freqs, config, *args, **kwargs):
    """RoPE of a THD batch split by :func:`get_thd_batch_on_this_cp_rank`: ``t`` ``[t, h, d]``, ``freqs``
    ``[n, 1, 1, d]``. Every other call is Megatron's (its THD branch and TE's fused one assume TE's layout).
    Megatron's signature ``(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None)``; ``mscale`` and
    ``cp_group`` are absent before megatron-core 0.13/0.14, so they are read only when given."""
    docs = STATE.documents
    cu_seqlens = kwargs.get("cu_seqlens", args[0] if args else None)
    if cu_seqlens is None or STATE.packed is None or docs is None:
        return original(t, freqs, config, *args, **kwargs)
    mscale = kwargs.get("mscale", args[1] if len(args) > 1 else 1.0)
    cp_group = kwargs.get("cp_group", args[2] if len(args) > 2 else None)
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    rank = (cp_group if cp_group is not None else ps.get_context_parallel_group()).rank()
    idx = docs.rope_index(rank, freqs.shape[0])
    return _apply_rotary_pos_emb_bshd(
        t.unsqueeze(1),
        freqs.index_select(0, idx),
        mscale=mscale,
        rotary_interleaved=config.rotary_interleaved,
        multi_latent_attention=config.multi_latent_attention,
    ).squeeze(1)
