#!/usr/bin/env bash
# `make quickstart`: preprocess the bundled sample corpus and a small text-only corpus, look at
# them, train the tiny preset on a blend of the two for a few dozen steps (CPU, or the GPU when
# there is one) with checkpoints, resume once from the last checkpoint, export the result to
# Hugging Face LLaVA (checked against transformers), and say where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUN_DIR=${RUN_DIR:-out/quickstart}
ITERS=${ITERS:-40}
DATA=$RUN_DIR/data/textbook
TEXT=$RUN_DIR/data/text
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

echo "== 1/5 preprocess examples/data/textbook_sample.jsonl -> $DATA"
TOKENIZER=$("$PY" -c 'import mistral_common, pathlib; print(pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")')
"$PY" tools/preprocess_interleaved.py --input examples/data/textbook_sample.jsonl \
    --image-root examples/data/images --tokenizer-model "$TOKENIZER" --output-prefix "$DATA" \
    --workers 2 --no-progress
# Text-only documents (no images) are rejected unless asked for; they train under the loss policy
# "all" (every text token), given in the blend below as TEXT:all.
"$PY" tools/preprocess_interleaved.py --input examples/data/text_sample.jsonl --allow-text-only \
    --tokenizer-model "$TOKENIZER" --output-prefix "$TEXT" --workers 1 --no-progress

echo "== 2/5 dataset summary"
"$PY" tools/inspect_dataset.py "$DATA" --seq-length 1536
"$PY" tools/inspect_dataset.py "$TEXT:all" --seq-length 1536

DEVICE=$("$PY" -c 'import torch; print("one GPU" if torch.cuda.is_available() else "CPU (gloo)")')
echo "== 3/5 train the tiny preset for $ITERS steps on $DEVICE, 80 % textbook, 20 % text only"
TRAIN=(-m engine.pretrain --config examples/configs/tiny.yaml --data-path 0.8 "$DATA" 0.2 "$TEXT:all"
       --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --log-jsonl "$RUN_DIR/train.jsonl")
"$PY" "${TRAIN[@]}" --train-iters "$((ITERS / 2))" --lr-decay-iters "$ITERS"

echo "== 4/5 resume from the checkpoint and finish"
"$PY" "${TRAIN[@]}" --train-iters "$ITERS" --lr-decay-iters "$ITERS"

echo "== 5/5 export to Hugging Face LLaVA and check it in transformers"
"$PY" tools/convert_checkpoint.py export --source "$RUN_DIR/ckpt" --target "$RUN_DIR/hf" --tokenizer "$TOKENIZER" --verify

echo
echo "Everything is under $RUN_DIR:"
echo "  datasets     $DATA.{idx,tokens.bin,images.bin}, $TEXT.* (+ .summary.json, .errors.jsonl; packing indices in $RUN_DIR/data/index-cache)"
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
print("  per source   " + ", ".join(f"{name}: {s['samples']} samples, {s['images']} images, {s['loss_tokens']} loss tokens"
                                   for name, s in train[-1]["sources"].items()))
PYEOF
