#!/usr/bin/env bash
# Megatron-LM GPT pretraining with mindspeed-cp context parallelism, in the style of Megatron-LM's
# examples/gpt3/train_gpt3_175b_distributed.sh. The pretrain_gpt_*_32k_*.sh scripts call this one.
#
#   bash scripts/pretrain_gpt_cp.sh MODEL PRESET [extra Megatron-LM arguments...]
#     MODEL   configs/models/MODEL.conf  (layers, hidden, heads, sequence length, ...) or a path to a .conf file
#     PRESET  configs/cp/PRESET.conf     (nodes, TP / PP / CP, algorithm, batch sizes, ...) or a path to a .conf
#             file, e.g. one written by `mindspeed-cp plan --write-preset FILE` (its keys win over MODEL's)
#
# Environment (defaults in brackets):
#   MEGATRON_LM_PATH   Megatron-LM checkout holding pretrain_gpt.py (required unless DRY_RUN=1)
#   DATA_PATH          Megatron data prefix (..._text_document) [unset: --mock-data]
#   VOCAB_FILE, MERGE_FILE  GPT-2 BPE files, needed with DATA_PATH
#   CHECKPOINT_PATH    --save / --load directory [unset: no checkpoints]
#   NNODES [preset]  GPUS_PER_NODE [8]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [6000]
#   TRAIN_ITERS [20000]  TORCHRUN [torchrun]  DISTRIBUTED_BACKEND [nccl; gloo on a CPU]
#   PYTHON [python3]   the interpreter that has mindspeed_cp installed (e.g. .venv/bin/python after make setup);
#                      checked first: without it the script says so in one line and exits 2
#   MODEL=NAME         configs/models/NAME.conf replaces the script's model size, keeping its sequence length
#                      (MODEL=tiny: a 2-layer GPT to debug the launch on a laptop or in CI; deepseek-tiny: MLA +
#                      MoE + MTP; gpt-oss-tiny: GQA + learnable sinks + sliding windows + MoE). A model conf may set NUM_QUERY_GROUPS
#                      (GQA), EP (--expert-model-parallel-size) and MODEL_ARGS (its other Megatron-LM flags).
#   DEVICE [auto]      auto: an accelerator if torch sees one, else the CPU; gpu; cpu. On the CPU the command
#                      uses gloo ranks and fp32 (one line says so) - Megatron-LM then trains through
#                      mindspeed-cp's CPU support.
#   DRY_RUN=1          print the layout and the final command, exit 0 (no GPU work)
#   Any key of the .conf files (TP, CP, CP_ALGO, SEQ_LENGTH, ...) set in the environment wins.
#
# Before launching it validates the configuration (mindspeed_cp.tools.check: layout, heads, sequence length) and
# prints the rank layout (mindspeed-cp groups); an impossible configuration exits with status 2.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

[[ $# -ge 2 ]] || die "usage: $0 MODEL PRESET [extra Megatron-LM arguments...]"
# NAME -> configs/DIR/NAME.conf; a path (holding a / or ending in .conf) is taken as it is
conf_path() { if [[ $2 == */* || $2 == *.conf ]]; then echo "$2"; else echo "$ROOT/configs/$1/$2.conf"; fi; }
MODEL_CONF=$(conf_path models "$1")
PRESET_CONF=$(conf_path cp "$2")
shift 2

# KEY=VALUE lines (comments and blank lines skipped); the environment wins over the file.
load_conf() {
  [[ -f $1 ]] || die "config $1 not found"
  local key value
  while IFS='=' read -r key value || [[ -n $key ]]; do
    [[ $key =~ ^[[:space:]]*(#|$) ]] && continue
    [[ $key =~ ^[A-Z_][A-Z0-9_]*$ ]] || die "$1: bad line '$key=$value'"
    [[ -n ${!key+set} ]] || printf -v "$key" '%s' "$value"
  done < "$1"
}
# MODEL=NAME first: its keys win over the script's model, which still gives what NAME leaves out (the sequence);
# then the preset (a planned one may pin the sequence length and model shape it was planned for), then the model
[[ -n ${MODEL:-} ]] && load_conf "$(conf_path models "$MODEL")"
load_conf "$PRESET_CONF"
load_conf "$MODEL_CONF"

PYTHON=${PYTHON:-python3}
# one line, not a traceback, when the interpreter lacks the plugin (or its torch)
WHY=$("$PYTHON" -c 'import mindspeed_cp.tools.check' 2>&1) || die "cannot import mindspeed_cp with PYTHON=$PYTHON \
(${WHY##*$'\n'}): run make setup, then PYTHON=$ROOT/.venv/bin/python (or source $ROOT/.venv/bin/activate), \
or pip install -e $ROOT into that interpreter's environment"
DEVICE=${DEVICE:-auto}
case $DEVICE in
  auto) DEVICE=$("$PYTHON" -c 'from mindspeed_cp.device import has_accelerator; print("gpu" if has_accelerator() else "cpu")') \
          || die "cannot import mindspeed_cp.device with PYTHON=$PYTHON" ;;
  gpu|cpu) ;;
  *) die "DEVICE must be auto, gpu or cpu (got '$DEVICE')" ;;
esac
PRECISION=(--bf16)
if [[ $DEVICE == cpu ]]; then
  # gloo ranks, fp32 (exact comparisons; bf16 on a CPU is slow), no torch.compile of Megatron's fusions;
  # sequence parallelism with the local spec needs Apex, which has no CPU build
  DISTRIBUTED_BACKEND=${DISTRIBUTED_BACKEND:-gloo}
  PRECISION=(--no-bias-gelu-fusion --no-bias-dropout-fusion)
  [[ ${SEQUENCE_PARALLEL:-0} == 1 ]] && SEQUENCE_PARALLEL=0 && CPU_NOTE=", without --sequence-parallel"
  echo "no accelerator: gloo ranks, fp32${CPU_NOTE:-} (DEVICE=gpu for the GPU command)"
fi
TORCHRUN=${TORCHRUN:-torchrun}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))
TRAIN_ITERS=${TRAIN_ITERS:-20000}
DISTRIBUTED_BACKEND=${DISTRIBUTED_BACKEND:-nccl}
CP_ALGO=${CP_ALGO:-ulysses_cp_algo}
CP_WINDOW=${CP_WINDOW:-1}
ATTENTION_MASK_TYPE=${ATTENTION_MASK_TYPE:-causal}

# ---------------------------------------------------------------- validate and show the layout
CP_FLAGS=(--context-parallel-size "$CP" --context-parallel-algo "$CP_ALGO" --cp-window-size "$CP_WINDOW"
          --attention-mask-type "$ATTENTION_MASK_TYPE")
[[ -n ${ULYSSES_DEGREE:-} ]] && CP_FLAGS+=(--ulysses-degree-in-cp "$ULYSSES_DEGREE")
[[ ${CP_OVERLAP:-0} == 1 ]] && CP_FLAGS+=(--use-cp-send-recv-overlap)
[[ ${CP_BNSD:-0} == 1 ]] && CP_FLAGS+=(--megatron-cp-in-bnsd)
[[ -n ${CP_KV_CACHE:-} ]] && CP_FLAGS+=(--context-parallel-kv-cache-policy "$CP_KV_CACHE")  # full | half
[[ -n ${CP_KV_CACHE_INTERVAL:-} ]] && CP_FLAGS+=(--context-parallel-cache-interval "$CP_KV_CACHE_INTERVAL")
[[ ${ULYSSES_ALLGATHER_KV:-0} == 1 ]] && CP_FLAGS+=(--use-ulysses-allgather-kv)
[[ ${CP_ALLGATHER_OVERLAP:-1} == 0 ]] && CP_FLAGS+=(--no-cp-allgather-overlap)  # kvallgather_cp_algo
[[ -n ${HYBRID_OUTER_CP_ALGO:-} ]] && CP_FLAGS+=(--hybrid-outer-cp-algo "$HYBRID_OUTER_CP_ALGO")  # hybrid_cp_algo
[[ -n ${WINDOW_CP_ALGO:-} ]] && CP_FLAGS+=(--window-attn-cp-algo "$WINDOW_CP_ALGO")  # the sliding-window layers'

MODEL_FLAGS=(--num-attention-heads "$NUM_ATTENTION_HEADS" --seq-length "$SEQ_LENGTH")
[[ -n ${NUM_QUERY_GROUPS:-} ]] && MODEL_FLAGS+=(--num-query-groups "$NUM_QUERY_GROUPS")
[[ ${SEQUENCE_PARALLEL:-0} == 1 ]] && MODEL_FLAGS+=(--sequence-parallel)

"$PYTHON" -m mindspeed_cp.tools.check --world-size "$WORLD_SIZE" --tp "$TP" --pp "$PP" "${CP_FLAGS[@]}" \
  "${MODEL_FLAGS[@]}" --num-layers "$NUM_LAYERS" || exit 2
GROUPS_FLAGS=(--world-size "$WORLD_SIZE" --tp "$TP" --pp "$PP" --cp "$CP" --cp-algo "$CP_ALGO"
              --cp-window-size "$CP_WINDOW" --nodes "$NNODES" --format text)
[[ -n ${ULYSSES_DEGREE:-} ]] && GROUPS_FLAGS+=(--ulysses-degree-in-cp "$ULYSSES_DEGREE")
"$PYTHON" -m mindspeed_cp groups "${GROUPS_FLAGS[@]}" || exit 2

# ---------------------------------------------------------------- the Megatron-LM command
GPT_ARGS=(
  --transformer-impl local                       # mindspeed-cp runs its algorithms in the local attention
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --ffn-hidden-size "$FFN_HIDDEN_SIZE"
  "${MODEL_FLAGS[@]}"
  --max-position-embeddings "$MAX_POSITION_EMBEDDINGS" --position-embedding-type "$POSITION_EMBEDDING_TYPE"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction 0.01
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std "$INIT_METHOD_STD"
  --attention-dropout 0.0 --hidden-dropout 0.0 "${PRECISION[@]}"
  --distributed-backend "$DISTRIBUTED_BACKEND"
)
# a model conf's own Megatron-LM flags (MLA, MoE, MTP, sinks: configs/models/deepseek-tiny.conf, gpt-oss-tiny.conf)
[[ -n ${NUM_QUERY_GROUPS:-} ]] && GPT_ARGS+=(--group-query-attention)
[[ -n ${EP:-} ]] && GPT_ARGS+=(--expert-model-parallel-size "$EP")
read -r -a MODEL_EXTRA <<< "${MODEL_ARGS:-}"
GPT_ARGS+=("${MODEL_EXTRA[@]}")
# causal attention needs no S x S mask (1 GiB per sample at 32k); the general mask is read from the batch
[[ $ATTENTION_MASK_TYPE == causal ]] && CP_FLAGS+=(--no-create-attention-mask-in-dataloader)

if [[ -n ${DATA_PATH:-} ]]; then
  DATA_ARGS=(--data-path "$DATA_PATH" --vocab-file "${VOCAB_FILE:?VOCAB_FILE is needed with DATA_PATH}"
             --merge-file "${MERGE_FILE:?MERGE_FILE is needed with DATA_PATH}" --tokenizer-type GPT2BPETokenizer
             --split 949,50,1)
else
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-50257}")
fi
OUTPUT_ARGS=(--log-interval 1 --eval-interval 1000 --eval-iters "${EVAL_ITERS:-10}")
[[ -n ${CHECKPOINT_PATH:-} ]] && OUTPUT_ARGS+=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 1000)
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
                  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
CMD=($TORCHRUN "${DISTRIBUTED_ARGS[@]}" -m mindspeed_cp.launch
     "${MEGATRON_LM_PATH:-\$MEGATRON_LM_PATH}/pretrain_gpt.py"
     "${GPT_ARGS[@]}" "${CP_FLAGS[@]}" "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}" "${EXTRA[@]}" "$@")

echo "command:"
echo "  CUDA_DEVICE_MAX_CONNECTIONS=1 $(printf '%q ' "${CMD[@]}")"
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exit 0
fi
[[ -n ${MEGATRON_LM_PATH:-} && -f $MEGATRON_LM_PATH/pretrain_gpt.py ]] \
  || die "MEGATRON_LM_PATH must point at a Megatron-LM checkout with pretrain_gpt.py (got '${MEGATRON_LM_PATH:-}')"
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "${CMD[@]}"
