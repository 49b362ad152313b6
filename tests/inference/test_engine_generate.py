"""Generation from an engine checkpoint: the KV-cache path equals the no-cache path and
transformers' `generate`, whatever the batch, and handles stops, lengths, sampling and bad input.

The model is a tiny random llava-hf model imported with the project's converter (conftest.py), in
fp32 on the CPU; the prompts interleave text with real photographs (examples/data/images).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from engine.inference import HFGenerator, Request, SamplingParams

from generation_inputs import IMAGES, interleaved_requests

GREEDY = SamplingParams(max_new_tokens=5)


@pytest.fixture(scope="module")
def requests_():
    return interleaved_requests(20)


@pytest.fixture(scope="module")
def greedy(engine, requests_):
    return engine.generate(requests_, GREEDY)


@pytest.fixture(scope="module")
def hf(hf_dir):
    return HFGenerator.from_pretrained(hf_dir, dtype=torch.float32, batch_size=1)


def _tokens(results):
    return {r.id: r.token_ids for r in results}


def test_greedy_equals_recompute_and_transformers(engine, hf, requests_, greedy):
    assert all(r.error is None and len(r.token_ids) == 5 and r.finish_reason == "length" for r in greedy)
    assert len({r.token_ids for r in greedy}) > 5  # the prompts lead to different continuations
    assert [r.id for r in greedy] == [r.id for r in requests_]
    assert _tokens(engine.generate_recompute(requests_, GREEDY)) == _tokens(greedy)
    reference = hf.generate(requests_, GREEDY)
    assert _tokens(reference) == _tokens(greedy)
    assert [r.text for r in reference] == [r.text for r in greedy]
    assert [r.prompt_length for r in reference] == [r.prompt_length for r in greedy]
    assert greedy[1].prompt_length > 576  # the second prompt holds an image


def test_batch_composition_and_continuous_batching(engine, requests_, greedy):
    """One at a time, in reverse order, and 20 requests through 3 slots: the same tokens."""
    saved = engine.batch_size
    try:
        engine.batch_size = 3
        assert _tokens(engine.generate(requests_[::-1], GREEDY)) == _tokens(greedy)
        engine.batch_size = 1
        assert _tokens(engine.generate(requests_[:4], GREEDY)) == _tokens(greedy[:4])
    finally:
        engine.batch_size = saved
    # Sequences of different lengths leave the batch at different steps and free slots for others.
    mixed = engine.generate(requests_[:6], dataclasses.replace(GREEDY, max_new_tokens=3))
    assert [r.token_ids for r in mixed] == [r.token_ids[:3] for r in greedy[:6]]


@pytest.mark.parametrize("bucket", [256, 4])
def test_fixed_shape_decode_gives_the_same_tokens(engine, requests_, greedy, monkeypatch, bucket):
    """The decode step a CUDA graph replays (every slot, idle ones too, keys read to a bucketed
    length under a per-slot mask), eagerly here: the dynamic path's tokens, with slots freed and
    refilled (20 requests through 3 slots) and, with 4-position buckets, every step crossing
    into a longer read."""
    from engine.inference import graphs

    monkeypatch.setattr(graphs, "BUCKET", bucket)
    saved = engine.batch_size, engine.decode_mode, engine._cache, engine._decoder
    try:
        engine.decode_mode, engine._cache, engine._decoder = "static", None, None
        engine.batch_size = 3
        assert _tokens(engine.generate(requests_, GREEDY)) == _tokens(greedy)
        assert isinstance(engine._decoder, graphs.StaticDecoder) and engine._cache.slots == 3
        assert not engine._decoder.graphs  # no CUDA here: the same step, run op by op
        mixed = engine.generate(requests_[:5], dataclasses.replace(GREEDY, max_new_tokens=2))
        assert [r.token_ids for r in mixed] == [r.token_ids[:2] for r in greedy[:5]]
    finally:
        engine.batch_size, engine.decode_mode, engine._cache, engine._decoder = saved


def test_decode_mode_is_checked(engine):
    from engine.inference import EngineGenerator

    with pytest.raises(ValueError, match="decode must be one of"):
        EngineGenerator(engine.model, engine.cfg, engine.tokenizer, decode="fast")
    assert engine.decode_mode == "auto"
    assert engine.decode_mode_for(1) == engine.decode_mode_for(64) == "eager"  # off CUDA


def test_stop_strings_and_max_new_tokens(engine, requests_, greedy, tokenizer_model):
    target = next(r for r in greedy if len(set(r.token_ids)) >= 4)
    req = next(q for q in requests_ if q.id == target.id)
    stop = target.text[len(target.text) // 2:][:3]
    assert stop.strip()
    out = engine.generate([req], dataclasses.replace(GREEDY, stop=(stop, "never-there")))[0]
    cut = target.text.find(stop)
    assert out.finish_reason == "stop" and out.text == target.text[:cut]
    assert out.token_ids == target.token_ids[: len(out.token_ids)]
    assert stop in engine.tokenizer.decode(out.token_ids)
    assert stop not in engine.tokenizer.decode(out.token_ids[:-1])
    one = engine.generate([req], dataclasses.replace(GREEDY, max_new_tokens=1))[0]
    assert one.token_ids == target.token_ids[:1] and one.finish_reason == "length"


def test_sampling_is_reproducible_per_request(engine, requests_, greedy):
    params = SamplingParams(max_new_tokens=6, temperature=2.0, top_p=0.95, seed=7)
    first = engine.generate(requests_[:6], params)
    assert _tokens(engine.generate(requests_[:6][::-1], params)) == _tokens(first)
    alone = engine.generate(requests_[2:3], params)[0]
    assert alone.token_ids == first[2].token_ids
    assert _tokens(first) != {r.id: r.token_ids[:6] for r in greedy[:6]}
    other = engine.generate(requests_[:6], dataclasses.replace(params, seed=8))
    assert _tokens(other) != _tokens(first)
    top1 = engine.generate(requests_[:3], SamplingParams(max_new_tokens=5, temperature=1.0, top_k=1))
    assert _tokens(top1) == _tokens(greedy[:3])


def test_logprobs_match_transformers(engine, hf, requests_):
    params = dataclasses.replace(GREEDY, max_new_tokens=3, logprobs=True)
    ours, ref = engine.generate(requests_[:3], params), hf.generate(requests_[:3], params)
    for a, b in zip(ours, ref):
        assert len(a.logprobs) == len(a.token_ids) == 3 and all(lp <= 0 for lp in a.logprobs)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert engine.generate(requests_[:1], GREEDY)[0].logprobs is None


def test_bad_requests_get_errors_and_the_others_answers(engine, requests_, greedy, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(IMAGES[0], "rb").read()[:300])
    bad = [
        Request("markers", "two <image> markers <image>", (IMAGES[0],)),
        Request("missing", "a <image> b", (str(tmp_path / "nope.jpg"),)),
        Request("corrupt", "a <image> b", (str(corrupt),)),
        Request("too-long", "<image> " * 15, (IMAGES[0],) * 15),
        Request("bad-bytes", "<image>", (b"not an image",)),
    ]
    mixed = [bad[0], requests_[1], bad[1], bad[2], requests_[2], bad[3], bad[4]]
    out = engine.generate(mixed, GREEDY)
    errors = {r.id: r.error for r in out if r.finish_reason == "error"}
    assert set(errors) == {b.id for b in bad}
    assert "1 <image>" not in errors["markers"] and "2 <image> marker(s) but 1 image" in errors["markers"]
    assert "not found" in errors["missing"] and "nope.jpg" in errors["missing"]
    assert "corrupt" in errors["corrupt"] or "truncated" in errors["corrupt"]
    assert "8655 positions" in errors["too-long"] and "8192" in errors["too-long"]
    assert "not a readable image" in errors["bad-bytes"]
    assert [r.token_ids for r in out if r.error is None] == [greedy[1].token_ids, greedy[2].token_ids]
    # Images given as bytes or as a PIL image are the same image as its path.
    (path,) = requests_[1].images
    as_bytes = Request("b", requests_[1].prompt, (open(path, "rb").read(),))
    pil = Request("p", requests_[1].prompt, (Image.open(path),))
    assert [r.token_ids for r in engine.generate([as_bytes, pil], GREEDY)] == [greedy[1].token_ids] * 2


def test_image_features_match_clip_pooler(engine, hf):
    ours, ref = engine.image_features(IMAGES[:3]), hf.image_features(IMAGES[:3])
    assert ours.shape == (3, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[0], ours[1])


def test_params_are_checked(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([], SamplingParams(max_new_tokens=0))


def test_transformers_batches_are_left_padded_correctly(hf, requests_, greedy):
    """transformers in batches of 4 prompts of different lengths: the same tokens as one at a time."""
    hf.batch_size = 4
    try:
        assert _tokens(hf.generate(requests_[:8], GREEDY)) == _tokens(greedy[:8])
    finally:
        hf.batch_size = 1
