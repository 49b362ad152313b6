"""Random OBELICS / MMC4 documents through the preprocessing (`llava-preprocess`).

Property: every input document is either written exactly as docs/data_format.md says (tokens
and images checked against an oracle written here from the spec, not from the tool's code) or
listed in ``<prefix>.errors.jsonl`` with the kind the spec gives; the tool never crashes; the
summary's counts add up (in = written + skipped).

The generator draws well-formed documents and then breaks them: wrong types, None where a value
belongs, missing keys, unequal lists, lone surrogates, NUL bytes, huge strings, deep nesting,
NaN/Infinity, invalid UTF-8, and image references that are missing, corrupt, outside the image
root (``..``, absolute paths, symbolic links out), symbolic-link loops, folders and FIFOs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.cli.preprocess import main as preprocess_main
from engine.data.format import IndexedDataset
from engine.data.images import preprocess_file
from faultlib import examples, hang_guard, photo
from helpers import read_jsonl, tokenizer_path

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32  # small stored images keep hundreds of runs fast; the pipeline is the same
MAX_IMAGES = 3
IMG_ID, BOS, EOS = 32000, 1, 2
URL_PRESENT = "https://example.org/media/cat.png"
URL_ABSENT = "https://example.org/media/gone.png"


def _sha(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


# ------------------------------------------------------------------------------ the image tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An image root of real photos in many formats and modes, and every kind of bad file and
    reference; `refs` maps each reference a document may use to its file (good) or its kind (bad)."""
    base = tmp_path_factory.mktemp("tree")
    root, outside = base / "img", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    photo("astronaut", (48, 40)).save(root / "a.jpg", quality=90)
    photo("chelsea", (45, 30)).save(root / "b.png")
    photo("camera", (40, 40), "L").save(root / "gray.png")
    photo("coffee", (30, 20)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(root / "pal.gif")
    rgba = photo("chelsea", (40, 27), "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 27)))
    rgba.save(root / "rgba.png")
    photo("rocket", (50, 28)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.asarray(photo("camera", (32, 32), "L")).astype(np.uint16) * 257).save(root / "g16.png")
    photo("coffee", (60, 40)).save(root / "sub" / "c.jpg")
    photo("astronaut", (20, 20)).save(root / "é 图 space.png")
    photo("chelsea", (30, 20)).save(root / _sha(URL_PRESENT), format="PNG")
    photo("coffee", (30, 30)).save(outside / "secret.jpg")
    os.symlink("a.jpg", root / "link_in.jpg")
    os.symlink("../outside/secret.jpg", root / "link_out.jpg")
    os.symlink("../outside", root / "dir_out")
    os.symlink("nothing.jpg", root / "dangling.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    jpeg = (root / "a.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "notimg.jpg").write_text("plain text, not a picture")
    (root / "empty.png").write_bytes(b"")
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(root / "float.tif")
    Image.new("1", (12000, 12000)).save(root / "bomb.png")  # 144 MP in a few kB
    os.mkfifo(root / "fifo.jpg")  # opening it for reading would block forever

    good = {"a.jpg": "a.jpg", "./b.png": "b.png", "sub/../gray.png": "gray.png", "pal.gif": "pal.gif",
            "rgba.png": "rgba.png", "cmyk.jpg": "cmyk.jpg", "g16.png": "g16.png", "sub/c.jpg": "sub/c.jpg",
            "sub//c.jpg": "sub/c.jpg", "é 图 space.png": "é 图 space.png", URL_PRESENT: _sha(URL_PRESENT),
            "link_in.jpg": "a.jpg", str(root / "a.jpg"): "a.jpg", "../img/rgba.png": "rgba.png"}
    bad = {"../outside/secret.jpg": "unsafe_path", str(outside / "secret.jpg"): "unsafe_path",
           "link_out.jpg": "unsafe_path", "dir_out/secret.jpg": "unsafe_path", "/etc/hostname": "unsafe_path",
           "missing.jpg": "missing_image", URL_ABSENT: "missing_image", "dangling.jpg": "missing_image",
           "loop.jpg": "unreadable_image", "broken.jpg": "corrupt_image", "notimg.jpg": "unreadable_image",
           "empty.png": "unreadable_image", "sub": "unreadable_image", "fifo.jpg": "unreadable_image",
           "x" * 5000: "unreadable_image", "float.tif": "unsupported_mode", "bomb.png": "decompression_bomb",
           "a\x00.jpg": "bad_field", "a\ud800.jpg": "bad_field"}
    pixels = {f: preprocess_file(root / f, size=IMAGE_SIZE) for f in set(good.values())}
    return {"root": root, "good": good, "bad": bad, "pixels": pixels}


# ------------------------------------------------------------------------------ the oracle


class Rejected(Exception):
    def __init__(self, kind: str, images_in: int = 0):
        super().__init__(kind)
        self.kind, self.images_in = kind, images_in


def _valid_text(s) -> bool:
    """A text the tool must accept: a str that is valid Unicode (encodable as UTF-8)."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def expected_outcome(line: bytes, tree) -> dict:
    """What the spec says happens to one JSONL line: {"tokens", "files", counts} or {"kind", ...}."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, or nested beyond any parser
        return {"kind": "malformed_json", "images_in": 0}
    try:
        if not isinstance(rec, dict):
            raise Rejected("malformed_json")
        if "text_list" in rec or "image_info" in rec:
            segments, refs = _mmc4(rec)
        elif "images" in rec:
            segments, refs = _obelics(rec)
        else:
            raise Rejected("unknown_format")
        return _finish(segments, refs, tree)
    except Rejected as r:
        return {"kind": r.kind, "images_in": r.images_in}


def _list(rec: dict, key: str) -> list:
    if not isinstance(rec.get(key, None), list):
        raise Rejected("bad_field")
    return rec[key]


def _obelics(rec):
    images, texts = _list(rec, "images"), _list(rec, "texts")
    if len(images) != len(texts):
        raise Rejected("unequal_lengths")
    if not images:
        raise Rejected("empty_document")
    valid = rec.get("valid_image")
    n_images = sum(i is not None for i in images)
    if valid is not None and (not isinstance(valid, list) or len(valid) != n_images):
        raise Rejected("bad_field")
    segments, refs, k = [], [], 0
    for img, txt in zip(images, texts):
        if img is not None and txt is not None:
            raise Rejected("both_image_and_text")
        if img is None and txt is None:
            raise Rejected("neither_image_nor_text")
        if txt is not None:
            if not _valid_text(txt):
                raise Rejected("bad_field")
            segments.append(txt)
            continue
        if not isinstance(img, str) or not img:
            raise Rejected("bad_field")
        if valid is None or valid[k]:
            segments.append(None)
            refs.append(img)
        k += 1
    return segments, refs


def _mmc4(rec):
    sentences, info = _list(rec, "text_list"), _list(rec, "image_info")
    if not all(_valid_text(s) for s in sentences):
        raise Rejected("bad_field")
    if not sentences and not info:
        raise Rejected("empty_document")
    ids = rec.get("valid_image_ids", list(range(len(info))))
    if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < len(info) for i in ids):
        raise Rejected("bad_field")
    refs = []
    for i in ids:
        entry = info[i]
        if not isinstance(entry, dict):
            raise Rejected("bad_field")
        name, url = entry.get("image_name"), entry.get("image_url") or entry.get("raw_url")
        if isinstance(name, str) and name:
            refs.append(name)
        elif isinstance(url, str) and url:
            refs.append(_sha(url))
        else:
            raise Rejected("bad_field")
    match = {}  # sentence -> image reference
    if refs and sentences:
        try:
            sim = np.asarray(rec.get("similarity_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            raise Rejected("bad_field") from None
        if sim.shape != (len(info), len(sentences)) or not np.isfinite(sim).all():
            raise Rejected("bad_field")
        match = _best_matching(sim[ids], refs)
    segments, ordered = [], []
    for j, s in enumerate(sentences):
        if j in match:
            segments.append(None)
            ordered.append(match[j])
        segments.append(s)
    return segments, ordered


def _best_matching(sim: np.ndarray, refs: list[str]) -> dict[int, str]:
    """Exhaustive maximum-weight matching of images (rows) to sentences (columns); the generator
    draws weights that make the optimum unique."""
    n_img, n_sent = sim.shape
    best, best_pairs = -np.inf, None
    if n_img <= n_sent:
        candidates = ([(r, c) for r, c in enumerate(cols)] for cols in itertools.permutations(range(n_sent), n_img))
    else:
        candidates = ([(r, c) for c, r in enumerate(rows)] for rows in itertools.permutations(range(n_img), n_sent))
    for pairs in candidates:
        total = sum(sim[r, c] for r, c in pairs)
        if total > best:
            best, best_pairs = total, pairs
    return {c: refs[r] for r, c in best_pairs}


def _finish(segments, refs, tree) -> dict:
    images_in = len(refs)
    if not refs and not any(segments):
        raise Rejected("empty_document", images_in)
    kept, seen = [], 0
    for seg in segments:
        if seg is None:
            seen += 1
            if seen > MAX_IMAGES:
                continue
        kept.append(seg)
    if not refs:
        raise Rejected("no_images", images_in)
    files = []
    for ref in refs[:MAX_IMAGES]:
        name = _sha(ref) if "://" in ref else ref
        if name in tree["bad"] or ref in tree["bad"]:
            raise Rejected(tree["bad"].get(ref, tree["bad"].get(name)), images_in)
        if ref in tree["good"]:
            files.append(tree["good"][ref])
        elif name in tree["good"].values():  # an MMC4 URL, already hashed to its file name
            files.append(name)
        else:  # a hashed URL of no file
            raise Rejected("missing_image", images_in)
    return {"tokens": _oracle_tokens(segments=kept), "files": files, "images_in": images_in,
            "images_dropped": images_in - len(files)}


_SP = spm.SentencePieceProcessor(model_file=tokenizer_path())


def _oracle_tokens(segments) -> list[int]:
    """The seed's text rule as a split, not a scan: drop empty texts, cut at the images, join each
    group's texts with one space; an empty group between two images is a single space."""
    groups = [[]]
    for seg in segments:
        if seg is None:
            groups.append([])
        elif seg != "":
            groups[-1].append(seg)
    chunks = [" ".join(g) for g in groups]
    for k in range(1, len(chunks) - 1):
        if not groups[k]:
            chunks[k] = " "
    out = [BOS]
    for k, chunk in enumerate(chunks):
        if k:
            out.append(IMG_ID)
        out.extend(_SP.encode(chunk) if chunk else [])
    return out + [EOS]


# ------------------------------------------------------------------------------ the generator

NON_STRINGS = st.one_of(st.integers(-5, 10**20), st.floats(allow_nan=False), st.booleans(),
                        st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
PLAIN_TEXT = st.one_of(st.text(max_size=24),
                       st.sampled_from(["", " ", "<image>", "</s>", "<s>", "\n", "a\x00b", " two  spaces ", "é", "🙂",
                                        "مرحبا", "\u202eRTL", "\ufeff"]))


def _pick(draw, common: str, *rare: str, weight: int = 10) -> str:
    """`common` about `weight` times as often as each of `rare` (hypothesis draws small numbers
    more often, so the ordinary case comes first)."""
    return draw(st.sampled_from([common] * weight + list(rare)))


@st.composite
def text_value(draw):
    kind = _pick(draw, "plain", "huge", "surrogate", "not_a_string", weight=25)
    if kind == "huge":
        return draw(st.sampled_from(["a", "ab c ", "图", " "])) * draw(st.integers(10_000, 120_000))
    if kind == "surrogate":  # valid JSON (\ud800), not valid Unicode
        return draw(st.text(max_size=3)) + chr(draw(st.integers(0xD800, 0xDFFF))) + draw(st.text(max_size=3))
    if kind == "not_a_string":
        return draw(NON_STRINGS)
    return draw(PLAIN_TEXT)


@st.composite
def image_ref(draw, tree):
    kind = _pick(draw, "good", "bad", "not_a_string", "empty", weight=12)
    if kind == "not_a_string":
        return draw(NON_STRINGS)
    if kind == "empty":
        return ""
    if kind == "bad" or draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(sorted(tree["bad"])))
    return draw(st.sampled_from(sorted(tree["good"])))


@st.composite
def obelics(draw, tree):
    slots = draw(st.lists(st.booleans(), min_size=1, max_size=7))  # True = image
    images = [draw(image_ref(tree)) if s else None for s in slots]
    texts = [None if s else draw(text_value()) for s in slots]
    rec = {"images": images, "texts": texts}
    n_images = sum(slots)
    mutation = draw(st.sampled_from([None] * 16 + list(range(9))))
    if mutation == 0:
        del rec[draw(st.sampled_from(["images", "texts"]))]
    elif mutation == 1:
        rec[draw(st.sampled_from(["images", "texts"]))] = draw(st.one_of(st.none(), NON_STRINGS, st.text(max_size=3)))
    elif mutation == 2:
        rec["texts"] = texts + [None]
    elif mutation in (3, 4) and slots:
        i = draw(st.integers(0, len(slots) - 1))
        if mutation == 3:
            images[i], texts[i] = images[i] or "a.jpg", texts[i] or "text"
        else:
            images[i] = texts[i] = None
    elif mutation == 5:
        rec["valid_image"] = draw(st.one_of(NON_STRINGS, st.lists(st.booleans(), max_size=4)))
    elif mutation in (6, 7):
        rec["valid_image"] = draw(st.lists(st.booleans() if mutation == 6 else st.sampled_from([0, 1, "", "no", None]),
                                           min_size=n_images, max_size=n_images))
    elif mutation == 8:
        rec.update(metadata=[{"k": None}] * len(slots), image_num=-1, text_num="many", token_num=None,
                   text_ocr_list=draw(NON_STRINGS))
    return rec


@st.composite
def mmc4(draw, tree):
    sentences = draw(st.lists(text_value(), max_size=5))
    n = draw(st.integers(0, 4) if sentences else st.just(0))
    info = []
    for _ in range(n):
        kind = _pick(draw, "name", "url", "name_and_url", "not_an_object", "no_name", weight=8)
        if kind == "not_an_object":
            info.append(draw(st.one_of(NON_STRINGS, st.text(max_size=3))))
        elif kind == "no_name":
            info.append({"image_name": draw(st.sampled_from(["", None, 7]))})
        elif kind == "url":
            info.append({draw(st.sampled_from(["image_url", "raw_url"])): draw(st.sampled_from([URL_PRESENT, URL_ABSENT]))})
        else:
            ref = draw(image_ref(tree))
            info.append({"image_name": ref, "image_url": URL_ABSENT} if kind == "name_and_url" else {"image_name": ref})
    # Distinct powers of two: every matching has a different total, so the optimum is unique.
    weights = draw(st.permutations(range(n * len(sentences))))
    sim = [[2.0 ** -weights[i * len(sentences) + j] for j in range(len(sentences))] for i in range(n)]
    rec = {"text_list": sentences, "image_info": info, "similarity_matrix": sim}
    if draw(st.booleans()):
        rec["valid_image_ids"] = draw(st.permutations(range(n)))[: draw(st.integers(0, n))]
    mutation = draw(st.sampled_from([None] * 12 + list(range(5))))
    if mutation == 0 and n and sentences:
        sim[draw(st.integers(0, n - 1))][draw(st.integers(0, len(sentences) - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    elif mutation == 1:
        rec["similarity_matrix"] = draw(st.one_of(st.none(), NON_STRINGS, st.just(sim[:-1]), st.just([[0.5], []])))
    elif mutation == 2:
        rec["valid_image_ids"] = draw(st.lists(st.one_of(st.integers(-2, 6), NON_STRINGS), max_size=3))
    elif mutation == 3:
        del rec[draw(st.sampled_from(["text_list", "image_info"]))]
    elif mutation == 4:
        rec[draw(st.sampled_from(["text_list", "image_info"]))] = draw(st.one_of(st.none(), NON_STRINGS))
    return rec


@st.composite
def jsonl_line(draw, tree):
    """One line (bytes, no newline, not blank): a document, or garbage."""
    kind = _pick(draw, "obelics", "mmc4", "mmc4", "bytes", "deep", "not_a_document", weight=6)
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b.strip()))
    if kind == "deep":  # nesting deeper than Python's JSON parser can follow
        depth = draw(st.sampled_from([3, 50_000]))
        return b'{"images": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "not_a_document":
        return json.dumps(draw(st.one_of(NON_STRINGS, st.lists(st.none(), max_size=2), st.just({})))).encode()
    rec = draw(mmc4(tree)) if kind == "mmc4" else draw(obelics(tree))
    if draw(st.sampled_from([True, True, True, False])):
        return json.dumps(rec).encode()  # \u escapes: lone surrogates stay valid JSON
    return json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogatepass")  # may be invalid UTF-8


FIRST = json.dumps({"images": ["a.jpg", None], "texts": [None, "A first, good document."]}).encode()


# ------------------------------------------------------------------------------ the property


def _run_tool(lines: list[bytes], blank_after: set[int], tree, out: Path, docs_per_part: int, workers: int = 1) -> dict:
    src = out / "docs.jsonl"
    with open(src, "wb") as f:
        for k, line in enumerate(lines):
            f.write(line + b"\n" + (b"  \n" if k in blank_after else b""))
    line_numbers, n = [], 1
    for k in range(len(lines)):
        line_numbers.append(n)
        n += 1 + (k in blank_after)
    argv = ["--input", str(src), "--output-prefix", str(out / "ds"), "--image-root", str(tree["root"]),
            "--tokenizer-model", tokenizer_path(), "--workers", str(workers), "--no-progress",
            "--image-size", str(IMAGE_SIZE), "--image-storage", "raw", "--max-num-images", str(MAX_IMAGES),
            "--docs-per-part", str(docs_per_part)]
    with hang_guard(60, "preprocessing"):
        assert preprocess_main(argv) == 0
    return {"src": src, "line_numbers": line_numbers}


def _check(lines, run, tree, out: Path) -> None:
    outcomes = [expected_outcome(line, tree) for line in lines]
    errors = read_jsonl(out / "ds.errors.jsonl")
    want_errors = [(n, o["kind"]) for n, o in zip(run["line_numbers"], outcomes) if "kind" in o]
    assert [(e["line"], e["kind"]) for e in errors] == want_errors, [e["reason"] for e in errors]
    assert all(e["source"] == str(run["src"]) and e["reason"] for e in errors)

    ds = IndexedDataset(out / "ds")
    ds.verify()
    written = [o for o in outcomes if "tokens" in o]
    assert len(ds) == len(written)
    for d, o in enumerate(written):
        assert ds.tokens(d).tolist() == o["tokens"], d
        got = [ds.image(i) for i in ds.doc_images(d)]
        assert len(got) == len(o["files"])
        for pixels, f in zip(got, o["files"]):
            np.testing.assert_array_equal(pixels, tree["pixels"][f])

    summary = json.loads((out / "ds.summary.json").read_text())
    assert summary["documents_in"] == len(lines) == summary["documents_out"] + summary["documents_skipped"]
    assert summary["documents_out"] == len(written)
    assert summary["skipped_by_reason"] == dict(Counter(o["kind"] for o in outcomes if "kind" in o))
    assert summary["images_in"] == sum(o["images_in"] for o in outcomes)
    assert summary["images_out"] == ds.num_images == sum(len(o["files"]) for o in written)
    assert summary["images_dropped_over_max"] == sum(o["images_dropped"] for o in written)
    assert summary["tokens"] == ds.num_tokens


@st.composite
def corpus(draw, tree):
    lines = [FIRST] + draw(st.lists(jsonl_line(tree), min_size=1, max_size=10))
    blank_after = set(draw(st.lists(st.integers(0, len(lines) - 1), max_size=2)))
    return lines, blank_after, draw(st.integers(1, 4))


@settings(max_examples=examples(200))
@given(data=st.data())
def test_random_documents_are_written_or_reported(tree, data):
    lines, blank_after, docs_per_part = data.draw(corpus(tree))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run = _run_tool(lines, blank_after, tree, out, docs_per_part)
        _check(lines, run, tree, out)


# Inputs that once crashed the tool or could hang it, one line each, with the kind reported.
NASTY = [
    (json.dumps({"images": ["a.jpg", None], "texts": [None, "x\ud800y"]}).encode(), "bad_field"),
    (json.dumps({"images": ["a\ud800.jpg"], "texts": [None]}).encode(), "bad_field"),
    (json.dumps({"images": ["a\x00.jpg"], "texts": [None]}).encode(), "bad_field"),
    (b'{"text_list": ["a", "b"], "image_info": [{"image_name": "a.jpg"}], "similarity_matrix": [[NaN, 1]]}', "bad_field"),
    (b'{"text_list": ["a", "b"], "image_info": [{"image_name": "a.jpg"}], "similarity_matrix": [[1, Infinity]]}',
     "bad_field"),
    (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed_json"),
    (json.dumps({"images": ["fifo.jpg"], "texts": [None]}).encode(), "unreadable_image"),
    (json.dumps({"images": ["loop.jpg"], "texts": [None]}).encode(), "unreadable_image"),
    (json.dumps({"text_list": ["a\udfff"], "image_info": []}).encode(), "bad_field"),
]


def test_nasty_documents_in_worker_processes(tree, tmp_path):
    """The same inputs through the command line with spawned workers: reported, in order, and the
    good documents around them written."""
    lines = [FIRST]
    for line, _ in NASTY:
        lines += [line, FIRST]
    for line, kind in NASTY:
        assert expected_outcome(line, tree)["kind"] == kind
    src = tmp_path / "nasty.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_interleaved.py"), "--input", str(src),
           "--output-prefix", str(tmp_path / "ds"), "--image-root", str(tree["root"]), "--tokenizer-model",
           tokenizer_path(), "--workers", "2", "--no-progress", "--image-size", str(IMAGE_SIZE), "--image-storage",
           "raw", "--max-num-images", str(MAX_IMAGES), "--docs-per-part", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's engine
    assert proc.returncode == 0, proc.stderr
    _check(lines, {"src": src, "line_numbers": list(range(1, len(lines) + 1))}, tree, tmp_path)


def test_every_image_reference_of_the_tree(tree, tmp_path):
    """Each reference of the tree once, as OBELICS and as MMC4, whatever the generator happens to
    draw: good ones written with the right pixels, bad ones reported with their kind."""
    lines = [FIRST]
    for ref in sorted(tree["good"]) + sorted(tree["bad"]):
        lines.append(json.dumps({"images": [None, ref], "texts": ["Look:", None]}).encode())
        lines.append(json.dumps({"text_list": ["One.", "Two."], "image_info": [{"image_name": ref}],
                                 "similarity_matrix": [[0.1, 0.9]]}).encode())
    kinds = Counter(expected_outcome(line, tree).get("kind", "written") for line in lines)
    assert kinds["written"] == 1 + 2 * len(tree["good"])
    assert set(kinds) - {"written"} == set(tree["bad"].values())
    run = _run_tool(lines, set(), tree, tmp_path, docs_per_part=7)
    _check(lines, run, tree, tmp_path)
