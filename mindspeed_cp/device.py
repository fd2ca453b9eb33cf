"""CPU (and NPU) support for megatron-core's hard-coded CUDA calls.

Filled in by the device-support work: ``PATCHES`` lists the patches that route megatron-core's CUDA-only
calls to the CPU when no accelerator exists. They are registered in ``megatron_adaptor.PATCHES``.
"""
from __future__ import annotations

import torch


def has_accelerator() -> bool:
    """True when CUDA (or Ascend NPU through torch_npu) is usable; then no device patch applies."""
    if torch.cuda.is_available():
        return True
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


PATCHES = []
