"""Interleaved image-text documents (OBELICS / Multimodal Textbook, MMC4) -> the binary dataset.

    llava-preprocess --input docs.jsonl shards/ --image-root images/ \\
        --tokenizer-model tokenizer.model --output-prefix out/textbook --workers 16

Writes ``<prefix>.idx``, ``.tokens.bin``, ``.images.bin`` (engine/data/format.py), the rejected
documents with their reasons in ``<prefix>.errors.jsonl`` and counts in ``<prefix>.summary.json``.
The output is the same bytes whatever ``--workers``, and a rerun after an interruption resumes
from the finished parts (engine/data/preprocess.py says how). Accepted documents and rejection
kinds: engine/data/documents.py and docs/data_format.md.

``--merge A B ... --output-prefix OUT`` concatenates finished datasets instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from engine.data import format as fmt
from engine.data.images import DEFAULT_MAX_PIXELS
from engine.data.preprocess import RunOptions, Settings, run
from engine.errors import PreprocessError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--input", nargs="+", metavar="PATH", help="JSON (a list) / JSONL files, or folders of them")
    io_.add_argument("--output-prefix", required=True, help="writes PREFIX.idx, .tokens.bin, .images.bin, "
                                                            ".errors.jsonl, .summary.json")
    io_.add_argument("--image-root", default=None,
                     help="folder the image paths are relative to (default: each input file's folder)")
    io_.add_argument("--format", choices=["auto", "obelics", "mmc4"], default="auto",
                     help="document format (default: detected per document)")
    io_.add_argument("--text-field", choices=["texts", "text_ocr_list"], default="texts")
    io_.add_argument("--merge", nargs="+", metavar="PREFIX",
                     help="instead of preprocessing, concatenate these datasets into --output-prefix")
    doc = p.add_argument_group("documents and images")
    doc.add_argument("--max-num-images", type=int, default=12, help="keep the first N images per document")
    doc.add_argument("--allow-text-only", action="store_true",
                     help="keep documents without images (a text-only corpus; train on it with the loss policy "
                          "'all', e.g. --data-path PREFIX:all) instead of rejecting them as no_images")
    doc.add_argument("--image-size", type=int, default=336)
    doc.add_argument("--image-storage", choices=["jpeg", "raw"], default="jpeg")
    doc.add_argument("--jpeg-quality", type=int, default=95)
    doc.add_argument("--no-jpeg-draft", action="store_true",
                     help="decode large JPEGs at full size (slower; differs by about one grey level)")
    doc.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="larger images are rejected as decompression bombs")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", choices=["sentencepiece", "hf"], default="sentencepiece")
    tok.add_argument("--tokenizer-model", help="SentencePiece .model file or Hugging Face tokenizer folder")
    run_ = p.add_argument_group("running")
    run_.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    run_.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                      help="skip bad documents (listed in PREFIX.errors.jsonl) or stop at the first")
    run_.add_argument("--docs-per-part", type=int, default=10000,
                      help="documents per resumable part (an interrupted run redoes at most one part)")
    run_.add_argument("--no-progress", action="store_true")
    return p


def _checked(args: argparse.Namespace) -> tuple[Settings, RunOptions]:
    if not args.input or not args.tokenizer_model:
        raise PreprocessError("--input and --tokenizer-model are required (or use --merge)")
    if args.max_num_images < 1 or args.workers < 1 or args.docs_per_part < 1:
        raise PreprocessError("--max-num-images, --workers and --docs-per-part must be at least 1")
    if not 1 <= args.jpeg_quality <= 100:
        raise PreprocessError("--jpeg-quality must be in 1..100")
    settings = Settings(
        image_root=args.image_root, text_field=args.text_field, doc_format=args.format,
        max_num_images=args.max_num_images, image_size=args.image_size, image_storage=args.image_storage,
        jpeg_quality=args.jpeg_quality, jpeg_draft=not args.no_jpeg_draft, max_image_pixels=args.max_image_pixels,
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        allow_text_only=args.allow_text_only)
    options = RunOptions(workers=args.workers, docs_per_part=args.docs_per_part, on_error=args.on_error,
                         progress=not args.no_progress)
    return settings, options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.merge:
            ds = fmt.merge(args.merge, args.output_prefix)
            print(json.dumps({"output_prefix": args.output_prefix, "documents": ds.num_documents,
                              "images": ds.num_images, "tokens": ds.num_tokens}))
            return 0
        settings, options = _checked(args)
        summary = run(settings, args.input, args.output_prefix, options)
    except (PreprocessError, fmt.FormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
