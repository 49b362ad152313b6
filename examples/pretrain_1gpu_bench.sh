#!/usr/bin/env bash
# Throughput of the 7B-shaped preset that fits one H100 (llava-7b-bench: 8 decoder layers of
# LLaVA-1.5-7B's shape, the full frozen CLIP tower, bf16), on real packed data.
#
#   DATA=out/tiny/data/textbook bash examples/pretrain_1gpu_bench.sh [--num-layers 12 ...]
#
# Reads the logged tokens/s, images/s, TFLOP/s per GPU, MFU (vs 989 TFLOP/s), peak memory and
# data-wait fraction from $RUN_DIR/bench.jsonl; the numbers of the last interval are printed at the
# end (the first interval includes warm-up). Random initial weights: throughput does not care.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUN_DIR=${RUN_DIR:-out/bench-1gpu}
DATA=${DATA:-out/tiny/data/textbook}
if [ ! -f "$DATA.idx" ]; then
    echo "no dataset at $DATA (run examples/pretrain_tiny.sh or make quickstart first, or set DATA)" >&2
    exit 1
fi
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/bench.jsonl"
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m engine.pretrain \
    --config examples/configs/llava7b_bench_1gpu.yaml \
    --data-path "$DATA" --log-jsonl "$RUN_DIR/bench.jsonl" "$@"
tail -n 1 "$RUN_DIR/bench.jsonl"
