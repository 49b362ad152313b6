#!/usr/bin/env bash
# One call on a GPU machine: build the C++ helpers, run tests/gpu, then the throughput benchmarks.
#
#   bash tools/gpu_check.sh DATA_PREFIX [OUT_DIR]
#
# Where packages are missing (no internet), put wheels in .whl/ (megatron-core,
# optionally nvidia-cudnn-frontend) and set LLAVA_TOKENIZER_MODEL to a tokenizer.model copy.
# Set GPU_CHECK_STAGES to a subset of "tests bench4096 bench8192 attention" to run less.
set -uo pipefail
DATA=${1:?usage: tools/gpu_check.sh DATA_PREFIX [OUT_DIR]}
OUT_DIR=${2:-out/gpu_check}
STAGES=${GPU_CHECK_STAGES:-tests bench4096 bench8192}
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
    bench4096)
        python3 tools/benchmark.py --preset llava-7b-bench --num-layers "${BENCH_LAYERS:-8}" --data-prefix "$DATA" \
            --seq-length 4096 --global-batch-size 8 --steps "${BENCH_STEPS:-6}" --baseline hf --matmul-ceiling \
            --json-out "$OUT_DIR/bench_4096.jsonl" 2>&1 | grep -v -i warn | tail -8 ;;
    bench8192)
        python3 tools/benchmark.py --preset llava-7b-bench --num-layers "${BENCH_LAYERS:-8}" --data-prefix "$DATA" \
            --seq-length 8192 --global-batch-size 4 --steps "${BENCH_STEPS:-6}" \
            --json-out "$OUT_DIR/bench_8192.jsonl" 2>&1 | grep -v -i warn | tail -8 ;;
    esac
done
exit $status
