"""The trainer starts from an imported checkpoint: its first-step loss is transformers' loss.

A one-document dataset (the real interleaved document, images stored raw so no JPEG loss) is
trained for one step with `python -m engine.pretrain --pretrained-checkpoint <import>`; the loss
it logs for step 1 is computed before any update, so it must equal the masked cross-entropy of
the source LlavaForConditionalGeneration's logits on the same tokens (docs/internals.md: no loss
on image targets or on text before the first image).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import read_jsonl, run_ranks

pytestmark = pytest.mark.slow


def test_first_training_step_loss_equals_transformers_loss(imports, tiny_llava, photos, tokenizer_model, tmp_path):
    from engine.data.format import IndexedDatasetWriter
    from engine.data.images import normalize, preprocess
    from engine.data.tokenizer import SentencePieceTokenizer, encode_document

    tok = SentencePieceTokenizer(tokenizer_model)
    segments = ["An introduction to the lecture.", None, "Here the astronaut poses.", None,
                "A cup of coffee ends the talk."]
    ids = encode_document(tok, segments)
    pics = [preprocess(Image.fromarray(p)) for p in photos[:2]]
    prefix = tmp_path / "one_doc"
    with IndexedDatasetWriter(prefix, image_token_id=tok.image_token_id, image_size=336,
                              image_storage="raw") as writer:
        writer.add_document(ids, [p.tobytes() for p in pics])

    # transformers: the document with each image expanded to 576 positions.
    expanded = np.concatenate([[t] * 576 if t == tok.image_token_id else [t] for t in ids.tolist()])
    tokens = torch.from_numpy(expanded).long()[None]
    with torch.no_grad():
        logits = tiny_llava(input_ids=tokens, pixel_values=torch.from_numpy(normalize(np.stack(pics)))).logits[0]
    targets = tokens[0, 1:]
    first_image = int((tokens[0] == tok.image_token_id).nonzero()[0])
    mask = (targets != tok.image_token_id) & (torch.arange(1, tokens.size(1)) > first_image)
    ce = torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="none")
    expected = (ce * mask).sum() / mask.sum()

    ckpt = imports(2, 1)["target"]  # written at TP=2, trained at TP=1
    log = tmp_path / "log.jsonl"
    argv = ["--model", "tiny", "--data-path", str(prefix), "--split", "100,0,0", "--seq-length", str(len(expanded) + 7),
            "--train-iters", "1", "--num-workers", "0", "--lr", "1e-4", "--eval-interval", "100",
            "--pretrained-checkpoint", ckpt, "--log-jsonl", str(log)]
    (rank,) = run_ranks(argv, 1, tmp_path / "logs", timeout=600)
    assert "loaded pretrained weights from" in rank.output
    records = read_jsonl(log)
    step1 = next(r for r in records if r.get("iteration") == 1 and "loss" in r)
    assert step1["loss"] == pytest.approx(expected.item(), rel=1e-5)
