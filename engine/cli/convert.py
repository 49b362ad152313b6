"""Convert checkpoints between the engine (megatron-core distributed) and Hugging Face LLaVA.

Import a Hugging Face checkpoint into an engine checkpoint at a TP x PP layout:

    python tools/convert_checkpoint.py import --from llava-hf --source llava-1.5-7b-hf \\
        --target ckpt/llava-7b --tp 2 --pp 1 --verify
    python tools/convert_checkpoint.py import --from llava --source llava-v1.5-7b \\
        --vision-source clip-vit-large-patch14-336 --target ckpt/llava-7b --tp 1 --pp 1
    python tools/convert_checkpoint.py import --from llama+clip --source vicuna-7b-v1.5 \\
        --vision-source clip-vit-large-patch14-336 --target ckpt/start --tp 1 --pp 1

  --from llava-hf     LlavaForConditionalGeneration (config.json + safetensors shards + index)
  --from llava        original LLaVA, LlavaLlamaForCausalLM; the CLIP tower comes from
                      --vision-source (or a local `mm_vision_tower` path)
  --from llama+clip   a LLaMA/Vicuna checkpoint + a CLIP checkpoint; new projector (--seed)

The result is what the trainer's `--pretrained-checkpoint` reads (an iteration-0 checkpoint with
its tracker file); the command prints the `--model` flags that build the same model.

Export an engine checkpoint (any TP/PP layout) to the llava-hf layout that
`LlavaForConditionalGeneration.from_pretrained` and `LlavaProcessor.from_pretrained` load:

    python tools/convert_checkpoint.py export --source ckpt/run1 --target hf/run1 --verify

`--verify` runs the engine and the Hugging Face model on the same random interleaved input (text,
images, text) and reports the largest logit difference. Conversion runs on the CPU over gloo,
one process per TP x PP rank, streaming one tensor at a time (a 7B model converts in bf16 on a
24 GiB machine: the ranks together hold one copy of the model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.convert.io import parse_dtype
from engine.convert.ranks import run_ranks
from engine.errors import CheckpointError

SOURCES = ("llava-hf", "llava", "llama+clip")


# ------------------------------------------------------------------------------ processes


@contextlib.contextmanager
def _removed_on_failure(target: Path):
    """A failed conversion leaves no half-written target behind (it would block the next try)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _quiet_logs() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)


# ------------------------------------------------------------------------------ import


def open_source(kind: str, source: str | Path, vision_source: str | Path | None = None, seed: int = 0):
    from engine.convert.original_llava import LlamaClipSource, OriginalLlavaSource
    from engine.convert.sources import LlavaHFSource

    if kind == "llava-hf":
        if vision_source is not None:
            raise CheckpointError("--vision-source is not used with --from llava-hf (the tower is in the checkpoint)")
        return LlavaHFSource(source)
    if kind == "llava":
        return OriginalLlavaSource(source, vision_source)
    if kind == "llama+clip":
        return LlamaClipSource(source, vision_source, seed=seed)
    raise CheckpointError(f"unknown source layout {kind!r}; choose from {', '.join(SOURCES)}")


def _import_rank(rank: int, spec: dict) -> None:
    _quiet_logs()
    from megatron.core import parallel_state

    from engine.convert.engine_io import build, fill_from_source, load_weights, save_weights
    from engine.convert.verify import engine_batch, engine_logits
    from engine.platform import destroy_distributed, init_distributed

    init_distributed(spec["tp"], spec["pp"])
    try:
        source = open_source(spec["kind"], spec["source"], spec["vision_source"], spec["seed"])
        cfg = source.config
        dtype = parse_dtype(spec["dtype"])
        model = build(cfg, dtype, initialize=False)
        fill_from_source(model, source, cfg, progress=rank == 0 and spec["progress"])
        save_weights(model, spec["target"], cfg, spec["info"])
        if spec["verify_input"] is not None:
            # Check what was written, at the target layout: wipe the weights, load the checkpoint
            # the way the trainer does, run the forward.
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            load_weights(model, spec["target"], cfg)
            logits = engine_logits(model, engine_batch(*torch.load(spec["verify_input"])))
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                torch.save(logits, spec["engine_logits"])
    finally:
        destroy_distributed()


def run_import(kind: str, source: str | Path, target: str | Path, tp: int = 1, pp: int = 1, *,
               dtype: str = "bf16", vision_source: str | Path | None = None, seed: int = 0,
               verify: bool = False, verify_input=None, progress: bool = True, log=print) -> dict:
    """Convert `source` into an engine checkpoint under `target`. Returns a report dict; when
    verifying (on a random input, or on `verify_input` = (tokens, images, offsets)) it holds
    `max_logit_diff` and the engine's float32 logits `engine_logits` [S, padded vocab]."""
    from engine.convert.llava_hf import trainer_flags
    from engine.model.llava import validate_layout

    start = time.perf_counter()
    parse_dtype(dtype)
    src = open_source(kind, source, vision_source, seed)
    cfg = src.config
    unused = src.check()  # every tensor present with the right shape, before any work
    if unused:
        log(f"ignoring {len(unused)} tensor(s) the model does not use, e.g. {unused[:3]}")
    try:
        validate_layout(cfg, tp, pp)
    except ValueError as e:
        raise CheckpointError(f"--tp {tp} --pp {pp}: {e}") from None
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"--target {target} is not empty; give a new directory")
    log(f"importing {kind} {source} ({cfg.name}: LLM {cfg.language.num_layers} layers x {cfg.language.hidden_size}, "
        f"CLIP {cfg.vision.num_layers} x {cfg.vision.hidden_size}) -> {target} at TP={tp} PP={pp}, {dtype}")
    with tempfile.TemporaryDirectory(prefix="convert-") as tmp:
        spec = dict(kind=kind, source=str(source), vision_source=vision_source and str(vision_source), seed=seed,
                    tp=tp, pp=pp, dtype=dtype, target=str(target), progress=progress, verify_input=None,
                    engine_logits=os.path.join(tmp, "engine_logits.pt"),
                    info={"converted_from": str(source), "source_layout": kind, "dtype": dtype})
        if verify or verify_input is not None:
            from engine.convert.verify import random_interleaved_input

            spec["verify_input"] = os.path.join(tmp, "input.pt")
            torch.save(verify_input if verify_input is not None else random_interleaved_input(cfg), spec["verify_input"])
        with _removed_on_failure(target):
            run_ranks(_import_rank, tp * pp, spec)
        if src.tokenizer_path is not None:
            shutil.copy(src.tokenizer_path, target / "tokenizer.model")
        report = {"target": str(target), "model": cfg.name, "tp": tp, "pp": pp, "dtype": dtype,
                  "trainer_flags": trainer_flags(cfg)}
        if spec["verify_input"] is not None:
            report["engine_logits"] = torch.load(spec["engine_logits"])
            report.update(_verify_against_source(src, spec, dtype, log))
    report["seconds"] = round(time.perf_counter() - start, 1)
    flags = report["trainer_flags"]
    log(f"done in {report['seconds']} s. Train from it with: "
        + (f"{flags} --pretrained-checkpoint {target}" if flags else
           f"--pretrained-checkpoint {target} (no preset matches this model: add one to engine/config.py)"))
    return report


def _verify_against_source(src, spec: dict, dtype: str, log) -> dict:
    """The source as a transformers model, on the input the engine ranks ran."""
    from engine.convert.verify import reference_model

    return _compare(reference_model(src, parse_dtype(dtype)), spec, log)


def _compare(hf_model, spec: dict, log) -> dict:
    from engine.convert.verify import compare_logits, hf_logits

    tokens, images, _ = torch.load(spec["verify_input"])
    engine = torch.load(spec["engine_logits"])
    result = compare_logits(engine, hf_logits(hf_model, tokens, images))
    log(f"verify: {tokens.numel()} positions, {images.size(0)} images: max |logit difference| "
        f"{result['max_logit_diff']:.3g} (mean {result['mean_logit_diff']:.3g}, logits up to "
        f"{result['max_abs_logit']:.3g}), same top-1 token at {100 * result['top1_agreement']:.2f} % of positions")
    return result


# ------------------------------------------------------------------------------ export


def _export_rank(rank: int, spec: dict) -> None:
    _quiet_logs()
    from tqdm import tqdm

    from engine.convert.engine_io import build, iter_hf_tensors, load_weights, read_checkpoint_config
    from engine.convert.io import ShardedSafetensorsWriter
    from engine.convert.llava_hf import hf_config, write_processor
    from engine.convert.verify import engine_batch, engine_logits
    from engine.platform import destroy_distributed, init_distributed

    init_distributed(1, 1)
    try:
        _, cfg, _ = read_checkpoint_config(spec["source"])
        dtype = parse_dtype(spec["dtype"])
        model = build(cfg, dtype, initialize=False)
        load_weights(model, spec["source"], cfg)
        target = Path(spec["target"])
        writer = ShardedSafetensorsWriter(target, max_shard_bytes=spec["max_shard_bytes"])
        tensors = iter_hf_tensors(model, cfg)
        for name, tensor in tqdm(tensors, desc="export", unit="tensor", disable=not spec["progress"]):
            writer.add(name, tensor.to(dtype))
        writer.close()
        hf_config(cfg, str(dtype).removeprefix("torch.")).save_pretrained(target)
        _generation_config().save_pretrained(target)
        write_processor(target, cfg, spec["tokenizer"])
        if spec["verify_input"] is not None:
            logits = engine_logits(model, engine_batch(*torch.load(spec["verify_input"])))
            torch.save(logits, spec["engine_logits"])
    finally:
        destroy_distributed()


def _generation_config():
    from transformers import GenerationConfig

    from engine.config import LLAMA_SPECIAL_TOKENS as ids

    return GenerationConfig(bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad)


def run_export(source: str | Path, target: str | Path, *, dtype: str = "bf16", tokenizer: str | None = None,
               verify: bool = False, verify_input=None, max_shard_bytes: int = 2 * 2**30,
               progress: bool = True, log=print) -> dict:
    from engine.convert.engine_io import find_tokenizer, read_checkpoint_config

    start = time.perf_counter()
    parse_dtype(dtype)
    ckpt, cfg, common = read_checkpoint_config(source)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(source)
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"--target {target} is not empty; give a new directory")
    log(f"exporting {ckpt} (iteration {common.get('iteration')}, {cfg.name}, saved at {common.get('layout')}) "
        f"-> {target} as llava-hf, {dtype}")
    with tempfile.TemporaryDirectory(prefix="convert-") as tmp:
        spec = dict(source=str(source), target=str(target), dtype=dtype, tokenizer=str(tok), progress=progress,
                    max_shard_bytes=max_shard_bytes, verify_input=None,
                    engine_logits=os.path.join(tmp, "engine_logits.pt"))
        if verify or verify_input is not None:
            from engine.convert.verify import random_interleaved_input

            spec["verify_input"] = os.path.join(tmp, "input.pt")
            torch.save(verify_input if verify_input is not None else random_interleaved_input(cfg), spec["verify_input"])
        with _removed_on_failure(target):
            run_ranks(_export_rank, 1, spec)
        report = {"target": str(target), "model": cfg.name, "dtype": dtype}
        if spec["verify_input"] is not None:
            report["engine_logits"] = torch.load(spec["engine_logits"])
            report.update(_verify_export(target, spec, dtype, log))
    report["seconds"] = round(time.perf_counter() - start, 1)
    log(f"done in {report['seconds']} s: {target}")
    return report


def _verify_export(target: Path, spec: dict, dtype: str, log) -> dict:
    from transformers import LlavaForConditionalGeneration

    return _compare(LlavaForConditionalGeneration.from_pretrained(target, dtype=parse_dtype(dtype)).eval(), spec, log)


# ------------------------------------------------------------------------------ command line


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face / original LLaVA -> engine checkpoint")
    imp.add_argument("--from", dest="layout", required=True, choices=SOURCES)
    imp.add_argument("--source", required=True, help="the Hugging Face / LLaVA / LLaMA checkpoint directory")
    imp.add_argument("--vision-source", help="CLIP checkpoint directory (--from llava, llama+clip)")
    imp.add_argument("--target", required=True, help="new engine checkpoint directory")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    imp.add_argument("--dtype", default="bf16", help="parameter dtype written: bf16 (default), fp16, fp32")
    imp.add_argument("--seed", type=int, default=0, help="initialisation of a new projector (llama+clip)")
    imp.add_argument("--verify", action="store_true", help="compare logits with the source model")
    exp = sub.add_parser("export", help="engine checkpoint -> llava-hf")
    exp.add_argument("--source", required=True, help="engine checkpoint: a save directory or one iter_* directory")
    exp.add_argument("--target", required=True, help="new Hugging Face directory")
    exp.add_argument("--dtype", default="bf16", help="tensor dtype written: bf16 (default), fp16, fp32")
    exp.add_argument("--tokenizer", help="SentencePiece model or tokenizer directory "
                                         "(default: tokenizer.model next to the checkpoint)")
    exp.add_argument("--max-shard-size", type=_size, default=2 * 2**30, help="e.g. 2GB (default), 500MB")
    exp.add_argument("--verify", action="store_true", help="compare logits of the engine and the exported model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import":
            report = run_import(args.layout, args.source, args.target, args.tp, args.pp, dtype=args.dtype,
                                vision_source=args.vision_source, seed=args.seed, verify=args.verify)
        else:
            report = run_export(args.source, args.target, dtype=args.dtype, tokenizer=args.tokenizer,
                                verify=args.verify, max_shard_bytes=args.max_shard_size)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.pop("engine_logits", None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
