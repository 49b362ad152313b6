"""The training flags: Megatron's names, grouped by concern (one function per group), and the
parser that holds them all. `engine.training.arguments` reads them (over an optional YAML config)
into the frozen `TrainingConfig`; keep each flag's name equal to its settings field
(engine/training/config.py).

Defaults reproduce the seed recipe (DAMO-NLP-SG/multimodal_textbook, scripts/run_training.sh):
lr 2e-5, constant after a 3 % linear warmup, weight decay 0, Adam(0.9, 0.999), gradient
clipping at 1.0, bf16 where a GPU is present, vision tower frozen, at most 12 images per document.
"""

from __future__ import annotations

import argparse

from engine.config import PRESETS
from engine.data.packing import LOSS_POLICIES


# --------------------------------------------------------------------------- flags by concern


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="llava-1.5-7b", choices=sorted(PRESETS),
                   help="model preset (engine/config.py); the flags below override single fields")
    g.add_argument("--num-layers", type=int, help="language-model layers (override the preset)")
    g.add_argument("--hidden-size", type=int, help="language-model hidden size")
    g.add_argument("--ffn-hidden-size", type=int, help="language-model MLP hidden size")
    g.add_argument("--num-attention-heads", type=int, help="language-model attention heads")
    g.add_argument("--num-query-groups", type=int, help="grouped-query attention groups")
    g.add_argument("--freeze-vision", dest="freeze_vision", action="store_true", default=True,
                   help="keep the CLIP tower frozen (default, as the seed)")
    g.add_argument("--train-vision", dest="freeze_vision", action="store_false",
                   help="train the CLIP tower too")
    g.add_argument("--freeze-projector", action="store_true", help="keep the MLP projector frozen")
    g.add_argument("--freeze-llm", action="store_true",
                   help="keep the language model frozen (projector-only alignment stage)")
    g.add_argument("--recompute-granularity", choices=["selective", "full"], default=None,
                   help="activation recompute (the seed used gradient checkpointing = full); "
                        "engine/model/recompute.py")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full recompute: uniform = every layer, in chunks of --recompute-num-layers; "
                        "block = only the first --recompute-num-layers layers of each pipeline stage. "
                        "Default uniform")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full recompute: layers per chunk (uniform) or recomputed layers per stage (block); default 1")
    g.add_argument("--recompute-modules", nargs="+", default=None, metavar="MODULE",
                   help="selective recompute: any of core_attn, mlp, layernorm (layernorm: torch-native "
                        "spec only); default core_attn")
    g.add_argument("--attention-backend", default="auto",
                   help="packed-attention kernel (engine/model/attention.py); auto picks the fastest available")


def _parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard norms/dropout activations along the sequence over the TP group")
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="shard optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap the gradient reduce-scatter/all-reduce with the backward pass")
    g.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=False,
                   help="overlap the distributed optimizer's parameter all-gather with the forward")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient bucket (default: mcore's)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with several ranks: a rank whose heartbeat (every SECONDS/4, through the "
                        "process group's store) stops for SECONDS is lost, and every rank exits with "
                        "status 4 naming it; 0 = off (a lost rank is noticed at the distributed timeout)")


def _data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="dataset prefixes (<prefix>.idx/.tokens.bin/.images.bin), optionally weighted: "
                        "[w1] p1 [w2] p2 ...; a prefix ending in :all or :after-first-image has that loss policy")
    g.add_argument("--data-blend-file", default=None, metavar="FILE.yaml",
                   help="instead of --data-path: a YAML list of {path, weight, loss} entries")
    g.add_argument("--loss-policy", choices=list(LOSS_POLICIES), default=LOSS_POLICIES[0],
                   help="which text carries loss, for datasets that do not say: after-first-image (the seed's "
                        "rule: none before a document's first image) or all (every text token; text-only data)")
    g.add_argument("--split", default="969,30,1",
                   help="train,valid,test proportions of each dataset's documents (Megatron's)")
    g.add_argument("--seq-length", type=int, default=4096,
                   help="language-model positions per packed sample (an image counts as 576)")
    g.add_argument("--max-num-images", type=int, default=12,
                   help="images per document (the seed's mmc4_max_num_images); applied by "
                        "tools/preprocess_interleaved.py --max-num-images and checked against the data at start")
    g.add_argument("--max-images-per-sample", type=int, default=None,
                   help="cap on images in one packed sample (default: only --seq-length limits them)")
    g.add_argument("--packing-policy", choices=["split", "truncate"], default="split",
                   help="a document longer than the room left: split it at a text position, or start "
                        "a new sample (truncating documents longer than a whole sample)")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    g.add_argument("--loader-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="stop with an error naming the worker, its sample and documents when no batch "
                        "arrives from the data-loader workers for this long (0: wait forever)")
    g.add_argument("--data-cache-path", default=None,
                   help="where packing/shuffle indices are cached (default: next to the data)")


def _training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step; gradient accumulation = global / (micro x DP). "
                        "Default: micro-batch-size x DP")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None,
                   help="alternative to --train-iters: total samples (rounded up to whole steps)")
    g.add_argument("--seed", type=int, default=42, help="the seed's HF Trainer default")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit when iteration %% N == 0")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit after this much wall time")
    g.add_argument("--max-skipped-steps", type=int, default=5,
                   help="steps with a NaN/Inf loss or gradients are skipped (no update); after this many in "
                        "a row the run saves its last good state and stops with exit status 3")
    g.add_argument("--gradient-accumulation-fusion", action=argparse.BooleanOptionalAction, default=True,
                   help="weight-gradient GEMMs accumulate straight into the fp32 gradient buffer "
                        "(engine/model/fusions.py) instead of a bf16 gradient plus a separate add")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused vocab-parallel cross-entropy (bf16 only; no faster here, "
                        "~1 GiB more memory: docs/benchmarks.md)")
    g.add_argument("--eval-interval", type=int, default=1000, help="0: no evaluation")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "cosine", "linear"], default="constant")
    g.add_argument("--lr-warmup-fraction", type=float, default=0.03,
                   help="fraction of the decay iterations spent in linear warmup")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="warmup iterations (instead of --lr-warmup-fraction)")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: the training iterations")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="keep the Adam state and fp32 main weights in host memory and run the update there "
                        "(megatron-core's HybridDeviceOptimizer; needs --use-distributed-optimizer)")
    g.add_argument("--optimizer-offload-fraction", type=float, default=1.0,
                   help="with --optimizer-cpu-offload: the share of this rank's optimizer state moved to the host")
    g.add_argument("--overlap-cpu-optimizer-d2h-h2d", action="store_true",
                   help="with --optimizer-cpu-offload: copy gradients to the host and weights back on side "
                        "streams, one host optimizer per parameter, overlapping the host update")


def _precision_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights/activations with fp32 main weights; default: on with CUDA, "
                        "off (fp32) on CPU")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None,
                   help="FP8 GEMMs through Transformer Engine: e4m3 everywhere, or hybrid (e4m3 forward, "
                        "e5m2 gradients); needs --bf16, TE and a GPU with FP8 tensor cores")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "blockwise"], default="delayed",
                   help="scaling: delayed (amax history), tensorwise (TE's current scaling) or blockwise")
    g.add_argument("--fp8-amax-history-len", type=int, default=1, help="the delayed recipe's amax history")
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"], default="most_recent",
                   help="how the delayed recipe reduces its amax history")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="keep the first and last language layers in bf16 (tensorwise/blockwise recipes)")
    g.add_argument("--num-layers-at-start-in-bf16", type=int, default=1)
    g.add_argument("--num-layers-at-end-in-bf16", type=int, default=1)
    g.add_argument("--fp8-vision", action="store_true",
                   help="run the frozen vision tower's forward in FP8 too (default: bf16)")


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="directory for distributed checkpoints")
    g.add_argument("--load", default=None,
                   help="resume from this directory (its latest checkpoint); may equal --save")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--export-hf-interval", type=int, default=None, metavar="N",
                   help="export every N-th saved checkpoint to <save>/hf/iter_XXXXXXX (Hugging Face LLaVA) in a "
                        "low-priority background process; training does not wait for it")
    g.add_argument("--export-hf-keep", type=int, default=None, metavar="K",
                   help="keep only the K newest Hugging Face exports")
    g.add_argument("--tokenizer-model", default=None,
                   help="the SentencePiece model the data was tokenized with, written into each Hugging Face "
                        "export (default: <save>/tokenizer.model)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoint tensors in the background while training continues")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action=argparse.BooleanOptionalAction, default=False,
                   help="save the optimizer state in the model's layout, so a resume may change TP and PP "
                        "too (each DP group gathers its optimizer state on one rank: slower saves). "
                        "Default: every rank writes its own shard; a resume may change DP; the weights "
                        "always reshard (--no-load-optim resumes them into any layout)")
    g.add_argument("--ckpt-save-threads", type=int, default=2, help="file-writing threads per rank")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="model weights to start from (a converted LLaVA checkpoint); "
                        "optimizer, schedule and data position start fresh")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save weights (and schedule, data position, RNG) without the optimizer state, a "
                        "seventh of its size for a full model; resume such a checkpoint with --no-load-optim")
    g.add_argument("--no-load-optim", action="store_true", help="resume weights but not optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG states")


def _logging_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-jsonl", default=None, help="append one JSON object per logged step here")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 TFLOP/s of one GPU for MFU (default: looked up by device name; docs/flops.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-pretrain",
        description="Pretrain LLaVA on interleaved image-text data with megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML file with the same keys as these flags")
    for add in (_model_flags, _parallel_flags, _data_flags, _training_flags, _optimizer_flags,
                _precision_flags, _checkpoint_flags, _logging_flags, _fewshot_flags):
        add(p)
    return p


def _fewshot_flags(p: argparse.ArgumentParser) -> None:
    from engine.evaluation.during_training import add_fewshot_flags

    add_fewshot_flags(p.add_argument_group("few-shot evaluation during training (docs/evaluation.md)"))
