"""Choosing the next token of every live sequence at once, and ending a continuation.

Greedy is an argmax. Sampling is the Gumbel-max draw argmax(logits / T + Gumbel noise) over the
top-k / top-p truncated vocabulary, which samples the softmax exactly; the noise of each row
comes from that request's own generator (seeded by the run's seed and the request id), so a
request draws the same tokens whichever batch it shares. Everything stays on the device; the
caller reads the chosen ids once per step.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def banned_ids(cfg) -> list[int]:
    """Ids a continuation never contains: <image> and the padding rows of the vocabulary."""
    return [cfg.image_token_id] + list(range(cfg.language.vocab_size, cfg.language.padded_vocab_size))


def request_generator(seed: int, request_id: str, device) -> torch.Generator:
    # The CPU generator keeps only the low 32 bits of a seed: mix the seed into those.
    low = zlib.crc32(f"{seed}\0{request_id}".encode())
    return torch.Generator(device=device).manual_seed(((int(seed) & 0x7FFFFFFF) << 32) | low)


def _truncate(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest top-p mass."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens ranked above already reach top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def choose(logits: Tensor, params, generators: list, banned: Tensor) -> tuple[Tensor, Tensor | None]:
    """logits [B, V] (fp32, full vocabulary) -> (token ids [B], log-probabilities [B] or None)."""
    logits = logits.index_fill(1, banned, float("-inf"))
    if params.temperature <= 0:
        chosen = logits.argmax(-1)
    else:
        scaled = _truncate(logits / params.temperature, params.top_k, params.top_p)
        u = torch.stack([torch.rand(scaled.size(1), generator=g, device=scaled.device) for g in generators])
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20, max=1 - 1e-7)))
        chosen = (scaled + gumbel).argmax(-1)
    logprobs = None
    if params.logprobs:
        logprobs = logits.log_softmax(-1).gather(1, chosen[:, None])[:, 0]
    return chosen, logprobs


def stop_at(tokenizer, ids: list[int], stops) -> tuple[str, int] | None:
    """When the decoded text of `ids` contains a stop string: (the text before the earliest one,
    the number of tokens up to the one that completes it); else None."""
    text = tokenizer.decode(ids)
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return None
    cut = min(hits)[0]
    n = len(ids)
    while n > 1 and any(s in tokenizer.decode(ids[: n - 1]) for s in stops):
        n -= 1
    return text[:cut], n


def finish(tokenizer, ids: list[int], eos_id: int, stops, max_new_tokens: int) -> tuple[list[int], str, str]:
    """A finished raw continuation (as a reference model returns it) -> (ids, text, finish_reason)."""
    reason = "length"
    if eos_id in ids:
        ids, reason = ids[: ids.index(eos_id)], "eos"
    hit = stop_at(tokenizer, ids, stops) if stops else None
    if hit is not None:
        text, n = hit
        return ids[:n], text, "stop"
    return ids, tokenizer.decode(ids), reason
