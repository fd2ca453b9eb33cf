"""The CPU plays "the CUDA device" when the machine has no accelerator: one layer at torch's level.

Megatron (megatron-core and Megatron-LM's training loop) is written for one accelerator per rank. It puts
tensors on ``device="cuda"`` / ``torch.cuda.current_device()`` / a bare index, calls ``.cuda()``,
synchronises, opens side streams, records events, checks ``tensor.type() == "torch.cuda.FloatTensor"`` and
saves the CUDA generator's state - at about 80 places in 0.16.1, moving between versions. Without an
accelerator each one raises "Torch not compiled with CUDA enabled". Rather than one patch per Megatron
function (copying Megatron's code, and a new list per version), this layer answers where all of those calls
go through, torch itself:

1. :class:`CpuDeviceMode`, a ``TorchFunctionMode`` entered once on the main thread, sees every torch function
   and Tensor method call. A CUDA device in ``device=`` (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, a
   bare ``int``), in ``Tensor.to(...)`` and ``.cuda()`` means the CPU; ``torch.device(N)`` is ``cuda:N`` (torch
   would look for an accelerator); ``pin_memory=True`` and
   ``Tensor.pin_memory()`` pin nothing (pinning needs an accelerator); ``Tensor.type()`` *asked by Megatron
   code* names the CUDA type (``torch.cuda.FloatTensor``) because Megatron's optimizers compare that string.
2. ``torch.cuda`` entry points that mean nothing without a device take their CPU meaning
   (:data:`PATCHES`): ``current_device()`` is 0, ``set_device`` / ``synchronize`` do nothing (the CPU is
   synchronous), ``Stream`` / ``stream`` / ``current_stream`` / ``default_stream`` / ``set_stream`` are one
   null stream whose waits are no-ops, ``Event`` records host time (``elapsed_time`` in ms), the CUDA
   generator's state is the CPU default generator's (``get_rng_state`` / ``set_rng_state``: checkpoints and
   Megatron's rerun state machine save and restore it; ``manual_seed`` seeds it).
3. Gloo sends keep their storage alive until they complete: Megatron's pipeline schedules free an output
   tensor (``out.data = torch.empty(1)``) right after posting its asynchronous send; on CUDA the caching
   allocator keeps that memory valid for the stream, on the CPU gloo would go on reading freed memory
   (wrong activations on the next stage, then NaN - seen with the interleaved schedule).

Decisions
- ``torch.cuda.is_available()`` stays False and ``torch.cuda.device_count()`` stays 0: code that asks gets
  the truth, and every other library keeps its CPU path. Nothing here applies when an accelerator exists
  (``has_accelerator()``: CUDA, or an Ascend NPU through ``torch_npu``).
- The mode is thread-local (torch's rule): it is entered on the thread that imports the adaptor, where
  Megatron's training loop runs; CPU autograd runs backward on the calling thread. A thread Megatron starts
  itself (none on the training path in 0.12-0.19) would see the plain CPU torch.
- Memory statistics (``torch.cuda.memory_allocated`` ...) keep the CPU build's answer, 0: the CPU has no
  device allocator to report on. ``empty_cache`` already does nothing without CUDA.
- Not emulated: CUDA graphs, ``torch.cuda.MemPool`` / UVM, NVTX ranges, the CUDA profiler, NCCL-only
  options (user buffers, SHARP), fused / Triton / Transformer Engine kernels. Their flags stay off on CPU.
- Cost: one Python call per torch op (about 2 us on this machine); nothing when an accelerator exists.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from ..megatron.patching import Hook, Patch, replace, wrap


def has_accelerator() -> bool:
    """True when CUDA (or Ascend NPU through torch_npu) is usable; then nothing of the CPU support applies."""
    if torch.cuda.is_available():
        return True
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def cpu_only() -> bool:
    return not has_accelerator()


# ----------------------------------------------------------------------------- what was routed, where
TRACE_ENV = "MINDSPEED_CP_DEVICE_TRACE"
# (file, line, what) -> calls; only with $MINDSPEED_CP_DEVICE_TRACE=PREFIX (written to PREFIX.<pid>.json at exit)
_TRACE: Optional[Dict[Tuple[str, int, str], int]] = {} if os.environ.get(TRACE_ENV) else None


def _note(what: str, depth: int) -> None:
    """Count one redirected call at its caller's file:line (``depth`` frames above the caller of _note)."""
    if _TRACE is None:
        return
    frame = sys._getframe(depth + 1)
    key = (frame.f_code.co_filename, frame.f_lineno, what)
    _TRACE[key] = _TRACE.get(key, 0) + 1


def traced_sites() -> List[dict]:
    """The calls routed so far: ``[{file, line, what, calls}]`` (empty unless tracing)."""
    return [dict(file=f, line=n, what=w, calls=c) for (f, n, w), c in sorted((_TRACE or {}).items())]


def _write_trace() -> None:
    with open(f"{os.environ[TRACE_ENV]}.{os.getpid()}.json", "w", encoding="utf-8") as f:
        json.dump(traced_sites(), f)


if _TRACE is not None:
    atexit.register(_write_trace)


# ----------------------------------------------------------------------------- 1. device arguments
_CPU = torch.device("cpu")


def is_cuda_device(device: Any) -> bool:
    """Does this ``device`` argument name a CUDA device? (A bare int does: torch reads it as ``cuda:N``.)"""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, int) and not isinstance(device, bool)


# Tensor methods with a device meaning; called as impl(func, args, kwargs) from the mode (caller: 2 frames up).
def _tensor_cuda(func, args, kwargs):
    """``t.cuda(...)``: already on "the device"."""
    _note("Tensor.cuda()", 2)
    return args[0]


def _tensor_to(func, args, kwargs):
    """``t.to("cuda" | 0 | torch.device("cuda"), ...)``: the device part means the CPU."""
    if len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)) and is_cuda_device(args[1]):
        _note("Tensor.to(cuda)", 2)
        args = (args[0], _CPU, *args[2:])
    return func(*args, **kwargs)


def _tensor_pin_memory(func, args, kwargs):
    _note("Tensor.pin_memory()", 2)
    return args[0]


def _tensor_type(func, args, kwargs):
    """``t.type()`` asked by Megatron: the CUDA name of the type (Megatron's optimizers check the string)."""
    result = func(*args, **kwargs)
    if (
        len(args) == 1
        and not kwargs
        and result.startswith("torch.")
        and not result.startswith("torch.cuda.")
        and sys._getframe(2).f_globals.get("__name__", "").startswith("megatron.")
    ):
        _note("Tensor.type() == 'torch.cuda.*'", 2)
        return "torch.cuda." + result[len("torch.") :]
    return result


def _device_index(func, args, kwargs):
    """``torch.device(N)``: torch reads a bare index as the current accelerator's and raises without one
    (YaRN RoPE: ``with torch.device(torch.cuda.current_device())``). It is CUDA device N, as with a GPU;
    used as a device it then means the CPU like every other CUDA device."""
    if len(args) == 1 and not kwargs and isinstance(args[0], int) and not isinstance(args[0], bool):
        _note("torch.device(index)", 2)
        return func("cuda", args[0])
    return func(*args, **kwargs)


_METHODS: Dict[Callable, Callable] = {
    torch.device: _device_index,
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.to: _tensor_to,
    torch.Tensor.pin_memory: _tensor_pin_memory,
    torch.Tensor.type: _tensor_type,
}


class CpuDeviceMode(TorchFunctionMode):
    """Every torch call: a CUDA device means the CPU (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            device = kwargs.get("device")
            if device is not None and is_cuda_device(device):
                _note(f"{getattr(func, '__name__', func)}(device=cuda)", 1)
                kwargs = {**kwargs, "device": _CPU}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
        else:
            kwargs = {}
        method = _METHODS.get(func)
        if method is not None:
            return method(func, args, kwargs)
        return func(*args, **kwargs)


_ACTIVE: List[CpuDeviceMode] = []  # the mode entered by the Hook below (at most one)


def _enter_mode() -> Callable[[], None]:
    mode = CpuDeviceMode()
    mode.__enter__()
    _ACTIVE.append(mode)

    def leave() -> None:
        _ACTIVE.remove(mode)
        mode.__exit__(None, None, None)

    return leave


def _backward_under_mode(original, *args, **kwargs):
    """``Tensor.backward`` / ``torch.autograd.backward`` / ``grad`` are torch functions themselves, so torch
    calls them with the mode popped (a mode's handler never sees its own nested calls); the autograd engine
    would then run custom backward code - Megatron's activation recompute re-running forward - without it.
    The engine entry runs under the mode again."""
    if not _ACTIVE or _ACTIVE[0] in torch.overrides._get_current_function_mode_stack():
        return original(*args, **kwargs)
    with _ACTIVE[0]:
        return original(*args, **kwargs)


# ----------------------------------------------------------------------------- 2. torch.cuda on the CPU
class NullStream:
    """The one stream of a synchronous device: waiting on it, or making it wait, has nothing to do."""

    device = _CPU
    cuda_stream = 0

    def __init__(self, device=None, priority=0, **kwargs):
        _note("torch.cuda.Stream", 1)

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> "HostEvent":
        event = event if event is not None else HostEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other) -> bool:
        return isinstance(other, NullStream)

    def __hash__(self) -> int:
        return hash(NullStream)


_STREAM = object.__new__(NullStream)


class HostEvent:
    """``torch.cuda.Event`` on a synchronous device: ``record`` notes the host time, ``elapsed_time`` is in ms."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        _note("torch.cuda.Event", 1)
        self._time = None

    def record(self, stream=None) -> None:
        self._time = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "HostEvent") -> float:
        if self._time is None or end_event._time is None:
            raise RuntimeError("elapsed_time: both events must have been recorded")
        return (end_event._time - self._time) * 1000.0


def _current_device() -> int:
    return 0


def _set_device(device) -> None:
    pass


def _synchronize(device=None) -> None:
    pass


def _stream(stream=None):
    return contextlib.nullcontext(stream)


def _current_stream(device=None) -> NullStream:
    return _STREAM


def _set_stream(stream) -> None:
    pass


def _cuda_get_rng_state(device="cuda") -> torch.Tensor:
    """The CPU default generator stands for the current CUDA generator."""
    return torch.get_rng_state()


def _cuda_set_rng_state(new_state, device="cuda") -> None:
    torch.set_rng_state(new_state)


def _cuda_manual_seed(seed) -> None:
    torch.default_generator.manual_seed(int(seed))  # not torch.manual_seed: that calls manual_seed_all


# ----------------------------------------------------------------------------- 3. gloo sends
# (work, alias) for every asynchronous send still in flight; `alias` shares the sent storage, so a
# caller that swaps the tensor's data (`out.data = torch.empty(1)`) does not free what gloo still reads.
_IN_FLIGHT: List[Tuple[Any, torch.Tensor]] = []


def _hold_until_sent(work, tensor: torch.Tensor) -> None:
    _IN_FLIGHT[:] = [(w, t) for w, t in _IN_FLIGHT if not w.is_completed()]
    if work is not None and not work.is_completed():
        _IN_FLIGHT.append((work, tensor.detach()))


def _isend(original, tensor, *args, **kwargs):
    work = original(tensor, *args, **kwargs)
    _hold_until_sent(work, tensor)
    return work


def in_flight_sends() -> int:
    """How many sent storages are held (a test's view of the gloo-send guard)."""
    _hold_until_sent(None, torch.empty(0))
    return len(_IN_FLIGHT)


# ----------------------------------------------------------------------------- the list
def _traced(name: str, impl: Callable) -> Callable:
    if isinstance(impl, type):  # classes note their construction themselves
        return impl

    @functools.wraps(impl)
    def call(*args, **kwargs):
        _note(f"torch.cuda.{name}", 1)
        return impl(*args, **kwargs)

    return call


def _cuda(name: str, impl: Any, why: str) -> Patch:
    return Patch(f"torch.cuda.{name}", replace(_traced(name, impl)), why, when=cpu_only, when_doc="no accelerator")


PATCHES = [
    Hook(
        "torch (TorchFunctionMode: mindspeed_cp.device.emulation.CpuDeviceMode)",
        _enter_mode,
        'every torch call: a CUDA device ("cuda", "cuda:N", an index, .cuda(), .to("cuda")) means the CPU, '
        "torch.device(N) is cuda:N (torch would look for an accelerator), "
        "pin_memory pins nothing, Megatron's tensor.type() checks see the CUDA type name",
        when=cpu_only,
        when_doc="no accelerator",
    ),
    Patch(
        "torch.autograd.graph._engine_run_backward",
        wrap(_backward_under_mode),
        "backward (and the activation recompute inside it) runs under the device mode: torch calls "
        "Tensor.backward with the mode popped",
        when=cpu_only,
        when_doc="no accelerator",
    ),
    _cuda("current_device", _current_device, "the one device is index 0 (Megatron passes it as device=)"),
    _cuda("set_device", _set_device, "there is one device: nothing to select"),
    _cuda("synchronize", _synchronize, "the CPU is synchronous (Megatron's timers synchronise around every phase)"),
    _cuda("Stream", NullStream, "side streams (DDP wrapping, gradient-reduce overlap) are the one null stream"),
    _cuda("stream", _stream, "`with torch.cuda.stream(s)` runs the body as it is"),
    _cuda("current_stream", _current_stream, "the null stream (callers make it wait on others: a no-op)"),
    _cuda("default_stream", _current_stream, "the null stream"),
    _cuda("set_stream", _set_stream, "nothing to set on a synchronous device"),
    _cuda("Event", HostEvent, "events record host time; elapsed_time in ms"),
    _cuda(
        "get_rng_state",
        _cuda_get_rng_state,
        "the CPU default generator's state stands for the CUDA generator's (checkpoints, rerun state machine)",
    ),
    _cuda("set_rng_state", _cuda_set_rng_state, "restore the CPU default generator (checkpoint load, rerun)"),
    _cuda(
        "manual_seed",
        _cuda_manual_seed,
        "seed the CPU default generator (Megatron seeds the default CUDA generator with the data-parallel seed)",
    ),
    Patch(
        "torch.distributed.distributed_c10d.isend",
        wrap(_isend),
        "an asynchronous send keeps its storage alive until it completes: Megatron's pipeline schedules free "
        "the sent output right after posting (safe with CUDA's caching allocator, not with gloo on the CPU)",
        when=cpu_only,
        when_doc="no accelerator",
    ),
]
