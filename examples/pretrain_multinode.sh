#!/usr/bin/env bash
# The same training on several nodes: run this script once on every node (e.g. from Slurm or
# by hand). torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT forms the job; the flags are
# those of pretrain_llava7b_textbook.sh.
#
#   # on each of 4 nodes:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 DATA=... PRETRAINED=... bash examples/pretrain_multinode.sh
#
# Layout for 4 x 8 GPUs: TP within a node (NVLink), PP/DP across nodes. With TP=2, PP=1 the
# 32 GPUs give DP=16: global batch 64 = micro-batch 2 x DP 16 x 2 accumulation steps.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a preprocessed dataset prefix}"
: "${PRETRAINED:?set PRETRAINED to a converted LLaVA checkpoint}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RUN_DIR=${RUN_DIR:-out/llava7b-multinode}   # must be a shared file system: every rank writes its shards
TP=${TP:-2}
PP=${PP:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
TRAIN_ITERS=${TRAIN_ITERS:-5000}

torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-llava}" \
    -m engine.pretrain \
    --config examples/configs/llava7b_textbook.yaml \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel \
    --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" \
    --data-path $DATA \
    --pretrained-checkpoint "$PRETRAINED" \
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" \
    --log-jsonl "$RUN_DIR/train.jsonl" --tensorboard-dir "$RUN_DIR/tensorboard" \
    "$@"
