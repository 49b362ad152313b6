#!/usr/bin/env bash
# LLaVA-1.5-7B on the Multimodal Textbook, one node of 8 GPUs, the seed's hyper-parameters
# (examples/configs/llava7b_textbook.yaml: lr 2e-5 constant after 3 % warmup, wd 0, bf16,
# frozen CLIP, full recompute, 2 samples per GPU, global batch 16).
#
#   DATA=/data/textbook/textbook PRETRAINED=ckpt/llava-1.5-7b bash examples/pretrain_llava7b_textbook.sh
#
# DATA        prefix written by tools/preprocess_interleaved.py (DATA.idx, .tokens.bin, .images.bin);
#             several weighted sets: DATA="0.7 /data/textbook 0.3 /data/mmc4"
# PRETRAINED  the starting weights, converted once with
#             python tools/convert_checkpoint.py import --from llava-hf --source llava-1.5-7b-hf --target ckpt/llava-1.5-7b
# RUN_DIR     checkpoints, JSONL log and TensorBoard (default out/llava7b-textbook); rerunning the
#             script resumes from the newest checkpoint there.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a preprocessed dataset prefix}"
: "${PRETRAINED:?set PRETRAINED to a converted LLaVA checkpoint}"
RUN_DIR=${RUN_DIR:-out/llava7b-textbook}
GPUS=${GPUS:-8}
TRAIN_ITERS=${TRAIN_ITERS:-20000}

# The parallel layout: GPUS = TP x PP x DP.
#  TP (--tensor-model-parallel-size) splits every layer's matrices over GPUs of one NVLink domain;
#     it cuts weight, gradient and activation memory per GPU, at the cost of all-reduces inside
#     every layer. 7B in bf16 with the distributed optimizer fits one 80 GB GPU, so TP=1.
#  PP (--pipeline-model-parallel-size) places consecutive layers on different GPUs (CLIP and the
#     projector go with the first stage); useful for 13B+ or for multi-node jobs with slow links.
#  DP (derived: GPUS / (TP x PP)) replicates the model; the distributed optimizer shards Adam's
#     state over the DP ranks and gradients are reduce-scattered while the backward still runs.
#  --sequence-parallel (only with TP > 1) also splits norms/activations along the sequence.
# Global batch 16 = micro-batch 2 x DP 8 x 1 accumulation step, as the seed (2 per GPU, 8 GPUs).
TP=${TP:-1}
PP=${PP:-1}

torchrun --standalone --nproc-per-node "$GPUS" -m engine.pretrain \
    --config examples/configs/llava7b_textbook.yaml \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --train-iters "$TRAIN_ITERS" \
    --data-path $DATA \
    --pretrained-checkpoint "$PRETRAINED" \
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" \
    --log-jsonl "$RUN_DIR/train.jsonl" --tensorboard-dir "$RUN_DIR/tensorboard" \
    "$@"
