"""What the installed megatron-core can do, for tests of features older releases lack (docs/compatibility.md).

Each is feature detection on megatron-core itself, never a version number, so the tests follow the release the
suite runs on (``make test-compat`` runs it on 0.12 ... 0.19):

    @pytest.mark.skipif(not features.local_sliding_window(), reason=features.WHY["local_sliding_window"])
"""

from __future__ import annotations

import inspect

WHY = {
    "local_sliding_window": "this megatron-core's local DotProductAttention has no sliding window (0.15+)",
    "thd_split": "this megatron-core has no get_thd_batch_on_this_cp_rank (THD batches under CP: 0.16 - 0.17)",
    "forward_step_calc_loss": "this megatron-core has no schedules.forward_step_calc_loss (0.14+)",
}


def local_sliding_window() -> bool:
    from megatron.core.transformer import utils

    return hasattr(utils, "get_sliding_window_causal_mask")


def thd_split() -> bool:
    from megatron.core import utils

    return hasattr(utils, "get_thd_batch_on_this_cp_rank")


def vp_stage() -> bool:
    """parallel_state's stage queries and GPTModel take ``vp_stage=`` (0.13+); before, the virtual rank is
    global state (``set_virtual_pipeline_model_parallel_rank``)."""
    from megatron.core import parallel_state as ps

    return "vp_stage" in inspect.signature(ps.is_pipeline_first_stage).parameters


def glu_tp_layout() -> bool:
    """MLP's fc1 under SwiGLU is TP-partitioned with stride 2 ([gate_r; up_r] on TP rank r: 0.16+), so weights
    initialised once on the CPU and split give the same model at any TP; before, each rank's shard pairs the
    wrong halves (Megatron's own behaviour with ``use_cpu_initialization``)."""
    from megatron.core.transformer import mlp

    return "fc1_stride" in inspect.getsource(mlp.MLP.__init__)


def cp_scaled_token_loss() -> bool:
    """The schedule multiplies a ``(loss sum, token count, report)`` loss by the CP size after dividing by the
    count (megatron-core 0.12): loss functions then divide by the CP group's count (0.12's pretrain_gpt.py
    all-reduces it). From 0.13 the count is the rank's own and DDP averages over DP x CP."""
    from megatron.core.pipeline_parallel import schedules

    fn = getattr(schedules, "forward_step_calc_loss", None) or schedules.forward_step
    src = inspect.getsource(fn)
    start = src.find("output_tensor /= num_tokens")
    return start >= 0 and "get_context_parallel_world_size" in src[start : src.find("num_microbatches", start)]


def forward_step_calc_loss() -> bool:
    """The schedules compute the loss in ``forward_step_calc_loss`` (0.14+), where the plugin normalises it over
    the CP group; before, inside ``forward_step``."""
    from megatron.core.pipeline_parallel import schedules

    return hasattr(schedules, "forward_step_calc_loss")
