"""The preprocessing (engine/data/preprocess.py, `llava-preprocess`) end to end: real photos, the
real tokenizer, every kind of bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from engine.data.format import IndexedDataset, dataset_paths
from engine.data.images import preprocess_file
from engine.cli.preprocess import main as preprocess_main
from engine.data import preprocess as pipeline
from engine.data.tokenizer import build_tokenizer, encode_document
from helpers import read_jsonl, tokenizer_path

REPO = Path(__file__).resolve().parents[2]
IMG = 32000
URL = "https://example.org/media/cat.png"


def _photo(name: str, size=None) -> Image.Image:
    img = Image.fromarray(getattr(skdata, name)())
    return img.resize(size, Image.BICUBIC) if size else img


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Images (real photos in several formats and modes, and broken files) and documents."""
    root = tmp_path_factory.mktemp("corpus")
    im = root / "images"
    (im / "sub").mkdir(parents=True)
    _photo("astronaut").save(im / "astronaut.jpg", quality=90)
    _photo("chelsea").save(im / "chelsea.png")
    _photo("coffee", (1280, 720)).save(im / "coffee.jpg", quality=90)  # 720p: decoded with draft
    _photo("rocket").save(im / "sub" / "rocket.jpg", quality=90)
    _photo("hubble_deep_field").convert("CMYK").save(im / "cmyk.jpg")
    gray16 = (np.asarray(_photo("camera")).astype(np.uint16) << 8)
    Image.fromarray(gray16).save(im / "gray16.png")
    rgba = np.dstack([skdata.chelsea(), np.full((300, 451), 255, np.uint8)])
    rgba[:, :100, 3] = 0
    Image.fromarray(rgba, "RGBA").save(im / "alpha.png")
    shutil.copy(im / "chelsea.png", im / hashlib.sha256(URL.encode()).hexdigest())
    # broken inputs
    (im / "notes.jpg").write_text("not a picture")
    jpeg = (im / "astronaut.jpg").read_bytes()
    (im / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    Image.fromarray(np.random.default_rng(0).random((32, 32), np.float32)).save(im / "float.tif")
    Image.new("1", (12000, 12000)).save(im / "bomb.png")  # 144 MP from a few kB
    (root / "outside").mkdir()
    _photo("coffee").save(root / "outside" / "secret.jpg")
    os.symlink(root / "outside" / "secret.jpg", im / "link.jpg")
    return root


def _obelics(images, texts, **extra):
    return {"images": images, "texts": texts, **extra}


GOOD = [
    # the example
    _obelics(["astronaut.jpg", None, "chelsea.png", "coffee.jpg", None], [None, "a", None, None, "b"]),
    _obelics([None, "sub/rocket.jpg", None, "cmyk.jpg", "gray16.png", None, "alpha.png", URL],
             ["A launch.", None, "Then a motorcycle,", None, None, "and a cat.", None, None],
             metadata=[{}] * 8, image_num=5, text_num=3, token_num=17),
    {"text_list": ["A cat.", "Coffee time.", "The end."],
     "image_info": [{"image_name": "coffee.jpg"}, {"image_name": "chelsea.png"}],
     "similarity_matrix": [[0.2, 0.9, 0.1], [0.7, 0.3, 0.2]]},
]

# (raw JSONL line or document, kind, words the reason must contain)
BAD = [
    ('{"images": ["astronaut.jpg", null], "texts": [null, "cut here', "malformed_json", "not valid JSON"),
    (_obelics(["astronaut.jpg", None], [None]), "unequal_lengths", "'images' has 2 entries but 'texts' has 1"),
    (_obelics(["astronaut.jpg"], ["caption"]), "both_image_and_text", "position 0 has both an image"),
    (_obelics(["astronaut.jpg", None], [None, None]), "neither_image_nor_text", "position 1 has neither"),
    (_obelics(["gone.jpg"], [None]), "missing_image", "image 0 ('gone.jpg'): image file not found"),
    (_obelics(["notes.jpg"], [None]), "unreadable_image", "not a readable image file"),
    (_obelics([None, "cut.jpg"], ["x", None]), "corrupt_image", "image 0 ('cut.jpg'): truncated or corrupt"),
    (_obelics(["float.tif"], [None]), "unsupported_mode", "unsupported image mode 'F'"),
    (_obelics([], []), "empty_document", "the document is empty"),
    (_obelics([None, None], ["only", "text"]), "no_images", "no image left"),
    (_obelics(["../outside/secret.jpg"], [None]), "unsafe_path", "resolves outside the image root"),
    (_obelics(["link.jpg"], [None]), "unsafe_path", "resolves outside the image root"),
    (_obelics(["bomb.png"], [None]), "decompression_bomb", "12000x12000 = 144000000 pixels"),
    ({"title": "no known fields"}, "unknown_format", "neither OBELICS fields"),
    (_obelics("astronaut.jpg", [None]), "bad_field", "field 'images' must be a list"),
]


def _line(doc) -> str:
    return doc if isinstance(doc, str) else json.dumps(doc)


@pytest.fixture(scope="module")
def inputs(corpus):
    good = corpus / "good.jsonl"
    good.write_text("".join(_line(d) + "\n" for d in GOOD))
    mixed = corpus / "mixed.jsonl"  # bad documents between good ones; a blank line too
    lines = []
    for i, (doc, _, _) in enumerate(BAD):
        lines += [_line(doc), _line(GOOD[i % len(GOOD)])]
    lines.insert(4, "")
    mixed.write_text("\n".join(lines) + "\n")
    return {"good": good, "mixed": mixed, "images": corpus / "images"}


def _run(inputs_, prefix, *extra, workers=1, check=True):
    argv = ["--input", *map(str, inputs_), "--output-prefix", str(prefix),
            "--tokenizer-model", tokenizer_path(), "--workers", str(workers), "--no-progress", *map(str, extra)]
    rc = preprocess_main(argv)
    if check:
        assert rc == 0
    return rc


def _files(prefix) -> dict:
    paths = [*dataset_paths(prefix), Path(f"{prefix}.errors.jsonl")]
    return {p.name.split(".", 1)[1]: p.read_bytes() for p in paths}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("sentencepiece", tokenizer_path())


@pytest.fixture(scope="module")
def mixed_run(inputs, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("mixed") / "ds"
    _run([inputs["mixed"]], prefix, "--image-root", inputs["images"], "--docs-per-part", 4)
    errors = read_jsonl(f"{prefix}.errors.jsonl")
    return prefix, errors


def test_seed_example_end_to_end(inputs, tok, tmp_path):
    _run([inputs["good"]], tmp_path / "ds", "--image-root", inputs["images"], "--image-storage", "raw")
    ds = IndexedDataset(tmp_path / "ds")
    ds.verify()
    assert ds.num_documents == 3 and ds.image_storage == "raw"
    assert ds.tokens(0).tolist() == [1, IMG, 264, IMG, 259, IMG, 287, 2]  # <image>a<image> <image>b</s>
    for i, name in zip(ds.doc_images(0), ["astronaut.jpg", "chelsea.png", "coffee.jpg"]):
        np.testing.assert_array_equal(ds.image(i), preprocess_file(inputs["images"] / name))
    # modes, sub-folders and a URL (stored under sha256(url)) in the second document
    expected = encode_document(tok, ["A launch.", None, "Then a motorcycle,", None, None, "and a cat.", None, None])
    assert ds.tokens(1).tolist() == expected.tolist()
    imgs = [ds.image(i) for i in ds.doc_images(1)]
    np.testing.assert_array_equal(imgs[-1], preprocess_file(inputs["images"] / "chelsea.png"))
    assert (imgs[3][100:230, 10:60] == 255).all()  # the transparent left band of alpha.png, on white


def test_mmc4_maximum_weight_matching(inputs, tok, tmp_path):
    """sim = [[.2,.9,.1],[.7,.3,.2]]: coffee -> sentence 1, chelsea -> sentence 0; each image
    goes before its sentence."""
    _run([inputs["good"]], tmp_path / "ds", "--image-root", inputs["images"], "--image-storage", "raw")
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.tokens(2).tolist() == encode_document(tok, [None, "A cat.", None, "Coffee time.", "The end."]).tolist()
    first, second = ds.doc_images(2)
    np.testing.assert_array_equal(ds.image(first), preprocess_file(inputs["images"] / "chelsea.png"))
    np.testing.assert_array_equal(ds.image(second), preprocess_file(inputs["images"] / "coffee.jpg"))


def test_mmc4_matching_is_optimal_not_greedy(corpus, tok, tmp_path):
    # Greedy takes the 0.9 pair (image 0 -> sentence 0) and leaves 0.1; the optimum is 0.8 + 0.85.
    doc = {"text_list": ["One.", "Two."], "similarity_matrix": [[0.9, 0.8], [0.85, 0.1]],
           "image_info": [{"image_url": URL}, {"image_name": "astronaut.jpg"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(doc) + "\n")
    _run([tmp_path / "m.jsonl"], tmp_path / "ds", "--image-root", corpus / "images", "--image-storage", "raw")
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.tokens(0).tolist() == encode_document(tok, [None, "One.", None, "Two."]).tolist()
    np.testing.assert_array_equal(ds.image(0), preprocess_file(corpus / "images" / "astronaut.jpg"))
    np.testing.assert_array_equal(ds.image(1), preprocess_file(corpus / "images" / "chelsea.png"))


def test_max_num_images_keeps_the_first(inputs, tok, tmp_path):
    _run([inputs["good"]], tmp_path / "ds", "--image-root", inputs["images"], "--max-num-images", 2)
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.tokens(0).tolist() == encode_document(tok, [None, "a", None, "b"]).tolist()
    assert ds.tokens(1).tolist() == encode_document(tok, ["A launch.", None, "Then a motorcycle,", None,
                                                          "and a cat."]).tolist()
    assert ds.doc_image_counts.tolist() == [2, 2, 2]
    summary = json.loads(Path(f"{tmp_path / 'ds'}.summary.json").read_text())
    assert summary["images_in"] == 3 + 5 + 2 and summary["images_out"] == 6
    assert summary["images_dropped_over_max"] == 4


def test_text_ocr_list_field(inputs, tok, tmp_path):
    doc = _obelics(["astronaut.jpg", None], [None, "spoken"], text_ocr_list=[None, "spoken (slide: F = ma)"])
    (tmp_path / "d.jsonl").write_text(json.dumps(doc) + "\n")
    _run([tmp_path / "d.jsonl"], tmp_path / "ds", "--image-root", inputs["images"], "--text-field", "text_ocr_list")
    assert IndexedDataset(tmp_path / "ds").tokens(0).tolist() == encode_document(
        tok, [None, "spoken (slide: F = ma)"]).tolist()


@pytest.mark.parametrize("k", range(len(BAD)), ids=[f"{kind}-{i}" for i, (_, kind, _) in enumerate(BAD)])
def test_bad_input_is_reported(mixed_run, inputs, k):
    prefix, errors = mixed_run
    _, kind, words = BAD[k]
    line = 2 * k + 1 + (k >= 2)  # one blank line was inserted before the third bad document
    entry = next(e for e in errors if e["line"] == line)
    assert entry["source"] == str(inputs["mixed"])
    assert entry["kind"] == kind
    assert words in entry["reason"], entry["reason"]


def test_mixed_run_keeps_every_good_document(mixed_run):
    prefix, errors = mixed_run
    assert len(errors) == len(BAD)
    ds = IndexedDataset(prefix)
    ds.verify()
    assert ds.num_documents == len(BAD)
    summary = json.loads(Path(f"{prefix}.summary.json").read_text())
    assert summary["documents_in"] == 2 * len(BAD) and summary["documents_skipped"] == len(BAD)
    assert sum(summary["skipped_by_reason"].values()) == len(BAD)
    assert summary["skipped_by_reason"]["unsafe_path"] == 2
    assert summary["tokens"] == ds.num_tokens and summary["images_out"] == ds.num_images


def test_json_list_reports_indices(inputs, tmp_path):
    items = [json.dumps(GOOD[0]), json.dumps(_obelics(["gone.jpg"], [None])), "{not json}", json.dumps(GOOD[2])]
    (tmp_path / "docs.json").write_text("[\n" + ",\n".join(items) + "\n]\n")
    _run([tmp_path / "docs.json"], tmp_path / "ds", "--image-root", inputs["images"])
    errors = read_jsonl(f"{tmp_path / 'ds'}.errors.jsonl")
    assert [(e["index"], e["kind"]) for e in errors] == [(1, "missing_image"), (2, "malformed_json")]
    assert IndexedDataset(tmp_path / "ds").num_documents == 2
    # a truncated file: the documents before the cut are kept, the cut one is reported
    text = (tmp_path / "docs.json").read_text()
    (tmp_path / "cut.json").write_text(text[: text.index(json.dumps(GOOD[2])) + 30])
    _run([tmp_path / "cut.json"], tmp_path / "cut", "--image-root", inputs["images"])
    errors = read_jsonl(f"{tmp_path / 'cut'}.errors.jsonl")
    assert errors[-1]["index"] == 3 and "truncated" in errors[-1]["reason"]
    assert IndexedDataset(tmp_path / "cut").num_documents == 1


def test_absolute_paths_inside_the_root_are_fine(corpus, tmp_path):
    inside, outside = corpus / "images" / "astronaut.jpg", corpus / "outside" / "secret.jpg"
    lines = [json.dumps(_obelics([str(inside)], [None])), json.dumps(_obelics([str(outside)], [None]))]
    (tmp_path / "abs.jsonl").write_text("\n".join(lines) + "\n")
    _run([tmp_path / "abs.jsonl"], tmp_path / "ds", "--image-root", corpus / "images")
    errors = read_jsonl(f"{tmp_path / 'ds'}.errors.jsonl")
    assert [(e["line"], e["kind"]) for e in errors] == [(2, "unsafe_path")]


def test_on_error_fail_stops_and_writes_no_dataset(inputs, tmp_path, capsys):
    rc = _run([inputs["mixed"]], tmp_path / "ds", "--image-root", inputs["images"], "--on-error", "fail", check=False)
    assert rc == 1
    assert f"{inputs['mixed']}: line 1: not valid JSON" in capsys.readouterr().err
    assert not any(p.exists() for p in dataset_paths(tmp_path / "ds"))


def test_same_bytes_for_any_worker_count(inputs, tmp_path):
    """Workers 1 in-process against workers 2 through the script entry point (spawned workers)."""
    _run([inputs["mixed"], inputs["good"]], tmp_path / "w1", "--image-root", inputs["images"], "--docs-per-part", 3)
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_interleaved.py"), "--input", str(inputs["mixed"]),
           str(inputs["good"]), "--image-root", str(inputs["images"]), "--docs-per-part", "3", "--workers", "2",
           "--tokenizer-model", tokenizer_path(), "--output-prefix", str(tmp_path / "w2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's engine
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["documents_out"] == len(BAD) + len(GOOD)
    assert "images/s" in proc.stderr  # the progress bar
    one, two = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one)
    assert not Path(f"{tmp_path / 'w2'}.parts").exists()


class _Interrupt(BaseException):
    """Stands in for Ctrl-C / a kill: not an Exception, so nothing may swallow it."""


@pytest.mark.parametrize("where", ["mid_part", "before_part_marker"])
def test_interrupted_run_resumes_to_the_same_bytes(inputs, tmp_path, monkeypatch, where):
    args = ([inputs["mixed"], inputs["good"]], "--image-root", inputs["images"], "--docs-per-part", 5)
    _run(args[0], tmp_path / "ref", *args[1:])
    calls = {"n": 0}
    if where == "mid_part":  # killed while processing the 13th document (third part)
        real = pipeline.process_document

        def flaky(*a):
            calls["n"] += 1
            if calls["n"] == 13:
                raise _Interrupt()
            return real(*a)

        monkeypatch.setattr(pipeline, "process_document", flaky)
    else:  # killed after the second part's data is renamed into place, before its completion marker
        real = pipeline._atomic_write

        def flaky(path, text):
            if path.name.endswith(".done.json"):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise _Interrupt()
            return real(path, text)

        monkeypatch.setattr(pipeline, "_atomic_write", flaky)
    prefix = tmp_path / "ds"
    with pytest.raises(_Interrupt):
        _run(args[0], prefix, *args[1:])
    monkeypatch.undo()
    assert not any(p.exists() for p in dataset_paths(prefix)), "an interrupted run must not look finished"
    parts = Path(f"{prefix}.parts")
    assert len(list(parts.glob("*.done.json"))) == (2 if where == "mid_part" else 1)
    assert not list(parts.glob("*.tmp"))  # the unfinished part's writer cleaned up

    _run(args[0], prefix, *args[1:], workers=2)
    summary = json.loads(Path(f"{prefix}.summary.json").read_text())
    assert summary["parts_reused"] == (2 if where == "mid_part" else 1)
    assert _files(prefix) == _files(tmp_path / "ref")
    assert not parts.exists()


def test_stale_parts_from_other_settings_are_discarded(inputs, tmp_path, monkeypatch, capsys):
    args = ([inputs["good"]], "--image-root", inputs["images"], "--docs-per-part", 1)
    real, calls = pipeline.process_document, {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt()
        return real(*a)

    monkeypatch.setattr(pipeline, "process_document", flaky)
    with pytest.raises(_Interrupt):
        _run(args[0], tmp_path / "ds", *args[1:])
    monkeypatch.undo()
    _run(args[0], tmp_path / "ds", *args[1:], "--jpeg-quality", 80)
    assert "starting over" in capsys.readouterr().err
    assert json.loads(Path(f"{tmp_path / 'ds'}.summary.json").read_text())["parts_reused"] == 0
    _run(args[0], tmp_path / "fresh", *args[1:], "--jpeg-quality", 80)
    assert _files(tmp_path / "ds") == _files(tmp_path / "fresh")


def test_folder_input_and_merge(inputs, corpus, tmp_path):
    shards = tmp_path / "shards"
    (shards / "nested").mkdir(parents=True)
    good = inputs["good"].read_text().splitlines()
    (shards / "b.jsonl").write_text(good[1] + "\n")
    (shards / "a.jsonl").write_text(good[0] + "\n")
    (shards / "nested" / "c.json").write_text("[" + good[2] + "]")
    (shards / "README.txt").write_text("ignored")
    _run([shards], tmp_path / "dir", "--image-root", inputs["images"])
    _run([inputs["good"]], tmp_path / "file", "--image-root", inputs["images"])
    assert _files(tmp_path / "dir")["tokens.bin"] == _files(tmp_path / "file")["tokens.bin"]

    assert preprocess_main(["--merge", str(tmp_path / "dir"), str(tmp_path / "file"),
                            "--output-prefix", str(tmp_path / "merged")]) == 0
    merged = IndexedDataset(tmp_path / "merged")
    merged.verify()
    assert merged.num_documents == 6 and merged.tokens(3).tolist() == merged.tokens(0).tolist()


def test_argument_errors(inputs, tmp_path, capsys):
    assert preprocess_main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x"),
                            "--tokenizer-model", tokenizer_path(), "--no-progress"]) == 1
    assert "nope.jsonl: no such file or folder" in capsys.readouterr().err
    assert preprocess_main(["--input", str(inputs["good"]), "--output-prefix", str(tmp_path / "x"),
                            "--image-root", str(tmp_path / "nowhere"), "--tokenizer-model", tokenizer_path()]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_valid_image_flags_and_forced_format(inputs, tok, tmp_path):
    """`valid_image` (OBELICS) and `valid_image_ids` (MMC4) drop images before --max-num-images
    counts; --format forces a parser; a .json file holding JSON lines is read as lines."""
    docs = [
        _obelics(["astronaut.jpg", None, "gone.jpg", "chelsea.png"], [None, "x", None, None],
                 valid_image=[True, False, True]),
        {"text_list": ["One.", "Two."], "image_info": [{"image_name": "gone.jpg"}, {"image_name": "coffee.jpg"}],
         "similarity_matrix": [[0.9, 0.1], [0.8, 0.2]], "valid_image_ids": [1]},
    ]
    (tmp_path / "d.json").write_text("".join(json.dumps(d) + "\n" for d in docs))
    _run([tmp_path / "d.json"], tmp_path / "ds", "--image-root", inputs["images"], "--max-num-images", 1,
         "--image-storage", "raw")
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.tokens(0).tolist() == encode_document(tok, [None, "x"]).tolist()
    assert ds.tokens(1).tolist() == encode_document(tok, [None, "One.", "Two."]).tolist()
    np.testing.assert_array_equal(ds.image(0), preprocess_file(inputs["images"] / "astronaut.jpg"))
    np.testing.assert_array_equal(ds.image(1), preprocess_file(inputs["images"] / "coffee.jpg"))
    assert Path(f"{tmp_path / 'ds'}.errors.jsonl").read_text() == ""

    _run([tmp_path / "d.json"], tmp_path / "forced", "--image-root", inputs["images"], "--format", "mmc4")
    errors = read_jsonl(f"{tmp_path / 'forced'}.errors.jsonl")
    assert [(e["line"], e["kind"]) for e in errors] == [(1, "bad_field")]
    assert "missing field 'text_list'" in errors[0]["reason"]


def test_text_only_corpus_with_allow_text_only(tok, tmp_path):
    docs = [_obelics([None], ["A text-only document."]), _obelics([None, None], ["Two", "paragraphs."])]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    _run([tmp_path / "t.jsonl"], tmp_path / "rejected")  # without the flag: both rejected as no_images
    assert [e["kind"] for e in read_jsonl(tmp_path / "rejected.errors.jsonl")] == ["no_images", "no_images"]
    _run([tmp_path / "t.jsonl"], tmp_path / "ds", "--allow-text-only")
    ds = IndexedDataset(tmp_path / "ds")
    ds.verify()
    assert ds.num_documents == 2 and ds.num_images == 0
    assert ds.tokens(1).tolist() == encode_document(tok, ["Two", "paragraphs."]).tolist()
