"""Tokenizer wrappers and the seed's document -> token stream rules, with the real SentencePiece model."""

import pickle
import shutil

import numpy as np
import pytest

from engine.config import IMAGE_TOKEN_ID
from engine.data.tokenizer import build_tokenizer, encode_document, render_text

BOS, EOS, IMG = 1, 2, IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return build_tokenizer("sentencepiece", tokenizer_model)


def llava_tokenizer_image_token(tok, text: str) -> list[int]:
    """Reference: LLaVA's `tokenizer_image_token` on a text with literal <image> markers, for a
    LLaMA tokenizer whose `tokenizer(chunk)` is [BOS] + sp.encode(chunk): every chunk is encoded
    on its own with its BOS, the first chunk keeps it, later chunks lose it."""
    chunks = [[tok.bos_id] + tok.encode(c) for c in text.split("<image>")]
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [tok.image_token_id] + c[1:]
    return ids + [tok.eos_id]


def test_special_ids(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
    assert tok.image_token_id == IMG == 32000


@pytest.mark.parametrize("segments, text", [
    # the issue's case: images [x, None, y, z, None], texts [None, "a", None, None, "b"]
    ([None, "a", None, None, "b"], "<image>a<image> <image>b"),
    (["Intro.", "More text.", None, "After."], "Intro. More text.<image>After."),
    ([None, None, None], "<image> <image> <image>"),
    (["Only text", None], "Only text<image>"),
    ([None, "", None, "x"], "<image> <image>x"),  # an empty text is dropped, the images become adjacent
    (["a", "", "b"], "a b"),
    ([None, " spaced ", None], "<image> spaced <image>"),  # a text's own spaces are kept
])
def test_render_text_follows_the_seed(segments, text):
    assert render_text(segments) == text


def test_issue_example_ids(tok):
    ids = encode_document(tok, [None, "a", None, None, "b"])
    # BOS, <image>, "▁a", <image>, "▁▁" (the space between two images), <image>, "▁b", EOS
    assert ids.tolist() == [BOS, IMG, 264, IMG, 259, IMG, 287, EOS]
    assert [tok._sp.id_to_piece(i) for i in (264, 259, 287)] == ["▁a", "▁▁", "▁b"]
    assert ids.dtype == np.int64


@pytest.mark.parametrize("segments", [
    [None, "a", None, None, "b"],
    ["The lecture begins with a definition of the derivative.", None,
     "Here the slope of the tangent is shown.", "We now compute it.", None, None, "Finally, the limit."],
    [None, "Numbers 3.14159 and ünïcödé, tabs\tand\nnewlines.", None],
    ["Leading text only", None],
    [None, "  two leading spaces", None, "trailing  "],
])
def test_matches_llava_tokenizer_image_token(tok, segments):
    assert encode_document(tok, segments).tolist() == llava_tokenizer_image_token(tok, render_text(segments))


def test_markup_in_text_stays_text(tok):
    """The seed put "<image>" and "</s>" into a string and let the tokenizer find them; a document
    whose text contains those strings would get extra images or an early EOS. Ours never does."""
    ids = encode_document(tok, [None, "write <image> or </s> in HTML <s>"]).tolist()
    assert ids.count(IMG) == 1 and ids.count(EOS) == 1 and ids.count(BOS) == 1
    assert ids[-1] == EOS and ids[1] == IMG
    assert tok.decode(ids[2:-1]) == "write <image> or </s> in HTML <s>"


def test_decode_skips_images_and_round_trips(tok):
    text = "A cat sits on a mat. It is 3 o'clock."
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([IMG] + tok.encode(text)) == text


def test_pickles_for_worker_processes(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("hello world") == tok.encode("hello world")


def test_hf_tokenizer_folder(tokenizer_model, tmp_path):
    """An HF tokenizer folder built from the same SentencePiece model."""
    shutil.copy(tokenizer_model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}')
    hf = build_tokenizer("hf", tmp_path)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id, hf.image_token_id) == (32000, 1, 2, 0, 32000)
    assert hf.encode("hello world") == [6312, 28709, 1526]
    ids = encode_document(hf, [None, "close with </s> please"]).tolist()
    assert ids.count(EOS) == 1 and ids[:2] == [BOS, IMG]  # "</s>" in text is not the EOS token
    assert pickle.loads(pickle.dumps(hf)).encode("hello world") == [6312, 28709, 1526]


def test_bad_arguments(tokenizer_model, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("bpe", tokenizer_model)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_tokenizer("sentencepiece", tmp_path / "nope.model")
