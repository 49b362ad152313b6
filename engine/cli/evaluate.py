"""Few-shot evaluation of a checkpoint on the Multimodal Textbook paper's benchmarks.

    llava-evaluate --checkpoint ckpt/run1 --benchmark okvqa textvqa_ocr --data-root bench/ \\
        --shots 0 1 2 4 --demos rices --output eval/run1/
    torchrun --nproc-per-node 8 tools/evaluate.py --hf-model hf/run1 --benchmark scienceqa ...
    llava-evaluate score --benchmark okvqa --predictions eval/run1/predictions.jsonl --data-root bench/

The first form loads an engine checkpoint (`--checkpoint`) or a llava-hf directory
(`--hf-model`), answers every question of each benchmark at each shot count greedily, and
writes results.json, predictions.jsonl, errors.jsonl and results.md into `--output`
(engine/evaluation/outputs.py says what each holds). Under torchrun the questions are sharded
over the processes (`--tp` processes share one model) and the results gathered; the files are
the same for any number of GPUs. `score` rescores a predictions file without a model.
docs/evaluation.md describes the data layouts, the protocol and the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engine.evaluation.benchmarks import BENCHMARKS
from engine.evaluation.runner import SHOTS, EvalSettings, run_benchmark, summarize
from engine.evaluation.templates import TEMPLATES


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-evaluate", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="engine checkpoint (a save directory or one iter_* directory)")
    model.add_argument("--hf-model", help="llava-hf model directory")
    p.add_argument("--benchmark", nargs="+", required=True, choices=list(BENCHMARKS))
    p.add_argument("--data-root", required=True, type=Path, help="folder with one sub-folder per benchmark")
    p.add_argument("--shots", nargs="+", type=int, default=[0], choices=SHOTS)
    p.add_argument("--demos", choices=("random", "rices"), default="random")
    p.add_argument("--template", choices=list(TEMPLATES), default="seed")
    p.add_argument("--rices-encoder", help="CLIP vision model directory for RICES features "
                                           "(default: the evaluated model's vision tower)")
    p.add_argument("--rices-cache", type=Path, help="feature cache folder (default: OUTPUT/rices_cache)")
    p.add_argument("--seed", type=int, default=0, help="random demonstrations' seed")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions of each benchmark")
    p.add_argument("--batch-size", type=int, default=16, help="sequences the generator runs at once")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel processes per model (--checkpoint)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--title", help="row label of results.md (default: the model path's name)")
    p.add_argument("--output", required=True, type=Path)
    return p


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-evaluate score", description="Rescore a predictions file.")
    p.add_argument("--benchmark", nargs="+", required=True, choices=list(BENCHMARKS))
    p.add_argument("--predictions", required=True, type=Path)
    p.add_argument("--errors", type=Path, help="the run's errors.jsonl (default: next to --predictions)")
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--output", type=Path, help="write results.json and results.md here")
    return p


def _setup_distributed(tp: int):
    """Initialise torch.distributed under torchrun; the World of this process."""
    import torch
    import torch.distributed as dist

    from engine.evaluation.sharding import World

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World.current(tp)


def build_generator(args):
    import torch

    from engine.inference import EngineGenerator, HFGenerator

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.checkpoint:
        return EngineGenerator.from_checkpoint(args.checkpoint, tp=args.tp, dtype=dtype, batch_size=args.batch_size)
    return HFGenerator.from_pretrained(args.hf_model, dtype=dtype, batch_size=args.batch_size)


def _encoder(args, generator):
    """(RICES feature function, its cache identity)."""
    if args.rices_encoder:
        import torch

        from engine.evaluation.rices import ClipEncoder

        enc = ClipEncoder(args.rices_encoder, "cuda" if torch.cuda.is_available() else "cpu")
        return enc, enc.encoder_id
    source = Path(args.checkpoint or args.hf_model).resolve()
    return generator.image_features, f"model:{source}"


def evaluate(args) -> int:
    from engine.evaluation.outputs import write_outputs

    world = _setup_distributed(args.tp)
    generator = build_generator(args)
    encoder, encoder_id = _encoder(args, generator) if args.demos == "rices" else (None, "model")
    results, predictions, errors = {}, [], []
    for name in args.benchmark:
        s = EvalSettings(benchmark=name, shots=tuple(args.shots), template=args.template, demos=args.demos,
                         seed=args.seed, limit=args.limit, batch_size=max(64, args.batch_size),
                         cache_dir=args.rices_cache or args.output / "rices_cache", encoder_id=encoder_id)
        run = run_benchmark(generator, args.data_root, s, encoder=encoder, world=world)
        results[name] = summarize(run, args.shots)
        predictions += run.predictions
        errors += run.errors
        if _is_first_replica():
            print(f"{name}: " + json.dumps(results[name]), flush=True)
    if _is_first_replica():
        title = args.title or Path(args.checkpoint or args.hf_model).name
        write_outputs(args.output, results, predictions, errors, title)
        print(f"wrote {args.output}/results.json, predictions.jsonl, errors.jsonl, results.md", flush=True)
    return 0


def _is_first_replica() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def score(args) -> int:
    from engine.evaluation.items import load_jsonl
    from engine.evaluation.outputs import markdown_table, write_jsonl
    from engine.evaluation.rescore import rescore

    errors_path = args.errors or args.predictions.with_name("errors.jsonl")
    errors = load_jsonl(errors_path) if errors_path.is_file() else []
    results, rescored = {}, []
    for name in args.benchmark:
        results[name], run = rescore(name, args.predictions, args.data_root, errors)
        rescored += run.predictions
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.output / "results.md").write_text(markdown_table(results, args.predictions.parent.name))
        write_jsonl(args.output / "predictions.jsonl", rescored)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["score"]:
            return score(score_parser().parse_args(argv[1:]))
        return evaluate(run_parser().parse_args(argv))
    except ValueError as e:  # data and flag errors name their file, field or flag
        print(f"llava-evaluate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
