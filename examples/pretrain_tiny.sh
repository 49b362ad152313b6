#!/usr/bin/env bash
# The tiny preset on the bundled sample corpus: CPU (gloo) or one GPU, a few minutes.
#
#   bash examples/pretrain_tiny.sh                     # preprocesses the sample if needed
#   NPROC=2 bash examples/pretrain_tiny.sh --tensor-model-parallel-size 2   # extra flags pass through
#
# Everything lands under $RUN_DIR (default out/tiny): data/, ckpt/, train.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUN_DIR=${RUN_DIR:-out/tiny}
NPROC=${NPROC:-1}
DATA=${DATA:-$RUN_DIR/data/textbook}

if [ ! -f "$DATA.idx" ]; then
    TOKENIZER=$("$PY" -c 'import mistral_common, pathlib; print(pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")')
    "$PY" tools/preprocess_interleaved.py --input examples/data/textbook_sample.jsonl \
        --image-root examples/data/images --tokenizer-model "$TOKENIZER" --output-prefix "$DATA" \
        --workers 2 --no-progress
fi

# torchrun sets RANK/WORLD_SIZE; on a CPU-only machine the engine picks gloo by itself.
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m engine.pretrain \
    --config examples/configs/tiny.yaml \
    --data-path "$DATA" \
    --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" \
    --log-jsonl "$RUN_DIR/train.jsonl" \
    "$@"
