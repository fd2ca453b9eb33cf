"""Megatron's training loop from the megatron-core wheel (0.19+, which ships ``megatron/training``) through the
plugin on gloo ranks: every CP algorithm trains exactly as CP=1.

Each run is ``torchrun --nproc-per-node 4 -m mindspeed_cp.launch tests/wheel_pretrain.py`` (our own script:
GPTModel with the local spec, deterministic random-token data, Megatron's ``pretrain``) with the tiny GPT of
``mindspeed_cp.tools.demo_megatron_lm.TINY_GPT`` (fp32, seed 1234, no dropout, global batch 4), for 4 iterations.
CP=1 spreads the 4 ranks over data parallelism, each CP run makes them one CP group of 4. Per iteration, the
reduced ``lm loss`` and the grad norm come from ``$MINDSPEED_CP_METRICS`` at full precision.

Tolerance: 2e-6 absolute on ``lm loss`` (about 5.5) and grad norm (1.5 - 3), as in
``tests/test_megatron_lm_training.py`` - float32 rounding of sums taken in another order.

Skipped unless ``megatron.training`` with the 0.19 entry points (``parse_and_validate_args``,
``pretrain_cfg_container_from_args``) is importable and the plugin's ``parse_args`` / ``validate_args`` patches
apply, i.e. under Python >= 3.12 with megatron-core 0.19::

    PYTHONPATH=. .compat/py312/bin/python -m pytest -q tests/test_megatron_training_wheel.py
"""

from __future__ import annotations

import os

import pytest

from mindspeed_cp.tools.demo_megatron_lm import TINY_GPT, run_pretrain_gpt
from tests.megatron_loop import step_tolerance

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "wheel_pretrain.py")


def _why_not() -> str:
    try:
        from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: F401
        from megatron.training.arguments import parse_and_validate_args  # noqa: F401
    except ImportError as e:
        return f"megatron.training with the 0.19 entry points is not importable ({e})"
    import mindspeed_cp.megatron_adaptor as adaptor

    adaptor.apply()
    missing = [
        t
        for t in ("megatron.training.arguments.parse_args", "megatron.training.arguments.validate_args")
        if not adaptor.PATCHES[t].applied
    ]
    return f"plugin patches not applied: {', '.join(missing)}" if missing else ""


_REASON = _why_not()
pytestmark = pytest.mark.skipif(bool(_REASON), reason=_REASON)

ITERS = 4
ALGORITHMS = {
    "ulysses": ["--context-parallel-algo", "ulysses_cp_algo"],
    "ring_overlap": ["--context-parallel-algo", "megatron_cp_algo", "--use-cp-send-recv-overlap"],
    "double_ring": ["--context-parallel-algo", "megatron_cp_algo", "--cp-window-size", "2"],
    "hybrid": ["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2"],
}
_DONE = {}


def run(cp: int, flags=()):
    key = (cp, tuple(flags))
    if key not in _DONE:
        # cwd: the repository root, so `-m mindspeed_cp.launch` imports this checkout (run_pretrain_gpt drops
        # PYTHONPATH); megatron_lm_path: only where a relative script would be looked up
        _DONE[key] = run_pretrain_gpt(
            4,
            [*TINY_GPT, "--train-iters", str(ITERS), "--context-parallel-size", str(cp), *flags],
            megatron_lm_path=HERE,
            script=SCRIPT,
            cwd=ROOT,
            timeout=900,
        )
    return _DONE[key]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_cp4_equals_cp1(name):
    ref, got = run(1), run(4, ALGORITHMS[name])
    assert "context-parallel size: 4" in got.output  # Megatron's own summary of the layout
    assert [r["iteration"] for r in got.records] == [r["iteration"] for r in ref.records] == list(range(1, ITERS + 1))
    dl = max(abs(a - b) for a, b in zip(got.losses, ref.losses))
    dg = max(abs(a - b) / abs(b) for a, b in zip(got.grad_norms, ref.grad_norms))
    print(
        f"\n{name}: lm loss {' '.join(f'{x:.7f}' for x in got.losses)} | max |dloss| {dl:.2e} | "
        f"max |dgrad norm| / grad norm {dg:.2e} | {got.seconds:.0f} s (CP=1 {ref.seconds:.0f} s)"
    )
    assert all(r["skipped"] == 0 for r in got.records)
    for step, (a, b, x, y) in enumerate(zip(got.losses, ref.losses, got.grad_norms, ref.grad_norms)):
        loss_tol, norm_tol = step_tolerance(step)
        assert abs(a - b) <= loss_tol * abs(b) and abs(x - y) <= norm_tol * abs(y), (
            name,
            step,
            got.losses,
            ref.losses,
            got.grad_norms,
            ref.grad_norms,
        )
