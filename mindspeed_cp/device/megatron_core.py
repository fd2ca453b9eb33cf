"""The Megatron functions torch's level cannot reach on the CPU: the RNG tracker, weight initialisation, MoE / MLA.

Everything else megatron-core does on "the device" (masks, RoPE tables, scratch buffers, TP collectives'
outputs, ``broadcast_data``, DDP buffers, optimizers, schedules) goes through :mod:`.emulation`. These
remain because their CUDA use is not a device *argument*: the tracker reads and writes the CUDA generator
objects themselves, weight placement is a choice between two initialisation paths, and the MoE all-to-all
dispatcher asks ``tensor.is_cuda`` before bringing its split sizes to the host. One more is a megatron-core
0.13 - 0.16 defect without Transformer Engine (which a CPU never has): the router's gating linear reads an
unbound ``te_general_gemm``; it applies only where the defect is there. (MLA taking Megatron's MagicMock
stand-in for TE as TE is a defect with or without an accelerator: ``megatron_adaptor``'s list.) The flex MoE
dispatcher (DeepEP / HybridEP CUDA kernels) is refused by name.

Decisions
- Weights: on the CPU "initialise on the device" *is* CPU initialisation, so ``use_cpu_initialization``
  is forced on in every config. Megatron documents CPU initialisation as independent of tensor
  parallelism: a TP=2 model starts from exactly the shards of the TP=1 weights. (GPU initialisation draws
  per-rank streams instead; its numbers could not match a GPU run anyway, CUDA's Philox generator is not
  the CPU's.)
- RNG: the CPU default generator plays the CUDA default generator (:mod:`.emulation` maps
  ``torch.cuda.manual_seed`` / ``get_rng_state`` / ``set_rng_state`` to it). Tracker states are CPU
  generator states and ``fork()`` swaps them in and out (independent streams, as on CUDA), so dropout in
  TP regions and activation recompute behave as on a GPU. ``model_parallel_cuda_manual_seed(seed)`` then
  runs unchanged: the tracker per TP / EP rank with Megatron's own seeds, the default generator with
  ``seed``.
- Sequence parallelism with the local spec needs Apex (Megatron's torch norm refuses it): not a device
  issue, left to Megatron. (So MoE with TP > 1, for which Megatron requires sequence parallelism.)
- ``tensor.is_cuda`` is not faked for Megatron (as ``Tensor.type()`` is): Megatron also asks it to choose
  Triton / fused kernels and CPU offloading, which must keep seeing the truth. The one MoE helper that means
  "is this on the device?" is patched instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from ..megatron.patching import Patch, replace, wrap
from .emulation import cpu_only as _cpu_only

_DEFAULT_RNG = "default-rng"  # Megatron's name for "no tracker state forked in"


# ----------------------------------------------------------------------------- weights
def _config_post_init(original, self, *args, **kwargs):
    """Megatron's checks, then initialise weights on the CPU (the only device there is)."""
    result = original(self, *args, **kwargs)
    self.use_cpu_initialization = True
    return result


# ----------------------------------------------------------------------------- RNG
def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    """The CPU default generator's state stands for the current CUDA generator's."""
    return torch.get_rng_state()  # already a copy: `clone` changes nothing


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on the CPU generator: a named state seeded with `seed`."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    outer = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(outer)


@contextlib.contextmanager
def _tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator: run the body on stream `name`, then restore.

    Megatron's version also warns when the CPU state changes inside the fork; here the CPU generator
    *is* the forked stream, so that check does not apply.
    """
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    outer_name = getattr(self, "_current_state_name", _DEFAULT_RNG)
    outer_state = torch.get_rng_state()
    if outer_name != _DEFAULT_RNG:  # nested fork: remember how far the outer stream got
        self.states_[outer_name] = outer_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current state name {self._current_state_name} is not the same as the desired state name {name}."
            )
        self.states_[name] = torch.get_rng_state()
        if outer_name != _DEFAULT_RNG:
            outer_state = self.states_[outer_name]
        torch.set_rng_state(outer_state)
        self._current_state_name = outer_name


# ----------------------------------------------------------------------------- MoE router without TE
_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"


@functools.lru_cache(maxsize=None)  # asked first before the patch binds the name: the release's own state
def _router_gemm_unbound() -> bool:
    """megatron-core 0.13-0.16 without Transformer Engine: the router's gating linear reads the name
    ``te_general_gemm``, which ``moe_utils`` binds only when its TE import succeeds (0.17+ binds None)."""
    try:
        moe_utils = importlib.import_module(_MOE_UTILS)
    except ImportError:
        return False
    return hasattr(moe_utils, "RouterGatingLinearFunction") and "te_general_gemm" not in vars(moe_utils)


def _to_host(original, tensor, as_numpy=False, record_stream=False):
    """``moe_utils.maybe_move_tensor_to_cpu`` with the CPU as the device: a tensor on it is a device tensor,
    so it gets the device-to-host treatment (a copy; a numpy array when asked) instead of coming back as
    it is. (Megatron tests ``tensor.is_cuda``: on the CPU the all-to-all dispatcher's split sizes stayed
    tensors, which ``all_to_all_single`` rejects.) No stream to record: the CPU is synchronous."""
    if torch.is_tensor(tensor) and tensor.device.type == "cpu":
        copy = tensor.detach().clone()
        return copy.numpy() if as_numpy else copy
    return original(tensor, as_numpy, record_stream)


def _refuse_flex(original, self, *args, **kwargs):
    raise RuntimeError(
        "mindspeed-cp: moe_token_dispatcher_type='flex' runs DeepEP's / HybridEP's CUDA kernels, which have no CPU "
        "version; with no accelerator use moe_token_dispatcher_type='alltoall' (expert parallelism > 1 too) or "
        "'allgather'"
    )


# ----------------------------------------------------------------------------- the list
def _cpu_patch(target: str, make, why: str) -> Patch:
    return Patch(target=target, make=make, why=why, when=_cpu_only, when_doc="no accelerator")


_RANDOM = "megatron.core.tensor_parallel.random"

PATCHES = [
    # weights
    _cpu_patch(
        "megatron.core.model_parallel_config.ModelParallelConfig.__post_init__",
        wrap(_config_post_init),
        "force use_cpu_initialization: Megatron's CPU initialisation draws the full weight and keeps this "
        "rank's shard (TP-independent), where GPU initialisation would draw per-TP-rank streams",
    ),
    # RNG
    _cpu_patch(
        f"{_RANDOM}._get_cuda_rng_state",
        replace(_get_rng_state),
        "the CPU default generator's state stands for the CUDA generator's (fork, recompute)",
    ),
    _cpu_patch(
        f"{_RANDOM}._set_cuda_rng_state",
        replace(_set_rng_state),
        "set the CPU default generator instead of a CUDA one (fork, activation recompute)",
    ),
    _cpu_patch(
        f"{_RANDOM}.CudaRNGStatesTracker.add",
        replace(_tracker_add),
        "named tracker states are CPU generator states (torch.cuda.get_rng_state needs CUDA)",
    ),
    _cpu_patch(
        f"{_RANDOM}.CudaRNGStatesTracker.fork",
        replace(_tracker_fork),
        "swap CPU generator states in and out (independent streams) without the CPU-state warning",
    ),
    # MoE
    _cpu_patch(
        f"{_MOE_UTILS}.maybe_move_tensor_to_cpu",
        wrap(_to_host),
        "the all-to-all token dispatcher brings its split sizes to the host as numpy arrays only when "
        "they are CUDA tensors (`tensor.is_cuda`); on the CPU they stayed tensors and all_to_all_single "
        "rejected them (EP > 1). A CPU tensor is the device's here: copied to the host the same way",
    ),
    _cpu_patch(
        "megatron.core.transformer.moe.token_dispatcher.MoEFlexTokenDispatcher.__init__",
        wrap(_refuse_flex),
        "refuse the flex dispatcher by name at model build, on every rank: DeepEP / HybridEP are CUDA "
        "kernels (Megatron would ask to install them, which cannot help on a CPU)",
    ),
    Patch(
        f"{_MOE_UTILS}.te_general_gemm",
        replace(None),
        "the MoE router's gating linear (RouterGatingLinearFunction) tests `te_general_gemm is not None`, a "
        "name moe_utils binds only when Transformer Engine imports: NameError for every moe_router_dtype. "
        "Bound to None, as 0.17 does, Megatron takes its own torch.mm path",
        when=lambda: _cpu_only() and _router_gemm_unbound(),
        when_doc="no accelerator, no Transformer Engine (te_general_gemm unbound)",
        create=True,
        versions="0.13 - 0.16 (0.12's router uses F.linear; 0.17+ binds None itself)",
    ),
]
