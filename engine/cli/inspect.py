"""Look inside a preprocessed dataset: statistics, and one packed sample rendered as HTML.

    llava-inspect PREFIX [--seq-length 4096] [--json]      (or: python tools/inspect_dataset.py ...)
    llava-inspect PREFIX --render 3 --out sample3.html

Statistics: documents, images, tokens, LLM positions (an image counts as --tokens-per-image
positions), histograms of document length and of images per document, and the packing
efficiency at --seq-length: useful positions / (samples x seq_length), from the same packing
index training builds (engine/data/packing.py, built in memory here, never cached).

--render N writes a self-contained HTML page of packed sample N in training order, built by
engine/data/dataset.py exactly as the trainer receives it: each image inline (a data: URI of
the stored pixels) between its text, the text decoded with the tokenizer, text that gets no loss
shaded, and each packed segment (a document or a piece of one) in its own box. A token is "trained" when the position before it has loss_mask 1, i.e. when
the model is trained to predict it.

By default the whole dataset is packed (--split 1,0,0). To see what a training run sees, pass
its --split and --seed and choose --split-name.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from pathlib import Path

import numpy as np

from engine.config import LLAMA_SPECIAL_TOKENS
from engine.data.dataset import PackedDataset
from engine.data.format import FormatError, IndexedDataset
from engine.data.blend import split_loss_suffix
from engine.data.packing import LOSS_POLICIES, POLICIES, PackingConfig

BAR_WIDTH = 40


# ------------------------------------------------------------------------------------ statistics


def dataset_stats(reader: IndexedDataset, tokens_per_image: int = 576) -> dict:
    """Counts and per-document distributions of a dataset (no packing involved)."""
    lengths = reader.doc_lengths.astype(np.int64)
    images = reader.doc_image_counts.astype(np.int64)
    positions = lengths + (tokens_per_image - 1) * images  # each <image> token becomes N positions
    return {
        "prefix": reader.prefix,
        "documents": int(reader.num_documents),
        "images": int(reader.num_images),
        "image_storage": reader.image_storage,
        "image_size": int(reader.image_size),
        "image_bytes": int(reader.image_byte_offsets[-1]),
        "tokens": int(reader.num_tokens),
        # the stream of a document is BOS, text, one <image> per image, EOS (docs/internals.md)
        "text_tokens": int(reader.num_tokens - reader.num_images - 2 * reader.num_documents),
        "llm_positions": int(positions.sum()),
        "tokens_per_image": int(tokens_per_image),
        "documents_without_images": int(np.count_nonzero(images == 0)),
        "doc_positions": _summary(positions),
        "doc_tokens": _summary(lengths),
        "images_per_doc": _summary(images),
        "doc_positions_histogram": _histogram(positions, discrete=False),
        "images_per_doc_histogram": _histogram(images, discrete=True),
    }


def packing_stats(ds: PackedDataset) -> dict:
    """How well one epoch packs: samples, useful positions and the padding left over."""
    index, seq = ds.index, ds.config.seq_length
    epoch = slice(int(index.epoch_offsets[0]), int(index.epoch_offsets[1]))
    used = index.sample_lengths[index.shuffle[epoch]].astype(np.int64)
    segments = np.diff(index.sample_offsets)[index.shuffle[epoch]]
    samples = int(len(used))
    return {
        "seq_length": seq,
        "policy": ds.config.policy,
        "max_images_per_sample": ds.config.max_images_per_sample,
        "seed": ds.config.seed,
        "split": ds.split,
        "documents": [int(ds.documents[0]), int(ds.documents[1])],
        "samples": samples,
        "useful_positions": int(used.sum()),
        "padding_positions": int(samples * seq - used.sum()),
        "efficiency": float(used.sum()) / (samples * seq) if samples else 0.0,
        "segments_per_sample": _summary(segments),
        "sample_fill_histogram": _histogram(used, discrete=False),
    }


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"min": 0, "median": 0.0, "mean": 0.0, "max": 0}
    return {"min": int(values.min()), "median": float(np.median(values)),
            "mean": float(values.mean()), "max": int(values.max())}


def _histogram(values: np.ndarray, *, discrete: bool, bins: int = 10) -> list[list[int]]:
    """[[lo, hi, count], ...] with integer bounds, hi inclusive. `discrete` gives one bin per
    value when the range is small (images per document)."""
    if len(values) == 0:
        return []
    lo, hi = int(values.min()), int(values.max())
    if discrete and hi - lo < 25:
        edges = np.arange(lo, hi + 2)
    else:
        edges = np.unique(np.linspace(lo, hi + 1, bins + 1).round().astype(np.int64))
    counts, _ = np.histogram(values, bins=edges)
    return [[int(a), int(b) - 1, int(c)] for a, b, c in zip(edges[:-1], edges[1:], counts)]


def format_histogram(rows: list[list[int]], unit: str) -> list[str]:
    if not rows:
        return ["    (empty)"]
    peak = max(c for _, _, c in rows) or 1
    width = max(len(f"{hi:,}") for _, hi, _ in rows)
    labels = [f"{lo:>{width},}" if lo == hi else f"{lo:>{width},} - {hi:>{width},}" for lo, hi, _ in rows]
    pad = max(len(label) for label in labels)
    return [f"    {label:>{pad}} {unit} | {'#' * round(BAR_WIDTH * count / peak):<{BAR_WIDTH}} {count:,}"
            for label, (_, _, count) in zip(labels, rows)]


def format_report(stats: dict, packing: dict | None) -> str:
    s = stats
    tpi = s["tokens_per_image"]
    pos, img = s["doc_positions"], s["images_per_doc"]
    lines = [
        f"dataset        {s['prefix']}",
        f"documents      {s['documents']:,} ({s['documents_without_images']:,} without images)",
        f"images         {s['images']:,} ({s['image_storage']}, {s['image_size']}x{s['image_size']}, "
        f"{s['image_bytes'] / 2**20:,.1f} MiB stored, {img['mean']:.2f} per document, max {img['max']})",
        f"tokens         {s['tokens']:,} stored = {s['text_tokens']:,} text + {s['images']:,} <image> "
        f"+ {2 * s['documents']:,} BOS/EOS",
        f"LLM positions  {s['llm_positions']:,} (each image = {tpi} positions)",
        f"document length in LLM positions: min {pos['min']:,}, median {pos['median']:,.0f}, "
        f"mean {pos['mean']:,.0f}, max {pos['max']:,}",
        *format_histogram(s["doc_positions_histogram"], "positions"),
        "images per document:",
        *format_histogram(s["images_per_doc_histogram"], "images"),
    ]
    if packing:
        p = packing
        limit = p["max_images_per_sample"] if p["max_images_per_sample"] is not None else "none"
        lines += [
            f"packing        seq_length {p['seq_length']:,}, policy {p['policy']}, max images per sample "
            f"{limit}, seed {p['seed']}, {p['split']} split = documents [{p['documents'][0]:,}, {p['documents'][1]:,})",
            f"samples        {p['samples']:,} per epoch, {p['segments_per_sample']['mean']:.2f} segments per sample",
            f"efficiency     {p['efficiency']:.2%} = {p['useful_positions']:,} useful positions / "
            f"({p['samples']:,} samples x {p['seq_length']:,}); {p['padding_positions']:,} padding",
            "positions used per sample:",
            *format_histogram(p["sample_fill_histogram"], "positions"),
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ rendering

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 60em; color: #222; }
h1 { font-size: 1.3em; }
table.meta td { padding: 0 1em 0 0; }
.legend span { margin-right: 1.5em; }
section.segment { border: 2px solid #36c; border-radius: 6px; margin: 1em 0; padding: 0.5em 1em; }
section.padding { border-color: #aaa; border-style: dashed; color: #777; }
section h2 { font-size: 0.9em; color: #36c; margin: 0 0 0.5em 0; }
section.padding h2 { color: #777; }
.text { white-space: pre-wrap; line-height: 1.6; }
.trained { background: #fff; }
.noloss { background: #ddd; color: #555; }
.special { font-family: monospace; font-size: 0.8em; border: 1px solid #999; border-radius: 3px; padding: 0 2px; }
figure { display: inline-block; margin: 0.3em; vertical-align: middle; text-align: center; }
figure img { width: 168px; height: 168px; border: 1px solid #999; }
figcaption { font-size: 0.7em; color: #666; }
"""


def _data_uri(image) -> str:
    """A stored image, uint8 [H, W, 3], as a JPEG data: URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_spans(tokenizer, ids: list[int], cuts: list[int]) -> list[str]:
    """Text of ids[cuts[i]:cuts[i+1]]. Decoding whole prefixes keeps the spaces SentencePiece
    encodes inside the next token; if a cut falls inside a multi-byte character (byte
    fallback), the pieces are decoded on their own instead."""
    prefixes = [tokenizer.decode(ids[:c]) for c in cuts]
    if all(b.startswith(a) for a, b in zip(prefixes, prefixes[1:])):
        return [b[len(a):] for a, b in zip(prefixes, prefixes[1:])]
    return [tokenizer.decode(ids[a:b]) for a, b in zip(cuts, cuts[1:])]


def _render_text(tokenizer, ids: np.ndarray, trained: np.ndarray) -> str:
    """One run of text positions -> spans, split where the trained flag changes and around
    BOS/EOS, which are shown as badges."""
    specials = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
    out, start = [], 0
    while start < len(ids):
        if int(ids[start]) in specials:
            cls = "trained" if trained[start] else "noloss"
            out.append(f'<span class="special {cls}">{html.escape(specials[int(ids[start])])}</span>')
            start += 1
            continue
        end = start
        while end < len(ids) and int(ids[end]) not in specials:
            end += 1
        run = [int(i) for i in ids[start:end]]
        flags = trained[start:end]
        cuts = [0] + [j for j in range(1, len(run)) if flags[j] != flags[j - 1]] + [len(run)]
        for (a, _), text in zip(zip(cuts, cuts[1:]), _decode_spans(tokenizer, run, cuts)):
            cls = "trained" if flags[a] else "noloss"
            out.append(f'<span class="{cls}">{html.escape(text)}</span>')
        start = end
    return "".join(out)


def _render_segment(ds: PackedDataset, k: int, sample: dict, segment, span: tuple[int, int], image_at: dict,
                    tokenizer) -> str:
    """One packed segment (document `d`, its tokens [a, b)) at positions `span` of sample k."""
    (d, a, b), (p0, p1) = segment, span
    tokens, loss_mask = sample["tokens"].numpy(), sample["loss_mask"].numpy()
    image_id, tpi = ds.reader.image_token_id, ds.config.tokens_per_image
    n = int(ds.reader.doc_lengths[d])
    part = "whole document" if (a, b) == (0, n) else f"tokens [{a:,}, {b:,}) of {n:,}"
    parts = [f'<section class="segment"><h2>document {d}: {part}; positions [{p0:,}, {p1:,})</h2>'
             '<div class="text">']
    # trained[p]: position p's token is a target, i.e. the position before it has loss
    trained = np.zeros(p1 - p0, bool)
    trained[1:] = loss_mask[p0:p1 - 1] > 0
    p = p0
    while p < p1:
        if p in image_at:
            n_img = image_at[p]
            parts.append(f'<figure><img src="{_data_uri(sample["images"][n_img])}" '
                         f'alt="image {n_img}"><figcaption>image {n_img}: {tpi} positions, no loss'
                         "</figcaption></figure>")
            p += tpi
            continue
        q = p
        while q < p1 and q not in image_at:
            q += 1
        if np.any(tokens[p:q] == image_id):
            raise ValueError(f"sample {k}: <image> positions without an image offset in [{p}, {q})")
        parts.append(_render_text(tokenizer, tokens[p:q], trained[p - p0:q - p0]))
        p = q
    parts.append("</div></section>")
    return "".join(parts)


def render_sample_html(ds: PackedDataset, k: int, tokenizer) -> str:
    """The HTML page of sample k (training order) of `ds`."""
    if not 0 <= k < len(ds):
        raise IndexError(f"sample {k} out of range: {ds.prefix} packs into {len(ds)} samples "
                         f"at seq_length {ds.config.seq_length}")
    sample = ds[k]
    segments = ds.index.segments_of(k).tolist()
    loss_mask = sample["loss_mask"].numpy()
    cu = sample["cu_seqlens"].tolist()
    image_at = {int(p): j for j, p in enumerate(sample["image_offsets"].tolist())}
    tpi, seq = ds.config.tokens_per_image, ds.config.seq_length
    used = cu[len(segments)]

    body = []
    for j, (p0, p1) in enumerate(zip(cu, cu[1:])):
        if j >= len(segments):  # the padding tail is the last segment
            body.append(f'<section class="segment padding"><h2>padding: {p1 - p0:,} positions '
                        f"(pad id {ds.pad_id}, no loss)</h2></section>")
            continue
        body.append(_render_segment(ds, k, sample, segments[j], (p0, p1), image_at, tokenizer))

    n_images = len(image_at)
    trained_total = int(loss_mask.sum())
    title = f"{Path(ds.prefix).name}: packed sample {k}"
    meta = [
        ("dataset", ds.prefix),
        ("sample", f"{k} in training order ({ds.split} split, seed {ds.config.seed}; "
                   f"packed sample id {int(ds.index.shuffle[k])})"),
        ("positions", f"{used:,} used of {seq:,} ({used / seq:.1%}), {seq - used:,} padding"),
        ("segments", f"{len(segments)} (documents {', '.join(str(s[0]) for s in segments)})"),
        ("images", f"{n_images} x {tpi} positions"),
        ("loss", f"{trained_total:,} positions have loss_mask 1"),
    ]
    rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in meta)
    legend = ('<p class="legend"><span class="trained">trained text</span><span class="noloss">no loss '
              "(BOS, text before the document&#x27;s first image, the first token after a cut)</span>"
              '<span class="special">&lt;s&gt;</span> BOS / EOS; blue box = one packed segment</p>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<table class="meta">{rows}</table>{legend}\n' + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------ command line


def default_tokenizer_model() -> str | None:
    """The Mistral/LLaMA SentencePiece model shipped by mistral-common, if installed."""
    try:
        import mistral_common
    except ImportError:
        return None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return str(path) if path.is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (<prefix>.idx, .tokens.bin, .images.bin)")
    p.add_argument("--seq-length", type=int, default=4096, help="LLM positions per packed sample")
    p.add_argument("--tokens-per-image", type=int, default=576, help="LLM positions per image")
    p.add_argument("--max-images-per-sample", type=int, default=None, help="packing limit (default: none)")
    p.add_argument("--packing-policy", choices=POLICIES, default="split",
                   help="documents longer than a sample: split at text positions or truncate")
    p.add_argument("--seed", type=int, default=PackingConfig.seed, help="packing shuffle seed")
    p.add_argument("--loss-policy", choices=LOSS_POLICIES, default=LOSS_POLICIES[0],
                   help="which text carries loss (as the training run's policy for this dataset): "
                        "after-first-image (the seed's rule) or all; a PREFIX:all suffix says the same")
    p.add_argument("--split", default="1,0,0", help="train,valid,test proportions (default: all in train)")
    p.add_argument("--split-name", choices=("train", "valid", "test"), default="train")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--render", type=int, metavar="N", help="write packed sample N (training order) as HTML")
    p.add_argument("--out", help="HTML file for --render")
    p.add_argument("--tokenizer-type", choices=("sentencepiece", "hf"), default="sentencepiece")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer the dataset was built with (default: mistral-common's tokenizer.model.v1)")
    args = p.parse_args(argv)
    if args.render is not None and not args.out:
        p.error("--render needs --out FILE.html")
    if args.out and args.render is None:
        p.error("--out is only used with --render N")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (FormatError, IndexError, ValueError) as e:  # bad input, not a bug: no traceback
        raise SystemExit(f"inspect_dataset: {e}") from e


def run(args: argparse.Namespace) -> int:
    args.prefix, loss_policy = split_loss_suffix(args.prefix, args.loss_policy)
    config = PackingConfig(seq_length=args.seq_length, tokens_per_image=args.tokens_per_image,
                           max_images_per_sample=args.max_images_per_sample, policy=args.packing_policy,
                           seed=args.seed, loss_policy=loss_policy)
    tokenizer = None
    if args.render is not None:  # fail on a bad tokenizer before any work
        from engine.data.tokenizer import build_tokenizer

        model = args.tokenizer_model or default_tokenizer_model()
        if model is None:
            raise SystemExit("--render needs --tokenizer-model (mistral-common is not installed)")
        tokenizer = build_tokenizer(args.tokenizer_type, model)
    reader = IndexedDataset(args.prefix)
    if tokenizer is not None and tokenizer.image_token_id != reader.image_token_id:
        raise SystemExit(f"{args.prefix}: the dataset's <image> id is {reader.image_token_id} but the "
                         f"tokenizer {model} gives {tokenizer.image_token_id}: pass the tokenizer the "
                         "dataset was built with (--tokenizer-type/--tokenizer-model)")
    stats = dataset_stats(reader, args.tokens_per_image)
    ds = packing = None
    if reader.num_documents or args.render is not None:  # an empty dataset has nothing to pack
        ds = PackedDataset(args.prefix, config, split=args.split_name, split_weights=args.split,
                           pad_id=tokenizer.pad_id if tokenizer else LLAMA_SPECIAL_TOKENS.pad, cache=False)
        packing = packing_stats(ds)
    if args.json:
        print(json.dumps({"dataset": stats, "packing": packing}, indent=1))
    else:
        print(format_report(stats, packing))
    if args.render is not None:
        page = render_sample_html(ds, args.render, tokenizer)
        Path(args.out).write_text(page, encoding="utf-8")
        print(f"wrote {args.out}: sample {args.render}, {len(page) / 1024:,.0f} KiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
