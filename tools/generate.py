"""See what a model says: continue an interleaved prompt of text and images.

    python tools/generate.py --checkpoint ckpt/run1 \\
        --prompt "A lecture slide: <image> The slide explains" --image slide.jpg
    python tools/generate.py --hf-model hf/run1 --prompt "<image> This photo shows" --image cat.jpg \\
        --temperature 0.7 --top-p 0.9 --seed 1

`--checkpoint` is an engine checkpoint (a save directory or one iter_* directory, any TP/PP
layout: it is loaded whole into this process); `--hf-model` a llava-hf directory, e.g. one written
by `tools/convert_checkpoint.py export`. Each `<image>` in the prompt takes the next `--image`.

The prompt becomes tokens exactly as training documents do (engine/data/tokenizer.py: BOS, the
text between images encoded chunk by chunk, no spaces around images) and each image is
preprocessed as in training (pad to square with the CLIP mean, resize, crop 336) and expanded to
576 positions, so both model kinds see the same input. Decoding is greedy by default
(`--temperature 0`); otherwise sampling with temperature, top-k and top-p (nucleus), from
`--seed`. The `<image>` token and the vocabulary's padding rows are never generated. The engine
path recomputes the whole sequence for every new token (the model has no KV cache): fine for a
look at a few dozen tokens; the Hugging Face path uses transformers' cached `generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/generate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor

IMAGE_MARKER = "<image>"


# ------------------------------------------------------------------------------ prompt


def prompt_segments(prompt: str) -> list[str | None]:
    """"A <image> B" -> ["A", None, "B"]: text segments (whitespace around images dropped, as in
    the training documents) and None for each image."""
    segments: list[str | None] = []
    for k, text in enumerate(re.split(re.escape(IMAGE_MARKER), prompt)):
        if k:
            segments.append(None)
        if text.strip():
            segments.append(text.strip())
    return segments


def build_input(tokenizer, prompt: str, image_paths: list[str], tokens_per_image: int,
                image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [1, S] with each image expanded, images [N, 3, H, W] normalised, offsets [N])."""
    import numpy as np

    from engine.data.images import normalize, preprocess_file
    from engine.data.tokenizer import encode_document

    segments = prompt_segments(prompt)
    n_images = sum(s is None for s in segments)
    if n_images != len(image_paths):
        raise ValueError(f"the prompt has {n_images} {IMAGE_MARKER} marker(s) but {len(image_paths)} --image "
                         f"file(s) were given")
    ids = encode_document(tokenizer, segments).tolist()[:-1]  # a prompt: no EOS
    expanded, offsets = [], []
    for t in ids:
        if t == tokenizer.image_token_id:
            offsets.append(len(expanded))
            expanded.extend([t] * tokens_per_image)
        else:
            expanded.append(t)
    if image_paths:
        images = torch.from_numpy(normalize(np.stack([preprocess_file(p, size=image_size) for p in image_paths])))
    else:
        images = torch.zeros(0, 3, image_size, image_size)
    return (torch.tensor([expanded], dtype=torch.int64), images, torch.tensor(offsets, dtype=torch.int64))


# ------------------------------------------------------------------------------ decoding


def pick_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature == 0, else a sample from the top-k / top-p truncated softmax."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def banned_ids(cfg) -> list[int]:
    """Ids a continuation never contains: <image> and the padding rows of the vocabulary."""
    return [cfg.image_token_id] + list(range(cfg.language.vocab_size, cfg.language.padded_vocab_size))


def generate_engine(model, cfg, tokens: Tensor, images: Tensor, offsets: Tensor, *, max_new_tokens: int,
                    eos_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0) -> list[int]:
    """New token ids from an engine model (TP=PP=1), recomputing the full sequence per token."""
    from engine.convert.verify import engine_batch, engine_logits

    gen = torch.Generator().manual_seed(seed)
    banned = torch.tensor(banned_ids(cfg))
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = engine_logits(model, engine_batch(tokens, images, offsets))[-1].cpu()
        logits[banned] = float("-inf")
        nxt = pick_next(logits, temperature, top_k, top_p, gen)
        if nxt == eos_id:
            break
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out


def generate_hf(model, cfg, tokens: Tensor, images: Tensor, *, max_new_tokens: int, eos_id: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """New token ids from a transformers LlavaForConditionalGeneration (cached `generate`)."""
    from engine.config import LLAMA_SPECIAL_TOKENS

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    torch.manual_seed(seed)
    sampling = temperature > 0
    vocab = model.config.text_config.vocab_size
    suppress = [i for i in banned_ids(cfg) if i < vocab]
    # top_k=0 disables top-k in transformers, as here (its generation default would be 50)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if sampling \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    out = model.generate(input_ids=tokens.to(device), pixel_values=images.to(device, dtype) if images.numel() else None,
                         attention_mask=torch.ones_like(tokens).to(device), max_new_tokens=max_new_tokens,
                         eos_token_id=eos_id, pad_token_id=LLAMA_SPECIAL_TOKENS.pad, suppress_tokens=suppress, **kwargs)
    new = out[0, tokens.size(1):].tolist()
    return new[: new.index(eos_id)] if eos_id in new else new


# ------------------------------------------------------------------------------ loading


def load_engine(checkpoint: str, dtype: torch.dtype | None):
    """(model, config) for an engine checkpoint, the whole model in this process."""
    from engine.convert.engine_io import build, load_weights, read_checkpoint_config
    from engine.platform import init_distributed, setup_platform

    if "RANK" not in os.environ:  # not under torchrun: a private single-process group
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    init_distributed(1, 1)
    _, cfg, _ = read_checkpoint_config(checkpoint)
    cuda = setup_platform().device == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    model = build(cfg, dtype, initialize=False)
    load_weights(model, checkpoint, cfg)
    return model, cfg


def load_hf(directory: str, dtype: torch.dtype | None):
    from transformers import LlavaForConditionalGeneration

    from engine.convert.llava_hf import read_model_config

    cfg, _ = read_model_config(directory)
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()
    if cuda:
        model = model.cuda()
    return model, cfg


def load_tokenizer(args):
    from engine.convert.engine_io import find_tokenizer
    from engine.data.tokenizer import build_tokenizer

    if args.tokenizer:
        kind = "hf" if Path(args.tokenizer).is_dir() else "sentencepiece"
        return build_tokenizer(kind, args.tokenizer)
    if args.checkpoint:
        return build_tokenizer("sentencepiece", find_tokenizer(args.checkpoint))
    spm = Path(args.hf_model) / "tokenizer.model"
    return build_tokenizer("sentencepiece", spm) if spm.is_file() else build_tokenizer("hf", args.hf_model)


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="engine checkpoint (save directory or iter_* directory)")
    src.add_argument("--hf-model", help="llava-hf directory")
    p.add_argument("--prompt", required=True, help=f"text with one {IMAGE_MARKER} per image")
    p.add_argument("--image", action="append", default=[], help="image file, once per <image>, in order")
    p.add_argument("--tokenizer", help="SentencePiece model or tokenizer directory "
                                       "(default: the one next to the checkpoint / in the HF directory)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.convert.io import CheckpointError, parse_dtype

    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        print("error: need --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0",
              file=sys.stderr)
        return 2
    try:
        dtype = parse_dtype(args.dtype)
        tokenizer = load_tokenizer(args)
        decode = dict(max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        if args.checkpoint:
            from engine.platform import destroy_distributed

            saved_port = os.environ.get("MASTER_PORT")
            try:
                model, cfg = load_engine(args.checkpoint, dtype)
                tokens, images, offsets = build_input(tokenizer, args.prompt, args.image,
                                                      cfg.vision.tokens_per_image, cfg.vision.image_size)
                new = generate_engine(model, cfg, tokens, images, offsets, **decode)
            finally:
                destroy_distributed()
                if saved_port is None:
                    os.environ.pop("MASTER_PORT", None)
        else:
            model, cfg = load_hf(args.hf_model, dtype)
            tokens, images, _ = build_input(tokenizer, args.prompt, args.image, cfg.vision.tokens_per_image,
                                            cfg.vision.image_size)
            new = generate_hf(model, cfg, tokens, images, **decode)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = tokenizer.decode(new)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "images": args.image, "prompt_tokens": tokens.size(1),
                          "new_tokens": new, "text": text}))
    else:
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
