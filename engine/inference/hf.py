"""`HFGenerator`: transformers' `generate` on a llava-hf directory, the reference implementation.

The prompts are built by the same code as the engine's (engine.inference.prompt), so both see the
same token ids and pixels; transformers' llava expects the image positions already expanded in
`input_ids`, which is what the prompt builder produces. Requests of a batch are left-padded.
The continuation is cut at EOS and at the stop strings afterwards, as the engine cuts its own.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from engine.inference.api import Request, Result, SamplingParams, error_result
from engine.inference.prompt import load_images, prepare
from engine.inference.sampling import banned_ids, finish


class HFGenerator:
    def __init__(self, model, cfg, tokenizer, *, batch_size: int = 16):
        self.model, self.cfg, self.tokenizer, self.batch_size = model, cfg, tokenizer, batch_size
        self.tokens_per_image = cfg.vision.tokens_per_image
        self.max_context = model.config.text_config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        vocab = model.config.text_config.vocab_size
        self.suppress = [i for i in banned_ids(cfg) if i < vocab]

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None, batch_size: int = 16,
                        tokenizer=None, attn_implementation: str = "sdpa") -> "HFGenerator":
        from transformers import LlavaForConditionalGeneration

        from engine.convert.llava_hf import read_model_config
        from engine.data.tokenizer import build_tokenizer

        cfg, _ = read_model_config(path)
        cuda = torch.cuda.is_available()
        dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                              attn_implementation=attn_implementation).eval()
        if cuda:
            model = model.cuda()
        if tokenizer is None:
            spm = Path(path) / "tokenizer.model"
            tokenizer = build_tokenizer("sentencepiece", spm) if spm.is_file() else build_tokenizer("hf", path)
        return cls(model, cfg, tokenizer, batch_size=batch_size)

    def close(self) -> None:
        pass

    def generate(self, requests: Seq[Request], params: SamplingParams = SamplingParams()) -> list[Result]:
        params.validate()
        results, items = {}, []
        for i, r in enumerate(requests):
            try:
                items.append((i, r, prepare(self.tokenizer, r, tokens_per_image=self.tokens_per_image,
                                            image_size=self.cfg.vision.image_size, max_context=self.max_context)))
            except ValueError as e:
                results[i] = error_result(r.id, str(e))
        for k in range(0, len(items), self.batch_size):
            for (i, r, p), res in zip(items[k: k + self.batch_size], self._batch(items[k: k + self.batch_size], params)):
                results[i] = res
        return [results[i] for i in range(len(requests))]

    @torch.no_grad()
    def _batch(self, items, params: SamplingParams) -> list[Result]:
        prompts = [p for _, _, p in items]
        width = max(p.length for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding
            ids[row, width - p.length:] = p.ids
            mask[row, width - p.length:] = 1
        pixels = torch.cat([p.pixels for p in prompts])
        sampling = params.temperature > 0
        kwargs = dict(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p) \
            if sampling else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        torch.manual_seed(params.seed)
        max_new = min(params.max_new_tokens, self.max_context - width)
        if pixels.numel():  # no pixel_values key at all for text-only prompts
            kwargs["pixel_values"] = pixels.to(self.device, self.dtype)
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            max_new_tokens=max_new, eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id,
            suppress_tokens=self.suppress, output_logits=params.logprobs, return_dict_in_generate=True, **kwargs)
        new = out.sequences[:, width:].tolist()
        results = []
        for row, ((_, r, p), seq) in enumerate(zip(items, new)):
            toks, text, reason = finish(self.tokenizer, seq, self.tokenizer.eos_id, params.stop, max_new)
            lps = None
            if params.logprobs:
                lps = tuple(self._logprob(out.logits[t][row], tok) for t, tok in enumerate(toks))
            results.append(Result(id=r.id, text=text, token_ids=tuple(toks), finish_reason=reason,
                                  logprobs=lps, prompt_length=p.length))
        return results

    def _logprob(self, logits: torch.Tensor, token: int) -> float:
        logits = logits.float().clone()
        logits[self.suppress] = float("-inf")
        return float(logits.log_softmax(-1)[token])

    @torch.no_grad()
    def image_features(self, images: Seq) -> torch.Tensor:
        pixels = load_images(list(images), self.cfg.vision.image_size).to(self.device, self.dtype)
        return self.model.model.vision_tower(pixel_values=pixels).pooler_output.float().cpu()
