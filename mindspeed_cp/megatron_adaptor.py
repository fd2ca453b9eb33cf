"""``import mindspeed_cp.megatron_adaptor`` applies every Megatron patch of the plugin, once.

This module is the one place that lists what the plugin replaces in Megatron (:data:`PATCHES`;
``mindspeed-cp patches`` prints it). Each entry is a dotted target, the function that builds the
replacement from the original, and why. Implementations live next to the feature they serve.

Usage (MindSpeed's convention)::

    import mindspeed_cp.megatron_adaptor as adaptor          # patches megatron.core
    adaptor.configure(context_parallel_size=4, context_parallel_algo="megatron_cp_algo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=4)
    # ... build a GPTModel as usual; its core attention now runs ring attention.
"""

from __future__ import annotations

from . import device
from .megatron import attention, batch, compat, megatron_lm, parallel_state
from .megatron.configure import configure  # noqa: F401 - documented here: mindspeed_cp.megatron_adaptor.configure
from .megatron.patching import Patch, PatchRegistry, replace, wrap

# ----------------------------------------------------------------------------- the list
PATCHES = PatchRegistry()
for _patch in (
    Patch(
        "megatron.core.parallel_state.initialize_model_parallel",
        wrap(parallel_state.initialize_model_parallel),
        "after Megatron's groups, create the Ulysses / ring / double-ring groups (and the overlap "
        "communicators) from mindspeed_cp.topology, the function `mindspeed-cp groups` draws",
    ),
    Patch(
        "megatron.core.parallel_state.destroy_model_parallel",
        wrap(parallel_state.destroy_model_parallel),
        "drop the context-parallel groups together with Megatron's (and the embedding groups' rank lists "
        "megatron-core < 0.13 leaves behind)",
        versions="all (0.12: stale embedding rank lists reset)",
    ),
    Patch(
        "megatron.core.fp8_utils.quantize_param_shard",
        wrap(compat.quantize_param_shard),
        "the distributed optimizer casts its FP8 parameters after every step; without Transformer Engine there "
        "are none, but megatron-core 0.12's fallback raises anyway (0.13 fixed it the same way)",
        when=compat.raises_without_fp8_params,
        when_doc="megatron-core's FP8 fallback raises on an empty list",
        versions="0.12 (0.13+ returns on an empty list itself)",
    ),
    # core attention swap; with CP = 1 both calls go straight to Megatron's own code
    Patch(
        "megatron.core.transformer.dot_product_attention.DotProductAttention.__init__",
        wrap(attention.core_attention_init),
        "local spec: with CP > 1 build Megatron's attention from a CP=1 copy of the config (its assert refuses "
        "CP; h/U heads under Ulysses) and attach the configured algorithm",
    ),
    Patch(
        "megatron.core.transformer.dot_product_attention.DotProductAttention.forward",
        wrap(attention.core_attention_forward),
        "local spec: run Ulysses / ring / hybrid attention around (or instead of) the local attention",
    ),
    Patch(
        "megatron.core.extensions.transformer_engine.TEDotProductAttention.__init__",
        wrap(attention.core_attention_init),
        "TE spec: as for the local spec; TE's own CP stays off (untested here: TE needs CUDA)",
        when=compat.te_available,
        when_doc="Transformer Engine importable",
    ),
    Patch(
        "megatron.core.extensions.transformer_engine.TEDotProductAttention.forward",
        wrap(attention.core_attention_forward),
        "TE spec: run the configured algorithm around (or instead of) TE's attention (untested here)",
        when=compat.te_available,
        when_doc="Transformer Engine importable",
    ),
    Patch(
        "megatron.core.transformer.multi_latent_attention.HAVE_TE",
        replace(False),
        "without Transformer Engine megatron-core stands a MagicMock in for it, so MLA's `from ...transformer_engine "
        "import TELinear` succeeds, MLA sets its HAVE_TE and its constructor raises on isinstance(linear_proj, "
        "TELinear): every MLA model fails to build. The flag says what is installed",
        when=compat.mla_sees_te_stub,
        when_doc="no Transformer Engine, MLA's HAVE_TE wrongly True",
        versions="0.14 - 0.16 (0.12 - 0.13 have no such check; 0.17+ imports HAVE_TE from the TE extension)",
    ),
    Patch(
        "megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed",
        wrap(attention.model_parallel_cuda_manual_seed),
        "also seed one attention-dropout stream per CP rank for the Ulysses level (Megatron's stream is seeded "
        "per TP rank only: every CP rank would drop the same positions of its different heads)",
    ),
    # sharding
    Patch(
        "megatron.core.utils.get_batch_on_this_cp_rank",
        wrap(batch.get_batch_on_this_cp_rank),
        "split the batch per algorithm: contiguous (Ulysses, unaligned lengths too), zigzag (ring), "
        "zigzag then contiguous (hybrid), per-document zigzag for packed documents; records the layout. In "
        "place: a name imported before the plugin would otherwise split Megatron's way",
        inplace=True,
    ),
    Patch(
        "megatron.core.utils.get_thd_batch_on_this_cp_rank",
        wrap(batch.get_thd_batch_on_this_cp_rank),
        "packed THD batches (cu_seqlens): the per-document layout of every algorithm instead of TE's "
        "(Megatron's needs TE for CP > 1), the same PackedSeqParams back; in place, as above",
        inplace=True,
        versions="0.16 - 0.17 (absent before; 0.18 removed it)",
    ),
    Patch(
        "megatron.core.transformer.multi_token_prediction.roll_tensor",
        wrap(batch.roll_tensor),
        "multi-token prediction shifts tokens, labels, loss mask and positions one position left; Megatron's CP "
        "shift assumes its zigzag (wrong at every shard boundary of Ulysses and Hybrid, and before 0.14 it did not "
        "cross ranks at all): shift by global position under every layout (one value per boundary), and count the "
        "MTP loss tokens over the CP group",
        versions="all (cp_group from 0.14, packed_seq_params from 0.16)",
    ),
    Patch(
        "megatron.core.models.common.embeddings.rope_utils.get_pos_emb_on_this_cp_rank",
        replace(batch.get_pos_emb_on_this_cp_rank),
        "RoPE positions of the tokens this rank holds, for every algorithm (Megatron's is zigzag only, and "
        "its index goes through .cuda())",
        versions="all (cp_group argument from 0.13; before, parallel_state's)",
    ),
    Patch(
        "megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb",
        wrap(batch.apply_rotary_pos_emb),
        "THD RoPE under CP: positions per document for the plugin's layout (Megatron's THD branch and TE's fused "
        "kernel assume TE's zigzag over the whole CP group, and read cu_seqlens on the host every layer)",
        versions="all (cp_group argument from 0.13; THD batches only 0.16 - 0.17)",
    ),
    Patch(
        "megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.forward",
        wrap(batch.rotary_forward),
        "RoPE's table is cached by length with this rank's slice in it; packed documents change the slice with "
        "every batch, so the cache is bypassed for them",
    ),
    Patch(
        "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding.YarnRotaryEmbedding.forward",
        wrap(batch.rotary_forward),
        "YaRN RoPE (MLA's default) caches its table the same way: bypassed for packed documents",
        versions="all (YaRN from 0.12)",
    ),
    Patch(
        "megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.get_rotary_seq_len",
        wrap(batch.get_rotary_seq_len),
        "RoPE table covers the global length when Ulysses lengths are unaligned (Megatron assumes s*CP)",
    ),
    *device.PATCHES,
    *megatron_lm.PATCHES,
):
    PATCHES.add(_patch)


def apply() -> None:
    """Apply every patch (a no-op for those already applied)."""
    PATCHES.apply_all()


def undo() -> None:
    """Restore every original (tests use this; a training job never needs it)."""
    PATCHES.undo_all()


apply()
