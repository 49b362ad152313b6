"""Token choice and stop strings, without a model."""

from __future__ import annotations

import torch

from engine.inference import SamplingParams
from engine.inference.sampling import choose, request_generator, stop_at


def _draws(logits, params, n=300):
    gens = [request_generator(params.seed, f"r{i}", "cpu") for i in range(n)]
    return choose(logits.expand(n, -1).clone(), params, gens, torch.tensor([3]))[0].tolist()


def test_greedy_top_k_top_p_and_banned():
    logits = torch.tensor([[0.0, 3.0, 2.9, 9.0, -1.0]])
    assert choose(logits, SamplingParams(), [None], torch.tensor([3]))[0].tolist() == [1]  # 3 is banned
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_k=1))) == {1}
    # top-p keeps the smallest set reaching the mass: {1, 2} here
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.8))) == {1, 2}
    assert set(_draws(logits, SamplingParams(temperature=100.0))) == {0, 1, 2, 4}


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -50.0]])
    draws = torch.tensor(_draws(logits, SamplingParams(temperature=1.0, seed=3), n=4000))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = torch.tensor([0.0, 1.0, 2.0]).softmax(0)
    torch.testing.assert_close(freq[:3], expected, atol=0.03, rtol=0)


def test_logprobs_are_of_the_untempered_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    tok, lp = choose(logits, SamplingParams(logprobs=True), [None], torch.tensor([3]))
    assert tok.tolist() == [2]
    torch.testing.assert_close(lp, torch.tensor([0.0, 1.0, 2.0]).log_softmax(0)[2:])


class _Chars:
    """A tokenizer whose tokens are characters."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_stop_at_cuts_text_and_tokens():
    ids = [ord(c) for c in "hello world. bye"]
    assert stop_at(_Chars(), ids, (". ", "zzz")) == ("hello world", 13)
    assert stop_at(_Chars(), ids, ("o", "w")) == ("hell", 5)
    assert stop_at(_Chars(), ids, ("zzz",)) is None
