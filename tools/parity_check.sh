#!/usr/bin/env bash
# Loss parity of parallel layouts on real GPUs (NCCL): one short TP=1 run writes a checkpoint that
# every layout starts from (weights resharded on load), then the same steps of the same data run at
# each layout and the per-step losses are printed side by side.
#
#   bash tools/parity_check.sh DATA_PREFIX OUT_DIR [LAYOUT ...]
#   LAYOUT = name:nproc:extra-flags, e.g. "tp2sp:2:--tensor-model-parallel-size 2 --sequence-parallel"
set -uo pipefail
DATA=${1:?usage: tools/parity_check.sh DATA_PREFIX OUT_DIR [LAYOUT ...]}
OUT_DIR=${2:?usage: tools/parity_check.sh DATA_PREFIX OUT_DIR [LAYOUT ...]}
shift 2
LAYOUTS=("$@")
[ ${#LAYOUTS[@]} -gt 0 ] || LAYOUTS=("tp1:1:" "tp2sp:2:--tensor-model-parallel-size 2 --sequence-parallel"
                                    "pp2:2:--pipeline-model-parallel-size 2" "dp2:2:")
# NVLink multicast stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL_FLAGS=${PARITY_MODEL_FLAGS:---model llava-7b-bench --num-layers 2 --bf16 --seq-length 4096}
mkdir -p "$OUT_DIR"
# shellcheck disable=SC2086
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m engine.pretrain $MODEL_FLAGS \
    --data-path "$DATA" --split 1,0,0 --micro-batch-size 1 --global-batch-size 4 --train-iters 1 \
    --eval-interval 0 --save "$OUT_DIR/start" --save-interval 1 > "$OUT_DIR/start.log" 2>&1 \
    || { echo "the start checkpoint failed: see $OUT_DIR/start.log"; tail -5 "$OUT_DIR/start.log"; exit 1; }
for layout in "${LAYOUTS[@]}"; do
    IFS=: read -r name nproc extra <<<"$layout"
    echo "=== $name ($nproc GPU) $extra"
    # shellcheck disable=SC2086
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m engine.pretrain $MODEL_FLAGS \
        --data-path "$DATA" --split 1,0,0 --pretrained-checkpoint "$OUT_DIR/start" \
        --micro-batch-size 1 --global-batch-size 4 --train-iters "${PARITY_STEPS:-10}" \
        --eval-interval 0 --log-interval 1 --log-jsonl "$OUT_DIR/$name.jsonl" $extra \
        > "$OUT_DIR/$name.log" 2>&1 || { echo "failed: see $OUT_DIR/$name.log"; tail -5 "$OUT_DIR/$name.log"; }
done
"$PY" - "$OUT_DIR" "${LAYOUTS[@]}" <<'PY'
import json, sys, pathlib
out, names = pathlib.Path(sys.argv[1]), [l.split(":")[0] for l in sys.argv[2:]]
runs = {}
for n in names:
    p = out / f"{n}.jsonl"
    if p.exists():
        runs[n] = {r["iteration"]: r for r in map(json.loads, p.open()) if r.get("kind") == "train"}
ref = runs.get(names[0], {})
print("iteration " + " ".join(f"{n:>12s}" for n in runs))
worst = {n: 0.0 for n in runs}
for it in sorted(ref):
    row = []
    for n, r in runs.items():
        loss = r.get(it, {}).get("loss")
        row.append(f"{loss:12.5f}" if loss is not None else f"{'-':>12s}")
        if loss is not None:
            worst[n] = max(worst[n], abs(loss - ref[it]["loss"]))
    print(f"{it:9d} " + " ".join(row))
print("max |loss - " + names[0] + "|: " + json.dumps({n: round(v, 5) for n, v in worst.items()}))
tput = {n: {k: r[max(r)].get(k) for k in ("tflops_per_gpu", "tokens_per_s", "mfu")} for n, r in runs.items() if r}
print("last-step throughput: " + json.dumps(tput))
(out / "parity_summary.json").write_text(json.dumps({"max_abs_loss_diff": worst, "throughput": tput}))
PY
