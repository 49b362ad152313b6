"""The Textbook-shaped corpus generator: its documents have the published corpus's shape, it is
deterministic, and the real preprocessing turns it into a dataset (frames padded to squares)."""

import json

import numpy as np
from PIL import Image

from engine.cli.preprocess import main as preprocess_main
from engine.cli.textbook_corpus import main
from engine.data.format import IndexedDataset


def _generate(out, documents=40, seed=3, workers=2):
    assert main(["--output", str(out), "--documents", str(documents), "--seed", str(seed),
                 "--workers", str(workers)]) == 0
    return [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]


def test_documents_have_the_textbook_shape(tmp_path):
    docs = _generate(tmp_path / "a")
    frames = [sum(1 for i in d["images"] if i) for d in docs]
    assert min(frames) >= 4 and max(frames) <= 20
    assert sum(f >= 12 for f in frames) > len(docs) / 3  # most lectures reach the 12-image cap
    for d in docs:
        assert len(d["images"]) == len(d["texts"]) and all((i is None) != (t is None) for i, t in zip(d["images"], d["texts"]))
        gaps = [len(t.split()) for i, t in enumerate(d["texts"]) if t and i > 0]
        assert all(40 <= g <= 250 for g in gaps)
    with Image.open(tmp_path / "a" / docs[0]["images"][1]) as im:
        assert im.size == (640, 360)  # 16:9
    again = _generate(tmp_path / "b", workers=1)
    assert again == docs
    assert (tmp_path / "a" / docs[5]["images"][3]).read_bytes() == (tmp_path / "b" / docs[5]["images"][3]).read_bytes()


def test_preprocesses_into_a_dataset_of_about_ten_images_per_document(tmp_path, tokenizer_model):
    _generate(tmp_path / "c", documents=12)
    prefix = tmp_path / "data" / "tb"
    assert preprocess_main(["--input", str(tmp_path / "c" / "corpus.jsonl"), "--image-root", str(tmp_path / "c"),
                            "--output-prefix", str(prefix), "--tokenizer-model", tokenizer_model,
                            "--workers", "1", "--no-progress"]) == 0
    ds = IndexedDataset(str(prefix))
    assert ds.num_documents == 12 and int(ds.doc_image_counts.max()) <= 12
    assert 6 <= ds.num_images / ds.num_documents <= 12
    text_tokens = (ds.doc_lengths - ds.doc_image_counts - 2).mean()
    assert 600 < text_tokens < 2500  # ~1.2k text tokens per document
    top = ds.image(0)[:20].reshape(-1, 3).astype(float)
    assert np.abs(top.mean(0) - np.array([122, 116, 104])).max() < 3  # letterbox: the CLIP mean colour
