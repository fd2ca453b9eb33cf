"""mindspeed_cp.device.emulation: the CPU plays "the CUDA device" at torch's level (no accelerator here).

Plain torch calls as Megatron writes them, in this process (the adaptor's mode is on the main thread) and on
gloo ranks for the send guard; the gating test imports the adaptor in a fresh interpreter that reports an
accelerator (``torch.cuda.is_available`` answering True is the one thing simulated: there is no GPU here).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

import mindspeed_cp.megatron_adaptor  # noqa: F401  - applies the layer (first)
from mindspeed_cp.device import emulation, has_accelerator
from tests.dist import run_on_ranks

pytestmark = pytest.mark.skipif(has_accelerator(), reason="the CPU emulation applies only without an accelerator")


def test_cuda_device_arguments_mean_the_cpu():
    for device in ("cuda", "cuda:0", 0, torch.device("cuda"), torch.device("cuda", 0), torch.cuda.current_device()):
        assert torch.zeros(2, device=device).device.type == "cpu", device
        assert torch.tensor([1.0], device=device, dtype=torch.float64).dtype == torch.float64
    x = torch.arange(4.0)
    assert x.cuda() is x and x.cuda(0, non_blocking=True) is x
    assert x.to("cuda").device.type == "cpu" and x.to(0).device.type == "cpu"
    y = x.to(torch.device("cuda"), torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y, x.double())
    assert x.to(device="cuda", dtype=torch.int32).dtype == torch.int32
    assert x.new_zeros(3, device="cuda").device.type == "cpu"
    assert torch.empty(3, pin_memory=True).device.type == "cpu" and x.pin_memory() is x
    # torch.device(N): torch asks for the current accelerator and raises without one; it is cuda:N (YaRN RoPE)
    assert torch.device(torch.cuda.current_device()) == torch.device("cuda", 0) == torch.device(1 - 1)
    with torch.device(torch.cuda.current_device()):
        assert torch.arange(3).device.type == "cpu"
    assert torch.device("cpu").type == "cpu" and torch.device("cuda", 1).index == 1
    module = torch.nn.Linear(2, 2).cuda()
    assert module.weight.device.type == "cpu"
    assert torch.cuda.is_available() is False and torch.cuda.device_count() == 0  # the truth stays


def test_tensor_type_names_cuda_only_for_megatron():
    x = torch.zeros(2)
    assert x.type() == "torch.FloatTensor"  # anyone else gets the truth
    scope = {"__name__": "megatron.core.optimizer.example", "x": x}
    exec(
        "name = x.type()\nhalf = x.half().type()\ncast = x.type(torch.float64).dtype", {"torch": torch, **scope}, scope
    )
    assert scope["name"] == "torch.cuda.FloatTensor" and scope["half"] == "torch.cuda.HalfTensor"
    assert scope["cast"] == torch.float64


def test_torch_cuda_entry_points_on_the_cpu():
    assert torch.cuda.current_device() == 0
    torch.cuda.set_device(0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream(device=torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        z = torch.ones(3, device="cuda") * 2
    torch.cuda.current_stream().wait_stream(side)
    assert torch.cuda.default_stream() == torch.cuda.current_stream() and z.sum().item() == 6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    time.sleep(0.05)
    end.record()
    end.synchronize()
    assert 40 <= start.elapsed_time(end) < 2000  # milliseconds of host time
    with pytest.raises(RuntimeError, match="recorded"):
        torch.cuda.Event().elapsed_time(end)


def test_cuda_rng_is_the_cpu_default_generator():
    torch.cuda.manual_seed(77)
    first = torch.rand(4)
    torch.manual_seed(77)
    assert torch.equal(torch.rand(4), first)
    state = torch.cuda.get_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)  # what a checkpoint load does
    assert torch.equal(torch.rand(3), a)


def test_mode_is_per_thread():
    """Decision recorded in the module docstring: a thread the user starts sees plain CPU torch."""
    seen = {}

    def other():
        try:
            torch.zeros(1, device="cuda")
            seen["ok"] = True
        except (AssertionError, RuntimeError) as e:
            seen["error"] = str(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert "error" in seen and torch.zeros(1, device="cuda").device.type == "cpu"


def _send_then_free(n: int):
    """Rank 0 posts an async send of n floats and frees the tensor's data the way Megatron's pipeline schedules
    do (``out.data = torch.empty(1)``); rank 1 receives only afterwards (gloo reads the sender's memory when
    the receiver is there). Rank 0 reports whether the guard still holds the sent storage, rank 1 what came."""
    import torch.distributed as dist

    from mindspeed_cp.device import emulation as em

    want = torch.arange(n, dtype=torch.float32) + 1
    if dist.get_rank() == 0:
        out = want.clone()
        ptr = out.data_ptr()
        work = dist.isend(out, 1)
        out.data = torch.empty((1,), dtype=out.dtype)  # schedules.deallocate_output_tensor
        junk = [torch.full((n,), -7.0) for _ in range(8)]  # would reuse the block if it had been freed
        held = [t for w, t in em._IN_FLIGHT if t.data_ptr() == ptr]
        kept = bool(held) and torch.equal(held[0], want)
        dist.barrier()
        work.wait()
        del junk
        return {"kept": kept, "in_flight_after": em.in_flight_sends()}
    dist.barrier()
    got = torch.empty(n)
    dist.recv(got, 0)
    return {"received_ok": bool(torch.equal(got, want))}


def test_async_send_keeps_its_storage_until_done():
    """The guard behind Megatron's interleaved schedule on gloo (without it Megatron-LM's VPP run goes NaN:
    tests/test_megatron_lm_training.py); here its mechanism: the sent storage outlives the caller's swap."""
    sender, receiver = run_on_ranks(2, _send_then_free, 1 << 13)
    assert sender["kept"] and receiver["received_ok"]
    assert sender["in_flight_after"] == 0  # released once the send completed


_GATED = r"""
import torch
torch.cuda.is_available = lambda: True          # an accelerator, as far as the plugin can tell
import mindspeed_cp.megatron_adaptor as adaptor
from mindspeed_cp import device
from mindspeed_cp.megatron.patching import resolve
bad = [p.target for p in device.PATCHES if p.applied or not p.status.startswith("skipped (no accelerator")]
assert not bad, bad
assert torch._C._len_torch_function_stack() == 0, "device mode entered with an accelerator"
import torch.distributed.distributed_c10d as c10d
assert not hasattr(c10d.isend, "__mindspeed_cp_original__")
assert torch.cuda.synchronize.__module__ == "torch.cuda" and torch.cuda.Stream.__module__.startswith("torch")
others = [p.target for p in adaptor.PATCHES if p.when_doc == "no accelerator" and p.applied]
assert not others, others
print("GATED", len(device.PATCHES))
"""


def test_nothing_applies_with_an_accelerator():
    res = subprocess.run([sys.executable, "-c", _GATED], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "GATED" in res.stdout, res.stdout + res.stderr[-3000:]
    from mindspeed_cp.device import megatron_core, megatron_lm

    assert int(res.stdout.split("GATED")[1]) == len(emulation.PATCHES) + len(megatron_core.PATCHES) + len(
        megatron_lm.PATCHES
    )
