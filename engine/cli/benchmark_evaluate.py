"""Few-shot evaluation speed: the engine's evaluation against the seed's way, in one process.

    llava-benchmark-evaluate --tokenizer "$LLAVA_TOKENIZER_MODEL" --json-out docs/benchmarks/evaluate_h200.json
    llava-benchmark-evaluate --checkpoint ckpt/run1 --hf-model hf/run1 --data-root bench/ --limit 200
    llava-benchmark-evaluate --preset tiny --questions 4 --demo-pool 8 --tokenizer tokenizer.model   # CPU

The same OK-VQA questions, at `--shots` shots (4) with random demonstrations (`--seed`) and the
`--template` prompts, are answered three ways, each through the evaluation's own code
(engine.evaluation.runner: prompts, demonstrations, scoring), greedy:

* engine: EngineGenerator (KV cache, `--batch-size` sequences decoded together) with the
  evaluation's generation settings: at most 10 new tokens, ending at a newline or EOS;
* seed_way: transformers' LlavaForConditionalGeneration.generate (HFGenerator) one question at
  a time (batch 1), 128 new tokens, ending at EOS only, as the seed's scripts generate;
* hf_engine_rules: the same batch-1 transformers path with the engine's settings, so that the
  share of the speed-up that comes from the generation settings alone is visible.

Models: `--checkpoint` (an engine checkpoint) with `--hf-model` (its llava-hf export), or by
default random weights of `--preset` (llava-1.5-7b on GPU, tiny on CPU) shared by both backends.
Prompts are read with `--tokenizer` (a SentencePiece model file or a tokenizer directory;
default: the checkpoint's, or for random weights a word-level tokenizer that has neither EOS nor
a newline). Data: `--data-root` (OK-VQA's official layout), or by default a synthetic folder of
that layout written to a temporary directory (`--questions` val questions, `--demo-pool` train
questions for the demonstrations, COCO-sized JPEG pictures).

Questions/s count the answering alone (prompts, pictures, generation, scoring); reading the data,
checking the pictures and choosing the demonstrations is done once and reported as `prepare_s`.
Each way reports its mean new tokens per question and why its continuations ended: a model that
never writes a newline or EOS (random weights) makes every way spend its whole budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from engine.bench.timing import print_result, timed
from engine.cli.benchmark_generate import build_models
from engine.evaluation.runner import SHOTS, EvalSettings, answer, check_settings, prepare
from engine.evaluation.sharding import World
from engine.evaluation.templates import TEMPLATES, stop_strings

SEED_MAX_NEW_TOKENS = 128  # the seed's scripts: greedy, 128 new tokens, EOS only
TARGET_SPEEDUP = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-benchmark-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="engine checkpoint (needs --hf-model, its llava-hf export)")
    p.add_argument("--hf-model", help="llava-hf export of --checkpoint")
    p.add_argument("--preset", default=None, help="random weights of this preset (default: llava-1.5-7b on GPU, tiny on CPU)")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's language-model layer count")
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model file or tokenizer directory")
    p.add_argument("--data-root", type=Path, default=None, help="OK-VQA folder (default: a synthetic one)")
    p.add_argument("--questions", type=int, default=64, help="synthetic data: val questions")
    p.add_argument("--demo-pool", type=int, default=64, help="synthetic data: train questions (demonstration pool)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--shots", type=int, default=4, choices=SHOTS)
    p.add_argument("--seed", type=int, default=0, help="random demonstrations' seed")
    p.add_argument("--template", choices=list(TEMPLATES), default="seed")
    p.add_argument("--batch-size", type=int, default=32, help="engine: sequences decoded together")
    p.add_argument("--json-out", default=None)
    return p


class Counted:
    """A Generator that keeps every Result by request id and may replace the sampling parameters
    it is called with (the seed's way: its own budget and stopping)."""

    def __init__(self, generator, **override):
        self.generator, self.override, self.results = generator, override, {}
        self.tokens_per_image, self.max_context = generator.tokens_per_image, generator.max_context

    def generate(self, requests, params):
        results = self.generator.generate(requests, replace(params, **self.override))
        self.results.update((r.id, r) for r in results)
        return results


def new_tokens(result) -> int:
    """Tokens the model generated for a result: those kept, and the EOS that ended it."""
    return len(result.token_ids) + (result.finish_reason == "eos")


def load_models(args):
    """(EngineGenerator, HFGenerator at batch 1, {what the models are}) holding the same weights."""
    from engine.convert.io import parse_dtype
    from engine.data.tokenizer import load_tokenizer
    from engine.inference import EngineGenerator, HFGenerator

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.checkpoint:
        dtype = parse_dtype(args.dtype)
        engine = EngineGenerator.from_checkpoint(args.checkpoint, dtype=dtype, batch_size=args.batch_size,
                                                 tokenizer=tokenizer)
        hf = HFGenerator.from_pretrained(args.hf_model, dtype=engine.runner.dtype, batch_size=1,
                                         tokenizer=engine.tokenizer)
        weights = {"checkpoint": str(args.checkpoint), "hf_model": str(args.hf_model)}
    else:
        engine, hf = build_models(args.preset, num_layers=args.num_layers, dtype=args.dtype,
                                  batch_size=args.batch_size, tokenizer=tokenizer)
        hf.batch_size = 1
        weights = "random (the same in both backends)"
    model = {"preset": engine.cfg.name, "num_layers": engine.cfg.language.num_layers, "weights": weights,
             "tokenizer": args.tokenizer or ("the checkpoint's" if args.checkpoint else "word-level (no EOS, no newline)"),
             "dtype": str(engine.runner.dtype).removeprefix("torch."), "device": str(engine.runner.device),
             "gpu": torch.cuda.get_device_name() if engine.runner.device.type == "cuda" else None}
    return engine, hf, model


def time_way(generator, prepared, s: EvalSettings, **override) -> tuple[dict, list[dict], dict]:
    """(figures, records, {id: Result}) of answering every prepared question once, after one
    warm-up question."""
    bench, good, selections, pool = prepared
    mine = list(zip(good, selections))
    answer(Counted(generator), bench, s, s.shots[0], mine[:1], pool)  # warm-up (engine settings)
    counted, out = Counted(generator, **override), []
    seconds = timed(lambda: out.extend(answer(counted, bench, s, s.shots[0], mine, pool)))
    records = [r for r in out if "error" not in r]
    tokens = [new_tokens(r) for r in counted.results.values() if not r.error]
    figures = {"batch_size": generator.batch_size,
               "max_new_tokens": override.get("max_new_tokens", bench.max_new_tokens),
               "stop": list(override.get("stop", stop_strings(s.template, bench.task))),
               "questions": len(records), "errors": len(out) - len(records), "seconds": seconds,
               "questions_per_s": len(records) / seconds,
               "mean_new_tokens": sum(tokens) / max(1, len(tokens)),
               "new_tokens_per_s": sum(tokens) / seconds,
               "finish_reasons": dict(Counter(r.finish_reason for r in counted.results.values())),
               "vqa_accuracy": 100.0 * sum(r["score"] for r in records) / max(1, len(records))}
    return figures, records, counted.results


def agreement(engine_run, other_run) -> dict:
    """How far another way's answers match the engine's, over the questions both answered."""
    (_, e_records, e_results), (_, o_records, o_results) = engine_run, other_run
    parsed = {r["id"]: r["parsed"] for r in o_records}
    both = [r for r in e_records if r["id"] in parsed]
    n = max(1, len(both))

    def prefix(i):
        a, b = e_results[i].token_ids, o_results[i].token_ids
        return b[: len(a)] == a

    return {"questions": len(both),
            "identical_outputs": sum(e_results[r["id"]].text == o_results[r["id"]].text for r in both) / n,
            "identical_answers": sum(r["parsed"] == parsed[r["id"]] for r in both) / n,
            "engine_tokens_are_a_prefix": sum(prefix(r["id"]) for r in both) / n}


def prepare_data(args, s: EvalSettings, scratch: str) -> tuple[tuple, dict]:
    """((benchmark, questions, selections, pool), {what the data is})."""
    from engine.evaluation.synthetic import synthetic_okvqa

    root = args.data_root
    if root is None:
        root = synthetic_okvqa(Path(scratch) / "okvqa", args.questions, args.demo_pool, seed=args.seed)
    out = []
    seconds = timed(lambda: out.extend(prepare(s, root, None, World())))
    bench, good, selections, pool, bad, pool_errors = out
    info = {"benchmark": bench.name, "root": None if args.data_root is None else str(root),
            "synthetic": args.data_root is None, "questions": len(good), "demo_pool": len(pool),
            "unusable_questions": len(bad), "unusable_demos": len(pool_errors), "prepare_s": seconds}
    return (bench, good, selections, pool), info


NOTE = ("All three ways answer the same questions from the same prompts, greedily. questions_per_s covers "
        "building the prompts, loading the pictures, generating and scoring. A continuation ends at EOS, at the "
        "way's stop strings, or after max_new_tokens (finish_reasons says which); when a model rarely writes a "
        "newline or EOS (random weights), every way generates its whole budget, so mean_new_tokens of seed_way "
        "is near 128 and of the others near 10. speedup_vs_hf_engine_rules is the engine's gain at equal "
        "generation settings; speedup_vs_seed_way / speedup_vs_hf_engine_rules is what the settings add.")


def run(args) -> dict:
    s = EvalSettings("okvqa", shots=(args.shots,), template=args.template, seed=args.seed, limit=args.limit,
                     batch_size=max(64, args.batch_size))
    check_settings(s)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as scratch:
        prepared, data = prepare_data(args, s, scratch)
        if not prepared[1]:
            raise ValueError("no usable questions to answer")
        engine, hf, model = load_models(args)
        try:
            ways = {"engine": time_way(engine, prepared, s),
                    "hf_engine_rules": time_way(hf, prepared, s),
                    "seed_way": time_way(hf, prepared, s, max_new_tokens=SEED_MAX_NEW_TOKENS, stop=())}
        finally:
            engine.close()
    return report(args, model, data, ways)


def report(args, model: dict, data: dict, ways: dict) -> dict:
    engine = ways["engine"][0]
    result = {"shots": args.shots, "demos": "random", "seed": args.seed, "template": args.template,
              "model": model, "data": data,
              "mean_prompt_positions": sum(r["prompt_length"] for r in ways["engine"][1]) / max(1, len(ways["engine"][1]))}
    for name, way in ways.items():
        result[name] = way[0]
        if name != "engine":
            result[name]["agreement_with_engine"] = agreement(ways["engine"], way)
    result["speedup_vs_seed_way"] = engine["questions_per_s"] / result["seed_way"]["questions_per_s"]
    result["speedup_vs_hf_engine_rules"] = engine["questions_per_s"] / result["hf_engine_rules"]["questions_per_s"]
    result["target_speedup_vs_seed_way"] = TARGET_SPEEDUP
    result["new_tokens_seed_way_over_engine"] = result["seed_way"]["mean_new_tokens"] / max(engine["mean_new_tokens"], 1e-9)
    result["note"] = NOTE
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.checkpoint) != bool(args.hf_model):
        print("error: --checkpoint and --hf-model go together (the engine checkpoint and its llava-hf export)",
              file=sys.stderr)
        return 2
    if args.checkpoint and (args.preset or args.num_layers):
        print("error: --preset and --num-layers apply to random weights only", file=sys.stderr)
        return 2
    if args.questions < 1 or args.demo_pool < args.shots or args.batch_size < 1:
        print("error: need --questions >= 1, --demo-pool >= --shots, --batch-size >= 1", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except ValueError as e:
        print(f"llava-benchmark-evaluate: error: {e}", file=sys.stderr)
        return 2
    print_result(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
