"""Training on a blend of a multimodal and a text-only dataset (one CPU rank, the tiny preset):
per-source accounting in the log and the checkpoint, an unchanged blend resumed bit-exactly, a
changed blend resumed with every source continuing where it stopped."""

from __future__ import annotations

import pytest

import helpers
from engine.config import IMAGE_TOKEN_ID
from engine.data.format import IndexedDatasetWriter
from engine.data.tokenizer import SentencePieceTokenizer, encode_document
from engine.training.checkpoint import read_data_state
from tests.training.conftest import TEXTS

pytestmark = pytest.mark.slow

ITERS = 4


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory, tokenizer_model) -> str:
    prefix = tmp_path_factory.mktemp("text") / "text"
    tok = SentencePieceTokenizer(tokenizer_model)
    with IndexedDatasetWriter(prefix, image_token_id=IMAGE_TOKEN_ID, image_size=336) as writer:
        for d in range(12):
            writer.add_document(encode_document(tok, [TEXTS[(d + k) % len(TEXTS)] for k in range(3)]), [])
    return str(prefix)


def _argv(data_path: list, *extra) -> list:
    return ["--model", "tiny", "--seq-length", 1536, "--micro-batch-size", 1, "--global-batch-size", 2,
            "--train-iters", ITERS, "--lr", 1e-3, "--lr-warmup-iters", 1, "--split", "80,20,0",
            "--eval-interval", 0, "--log-interval", 1, "--num-workers", 0, "--data-path", *data_path, *extra]


@pytest.fixture(scope="module")
def blended(tmp_path_factory, tiny_dataset, text_dataset):
    root = tmp_path_factory.mktemp("blend")
    blend = ["0.5", tiny_dataset, "0.5", f"{text_dataset}:all"]
    helpers.run_ranks(_argv(blend, "--save", root / "ckpt", "--save-interval", 2, "--log-jsonl",
                            root / "log.jsonl"), 1, root / "logs")
    return {"root": root, "blend": blend, "train": helpers.read_jsonl(root / "log.jsonl", "train")}


def test_each_source_is_accounted_in_the_log_and_the_checkpoint(blended):
    train = blended["train"]
    assert [r["iteration"] for r in train] == list(range(1, ITERS + 1))
    for r in train:
        mm, text = r["sources"]["sample"], r["sources"]["text:all"]
        assert mm["samples"] + text["samples"] == r["consumed_samples"]
        assert text["images"] == 0 and text["loss_tokens"] > 0 and mm["images"] > 0
        assert r["loss"] is not None and r["no_loss_microbatches"] == 0
    state = read_data_state(blended["root"] / "ckpt")
    assert [e["loss"] for e in state["blend"]] == ["after-first-image", "all"]
    assert state["sources"] == list(train[-1]["sources"].values())


def test_unchanged_blend_resumes_bit_exactly(blended, tmp_path):
    helpers.run_ranks(_argv(blended["blend"], "--load", blended["root"] / "ckpt" / "iter_0000002",
                            "--log-jsonl", tmp_path / "log.jsonl"), 1, tmp_path / "logs")
    resumed = helpers.read_jsonl(tmp_path / "log.jsonl", "train")
    assert [(r["loss"], r["sources"]) for r in resumed] == [(r["loss"], r["sources"]) for r in blended["train"][2:]]


def test_changed_blend_continues_each_source(blended, tiny_dataset, text_dataset, tmp_path):
    changed = ["0.25", tiny_dataset, "0.75", f"{text_dataset}:all"]
    (rank,) = helpers.run_ranks(_argv(changed, "--load", blended["root"] / "ckpt" / "iter_0000002",
                                      "--log-jsonl", tmp_path / "log.jsonl"), 1, tmp_path / "logs")
    at2 = blended["train"][1]["sources"]
    line = (f"each source continues after the samples it has consumed: sample from {at2['sample']['samples']}, "
            f"text:all from {at2['text:all']['samples']}")
    assert line in rank.output and "a new blending index from sample 4" in rank.output
    resumed = helpers.read_jsonl(tmp_path / "log.jsonl", "train")
    last = resumed[-1]["sources"]  # 4 samples after the resume: 1 multimodal, 3 text
    assert last["sample"]["samples"] == at2["sample"]["samples"] + 1
    assert last["text:all"]["samples"] == at2["text:all"]["samples"] + 3
