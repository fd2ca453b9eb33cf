"""CPU support for megatron-core's hard-coded CUDA calls (users debug CP configs without a GPU).

megatron-core allocates on ``torch.cuda.current_device()``, seeds ``torch.cuda``'s generator and builds
masks with ``device="cuda"`` on its training path. Without an accelerator (no CUDA, no ``torch_npu``)
the patches below route exactly those calls to the CPU, so a CP configuration runs on a laptop or in CI
with gloo ranks. Nothing pretends that CUDA exists: ``torch.cuda`` is left alone and each patch replaces
one Megatron function (listed in ``megatron_adaptor.PATCHES``, each with its reason). With an
accelerator none of them applies. Import ``mindspeed_cp.megatron_adaptor`` before building configs and
models (MindSpeed's convention).

Decisions
- Weights: on the CPU "initialise on the device" *is* CPU initialisation, so ``use_cpu_initialization``
  is forced on in every config (one patch instead of one per layer class: Column/RowParallelLinear,
  VocabParallelEmbedding, RoPE, ... all allocate inline on ``torch.cuda.current_device()`` otherwise).
  Megatron documents CPU initialisation as independent of tensor parallelism: a TP=2 model starts from
  exactly the shards of the TP=1 weights. (GPU initialisation draws per-rank streams instead; its numbers
  could not match a GPU run anyway, CUDA's Philox generator is not the CPU's.)
- RNG: the CPU default generator plays the CUDA default generator. Tracker states are CPU generator
  states, ``fork()`` swaps them in and out (independent streams, as on CUDA), and
  ``model_parallel_cuda_manual_seed(seed)`` seeds the tracker per TP / EP rank with Megatron's own
  seeds and the default generator with the data-parallel seed (``seed``).
- Covered: GPTModel-style forward/backward with the local spec (TP, GQA, dropout, RoPE, sliding window,
  activation recompute incl. distribute_saved_activations), Megatron's TP / sequence-parallel
  collectives and ``broadcast_data``; train with ``torch.optim``. No ``torch.cuda.synchronize``, stream
  or event is on that path.
- Not covered (each allocates inline on "cuda" inside a large function; routing it would mean copying
  Megatron's code): Megatron's DDP buffers and ``get_megatron_optimizer`` (clip_grads, grad scaler),
  the pipeline schedules (``forward_backward_no_pipelining`` counts tokens on "cuda") and P2P, shared
  embeddings across pipeline stages, MoE, inference buffers, CUDA graphs, Transformer Engine, fused and
  Triton kernels, yarn / multimodal RoPE, RoPE of versions without ``RotaryEmbedding.get_emb``. Sequence
  parallelism with the local spec needs Apex (Megatron's torch norm refuses it), not a device issue.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import math

import torch
import torch.distributed as dist

from .patching import Patch, replace, wrap


def has_accelerator() -> bool:
    """True when CUDA (or Ascend NPU through torch_npu) is usable; then no device patch applies."""
    if torch.cuda.is_available():
        return True
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def _cpu_only() -> bool:
    return not has_accelerator()


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
            raise Exception(f"current state name {self._current_state_name} is not the same as the "
                            f"desired state name {name}.")
        self.states_[name] = torch.get_rng_state()
        if outer_name != _DEFAULT_RNG:
            outer_state = self.states_[outer_name]
        torch.set_rng_state(outer_state)
        self._current_state_name = outer_name


def _model_parallel_manual_seed(original, seed, *args, **kwargs):
    """Megatron seeds the tracker (per TP / EP rank) and the default CUDA generator with the
    data-parallel seed (= `seed`); on the CPU the default generator is the CPU one."""
    result = original(seed, *args, **kwargs)
    torch.manual_seed(seed)
    return result


# ----------------------------------------------------------------------------- tensors on "the device"
def _rope_get_emb(self, max_seq_len, offset=0):
    """RotaryEmbedding.get_emb without moving inv_freq to torch.cuda.current_device()."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
    if self.rotary_interleaved:  # f0 f0 f1 f1 ...
        emb = torch.stack((freqs, freqs), dim=-1).reshape(freqs.shape[0], -1)
    else:  # f0 f1 ... f0 f1 ...
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]  # [s, 1, 1, dim]


def _default_causal_mask(sq):
    """True above the diagonal (masked), on the CPU."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _sliding_window_causal_mask(sq, skv, window_size):
    """True outside the band [skv-sq-left, skv-sq+right] around the diagonal, on the CPU."""
    keep = torch.ones(sq, skv, dtype=torch.bool)
    keep = keep.triu(diagonal=skv - sq - window_size[0]).tril(diagonal=skv - sq + window_size[1])
    return ~keep


def _buffer_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """GlobalMemoryBuffer.get_tensor with its buffers on the CPU."""
    numel = math.prod(tensor_shape)
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < numel:
        with (mem_alloc_context or contextlib.nullcontext)():
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(*tensor_shape)


def _rope_init(original, self, *args, **kwargs):
    """RotaryEmbedding.__init__ with use_cpu_initialization=True: inv_freq is computed on the CPU
    instead of torch.cuda.current_device() (GPTModel passes the forced config value anyway)."""
    if "use_cpu_initialization" in inspect.signature(original).parameters:
        kwargs["use_cpu_initialization"] = True
    return original(self, *args, **kwargs)


# ----------------------------------------------------------------------------- TP collectives
# Megatron allocates their outputs on torch.cuda.current_device(); here on the input's device.
def _tp_group(group):
    if group is None:  # older signatures defaulted to the tensor-parallel group
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


def _output_buffer(shape, like, use_global_buffer):
    if use_global_buffer:
        from megatron.core.parallel_state import get_global_memory_buffer

        return get_global_memory_buffer().get_tensor(list(shape), like.dtype, "mpu")
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _gather_along_last_dim(input_, group=None):
    group = _tp_group(group)
    n = group.size()
    if n == 1:
        return input_
    out = torch.empty((n * input_.shape[0], *input_.shape[1:]), dtype=input_.dtype, device=input_.device)
    dist.all_gather_into_tensor(out, input_.contiguous(), group=group)  # [n*s, .., h/n]
    return torch.cat(out.chunk(n, dim=0), dim=-1).contiguous()  # [s, .., h]


def _gather_along_first_dim(input_, group=None, output_split_sizes=None, use_global_buffer=False):
    group = _tp_group(group)
    n = group.size()
    if n == 1:
        return input_
    rows = n * input_.shape[0] if output_split_sizes is None else sum(output_split_sizes)
    out = _output_buffer((rows, *input_.shape[1:]), input_, use_global_buffer)  # [rows, ..]
    if output_split_sizes is None:
        dist.all_gather_into_tensor(out, input_.contiguous(), group=group)
    else:
        dist.all_gather(list(out.split(output_split_sizes, dim=0)), input_.contiguous(), group=group)
    return out


def _reduce_scatter_along_first_dim(input_, group=None, input_split_sizes=None, use_global_buffer=False):
    group = _tp_group(group)
    n = group.size()
    if n == 1:
        return input_
    if input_split_sizes is None:
        if input_.shape[0] % n:
            raise ValueError(f"first dimension {input_.shape[0]} of the tensor should be divisible by "
                             f"tensor parallel size {n}")
        out = _output_buffer((input_.shape[0] // n, *input_.shape[1:]), input_, use_global_buffer)
        dist.reduce_scatter_tensor(out, input_.contiguous(), group=group)
    else:
        parts = list(input_.split(input_split_sizes, dim=0))
        out = _output_buffer(parts[group.rank()].shape, input_, use_global_buffer)
        dist.reduce_scatter(out, [p.contiguous() for p in parts], group=group)
    return out


def _split_1d_equal_chunks(original, tensor, new_buffer=False, *args, **kwargs):
    """split_tensor_into_1d_equal_chunks: a CPU copy of this rank's chunk instead of a CUDA buffer."""
    chunk = original(tensor, False, *args, **kwargs)  # a view of this rank's chunk
    return chunk.clone() if new_buffer else chunk


def _gather_split_1d_tensor(tensor, tp_group=None):
    """gather_split_1d_tensor with the gathered buffer on the tensor's device."""
    group = _tp_group(tp_group)
    out = torch.empty(tensor.numel() * group.size(), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


def _broadcast_data(keys, data, datatype, tp_group=None):
    """tensor_parallel.broadcast_data with its size and data buffers on the CPU: TP rank 0's tensors
    `data[key]` (all of `datatype`) reach every rank of the TP group."""
    from megatron.core.tensor_parallel import data as tp_data

    group = _tp_group(tp_group)
    src = dist.get_process_group_ranks(group)[0]
    first = group.rank() == 0
    shapes = torch.zeros(len(keys), tp_data._MAX_DATA_DIM, dtype=torch.long)  # zero-padded sizes
    if first:
        tp_data._check_data_types(keys, data, datatype)
        for i, key in enumerate(keys):
            if data[key].dim() >= tp_data._MAX_DATA_DIM:
                raise ValueError(f"broadcast_data: {key!r} has {data[key].dim()} dims, "
                                 f"at most {tp_data._MAX_DATA_DIM - 1} supported")
            shapes[i, :data[key].dim()] = torch.tensor(data[key].shape)
    dist.broadcast(shapes, src, group=group)
    sizes = [list(itertools.takewhile(lambda n: n > 0, row.tolist())) for row in shapes]
    numels = [math.prod(size) for size in sizes]
    if first:
        flat = torch.cat([data[key].contiguous().view(-1) for key in keys])
    else:
        flat = torch.empty(sum(numels), dtype=datatype)
    dist.broadcast(flat, src, group=group)
    return {key: part.view(size) for key, part, size in zip(keys, flat.split(numels), sizes)}


# ----------------------------------------------------------------------------- the list
def _cpu_patch(target: str, make, why: str) -> Patch:
    return Patch(target=target, make=make, why=why, when=_cpu_only, when_doc="no accelerator")


_RANDOM = "megatron.core.tensor_parallel.random"
_ROPE = "megatron.core.models.common.embeddings"
_TP = "megatron.core.tensor_parallel"

PATCHES = [
    # weights
    _cpu_patch("megatron.core.model_parallel_config.ModelParallelConfig.__post_init__",
               wrap(_config_post_init),
               "force use_cpu_initialization: layers would allocate weights on torch.cuda.current_device(); "
               "CPU init is Megatron's TP-independent path"),
    # RNG
    _cpu_patch(f"{_RANDOM}._get_cuda_rng_state", replace(_get_rng_state),
               "the CPU default generator's state stands for the CUDA generator's (fork, recompute)"),
    _cpu_patch(f"{_RANDOM}._set_cuda_rng_state", replace(_set_rng_state),
               "set the CPU default generator instead of a CUDA one (fork, activation recompute)"),
    _cpu_patch(f"{_RANDOM}.CudaRNGStatesTracker.add", replace(_tracker_add),
               "named tracker states are CPU generator states (torch.cuda.get_rng_state needs CUDA)"),
    _cpu_patch(f"{_RANDOM}.CudaRNGStatesTracker.fork", replace(_tracker_fork),
               "swap CPU generator states in and out (independent streams) without the CPU-state warning"),
    _cpu_patch(f"{_RANDOM}.model_parallel_cuda_manual_seed", wrap(_model_parallel_manual_seed),
               "the data-parallel seed seeds the CPU default generator (torch.cuda.manual_seed is a no-op)"),
    # tensors Megatron puts on torch.cuda.current_device() / "cuda"
    _cpu_patch(f"{_ROPE}.rotary_pos_embedding.RotaryEmbedding.__init__", wrap(_rope_init),
               "inv_freq computed on the CPU when built directly (default use_cpu_initialization=False)"),
    _cpu_patch(f"{_ROPE}.rotary_pos_embedding.RotaryEmbedding.get_emb", replace(_rope_get_emb),
               "RoPE frequencies stay on the CPU (moved to torch.cuda.current_device() on first use)"),
    # rope_utils.get_pos_emb_on_this_cp_rank: replaced for every device by mindspeed_cp.attention
    _cpu_patch("megatron.core.transformer.utils.get_default_causal_mask", replace(_default_causal_mask),
               "causal mask built on the CPU (device=\"cuda\")"),
    _cpu_patch("megatron.core.transformer.utils.get_sliding_window_causal_mask",
               replace(_sliding_window_causal_mask),
               "sliding-window mask built on the CPU (device=\"cuda\")"),
    _cpu_patch("megatron.core.utils.GlobalMemoryBuffer.get_tensor", replace(_buffer_get_tensor),
               "shared scratch buffers (sequence-parallel collectives) allocated on the CPU"),
    # TP collectives and helpers
    _cpu_patch(f"{_TP}.mappings._gather_along_last_dim", replace(_gather_along_last_dim),
               "all-gather output (gather_output, parallel_output=False logits) allocated on the CPU"),
    _cpu_patch(f"{_TP}.mappings._gather_along_first_dim", replace(_gather_along_first_dim),
               "sequence-parallel all-gather output allocated on the CPU"),
    _cpu_patch(f"{_TP}.mappings._reduce_scatter_along_first_dim", replace(_reduce_scatter_along_first_dim),
               "sequence-parallel reduce-scatter output allocated on the CPU"),
    _cpu_patch(f"{_TP}.utils.split_tensor_into_1d_equal_chunks", wrap(_split_1d_equal_chunks),
               "distribute_saved_activations: the kept chunk is copied on the CPU, not into a CUDA buffer"),
    _cpu_patch(f"{_TP}.utils.gather_split_1d_tensor", replace(_gather_split_1d_tensor),
               "distribute_saved_activations: gathered activations on the CPU"),
    _cpu_patch(f"{_TP}.data.broadcast_data", replace(_broadcast_data),
               "TP rank 0's batch broadcast through CPU buffers (sizes and data were put on CUDA)"),
]
