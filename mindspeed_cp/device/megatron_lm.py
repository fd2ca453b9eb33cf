"""Megatron-LM's training loop without an accelerator: its start-up decisions, on the CPU.

Megatron-LM (``megatron.training``) builds its parallel groups, seeds its RNG tracker and warms its fusions up only
when CUDA devices exist, asks nvcc for the CUDA version and asserts CUDA before parsing its arguments; its flags
select CUDA-only kernels and NCCL. Each entry of :data:`PATCHES` answers one of those (listed by ``mindspeed-cp
patches``; skipped with an accelerator or without Megatron-LM), and :func:`cpu_args` switches the kernel flags
off in ``validate_args``.
"""

from __future__ import annotations

import inspect
from typing import Any, List

from ..megatron.patching import Patch, replace, wrap
from .emulation import cpu_only

# What cannot run without an accelerator, whatever the script says: (attribute, CPU value, the flag).
_CPU_ARGS = (
    ("gradient_accumulation_fusion", False, "--no-gradient-accumulation-fusion"),  # Apex / TE CUDA extension
    ("no_persist_layer_norm", True, "--no-persist-layer-norm"),  # Apex's persistent LayerNorm kernel
    ("apply_rope_fusion", False, "--no-rope-fusion"),  # Transformer Engine's fused RoPE kernel
    ("distributed_backend", "gloo", "--distributed-backend gloo"),  # NCCL needs GPUs
)


def cpu_args(args: Any) -> List[str]:
    """On a machine without an accelerator, switch off what needs one (CUDA-only kernels, NCCL) and say so
    once; returns the flags that were changed. Numerics are unchanged: these select kernels, not math."""
    changed = []
    for attr, value, flag in _CPU_ARGS:
        if hasattr(args, attr) and getattr(args, attr) != value:
            setattr(args, attr, value)
            changed.append(flag)
    if changed and getattr(args, "rank", 0) == 0:
        print(
            f"mindspeed-cp: no accelerator, running as if given {' '.join(changed)} (CUDA-only kernels, NCCL)",
            flush=True,
        )
    return changed


# ----------------------------------------------------------------------------- CPU (no accelerator)
def _no_device_arch():
    """No CUDA device: architecture 0 (Megatron then still asks for CUDA_DEVICE_MAX_CONNECTIONS=1)."""
    return 0


def _initialize_megatron_cpu(original, *args, **kwargs):
    """initialize_megatron asserts torch.cuda.is_available() unless allow_no_cuda; without an accelerator
    the argument parsing (and --help) must still work."""
    kwargs["allow_no_cuda"] = True
    return original(*args, **kwargs)


def _initialize_distributed_cpu(original, *args, **kwargs):
    """Megatron-LM creates its model-parallel groups only when torch.cuda.device_count() > 0 (and, from 0.19,
    unless the caller passes ``skip_model_parallel_init``: then it builds them itself)."""
    result = original(*args, **kwargs)
    from megatron.core import parallel_state as ps
    from megatron.training import get_args

    if kwargs.get("skip_model_parallel_init") or (len(args) > 3 and args[3]):
        return result
    if not ps.model_parallel_is_initialized():
        a = get_args()
        gloo = getattr(a, "enable_gloo_process_groups", getattr(a, "use_gloo_process_groups", True))  # 0.19 name
        wanted = dict(
            tensor_model_parallel_size=a.tensor_model_parallel_size,
            pipeline_model_parallel_size=a.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=a.virtual_pipeline_model_parallel_size,
            context_parallel_size=a.context_parallel_size,
            expert_model_parallel_size=a.expert_model_parallel_size,
            expert_tensor_parallel_size=a.expert_tensor_parallel_size,
            distributed_timeout_minutes=a.distributed_timeout_minutes,
            order="tp-cp-ep-dp-pp" if not getattr(a, "use_tp_pp_dp_mapping", False) else "tp-cp-ep-pp-dp",
            get_embedding_ranks=kwargs.get("get_embedding_ranks", args[0] if args else None),
            get_position_embedding_ranks=kwargs.get("get_position_embedding_ranks", args[1] if len(args) > 1 else None),
            create_gloo_process_groups=gloo,
        )
        params = inspect.signature(ps.initialize_model_parallel).parameters
        ps.initialize_model_parallel(**{k: v for k, v in wanted.items() if k in params})
    return result


def _set_random_seed_cpu(original, seed_, data_parallel_random_init=False, *args, **kwargs):
    """Megatron-LM seeds the model-parallel RNG tracker only when torch.cuda.device_count() > 0."""
    result = original(seed_, data_parallel_random_init, *args, **kwargs)
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if torch.cuda.device_count() == 0:
        seed = seed_ + 100 * ps.get_pipeline_model_parallel_rank()
        if data_parallel_random_init:
            seed += 10 * ps.get_data_parallel_rank()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return result


def _no_fused_kernels(args):
    """megatron.legacy.fused_kernels.load runs `$CUDA_HOME/bin/nvcc -V`; there is nothing to build on a CPU."""
    return None


def _no_jit_warmup(*args, **kwargs):
    """_warmup_jit_function runs the fused bias-GeLU / dropout-add kernels on device=\"cuda\" tensors (0.19 passes
    ``tp_size``)."""
    return None


_INIT = "megatron.training.initialize.initialize_megatron"

PATCHES: List[Patch] = [
    Patch(
        "megatron.training.utils.get_device_arch_version",
        replace(_no_device_arch),
        "validate_args asks the CUDA device's architecture for the CUDA_DEVICE_MAX_CONNECTIONS rule",
        when=cpu_only,
        when_doc="no accelerator",
    ),
    Patch(
        "megatron.training.initialize._initialize_distributed",
        wrap(_initialize_distributed_cpu),
        "Megatron-LM builds its parallel groups only when CUDA devices exist: build them on the CPU too",
        when=cpu_only,
        when_doc="no accelerator",
    ),
    Patch(
        "megatron.training.initialize._set_random_seed",
        wrap(_set_random_seed_cpu),
        "Megatron-LM seeds the model-parallel RNG tracker only when CUDA devices exist: seed it on the CPU",
        when=cpu_only,
        when_doc="no accelerator",
    ),
    Patch(
        "megatron.legacy.fused_kernels.load",
        replace(_no_fused_kernels),
        "start-up asks nvcc for the CUDA version (no CUDA_HOME on a CPU machine); no kernels to build",
        when=cpu_only,
        when_doc="no accelerator",
    ),
    Patch(
        "megatron.training.initialize._warmup_jit_function",
        replace(_no_jit_warmup),
        'start-up warms the JIT fusions up on device="cuda" tensors; nothing to warm up on a CPU',
        when=cpu_only,
        when_doc="no accelerator",
    ),
    Patch(
        _INIT,
        wrap(_initialize_megatron_cpu),
        "initialize_megatron asserts CUDA before parsing arguments: allow_no_cuda so parsing works",
        when=cpu_only,
        when_doc="no accelerator",
    ),
]
