"""megatron-core's training machinery (DDP grad buffers, distributed optimizer, grad clipping, pipeline
schedules with p2p, timers) with CP equals the same run at CP=1 - on gloo ranks, without a GPU.

``tests/megatron_loop.py`` wires it as Megatron-LM's ``train`` does; this is what CI (no Megatron-LM
checkout) sees of the real training loop. The reference has the same TP / PP layout at CP=1 and the same
global batch (4 sequences, CP=1 spreads the ranks over data parallelism). Tolerance per step, float32:
``tests.megatron_loop.step_tolerance`` (1e-6 / 2e-6 relative at the first step, then Adam's
measured drift).
"""

import pytest

from tests.dist import run_on_ranks
from tests.megatron_loop import step_tolerance, train

RING = dict(context_parallel_algo="megatron_cp_algo")

CASES = {  # name: (CP case, its CP=1 reference)
    "hybrid4_ddp": (dict(cp=4, flags=dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)), dict()),
    "ulysses2_distopt_overlap": (
        dict(cp=2, distributed_optimizer=True, overlap=True),
        dict(distributed_optimizer=True, overlap=True),
    ),
    "ring2_pp2_1f1b": (dict(cp=2, pp=2, flags=RING), dict(pp=2)),
    # interleaved 1F1B with overlapped p2p frees each sent output at once: the gloo send guard's case
    "ring2_pp2_vpp2": (
        dict(cp=2, pp=2, vpp=2, layers=4, flags=dict(RING, use_cp_send_recv_overlap=True)),
        dict(pp=2, vpp=2, layers=4),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_loop_with_cp_equals_cp1(name):
    case, ref = CASES[name]
    got = run_on_ranks(4, train, case)
    want = run_on_ranks(4, train, ref)
    for g, w in zip(got, want):
        assert len(g["losses"]) == 4
        for step, (a, b, x, y) in enumerate(zip(g["losses"], w["losses"], g["grad_norms"], w["grad_norms"])):
            loss_tol, norm_tol = step_tolerance(step)
            assert abs(a - b) <= loss_tol * abs(b) and abs(x - y) <= norm_tol * abs(y), (name, step, g, w)
    assert got[0]["losses"][-1] < got[0]["losses"][0]  # it trains
    assert "forward-compute" in got[0]["timers"]  # the schedules' timers ran (torch.cuda.synchronize inside)
