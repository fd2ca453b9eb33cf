#!/usr/bin/env bash
# GPT-3 1.3B, 32k tokens, Ring attention: CP 8 on one node, --use-cp-send-recv-overlap, KV cache full.
# Megatron-LM pretrain_gpt.py through mindspeed_cp.launch; see pretrain_gpt_cp.sh for the environment
# (MEGATRON_LM_PATH, DATA_PATH or mock data, NNODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR/PORT, DRY_RUN=1).
# Presets: configs/models/gpt3-1.3b.conf, configs/cp/1.3b-32k-ring.conf. Extra arguments go to pretrain_gpt.py.
exec bash "$(dirname "${BASH_SOURCE[0]}")/pretrain_gpt_cp.sh" gpt3-1.3b 1.3b-32k-ring "$@"
