"""The model presets people copy from (``configs/models/deepseek-tiny.conf``: MLA + MoE + MTP; ``gpt-oss-tiny.conf``:
GQA + learnable sinks + a sliding window on every second layer + MoE) train on gloo ranks under every CP algorithm,
equal to CP=1.

Each preset is read from its ``.conf`` (the file ``scripts/pretrain_gpt_cp.sh`` reads): its keys and its Megatron-LM
flags (``MODEL_ARGS``) become megatron-core ``TransformerConfig`` fields - every flag of a preset must be one this
file knows, so a preset cannot drift from what is tested. Training goes through megatron-core's own machinery
(``tests/megatron_loop.py``: DDP, the distributed optimizer's Adam, grad clipping, the schedules, the MoE all-to-all
dispatcher over EP 2), 3 iterations, CP runs against the CP=1 run of the same layout otherwise (the same global
batch; CP=1 spreads the 4 ranks over data parallelism). Megatron-LM's ``pretrain_gpt.py`` with the same presets:
``tests/test_megatron_lm_training.py`` (``make test-megatron-lm``).
"""

from __future__ import annotations

import os

import pytest

from tests.dist import run_on_ranks
from tests.megatron_loop import step_tolerance, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _moe_freq(text: str):
    """Megatron-LM's ``moe_freq_type``: an int, or a Python list expression such as ``[0]*1+[1]*1``."""
    if set(text) <= set("0123456789[]*+, "):
        return eval(text) if text.startswith("[") else int(text)  # noqa: S307 - digits and list arithmetic only
    raise ValueError(f"--moe-layer-freq {text!r}")


KEYS = {
    "NUM_LAYERS": "num_layers",
    "HIDDEN_SIZE": "hidden_size",
    "FFN_HIDDEN_SIZE": "ffn_hidden_size",
    "NUM_ATTENTION_HEADS": "num_attention_heads",
    "NUM_QUERY_GROUPS": "num_query_groups",
    "INIT_METHOD_STD": "init_method_std",
    "VOCAB_SIZE": "vocab",
}
IGNORED = {"LR", "MIN_LR", "EVAL_ITERS", "EP", "MODEL_ARGS", "WINDOW_CP_ALGO"}  # optimizer, loop, or read apart
FLAGS = {  # Megatron-LM flag -> TransformerConfig field ("--swiglu" and "--num-experts" renamed by Megatron-LM)
    "--multi-latent-attention": "multi_latent_attention",
    "--kv-lora-rank": "kv_lora_rank",
    "--qk-head-dim": "qk_head_dim",
    "--qk-pos-emb-head-dim": "qk_pos_emb_head_dim",
    "--v-head-dim": "v_head_dim",
    "--rope-type": "rope_type",
    "--rotary-scaling-factor": "rotary_scaling_factor",
    "--normalization": "normalization",
    "--num-experts": "num_moe_experts",
    "--moe-router-topk": "moe_router_topk",
    "--moe-ffn-hidden-size": "moe_ffn_hidden_size",
    "--moe-shared-expert-intermediate-size": "moe_shared_expert_intermediate_size",
    "--moe-layer-freq": "moe_layer_freq",
    "--moe-token-dispatcher-type": "moe_token_dispatcher_type",
    "--moe-router-load-balancing-type": "moe_router_load_balancing_type",
    "--moe-aux-loss-coeff": "moe_aux_loss_coeff",
    "--mtp-num-layers": "mtp_num_layers",
    "--mtp-loss-scaling-factor": "mtp_loss_scaling_factor",
    "--softmax-type": "softmax_type",
    "--window-size": "window_size",
    "--window-attn-skip-freq": "window_attn_skip_freq",
}


def preset(name: str):
    """(TransformerConfig fields, EP) of ``configs/models/NAME.conf``; an unknown key or flag is an error."""
    import torch.nn.functional as F

    from mindspeed_cp.planner.plan import read_conf

    conf = read_conf(os.path.join(ROOT, "configs", "models", f"{name}.conf"))
    unknown = set(conf) - set(KEYS) - IGNORED
    assert not unknown, f"{name}.conf: keys this test does not know: {unknown}"
    fields = {KEYS[k]: _value(v) for k, v in conf.items() if k in KEYS}
    args = conf.get("MODEL_ARGS", "").split()
    i = 0
    while i < len(args):
        flag = args[i]
        takes = i + 1 < len(args) and not args[i + 1].startswith("--")
        if flag == "--swiglu":
            fields.update(gated_linear_unit=True, activation_func=F.silu)
        elif flag == "--disable-bias-linear":
            fields.update(add_bias_linear=False)
        else:
            assert flag in FLAGS, f"{name}.conf: MODEL_ARGS flag {flag} unknown to tests/test_presets.py"
            value = True if not takes else _moe_freq(args[i + 1]) if flag == "--moe-layer-freq" else _value(args[i + 1])
            if flag == "--window-size":  # Megatron-LM's tuple_type
                value = tuple(int(x) for x in args[i + 1].strip("()").split(","))
            fields[FLAGS[flag]] = value
        i += 2 if takes else 1
    return fields, int(conf.get("EP", 1)), conf.get("WINDOW_CP_ALGO")


def _run(name, cp, flags):
    fields, ep, window_algo = preset(name)
    if window_algo and "window_attn_cp_algo" not in flags:  # the conf's choice, as the script passes it
        flags = dict(flags, window_attn_cp_algo=window_algo)
    return train(dict(cp=cp, ep=ep, steps=3, seq=64, model=fields, flags=flags))


U = dict(context_parallel_algo="ulysses_cp_algo")
RING = dict(context_parallel_algo="megatron_cp_algo")
RUNS = {  # preset -> {name: (CP, flags)}
    "deepseek-tiny": {
        "ulysses4": (4, U),
        "ring4": (4, dict(RING, use_cp_send_recv_overlap=True)),
        "double-ring4": (4, dict(RING, cp_window_size=2)),
        "hybrid4": (4, dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)),
        "ring4-kv-full": (4, dict(RING, context_parallel_kv_cache_policy="full")),
    },
    "gpt-oss-tiny": {  # windowed layers on the window-aware ring (the conf's WINDOW_CP_ALGO), full ones on CP_ALGO
        "ulysses4": (4, U),
        "ulysses4-windows-ulysses-kv-half": (
            4,
            dict(U, window_attn_cp_algo="ulysses_cp_algo", context_parallel_kv_cache_policy="half"),
        ),
        "ring4": (4, dict(RING, use_cp_send_recv_overlap=True)),
        "hybrid4": (4, dict(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)),
        "kvallgather4": (4, dict(context_parallel_algo="kvallgather_cp_algo")),
    },
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_preset_trains_equal_to_cp1(name):
    want = run_on_ranks(4, _run, name, 1, {})
    for run, (cp, flags) in RUNS[name].items():
        got = run_on_ranks(4, _run, name, cp, flags)
        for g, w in zip(got, want):
            for step, (a, b, x, y) in enumerate(zip(g["losses"], w["losses"], g["grad_norms"], w["grad_norms"])):
                loss_tol, norm_tol = step_tolerance(step)  # measured: 9.5e-7 / 1.0e-7 at most, AVX-512 and AVX2
                assert abs(a - b) <= loss_tol * abs(b) and abs(x - y) <= norm_tol * abs(y), (name, run, step, g, w)
    assert want[0]["losses"][-1] < want[0]["losses"][0]  # it trains


def megatron_lm_flags(name: str):
    """``pretrain_gpt.py`` flags of a preset, as ``scripts/pretrain_gpt_cp.sh`` passes them: its shape keys, GQA,
    EP and ``MODEL_ARGS`` (for ``tests/test_megatron_lm_training.py``; the training flags are the caller's)."""
    from mindspeed_cp.planner.plan import read_conf

    conf = read_conf(os.path.join(ROOT, "configs", "models", f"{name}.conf"))
    flags = []
    for key, flag in (
        ("NUM_LAYERS", "--num-layers"),
        ("HIDDEN_SIZE", "--hidden-size"),
        ("FFN_HIDDEN_SIZE", "--ffn-hidden-size"),
        ("NUM_ATTENTION_HEADS", "--num-attention-heads"),
        ("INIT_METHOD_STD", "--init-method-std"),
        ("VOCAB_SIZE", "--vocab-size"),
    ):
        flags += [flag, conf[key]]
    if "NUM_QUERY_GROUPS" in conf:
        flags += ["--group-query-attention", "--num-query-groups", conf["NUM_QUERY_GROUPS"]]
    if "EP" in conf:
        flags += ["--expert-model-parallel-size", conf["EP"]]
    if "WINDOW_CP_ALGO" in conf:
        flags += ["--window-attn-cp-algo", conf["WINDOW_CP_ALGO"]]
    return flags + conf.get("MODEL_ARGS", "").split()
