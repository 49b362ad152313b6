#!/usr/bin/env bash
# `make quickstart`: preprocess the bundled sample corpus, look at it, train the tiny preset for a
# few dozen steps (CPU, or the GPU when there is one) with checkpoints, resume once from the last
# checkpoint, export the result to Hugging Face LLaVA (checked against transformers), and say
# where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUN_DIR=${RUN_DIR:-out/quickstart}
ITERS=${ITERS:-40}
DATA=$RUN_DIR/data/textbook
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

echo "== 1/5 preprocess examples/data/textbook_sample.jsonl -> $DATA"
TOKENIZER=$("$PY" -c 'import mistral_common, pathlib; print(pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")')
"$PY" tools/preprocess_interleaved.py --input examples/data/textbook_sample.jsonl \
    --image-root examples/data/images --tokenizer-model "$TOKENIZER" --output-prefix "$DATA" \
    --workers 2 --no-progress

echo "== 2/5 dataset summary"
"$PY" tools/inspect_dataset.py "$DATA" --seq-length 1536

DEVICE=$("$PY" -c 'import torch; print("one GPU" if torch.cuda.is_available() else "CPU (gloo)")')
echo "== 3/5 train the tiny preset for $ITERS steps on $DEVICE"
TRAIN=(-m engine.pretrain --config examples/configs/tiny.yaml --data-path "$DATA"
       --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --log-jsonl "$RUN_DIR/train.jsonl")
"$PY" "${TRAIN[@]}" --train-iters "$((ITERS / 2))" --lr-decay-iters "$ITERS"

echo "== 4/5 resume from the checkpoint and finish"
"$PY" "${TRAIN[@]}" --train-iters "$ITERS" --lr-decay-iters "$ITERS"

echo "== 5/5 export to Hugging Face LLaVA and check it in transformers"
"$PY" tools/convert_checkpoint.py export --source "$RUN_DIR/ckpt" --target "$RUN_DIR/hf" --tokenizer "$TOKENIZER" --verify

echo
echo "Everything is under $RUN_DIR:"
echo "  dataset      $DATA.{idx,tokens.bin,images.bin} (+ .summary.json, .errors.jsonl; packing indices in $RUN_DIR/data/index-cache)"
echo "  checkpoints  $RUN_DIR/ckpt/ (newest: iter_$(printf %07d "$(cat "$RUN_DIR/ckpt/latest_checkpointed_iteration.txt")"))"
echo "  metrics      $RUN_DIR/train.jsonl (one JSON object per logged step)"
echo "  hugging face $RUN_DIR/hf/ (LlavaForConditionalGeneration + LlavaProcessor: from_pretrained works)"
"$PY" - "$RUN_DIR/train.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if r["kind"] == "train"]
valid = [r for r in rows if r["kind"] == "valid"]
print(f"  loss         {train[0]['loss']:.3f} (iteration {train[0]['iteration']}) -> "
      f"{train[-1]['loss']:.3f} (iteration {train[-1]['iteration']})"
      + (f"; validation {valid[0]['loss']:.3f} -> {valid[-1]['loss']:.3f}" if valid else ""))
PYEOF
