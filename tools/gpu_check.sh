#!/usr/bin/env bash
# One call on a GPU machine: build the C++ helpers, run tests/gpu, then the throughput benchmarks.
#
#   bash tools/gpu_check.sh DATA_PREFIX [OUT_DIR]
#
# Where packages are missing (no internet), put wheels in .whl/ (megatron-core,
# optionally nvidia-cudnn-frontend) and set LLAVA_TOKENIZER_MODEL to a tokenizer.model copy.
# Set GPU_CHECK_STAGES to a subset of "tests kernels bench4096 ablate4096 bench8192 maxlayers attention"
# to run less. BENCH_LAYERS (8), BENCH_MBS (2), BENCH_STEPS (6), BENCH_MAX_LAYERS (layer counts to
# try under an 80 GB cap, "15 14"), BENCH_ABLATE (flags to change one at a time),
# BENCH_PROFILE=1 (profile one 4096 step).
set -uo pipefail
DATA=${1:?usage: tools/gpu_check.sh DATA_PREFIX [OUT_DIR]}
OUT_DIR=${2:-out/gpu_check}
STAGES=${GPU_CHECK_STAGES:-tests bench4096 bench8192}
L=${BENCH_LAYERS:-8} MBS=${BENCH_MBS:-2} STEPS=${BENCH_STEPS:-6}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 setup.py -q build_ext --inplace 2>&1 | tail -2 || exit 1
status=0
for stage in $STAGES; do
    echo "=== $stage"
    case $stage in
    tests)
        python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25
        [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    attention)
        python3 tools/bench_attention.py --json-out "$OUT_DIR/attention.jsonl" 2>&1 | tail -8 ;;
    kernels)
        python3 tools/bench_kernels.py --json-out "$OUT_DIR/kernels.jsonl" 2>&1 | tail -8 ;;
    bench4096)
        python3 tools/benchmark.py --preset llava-7b-bench --num-layers "$L" --data-prefix "$DATA" \
            --seq-length 4096 --micro-batch-size "$MBS" --global-batch-size 8 --steps "$STEPS" --baseline hf \
            --matmul-ceiling ${BENCH_PROFILE:+--profile "$OUT_DIR/profile4096"} \
            --json-out "$OUT_DIR/bench_4096.jsonl" 2>&1 | grep -v -i warn | grep -v "^ " | tail -12 ;;
    ablate4096)  # the same engine run with one setting changed at a time (BENCH_ABLATE: flags, ';'-separated)
        IFS=';' read -ra ablations <<< "${BENCH_ABLATE:---no-gradient-accumulation-fusion;--cross-entropy-loss-fusion}"
        for flag in "${ablations[@]}"; do
            python3 tools/benchmark.py --preset llava-7b-bench --num-layers "$L" --data-prefix "$DATA" \
                --seq-length 4096 --micro-batch-size "$MBS" --global-batch-size 8 --steps "$STEPS" \
                --train-args="$flag" --json-out "$OUT_DIR/ablate_4096_${flag//[^a-z]/}.jsonl" 2>&1 \
                | grep -v -i warn | tail -2
        done ;;
    bench8192)
        python3 tools/benchmark.py --preset llava-7b-bench --num-layers "$L" --data-prefix "$DATA" \
            --seq-length 8192 --micro-batch-size 1 --global-batch-size 4 --steps "$STEPS" \
            --json-out "$OUT_DIR/bench_8192.jsonl" 2>&1 | grep -v -i warn | tail -4 ;;
    maxlayers)  # the most layers an 80 GB H100 (79.6 GiB) holds without recompute, at 4096 and 8192
        for seq in 4096 8192; do
            for n in ${BENCH_MAX_LAYERS:-15 14}; do
                python3 tools/benchmark.py --preset llava-7b-bench --num-layers "$n" \
                    --data-prefix "$DATA" --seq-length $seq --micro-batch-size $((8192 / seq)) \
                    --global-batch-size $((32768 / seq)) --steps "$STEPS" --memory-limit-gib 79.6 \
                    --json-out "$OUT_DIR/bench_${seq}_${n}_layers.jsonl" > "$OUT_DIR/maxlayers.log" 2>&1 \
                    && { grep "^{" "$OUT_DIR/maxlayers.log" | tail -1; BENCH_MAX_LAYERS=$n; break; }
                echo "# $n layers at $seq: $(grep -o 'OutOfMemoryError[^.]*' "$OUT_DIR/maxlayers.log" | head -1)"
            done
        done ;;
    esac
done
exit $status
