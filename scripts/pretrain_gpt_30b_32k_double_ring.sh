#!/usr/bin/env bash
# GPT-3 style 30B, 32k tokens, Double Ring: TP 4 x CP 8 (--cp-window-size 2: one window per node) on 4 nodes.
# Megatron-LM pretrain_gpt.py through mindspeed_cp.launch; see pretrain_gpt_cp.sh for the environment
# (MEGATRON_LM_PATH, DATA_PATH or mock data, NNODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR/PORT, DRY_RUN=1).
# Presets: configs/models/gpt3-30b.conf, configs/cp/30b-32k-double-ring.conf. Extra arguments go to pretrain_gpt.py.
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain_gpt_cp.sh" gpt3-30b 30b-32k-double-ring "$@"
