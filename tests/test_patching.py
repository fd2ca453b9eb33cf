"""The patch registry: keyed by dotted path, applied once, undoable, listable; import sites rebound."""

import re
import subprocess
import sys
import types

import pytest

from mindspeed_cp.megatron.patching import Patch, PatchRegistry, replace, wrap


@pytest.fixture
def fake_pkg(monkeypatch):
    """A throwaway package `mscp_fake` with a function, a class and a module that imported the function."""
    pkg = types.ModuleType("mscp_fake")
    pkg.__path__ = []
    core = types.ModuleType("mscp_fake.core")

    def double(x):
        return 2 * x

    class Box:
        def value(self):
            return 1

    core.double, core.Box = double, Box
    user = types.ModuleType("mscp_fake.user")
    user.double = double  # `from mscp_fake.core import double`
    for name, mod in (("mscp_fake", pkg), ("mscp_fake.core", core), ("mscp_fake.user", user)):
        monkeypatch.setitem(sys.modules, name, mod)
    pkg.core, pkg.user = core, user
    return core, user, double, Box


def test_apply_once_rebinds_import_sites_and_undo_restores(fake_pkg):
    core, user, double, Box = fake_pkg
    calls = []

    def traced(original, x):
        calls.append(x)
        return original(x) + 1

    reg = PatchRegistry()
    reg.add(Patch("mscp_fake.core.double", wrap(traced), "trace"))
    reg.add(Patch("mscp_fake.core.Box.value", replace(lambda self: 42), "constant"))
    reg.apply_all()
    reg.apply_all()  # a second apply changes nothing (no double wrapping)
    assert core.double(3) == 7 and user.double(3) == 7 and calls == [3, 3]
    assert Box().value() == 42
    assert reg["mscp_fake.core.double"].status == "applied (+1 import sites)"
    reg.undo_all()
    assert core.double is double and user.double is double and Box().value() == 1
    assert not reg.applied


def test_inplace_patch_reaches_names_bound_anywhere_before(fake_pkg):
    core, user, double, Box = fake_pkg
    early = core.double  # e.g. `from megatron.core.utils import f` at the top of a user's script
    reg = PatchRegistry()
    reg.add(Patch("mscp_fake.core.double", wrap(lambda original, x: original(x) + 100), "in place", inplace=True))
    reg.apply_all()
    assert early(1) == 102 and core.double(1) == 102 and user.double(1) == 102
    reg.undo_all()
    assert early is double and early(1) == 2 and core.double is double and user.double is double
    reg.apply_all()
    assert early(2) == 104
    reg.undo_all()
    assert early(2) == 4


def test_undo_reaches_names_bound_after_apply(fake_pkg, monkeypatch):
    """A module imported while the patch was applied bound the replacement (`from x import f`): undo restores
    it too (megatron-core 0.19 imports some of its modules only then)."""
    core, user, double, Box = fake_pkg
    reg = PatchRegistry()
    reg.add(Patch("mscp_fake.core.double", wrap(lambda original, x: original(x) + 1), "late import site"))
    reg.apply_all()
    late = types.ModuleType("mscp_fake.late")
    late.double = core.double  # imported after apply: the replacement
    monkeypatch.setitem(sys.modules, "mscp_fake.late", late)
    assert late.double(1) == 3
    reg.undo_all()
    assert late.double is double and late.double(1) == 2


def test_conditions_missing_targets_and_duplicates(fake_pkg):
    reg = PatchRegistry()
    reg.add(Patch("mscp_fake.core.double", replace(None), "never", when=lambda: False, when_doc="never"))
    reg.add(Patch("mscp_fake.core.renamed_in_this_version", replace(None), "absent"))
    reg.add(Patch("mscp_fake_missing.mod.f", replace(None), "absent module"))
    reg.apply_all()
    statuses = [p.status for p in reg]
    assert statuses[0] == "skipped (never does not hold)"
    assert statuses[1].startswith("skipped (target absent")
    assert statuses[2].startswith("skipped (target absent")
    with pytest.raises(ValueError, match="two patches for mscp_fake.core.double"):
        reg.add(Patch("mscp_fake.core.double", replace(None), "again"))
    assert "mscp_fake.core.double" in reg.format()


def _adaptor_state():
    """In a fresh interpreter: import twice, list, undo, re-apply."""
    code = r"""
import json
import megatron.core.parallel_state as ps
from megatron.core.transformer.dot_product_attention import DotProductAttention
orig_init, orig_fwd = ps.initialize_model_parallel, DotProductAttention.forward
import mindspeed_cp.megatron_adaptor as a
first = ps.initialize_model_parallel
import mindspeed_cp.megatron_adaptor
a.apply()
same = ps.initialize_model_parallel is first
a.undo()
restored = ps.initialize_model_parallel is orig_init and DotProductAttention.forward is orig_fwd
a.apply()
print(json.dumps(dict(patched=first is not orig_init, same=same, restored=restored,
                      reapplied=ps.initialize_model_parallel is not orig_init,
                      targets=[r["target"] for r in a.PATCHES.table()])))
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_megatron_adaptor_applies_once_and_undoes():
    s = _adaptor_state()
    assert s["patched"] and s["same"] and s["restored"] and s["reapplied"]
    for target in (
        "megatron.core.parallel_state.initialize_model_parallel",
        "megatron.core.transformer.dot_product_attention.DotProductAttention.forward",
        "megatron.core.utils.get_batch_on_this_cp_rank",
    ):
        assert target in s["targets"]


def test_transformer_engine_takeover_is_announced_once_on_rank_0(capsys):
    """With Transformer Engine importable the plugin runs its algorithm inside TE's attention instead of TE's own
    CP: initialize_model_parallel says so once per process, on global rank 0 (announce_te; TE itself needs CUDA,
    so the gate - megatron.core's HAVE_TE - is not exercised here)."""
    from mindspeed_cp.config import CPConfig
    from mindspeed_cp.megatron import compat as adaptor

    config = CPConfig(context_parallel_size=8, context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    adaptor._TE_ANNOUNCED.clear()
    try:
        assert not adaptor.announce_te(config, rank=3)
        assert adaptor.announce_te(config, rank=0)
        assert not adaptor.announce_te(config, rank=0)
    finally:
        adaptor._TE_ANNOUNCED.clear()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out == adaptor.te_takeover(config) + "\n"
    for words in (
        "TEDotProductAttention",
        "CP=8 hybrid_cp_algo ulysses=2 ring=4",
        "not TE's own context parallelism",
        "--cp-comm-type other than p2p",
        "refused",
    ):
        assert words in out, words


@pytest.mark.parametrize("comm,ok", [(None, True), (["p2p"], True), (["a2a"], False), (["a2a+p2p"], False)])
def test_megatron_cp_comm_type_other_than_p2p_is_refused(comm, ok):
    """Megatron-LM's --cp-comm-type selects TE's own CP: anything but its default p2p is refused with CP > 1."""
    import argparse

    from mindspeed_cp.config import CPConfigError
    from mindspeed_cp.megatron.megatron_lm import check_args

    args = argparse.Namespace(
        context_parallel_size=2,
        context_parallel_algo="megatron_cp_algo",
        world_size=2,
        transformer_impl="local",
        cp_comm_type=comm,
    )
    if ok:
        assert check_args(args).cp == 2
    else:
        with pytest.raises(CPConfigError, match=re.escape(f"--cp-comm-type {comm[0]} selects Transformer Engine's")):
            check_args(args)
