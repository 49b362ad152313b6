#!/usr/bin/env bash
# LLaVA-1.5-7B at full size (all 32 layers) on ONE 80 GB GPU: continued pretraining on the
# Multimodal Textbook with the seed's hyper-parameters (examples/configs/llava7b_textbook.yaml:
# 4096 positions, the model's context; 2 samples per micro-batch), global batch 16 by 8 steps of
# gradient accumulation.
#
#   DATA=/data/textbook/textbook PRETRAINED=ckpt/llava-1.5-7b bash examples/pretrain_1gpu_llava7b.sh
#
# DATA, PRETRAINED and RUN_DIR as in examples/pretrain_llava7b_textbook.sh; rerunning resumes.
#
# What has to fit. Per parameter of the 7B model: 2 bytes of bf16 weights, 4 of fp32 gradient
# buffer, and 12 of optimizer state (fp32 main weights + Adam's two moments) = 18 bytes, ~126 GB
# before a single activation. So on an 80 GB card:
#  --optimizer-cpu-offload   the 12 bytes (~84 GB) live in host memory and Adam runs there
#                            (torch's fused CPU AdamW); gradients go to the host and updated weights
#                            come back once per optimizer step, which the 8 micro-batches of a
#                            step amortise. Needs ~90 GB of host RAM. --optimizer-offload-fraction F
#                            keeps 1-F of the state on the GPU when there is room for it.
#  --recompute-*             activations of 2 x 4096 positions: full recompute of every layer keeps
#                            only each layer's input (and costs a third more compute); recomputing
#                            only the first N layers of the stage (--recompute-method block
#                            --recompute-num-layers N) keeps the other layers' activations and is
#                            faster the smaller N is, as long as it fits.
# Measured on one H200 (docs/benchmarks.md, "What fits where"): with the optimizer on the GPU,
# 8,192 positions, recomputing the first 26 of 32 layers fits (124.2 GiB) at 9,246 tokens/s
# (41.1 % useful MFU); 121 GB of weights, gradients and optimizer state leave no more room. An
# 80 GB card therefore needs --optimizer-cpu-offload, whose host side holds ~110 GB for 7B: on a
# host with less memory, keep part of the state on the GPU (--optimizer-offload-fraction 0.6) and
# recompute more. The offloaded setting below was not measured on an 80 GB card; find the fastest
# that fits yours with the benchmark's search (one process per attempt, out-of-memory attempts
# recorded and skipped; --memory-limit-gib emulates a smaller card on a bigger one):
#
#   python tools/benchmark.py --preset llava-1.5-7b --data-prefix "$DATA" --seq-length 4096 \
#       --micro-batch-size 2 --global-batch-size 16 --steps 5 --memory-limit-gib 79.6 --search
#
# and put its "search-best" row's "flags" in place of the two lines marked MEMORY below.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a preprocessed dataset prefix}"
: "${PRETRAINED:?set PRETRAINED to a converted LLaVA checkpoint}"
RUN_DIR=${RUN_DIR:-out/llava7b-1gpu}
TRAIN_ITERS=${TRAIN_ITERS:-20000}

torchrun --standalone --nproc-per-node 1 -m engine.pretrain \
    --config examples/configs/llava7b_textbook.yaml \
    --recompute-granularity full --recompute-method block --recompute-num-layers 24 `# MEMORY` \
    --optimizer-cpu-offload `# MEMORY` \
    --train-iters "$TRAIN_ITERS" \
    --data-path $DATA \
    --pretrained-checkpoint "$PRETRAINED" \
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --save-interval 500 --keep-last 3 \
    --log-jsonl "$RUN_DIR/train.jsonl" --tensorboard-dir "$RUN_DIR/tb" \
    "$@"
