"""Generation speed: batch-1 decode against the HBM roofline, and few-shot VQA requests/s.

    llava-benchmark-generate --preset llava-1.5-7b --json-out docs/benchmarks/generate.json
    llava-benchmark-generate --preset tiny --decode-tokens 8 --requests 4 --hf-batch-sizes 1,2   # CPU

Random weights of a preset (speed does not depend on the values); a synthetic word-level
tokenizer that never produces EOS, so every request generates exactly its token budget.

* decode: one text prompt, batch 1; tokens/s of the decode steps alone (the time of
  `--decode-tokens` new tokens minus the time of one, which is the prefill). Each step reads every
  language-model weight once, so the roofline is bandwidth / weight bytes; the bandwidth is
  `--bandwidth-gbs` or measured with a large device-to-device copy.
* vqa: `--requests` few-shot VQA-shaped requests (`--images` images, about `--text-tokens` words
  of text, `--new-tokens` new tokens). Requests/s of the engine (`--batch-size`, continuous
  batching), of transformers' `generate` (SDPA, at its best of `--hf-batch-sizes`), and of the
  old way (no cache, the whole sequence recomputed per token, one request at a time).
"""

from __future__ import annotations

import argparse
import sys

import torch

from engine.bench.timing import print_result, timed


class WordTokenizer:
    """Each word is one token (a stable id from its text); decoding joins ids. EOS never appears."""

    bos_id, eos_id, pad_id, vocab_size, image_token_id = 1, -1, 0, 32000, 32000

    def encode(self, text: str) -> list[int]:
        import zlib

        return [3 + zlib.crc32(w.encode()) % 31000 for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-benchmark-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset (default: llava-1.5-7b on GPU, tiny on CPU)")
    p.add_argument("--num-layers", type=int, default=None, help="override the language model's layer count")
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-modes", default=None,
                   help="decode-step modes timed at batch 1 (engine.inference.EngineGenerator: graphs, static, "
                        "eager; default: graphs,eager on CUDA, eager on the CPU); the VQA requests run in the "
                        "default mode, auto")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth in GB/s (default: measured)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--text-tokens", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="engine: sequences decoded together")
    p.add_argument("--hf-batch-sizes", default="1,4,8,16", help="transformers batch sizes to try")
    p.add_argument("--seed-requests", type=int, default=4, help="requests timed the old way (0: skip)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--json-out", default=None)
    return p


def measure_bandwidth(device) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write), best of 5; on the CPU 64 MiB."""
    n = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(timed(lambda: b.copy_(a)) for _ in range(5))
    return 2 * a.numel() * 4 / best / 1e9


def vqa_requests(n: int, images: int, words: int, size: int):
    """n requests: `images` random pictures, then a question, ~`words` text tokens in all."""
    from PIL import Image

    from engine.inference import Request

    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        pics = [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy())
                for _ in range(images)]
        per = max(1, words // (images + 1))
        parts = [" ".join(f"w{i}_{k}_{j}" for j in range(per)) for k in range(images + 1)]
        prompt = " <image> ".join(parts) + " Answer:"
        out.append(Request(f"q{i}", prompt, tuple(pics)))
    return out


def bench_decode_modes(engine, modes: list[str], tokens: int, bandwidth: float) -> dict:
    """{mode: bench_decode} for each decode-step mode; the engine is left in mode "auto"."""
    out = {}
    for mode in modes:
        engine.decode_mode, engine._cache, engine._decoder = mode, None, None
        out[mode] = bench_decode(engine, tokens, bandwidth)
    engine.decode_mode, engine._cache, engine._decoder = "auto", None, None
    return out


def bench_decode(engine, tokens: int, bandwidth: float) -> dict:
    from engine.inference import Request, SamplingParams

    req = [Request("d", " ".join(f"w{j}" for j in range(32)))]
    engine.generate(req, SamplingParams(max_new_tokens=min(tokens, 8)))  # warm-up
    one = min(timed(lambda: engine.generate(req, SamplingParams(max_new_tokens=1))) for _ in range(3))
    full = min(timed(lambda: engine.generate(req, SamplingParams(max_new_tokens=tokens))) for _ in range(2))
    per_token = max(full - one, 1e-9) / (tokens - 1)
    weights = sum(p.numel() * p.element_size() for p in engine.model.language_model.parameters())
    roofline = bandwidth * 1e9 / weights
    return {"tokens_per_s": 1 / per_token, "ms_per_token": 1e3 * per_token, "weight_bytes": weights,
            "bandwidth_gbs": bandwidth, "roofline_tokens_per_s": roofline, "roofline_fraction": 1 / per_token / roofline}


def _rate(fn, n: int) -> float:
    return n / timed(fn)


def bench_vqa(engine, hf, args, requests) -> dict:
    from engine.inference import SamplingParams

    params = SamplingParams(max_new_tokens=args.new_tokens)
    engine.generate(requests[: min(2, len(requests))], params)  # warm-up
    out = {"requests": len(requests), "images": args.images, "text_tokens": args.text_tokens,
           "new_tokens": args.new_tokens,
           "prompt_positions": engine.prepare(requests[:1])[0][0][2].length,
           "engine": {"batch_size": engine.batch_size,
                      "requests_per_s": _rate(lambda: engine.generate(requests, params), len(requests))}}
    saved = engine.batch_size
    engine.batch_size = 1
    few = requests[: max(1, args.seed_requests)]
    out["engine_batch1"] = {"requests_per_s": _rate(lambda: [engine.generate([r], params) for r in few], len(few))}
    engine.batch_size = saved
    if args.seed_requests:
        out["seed_way"] = {"requests_per_s": _rate(lambda: [engine.generate_recompute([r], params) for r in few],
                                                   len(few))}
        out["speedup_vs_seed_way"] = out["engine"]["requests_per_s"] / out["seed_way"]["requests_per_s"]
    if hf is not None:
        by_size = {}
        for b in (int(x) for x in args.hf_batch_sizes.split(",")):
            hf.batch_size = b
            hf.generate(requests[:b], params)  # warm-up
            try:
                by_size[b] = _rate(lambda: hf.generate(requests, params), len(requests))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
        best = max(by_size, key=by_size.get)
        out["hf"] = {"best_batch_size": best, "requests_per_s": by_size[best], "by_batch_size": by_size}
        out["speedup_vs_hf"] = out["engine"]["requests_per_s"] / by_size[best]
    return out


def build_models(preset: str | None = None, *, num_layers: int | None = None, dtype: str | None = None,
                 batch_size: int = 32, hf: bool = True, tokenizer=None):
    """(EngineGenerator, HFGenerator or None) with the same random weights of `preset` (default:
    llava-1.5-7b on GPU, tiny on CPU), both reading prompts with `tokenizer` (default: the
    WordTokenizer)."""
    from engine.config import get_preset
    from engine.convert.io import parse_dtype
    from engine.inference import EngineGenerator, HFGenerator
    from engine.inference.engine import build_inference_model, init_process_group
    from engine.platform import setup_platform

    cuda = setup_platform().device == "cuda"
    cfg = get_preset(preset or ("llava-1.5-7b" if cuda else "tiny"))
    if num_layers:
        cfg = cfg.replace(num_layers=num_layers)
    dtype = parse_dtype(dtype) or (torch.bfloat16 if cuda else torch.float32)
    tokenizer = tokenizer or WordTokenizer()
    _, owns = init_process_group(1)
    model = build_inference_model(cfg, dtype, initialize=True)
    engine = EngineGenerator(model, cfg, tokenizer, batch_size=batch_size, owns_process_group=owns)
    reference = HFGenerator(_hf_copy(model, cfg, dtype), cfg, tokenizer) if hf else None
    return engine, reference


def _hf_copy(model, cfg, dtype):
    """transformers' LlavaForConditionalGeneration holding the engine model's weights (written
    in the Hub layout to a temporary directory and loaded the way a user loads one)."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from engine.convert.engine_io import iter_hf_tensors
    from engine.convert.llava_hf import hf_config

    config = hf_config(cfg, dtype=str(dtype).removeprefix("torch."))
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in iter_hf_tensors(model, cfg, config.text_config.vocab_size)}
        save_file(tensors, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        del tensors
        config.save_pretrained(tmp)
        hf = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.decode_tokens < 2 or args.requests < 1 or args.new_tokens < 1:
        print("error: need --decode-tokens >= 2, --requests >= 1, --new-tokens >= 1", file=sys.stderr)
        return 2
    engine, hf = build_models(args.preset, num_layers=args.num_layers, dtype=args.dtype,
                              batch_size=args.batch_size, hf=not args.skip_hf)
    try:
        device = engine.runner.device
        bandwidth = args.bandwidth_gbs or measure_bandwidth(device)
        requests = vqa_requests(args.requests, args.images, args.text_tokens, engine.cfg.vision.image_size)
        modes = (args.decode_modes or ("graphs,eager" if device.type == "cuda" else "eager")).split(",")
        by_mode = bench_decode_modes(engine, modes, args.decode_tokens, bandwidth)
        result = {"preset": engine.cfg.name, "num_layers": engine.cfg.language.num_layers,
                  "dtype": str(engine.runner.dtype).removeprefix("torch."), "device": str(device),
                  "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                  "decode_mode": modes[0], "decode": by_mode[modes[0]], "decode_by_mode": by_mode,
                  "vqa": bench_vqa(engine, hf, args, requests)}
    finally:
        engine.close()
    print_result(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
