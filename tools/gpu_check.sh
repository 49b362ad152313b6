#!/usr/bin/env bash
# One call on a GPU machine: build the C++ helpers, run tests/gpu, then the throughput benchmarks.
#
#   bash tools/gpu_check.sh DATA_PREFIX [OUT_DIR]
#
# Where packages are missing (no internet), put wheels in .whl/ (megatron-core,
# optionally nvidia-cudnn-frontend) and set LLAVA_TOKENIZER_MODEL to a tokenizer.model copy.
# Set GPU_CHECK_STAGES to a subset of "te tests kernels bench4096 ablate4096 bench8192 maxlayers
# attention fp8bench converge fp8resume fullsize generate parity7b evalbench" to run less. "te" installs Transformer Engine from carried
# parts first (TE_SMALL: the folder with its install.sh; the core wheel's parts already in
# /tmp/tec), so the stages after it run with TE: tests/gpu then checks both layer specs. BENCH_LAYERS (8), BENCH_MBS (2), BENCH_STEPS (6), BENCH_MAX_LAYERS (layer counts to
# try under an 80 GB cap, "15 14"), BENCH_ABLATE (flags to change one at a time),
# BENCH_PROFILE=1 (profile one 4096 step), BENCH_BASELINE (hf; empty: none), BENCH_ATTENTION (auto).
set -uo pipefail
DATA=${1:?usage: tools/gpu_check.sh DATA_PREFIX [OUT_DIR]}
OUT_DIR=${2:-out/gpu_check}
STAGES=${GPU_CHECK_STAGES:-tests bench4096 bench8192}
L=${BENCH_LAYERS:-8} MBS=${BENCH_MBS:-2} STEPS=${BENCH_STEPS:-6} BASELINE=${BENCH_BASELINE-hf}
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
bench() {  # the 8-layer bench preset at 8192 x 1, one row, with extra trainer flags "$2" ($1 names it)
    python3 tools/benchmark.py --preset llava-7b-bench --num-layers "$L" --data-prefix "$DATA" \
        --seq-length 8192 --micro-batch-size 1 --global-batch-size 4 --steps "$STEPS" --train-args="$2" \
        --json-out "$OUT_DIR/fp8_$1.jsonl" 2>&1 | grep "^{" | tail -1
}
tb_corpus() {  # $1 documents: the Textbook-shaped corpus (llava-textbook-corpus), preprocessed to $OUT_DIR/tb/data
    [ -f "$OUT_DIR/tb/data.idx" ] && return 0
    python3 tools/make_textbook_corpus.py --output "$OUT_DIR/tb/raw" --documents "$1" --workers 16 | tail -1
    python3 tools/preprocess_interleaved.py --input "$OUT_DIR/tb/raw/corpus.jsonl" --image-root "$OUT_DIR/tb/raw" \
        --output-prefix "$OUT_DIR/tb/data" --tokenizer-model "$LLAVA_TOKENIZER_MODEL" --workers 16 --no-progress | tail -1
}
full() {  # $1 name, then flags: LLaVA-1.5-7B's shape with all 32 layers at 8192 x 1 on the Textbook-shaped corpus
    local name=$1; shift
    python3 tools/benchmark.py --preset llava-7b-bench --num-layers 32 --data-prefix "$OUT_DIR/tb/data" \
        --seq-length 8192 --micro-batch-size 1 --json-out "$OUT_DIR/full_$name.jsonl" "$@" > "$OUT_DIR/full_$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc $(grep '^{' "$OUT_DIR/full_$name.log" | tail -1 | cut -c1-400)"
    [ $rc = 0 ] || grep -E "Error|error:" "$OUT_DIR/full_$name.log" | tail -2 | cut -c1-300
    return $rc
}
block() { echo "--recompute-granularity full --recompute-method block --recompute-num-layers $1"; }
train_curve() {  # $1 name, then trainer flags: 300 steps of the 8-layer preset on the Textbook-shaped corpus
    local name=$1; shift
    python3 -m engine.pretrain --model llava-7b-bench --num-layers "$L" --data-path "$OUT_DIR/tb/data" \
        --seq-length 4096 --micro-batch-size 1 --global-batch-size 4 --split 1,0,0 --eval-interval 0 \
        --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-iters 30 --seed 7 --num-workers 4 \
        --log-interval 10 --log-jsonl "$OUT_DIR/converge_$name.jsonl" --bf16 "$@" > "$OUT_DIR/converge_$name.log" 2>&1
    echo "$name: exit $?, $(grep '^train' "$OUT_DIR/converge_$name.log" | tail -1 | cut -c1-120)"
}
for stage in $STAGES; do
    echo "=== $stage"
    case $stage in
    te)
        source "${TE_SMALL:-.te/small}/install.sh" || exit 1 ;;
    fp8bench)  # bf16 (torch-native, TE) against FP8 (delayed, tensorwise, + vision), same data, same session
        bench bf16_local "--attention-backend=varlen"
        bench bf16_te "--attention-backend=te"
        bench fp8_delayed "--attention-backend=te --fp8-format=hybrid --fp8-recipe=delayed --fp8-amax-history-len=1024 --fp8-amax-compute-algo=max"
        bench fp8_tensorwise "--attention-backend=te --fp8-format=hybrid --fp8-recipe=tensorwise"
        bench fp8_tensorwise_vision "--attention-backend=te --fp8-format=hybrid --fp8-recipe=tensorwise --fp8-vision" ;;
    converge)  # Textbook-shaped corpus, then bf16 against FP8 (both recipes), same data order and seed
        tb_corpus ${CONVERGE_DOCS:-800}
        ITERS=${CONVERGE_ITERS:-300}
        train_curve bf16 --attention-backend te --train-iters "$ITERS"
        train_curve fp8_delayed --attention-backend te --train-iters "$ITERS" --fp8-format hybrid --fp8-recipe delayed \
            --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
        train_curve fp8_tensorwise --attention-backend te --train-iters "$ITERS" --fp8-format hybrid --fp8-recipe tensorwise ;;
    fp8resume)  # an FP8 run resumed from its checkpoint continues with the same losses
        tb_corpus ${CONVERGE_DOCS:-800}
        F="--attention-backend te --fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 16 --log-interval 1
           --lr-warmup-iters 2 --lr-decay-iters 20"
        train_curve resume_full $F --train-iters 20
        train_curve resume_a $F --train-iters 10 --save "$OUT_DIR/fp8ck" --save-interval 10
        train_curve resume_b $F --train-iters 20 --save "$OUT_DIR/fp8ck" --load "$OUT_DIR/fp8ck"
        python3 - "$OUT_DIR" <<'PYEOF'
import json, sys
rows = lambda n: {r["iteration"]: r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/converge_{n}.jsonl")) if r["kind"] == "train"}
full, resumed = rows("resume_full"), {**rows("resume_a"), **rows("resume_b")}
same = [full[i] == resumed.get(i) for i in sorted(full)]
print(f"fp8 resume: {sum(same)}/{len(same)} iterations with identical losses; "
      f"iteration 20: {full.get(20)} uninterrupted, {resumed.get(20)} resumed")
PYEOF
        ;;
    fullsize)  # docs/benchmarks.md "What fits where": FULL_BLOCKS (layers recomputed, tried in order until one
               # fits) for the optimizer on the GPU, FULL_CAP_BLOCKS under an 80 GB cap with it offloaded
        tb_corpus ${FULL_DOCS:-300}
        for n in ${FULL_BLOCKS:-14 18 22}; do full "bf16_block$n" --global-batch-size 4 --steps 4 $(block "$n") && break; done
        if [ -n "${FULL_FP8_BLOCK:-}" ]; then
            full "fp8_delayed_block$FULL_FP8_BLOCK" --global-batch-size 4 --steps 4 $(block "$FULL_FP8_BLOCK") \
                --train-args="--attention-backend=te --fp8-format=hybrid --fp8-recipe=delayed --fp8-amax-history-len=1024 --fp8-amax-compute-algo=max"
        fi
        for n in ${FULL_CAP_BLOCKS:-6 12}; do
            full "bf16_cap80_offload_block$n" --memory-limit-gib 79.6 --optimizer-cpu-offload --overlap-cpu-optimizer-d2h-h2d \
                --global-batch-size "${FULL_OFFLOAD_GBS:-16}" --warmup 1 --steps 2 $(block "$n") && break
        done
        [ -n "${FULL_EXTRA:-}" ] && full extra $FULL_EXTRA ;;
    generate)  # decode (CUDA graphs and op by op) and few-shot VQA requests/s, 7B preset, random weights
        python3 tools/benchmark_generate.py --requests "${GEN_REQUESTS:-64}" --hf-batch-sizes "${GEN_HF_BATCHES:-1,8,16}" \
            --seed-requests 2 --json-out "$OUT_DIR/generate.json" > "$OUT_DIR/generate.log" 2>&1
        echo "exit $?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({m: round(r['tokens_per_s'],1) for m, r in d['decode_by_mode'].items()}, d['decode']['roofline_fraction'], {k: v for k, v in d['vqa'].items() if 'speedup' in k or k in ('engine', 'engine_batch1')})" "$OUT_DIR/generate.json" 2>&1 | tail -2 ;;
    parity7b)  # a 7B checkpoint trained briefly on DATA (weights only), then tests/gpu/test_generate_gpu.py on it
        python3 -m engine.pretrain --model llava-1.5-7b --data-path "$DATA" --seq-length 2048 --micro-batch-size 1 \
            --global-batch-size 1 --train-iters "${PARITY_ITERS:-150}" --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 20 --lr-decay-style cosine \
            --split 1,0,0 --eval-interval 0 --log-interval 25 --bf16 $(block 32) --save "$OUT_DIR/ck7b" \
            --save-interval "${PARITY_ITERS:-150}" --no-save-optim --num-workers 4 > "$OUT_DIR/parity_train.log" 2>&1
        echo "train exit $?: $(grep '^train' "$OUT_DIR/parity_train.log" | sed -n '1p;$p' | cut -c1-100 | tr '\n' '|')"
        cp "$LLAVA_TOKENIZER_MODEL" "$OUT_DIR/ck7b/tokenizer.model"
        LLAVA_GENERATE_CHECKPOINT="$OUT_DIR/ck7b" python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_generate_gpu.py \
            2>&1 | grep -E "greedy agreement|passed|failed|Error" | tail -6 ;;
    evalbench)  # few-shot evaluation questions/s: the engine against transformers at batch 1 (the seed's way)
        python3 tools/benchmark_evaluate.py ${EVAL_ARGS:-} --json-out "$OUT_DIR/evaluate.json" > "$OUT_DIR/evaluate.log" 2>&1
        echo "exit $?"; tail -c 1500 "$OUT_DIR/evaluate.json" ;;
    tests)
        python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25
        [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    attention)
        python3 tools/bench_attention.py --json-out "$OUT_DIR/attention.jsonl" 2>&1 | tail -8 ;;
    kernels)
        python3 tools/bench_kernels.py --json-out "$OUT_DIR/kernels.jsonl" 2>&1 | tail -8 ;;
    bench4096)
        python3 tools/benchmark.py --preset llava-7b-bench --num-layers "$L" --data-prefix "$DATA" \
            --seq-length 4096 --micro-batch-size "$MBS" --global-batch-size 8 --steps "$STEPS" \
            ${BASELINE:+--baseline "$BASELINE"} --attention-backend "${BENCH_ATTENTION:-auto}" \
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
