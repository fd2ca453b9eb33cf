#!/usr/bin/env bash
# GPT-3 1.3B, 32k tokens, all-gather K/V (kvallgather_cp_algo): CP 8 on one node, gathered K/V kept for backward.
# Megatron-LM pretrain_gpt.py through mindspeed_cp.launch; see pretrain_gpt_cp.sh for the environment
# (MEGATRON_LM_PATH, DATA_PATH or mock data, NNODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR/PORT, DRY_RUN=1).
# Presets: configs/models/gpt3-1.3b.conf, configs/cp/1.3b-32k-kvallgather.conf. Extra arguments go to pretrain_gpt.py.
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain_gpt_cp.sh" gpt3-1.3b 1.3b-32k-kvallgather "$@"
