"""Continuous batching over a static KV cache.

Up to `slots` sequences decode together, one token each per step. A sequence leaves the batch
when it finishes (EOS, a stop string, `max_new_tokens`, the end of the context) and frees its
slot; waiting requests join at the next step: all that fit the free slots and the prefill token
budget are prefilled together in one packed forward, which also gives each its first token. The
only host sync of a step is reading the chosen token ids.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from engine.inference.api import Request, Result, SamplingParams
from engine.inference.cache import to_device
from engine.inference.prompt import Prompt
from engine.inference.sampling import choose, request_generator, stop_at


@dataclass
class Sequence:
    """One request's progress: the new tokens so far and whether (and why) it finished."""

    index: int
    request: Request
    prompt: Prompt
    params: SamplingParams
    max_context: int
    generator: torch.Generator | None = None
    slot: int = -1
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str = ""
    text: str | None = None

    @property
    def position(self) -> int:
        """Position of the last generated token (the next one to feed)."""
        return self.prompt.length + len(self.ids) - 1

    def accept(self, token: int, logprob: float | None, tokenizer) -> bool:
        """Take the chosen token; True when the sequence is finished."""
        if token == tokenizer.eos_id:
            self.reason = "eos"
            return True
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.params.stop:
            hit = stop_at(tokenizer, self.ids, self.params.stop)
            if hit is not None:
                self.text, n = hit
                del self.ids[n:], self.logprobs[n:]
                self.reason = "stop"
                return True
        if len(self.ids) >= self.params.max_new_tokens or self.prompt.length + len(self.ids) >= self.max_context:
            self.reason = "length"
            return True
        return False

    def result(self, tokenizer) -> Result:
        return Result(id=self.request.id, text=tokenizer.decode(self.ids) if self.text is None else self.text,
                      token_ids=tuple(self.ids), finish_reason=self.reason,
                      logprobs=tuple(self.logprobs) if self.params.logprobs else None,
                      prompt_length=self.prompt.length)


def new_sequences(items, params: SamplingParams, max_context: int, device) -> list[Sequence]:
    """items: (index, request, prompt) -> Sequences, each with its own generator when sampling."""
    sampling = params.temperature > 0
    return [Sequence(i, r, p, params, max_context,
                     request_generator(params.seed, r.id, device) if sampling else None) for i, r, p in items]


def advance(seqs: list[Sequence], logits, params: SamplingParams, banned, tokenizer) -> list[Sequence]:
    """Choose one token for each sequence; return those still going."""
    chosen, logprobs = choose(logits, params, [s.generator for s in seqs], banned)
    ids = chosen.tolist()
    lps = logprobs.tolist() if logprobs is not None else [None] * len(ids)
    return [s for s, t, lp in zip(seqs, ids, lps) if not s.accept(t, lp, tokenizer)]


def run_batched(runner, cache, seqs: list[Sequence], *, slots: int, prefill_tokens: int, banned,
                tokenizer, decoder=None) -> None:
    """Generate every sequence to its end (results stay in the Sequence objects). `decoder`: an
    engine.inference.graphs.StaticDecoder for the decode steps (None: `runner.decode`)."""
    params = seqs[0].params
    waiting, live, free = deque(seqs), [], list(range(slots))
    while waiting or live:
        admitted, budget = [], prefill_tokens
        while waiting and free and (not admitted or waiting[0].prompt.length <= budget):
            seq = waiting.popleft()
            seq.slot = free.pop(0)
            budget -= seq.prompt.length
            admitted.append(seq)
        if admitted:
            logits = runner.prefill([s.prompt for s in admitted], [s.slot for s in admitted], cache)
            live += advance(admitted, logits, params, banned, tokenizer)
        elif live and decoder is not None:
            logits = decoder.step([s.slot for s in live], [s.ids[-1] for s in live], [s.position for s in live])
            live = advance(live, logits, params, banned, tokenizer)
        elif live:
            tokens = to_device(torch.tensor([s.ids[-1] for s in live]), runner.device)
            logits = runner.decode(tokens, [s.slot for s in live], [s.position for s in live], cache)
            live = advance(live, logits, params, banned, tokenizer)
        free = sorted(set(range(slots)) - {s.slot for s in live})
