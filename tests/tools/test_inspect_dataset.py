"""`llava-inspect` (engine/cli/inspect.py): statistics against known counts, and the HTML of packed samples."""

import html
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.data.dataset import PackedDataset
from engine.data.format import IndexedDataset, IndexedDatasetWriter
from engine.data.images import encode_jpeg, preprocess_file
from engine.data.packing import PackingConfig
from engine.data.tokenizer import build_tokenizer
from engine.cli import inspect
from engine.cli.preprocess import main as preprocess

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "data"
# Four lectures of the bundled corpus: starts with an image / starts with text / three
# consecutive images / 15 images, of which --max-num-images 12 keeps 12.
LECTURES = ["lec01-cat", "lec02-coffee", "lec19-textures", "lec29-review"]
IMAGES_KEPT = [2, 2, 3, 12]


# ------------------------------------------------------------------ a hand-made dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sample_images_dir):
    """Three documents whose every count is known: tokens 1 = BOS, 2 = EOS, 99 = <image>."""
    prefix = tmp_path_factory.mktemp("tiny") / "tiny"
    jpeg = encode_jpeg(preprocess_file(sample_images_dir / "skimage" / "coins.jpg"))
    docs = [
        ([1, 5, 99, 6, 99, 7, 2], 2),  # 7 tokens, 2 images
        ([1, 8, 2], 0),  # 3 tokens, no image
        ([1, 99, 9, 10, 11, 12, 13, 14, 15, 16, 17, 2], 1),  # 12 tokens, 1 image
    ]
    with IndexedDatasetWriter(prefix, image_token_id=99, image_size=336) as w:
        for tokens, n in docs:
            w.add_document(tokens, [jpeg] * n)
    return prefix


def test_dataset_stats_count_everything(tiny):
    s = inspect.dataset_stats(IndexedDataset(tiny), tokens_per_image=4)
    assert (s["documents"], s["images"], s["tokens"]) == (3, 3, 22)
    assert s["text_tokens"] == 13  # 5 6 7 / 8 / 9..17
    # LLM positions: each image becomes 4 positions: 7+3*2, 3, 12+3
    assert s["llm_positions"] == 13 + 3 + 15
    assert s["documents_without_images"] == 1
    assert s["doc_positions"] == {"min": 3, "median": 13.0, "mean": 31 / 3, "max": 15}
    assert s["images_per_doc_histogram"] == [[0, 0, 1], [1, 1, 1], [2, 2, 1]]
    hist = s["doc_positions_histogram"]
    assert sum(c for _, _, c in hist) == 3
    assert hist[0][0] == 3 and hist[-1][1] == 15 and hist[0][2] == 1 and hist[-1][2] == 1


def test_packing_efficiency_is_useful_over_allocated(tiny):
    ds = PackedDataset(tiny, PackingConfig(seq_length=16, tokens_per_image=4, loss_policy="all"), split_weights="1",
                       cache=False)
    p = inspect.packing_stats(ds)
    # `split` uses every token of every document once per epoch (under loss policy `all`, doc 1 too)
    assert p["useful_positions"] == 31
    assert p["samples"] == len(ds) >= 2  # 31 positions need at least two samples of 16
    assert p["padding_positions"] == p["samples"] * 16 - 31
    assert p["efficiency"] == pytest.approx(31 / (p["samples"] * 16))
    assert p["segments_per_sample"]["mean"] == pytest.approx(len(ds.index.segments) / p["samples"])


def test_command_line_json(tiny, capsys):
    assert inspect.main([str(tiny), "--seq-length", "16", "--tokens-per-image", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"]["llm_positions"] == 31
    assert out["packing"]["useful_positions"] == 31 - 3  # doc 1 has no image: under the seed's rule, not packed
    assert inspect.main([f"{tiny}:all", "--seq-length", "16", "--tokens-per-image", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["packing"]["useful_positions"] == 31
    assert inspect.main([str(tiny), "--seq-length", "16", "--tokens-per-image", "4"]) == 0
    text = capsys.readouterr().out
    assert "documents      3 (1 without images)" in text
    assert "LLM positions  31" in text


def test_render_needs_out(tiny):
    with pytest.raises(SystemExit):
        inspect.parse_args([str(tiny), "--render", "0"])


def test_render_refuses_another_tokenizer(tiny, tokenizer_model, tmp_path):
    # the tiny dataset's <image> id is 99; the real tokenizer's is 32000
    with pytest.raises(SystemExit, match="<image> id is 99"):
        inspect.main([str(tiny), "--seq-length", "16", "--tokens-per-image", "4", "--render", "0",
                      "--out", str(tmp_path / "x.html"), "--tokenizer-model", tokenizer_model])
    assert not (tmp_path / "x.html").exists()


def test_empty_dataset(tmp_path, capsys):
    IndexedDatasetWriter(tmp_path / "empty", image_token_id=32000, image_size=336).finalize()
    assert inspect.main([str(tmp_path / "empty"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"]["documents"] == 0 and out["packing"] is None


# ------------------------------------------------------------------ the bundled corpus, preprocessed


@pytest.fixture(scope="module")
def lectures(tmp_path_factory, tokenizer_model):
    """Four bundled lectures through the preprocessing; returns (prefix, docs)."""
    tmp = tmp_path_factory.mktemp("lectures")
    docs = {}
    for line in (SAMPLE / "textbook_sample.jsonl").read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        docs[doc["general_metadata"]["id"]] = doc
    docs = [docs[name] for name in LECTURES]
    src = tmp / "lectures.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    prefix = tmp / "lectures"
    assert preprocess(["--input", str(src), "--image-root", str(SAMPLE / "images"), "--output-prefix",
                       str(prefix), "--tokenizer-model", tokenizer_model, "--workers", "1",
                       "--no-progress"]) == 0
    return prefix, docs


def test_stats_of_preprocessed_lectures(lectures, capsys):
    prefix, docs = lectures
    summary = json.loads(Path(str(prefix) + ".summary.json").read_text())
    s = inspect.dataset_stats(IndexedDataset(prefix))
    assert s["documents"] == len(LECTURES)
    assert s["images"] == sum(IMAGES_KEPT) == summary["images_out"]
    assert s["tokens"] == summary["tokens"]
    assert s["llm_positions"] == s["tokens"] + 575 * sum(IMAGES_KEPT)
    assert {lo: c for lo, hi, c in s["images_per_doc_histogram"] if c} == Counter(IMAGES_KEPT)
    assert s["images_per_doc"]["max"] == 12


def _sections(page: str) -> list[tuple[str, str]]:
    """(heading, content) of every packed segment on the page."""
    return re.findall(r'<section class="segment[^"]*"><h2>(.*?)</h2>(.*?)</section>', page, re.S)


def _text(fragment: str) -> str:
    """Visible transcript text of an HTML fragment, BOS/EOS badges left out."""
    fragment = re.sub(r'<span class="special[^"]*">.*?</span>', "", fragment)
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_render_whole_documents(lectures, tokenizer_model, tmp_path):
    """At 16384 positions the four lectures fit one sample: every document whole, every image
    shown once, text before the first image shaded and everything after it trained."""
    prefix, docs = lectures
    out = tmp_path / "sample.html"
    assert inspect.main([str(prefix), "--seq-length", "16384", "--render", "0", "--out", str(out),
                         "--tokenizer-model", tokenizer_model]) == 0
    page = out.read_text(encoding="utf-8")
    assert page.count("<img ") == sum(IMAGES_KEPT)
    assert len(re.findall(r'src="data:image/jpeg;base64,[A-Za-z0-9+/=]{1000,}"', page)) == sum(IMAGES_KEPT)
    sections = _sections(page)
    assert len(sections) == len(LECTURES) + 1  # + the padding tail
    assert sections[-1][0].startswith("padding:")

    by_doc = {int(re.match(r"document (\d+): whole document", h).group(1)): c for h, c in sections[:-1]}
    assert sorted(by_doc) == list(range(len(LECTURES)))
    for d, doc in enumerate(docs):
        content = by_doc[d]
        kept = IMAGES_KEPT[d]
        assert content.count("<img ") == kept
        before, *after = re.split(r"<figure>.*?</figure>", content)
        # The seed's text between images: segments joined by a space; images past the 12th
        # are dropped with their placeholders, so their neighbours' texts join.
        runs, run, seen = [], [], 0
        for image, text in zip(doc["images"], doc["texts"]):
            if image is None:
                run.append(text)
            elif seen < kept:
                runs.append(" ".join(run))
                run, seen = [], seen + 1
        runs.append(" ".join(run))
        pieces = [_text(p) for p in [before, *after]]
        assert [p.strip() for p in pieces] == [r.strip() for r in runs], d
        # Shading: nothing before the first image is trained, everything after it is.
        assert 'class="trained"' not in re.sub(r'<span class="special[^"]*">.*?</span>', "", before)
        assert all('class="noloss"' not in re.sub(r'<span class="special[^"]*">.*?</span>', "", p)
                   for p in after)
    # lec02 starts with text: that text is on the page, shaded
    assert re.search(r'<span class="noloss">Beverage: Liquid for drinking', by_doc[1])


def test_render_shades_by_the_loss_policy(lectures, tokenizer_model, tmp_path):
    """Under the loss policy 'all' (PREFIX:all) the text before the first image trains too."""
    prefix, _ = lectures
    out = tmp_path / "all.html"
    assert inspect.main([f"{prefix}:all", "--seq-length", "16384", "--render", "0", "--out", str(out),
                         "--tokenizer-model", tokenizer_model]) == 0
    sections = _sections(out.read_text(encoding="utf-8"))
    by_doc = {int(re.match(r"document (\d+): whole document", h).group(1)): c for h, c in sections[:-1]}
    assert re.search(r'<span class="trained">[^<]*Liquid for drinking', by_doc[1])
    for content in by_doc.values():  # only each document's first token (nothing predicts it) is untrained text
        visible = re.sub(r'<span class="special[^"]*">.*?</span>', "", content)
        assert len(re.findall(r'class="noloss"', visible)) <= 1


@pytest.mark.parametrize("seq_length", [700, 4096])
def test_render_every_sample(lectures, tokenizer_model, seq_length):
    """Split into several samples: each page shows exactly its sample's images and segments.
    At 700 positions (one image and some text) documents are also cut inside text."""
    prefix, _ = lectures
    tok = build_tokenizer("sentencepiece", tokenizer_model)
    ds = PackedDataset(prefix, PackingConfig(seq_length=seq_length), split_weights="1",
                       pad_id=tok.pad_id, cache=False)
    assert len(ds) > 1
    shown = text_cuts = 0
    for k in range(len(ds)):
        page = inspect.render_sample_html(ds, k, tok)
        segments = ds.index.segments_of(k).tolist()
        # images of the sample, counted from the token stream
        n = sum(int(np.count_nonzero(ds.reader.tokens(d, a, b) == ds.reader.image_token_id))
                for d, a, b in segments)
        assert page.count("<img ") == n == len(ds[k]["images"])
        sections = _sections(page)
        assert len(sections) == len(ds[k]["cu_seqlens"]) - 1
        for (heading, content), (d, a, b) in zip(sections, segments):
            assert heading.startswith(f"document {d}: ")
            # The text between images reads as the tokenizer decodes it, also where shading
            # changes inside a run (the first token of a continued document gets no loss).
            ids = ds.reader.tokens(d, a, b).tolist()
            text_cuts += a > 0 and ids[0] != ds.reader.image_token_id
            ids = [i for i in ids if i not in (tok.bos_id, tok.eos_id)]
            bounds = [-1] + [j for j, i in enumerate(ids) if i == ds.reader.image_token_id] + [len(ids)]
            expected = [tok.decode(ids[lo + 1:hi]) for lo, hi in zip(bounds, bounds[1:])]
            assert [_text(p) for p in re.split(r"<figure>.*?</figure>", content)] == expected
        shown += n
    assert shown == sum(IMAGES_KEPT)  # one epoch shows every image once
    assert text_cuts > 0 or seq_length == 4096


def test_render_out_of_range(lectures, tokenizer_model):
    prefix, _ = lectures
    ds = PackedDataset(prefix, PackingConfig(seq_length=4096), split_weights="1", cache=False)
    with pytest.raises(IndexError, match="out of range"):
        inspect.render_sample_html(ds, len(ds), build_tokenizer("sentencepiece", tokenizer_model))
