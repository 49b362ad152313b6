"""See what a model says: continue interleaved prompts of text and images, one or a file of them.

    llava-generate --checkpoint ckpt/run1 \\
        --prompt "A lecture slide: <image> The slide explains" --image slide.jpg
    llava-generate --hf-model hf/run1 --prompt "<image> This photo shows" --image cat.jpg \\
        --temperature 0.7 --top-p 0.9 --seed 1
    llava-generate --checkpoint ckpt/run1 --prompts-jsonl prompts.jsonl --output answers.jsonl \\
        --max-new-tokens 10 --batch-size 32 --stop "\\n"
    torchrun --nproc-per-node 2 -m engine.cli.generate --checkpoint ckpt/run1 --tp 2 ...

`--checkpoint` is an engine checkpoint (a save directory or one iter_* directory, saved at any
TP/PP layout; it loads at TP=`--tp`, PP=1); `--hf-model` a llava-hf directory, e.g. one written
by `llava-convert export`, run with transformers' `generate` (the reference). Each `<image>`
in a prompt takes the next image.

Batch mode reads one JSON object per line, `{"id": ..., "prompt": "...<image>...", "images":
[paths]}` (relative paths are relative to the JSONL file), and writes one line per request in the
same order, `{"id", "text", "token_ids", "finish_reason"}`, plus `"error"` for a request that
could not be answered (an image that cannot be read, a marker count that differs from the images,
a prompt longer than the context); the others are answered. A line that is not such an object
stops the run with its file and line number.

Prompts become tokens exactly as training documents do and images are preprocessed as in
training (engine.inference.prompt). Decoding is greedy by default (`--temperature 0`); otherwise
sampling with temperature, top-k and top-p, each request from its own generator seeded by
`--seed` and its id. The `<image>` token and the vocabulary's padding rows are never generated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

IMAGE_MARKER = "<image>"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="engine checkpoint (save directory or iter_* directory)")
    src.add_argument("--hf-model", help="llava-hf directory (transformers generate)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help=f"one prompt: text with one {IMAGE_MARKER} per --image")
    what.add_argument("--prompts-jsonl", help='requests, one {"id", "prompt", "images"} object per line')
    p.add_argument("--image", action="append", default=[], help="image file, once per <image>, in order")
    p.add_argument("--output", help="batch mode: where to write the results (JSONL)")
    p.add_argument("--tokenizer", help="SentencePiece model or tokenizer directory "
                                       "(default: the one next to the checkpoint / in the HF directory)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not part of the text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (engine; run under torchrun "
                                                        "with as many processes)")
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--json", action="store_true", help="one prompt: print one JSON object instead of text")
    return p


def read_requests(path: str | Path) -> list:
    """The requests of a JSONL file; ValueError naming the file and line of a malformed one."""
    from engine.inference import Request

    path = Path(path)
    base = path.parent
    requests, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rid, prompt, images = obj.get("id"), obj.get("prompt"), obj.get("images", [])
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise ValueError(f"{where}: field 'id' must be a string or an integer")
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: field 'prompt' must be a string")
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise ValueError(f"{where}: field 'images' must be a list of paths")
            if str(rid) in seen:
                raise ValueError(f"{where}: id {rid!r} appears twice")
            seen.add(str(rid))
            requests.append(Request(str(rid), prompt, tuple(str(base / i) for i in images)))
    return requests


def _params(args):
    from engine.inference import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=tuple(args.stop), seed=args.seed)
    params.validate()
    return params


def _generator(args, dtype):
    from engine.inference import EngineGenerator, HFGenerator

    if args.checkpoint:
        return EngineGenerator.from_checkpoint(args.checkpoint, tp=args.tp, dtype=dtype, batch_size=args.batch_size,
                                               tokenizer=args.tokenizer)
    if args.tp not in (None, 1):
        raise ValueError("--tp applies to --checkpoint (the engine) only")
    tokenizer = None
    if args.tokenizer:
        from engine.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    return HFGenerator.from_pretrained(args.hf_model, dtype=dtype, batch_size=args.batch_size, tokenizer=tokenizer)


def _is_first_rank() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _report(args, requests, results) -> int:
    if args.prompts_jsonl:
        with open(args.output, "w", encoding="utf-8") as f:
            for r in results:
                line = {"id": r.id, "text": r.text, "token_ids": list(r.token_ids), "finish_reason": r.finish_reason}
                if r.error is not None:
                    line["error"] = r.error
                f.write(json.dumps(line) + "\n")
        bad = sum(r.error is not None for r in results)
        print(f"wrote {len(results)} result(s) to {args.output} ({bad} error(s))", file=sys.stderr)
        return 0
    (r,) = results
    if r.error is not None:
        print(f"error: {r.error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"prompt": args.prompt, "images": args.image, "prompt_tokens": r.prompt_length,
                          "new_tokens": list(r.token_ids), "text": r.text, "finish_reason": r.finish_reason}))
    else:
        print(args.prompt + r.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    from engine.convert.io import parse_dtype
    from engine.errors import CheckpointError
    from engine.inference import Request

    args = build_parser().parse_args(argv)
    if bool(args.prompts_jsonl) != bool(args.output):
        print("error: --prompts-jsonl and --output go together", file=sys.stderr)
        return 2
    saved_port = os.environ.get("MASTER_PORT")
    generator, first = None, True
    try:
        params = _params(args)
        dtype = parse_dtype(args.dtype)
        requests = read_requests(args.prompts_jsonl) if args.prompts_jsonl else \
            [Request("prompt", args.prompt, tuple(args.image))]
        generator = _generator(args, dtype)
        results = generator.generate(requests, params)
        first = _is_first_rank()
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if generator is not None:
            generator.close()
        if saved_port is None:
            os.environ.pop("MASTER_PORT", None)
    return _report(args, requests, results) if first else 0


if __name__ == "__main__":
    sys.exit(main())
