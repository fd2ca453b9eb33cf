"""CPU support: Megatron (megatron-core and Megatron-LM's training loop) on a machine without an accelerator.

Users debug a context-parallel configuration on a laptop or in CI with gloo ranks before spending GPU hours.
Two parts, both listed by ``mindspeed-cp patches`` and both skipped when an accelerator exists:

- :mod:`.emulation` - torch's level, version-independent: a CUDA device means the CPU in every torch call,
  ``torch.cuda``'s stream / event / synchronise / RNG entry points take their CPU meaning, gloo sends keep
  their storage until done. This is what lets Megatron-LM's ``pretrain`` loop (DDP, optimizers, timers,
  schedules, checkpoints) run unmodified.
- :mod:`.megatron_core` - the few Megatron functions torch's level cannot reach: the RNG tracker's named
  states on the CPU generator, CPU weight initialisation (TP-independent), the MoE all-to-all dispatcher's
  host copies, and megatron-core's MoE router without Transformer Engine.
- :mod:`.megatron_lm` - Megatron-LM's start-up decisions (groups, seeding, fusions, argument checks) that it
  makes only when CUDA devices exist, and its CUDA-only kernel flags.
"""

from __future__ import annotations

from . import emulation, megatron_core, megatron_lm
from .emulation import cpu_only, has_accelerator, is_cuda_device

PATCHES = [*emulation.PATCHES, *megatron_core.PATCHES, *megatron_lm.PATCHES]

__all__ = ["PATCHES", "cpu_only", "has_accelerator", "is_cuda_device", "emulation", "megatron_core", "megatron_lm"]
