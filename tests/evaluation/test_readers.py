"""Readers of the official layouts: what they return, and the error each missing field gives."""

import json
import shutil

import pytest

from _eval_layouts import (mathverse_records, mathvision_records, mathvista_records, png_bytes, write_mathverse,
                           write_mathvision, write_mathvista, write_okvqa, write_scienceqa, write_textvqa)
from engine.evaluation.items import BenchmarkDataError
from engine.evaluation.math_readers import choice_letter, read_mathverse, read_mathvision, read_mathvista
from engine.evaluation.scienceqa_reader import read_scienceqa
from engine.evaluation.vqa_readers import read_okvqa, read_textvqa


def test_okvqa(tmp_path):
    root = write_okvqa(tmp_path)
    items = read_okvqa(root, "val")
    assert [it.id for it in items] == ["200", "201", "202"]
    assert items[0].image == root / "val2014" / "COCO_val2014_000000001200.jpg" and items[0].image.is_file()
    assert len(items[0].answers) == 10 and items[0].answers[0] == "cat"
    assert items[1].question == "What is shown in picture 1?"
    assert len(read_okvqa(root, "train")) == 4


def _rewrite(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field", ["question_id", "image_id", "question"])
def test_okvqa_missing_question_field(tmp_path, field):
    root = write_okvqa(tmp_path)
    qpath = root / "OpenEnded_mscoco_val2014_questions.json"
    _rewrite(qpath, lambda d: d["questions"][1].pop(field))
    with pytest.raises(BenchmarkDataError, match=rf"{qpath}: questions\[1\]: missing field '{field}'"):
        read_okvqa(root, "val")


def test_okvqa_missing_answers_and_files(tmp_path):
    root = write_okvqa(tmp_path)
    apath = root / "mscoco_val2014_annotations.json"
    _rewrite(apath, lambda d: d["annotations"][2].pop("answers"))
    with pytest.raises(BenchmarkDataError, match=r"annotations\[2\]: missing field 'answers'"):
        read_okvqa(root, "val")
    apath.unlink()
    with pytest.raises(BenchmarkDataError, match="mscoco_val2014_annotations.json: file not found"):
        read_okvqa(root, "val")


def test_textvqa(tmp_path):
    root = write_textvqa(tmp_path)
    items = read_textvqa(root, "val")
    assert [it.id for it in items] == ["50", "51", "52"]
    assert items[0].image == root / "train_images" / "valimg000.jpg"
    assert items[0].info["ocr_tokens"] == ("stop", "no0") and len(items[0].answers) == 10


@pytest.mark.parametrize("field", ["question_id", "question", "image_id", "answers", "ocr_tokens"])
def test_textvqa_missing_field(tmp_path, field):
    root = write_textvqa(tmp_path)
    path = root / "TextVQA_0.5.1_val.json"
    _rewrite(path, lambda d: d["data"][0].pop(field))
    with pytest.raises(BenchmarkDataError, match=rf"TextVQA_0.5.1_val.json: data\[0\]: missing field '{field}'"):
        read_textvqa(root, "val")


def test_scienceqa_img_subset(tmp_path):
    root = write_scienceqa(tmp_path)
    test = read_scienceqa(root, "test")
    assert [it.id for it in test] == ["6", "7", "8"]  # problem 9 has no image: not in IMG
    assert test[0].image == root / "images" / "test" / "6" / "image.png"
    assert test[0].answers == ("A",) and test[1].answers == ("B",)  # answer index 6 % 3 = 0, 7 % 3 = 1
    assert test[0].choices == ("cat", "dog", "bird")
    assert len(read_scienceqa(root, "train")) == 4


@pytest.mark.parametrize("field", ["question", "choices", "answer"])
def test_scienceqa_missing_field(tmp_path, field):
    root = write_scienceqa(tmp_path)
    _rewrite(root / "problems.json", lambda d: d["7"].pop(field))
    with pytest.raises(BenchmarkDataError, match=rf"problems.json: problem 7: missing field '{field}'"):
        read_scienceqa(root, "test")


def test_scienceqa_missing_split(tmp_path):
    root = write_scienceqa(tmp_path)
    _rewrite(root / "pid_splits.json", lambda d: d.pop("test"))
    with pytest.raises(BenchmarkDataError, match="pid_splits.json: missing field 'test'"):
        read_scienceqa(root, "test")


def test_math_json_layouts(tmp_path):
    vista = read_mathvista(write_mathvista(tmp_path / "vista"))
    assert [it.id for it in vista] == ["1", "2", "3"]
    assert vista[0].choices == ("3", "5", "7") and choice_letter(vista[0]) == "B"
    assert vista[1].info == {"question_type": "free", "answer_type": "float", "unit": "cm", "precision": 1.0}
    assert vista[0].image.is_file()
    vision = read_mathvision(write_mathvision(tmp_path / "vision"))
    assert vision[0].info["question_type"] == "choice" and vision[1].info["question_type"] == "free"
    assert vision[0].answers == ("C",) and vision[0].image.is_file()
    verse = read_mathverse(write_mathverse(tmp_path / "verse"))
    assert verse[0].image == tmp_path / "verse" / "images" / "image_1.png"
    assert verse[0].info["question_type"] == "choice" and choice_letter(verse[0]) == "B"


@pytest.mark.parametrize("reader,writer,name,field", [
    (read_mathvista, write_mathvista, "annot_testmini.json", "answer_type"),
    (read_mathvision, write_mathvision, "data/test.jsonl", "options"),
    (read_mathverse, write_mathverse, "testmini.json", "sample_index"),
])
def test_math_missing_field(tmp_path, reader, writer, name, field):
    root = writer(tmp_path)
    path = root / name
    if name.endswith(".jsonl"):
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        lines[1].pop(field)
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    else:
        _rewrite(path, lambda d: (d["2"] if isinstance(d, dict) else d[1]).pop(field))
    with pytest.raises(BenchmarkDataError, match=rf"{name}: entry 1: missing field '{field}'"):
        reader(root)


def test_math_nothing_found(tmp_path):
    with pytest.raises(BenchmarkDataError, match="mathvista: no annotation file or parquet export found"):
        read_mathvista(tmp_path)


def _write_parquet(path, records, image_field, pictures):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [dict(r, **{image_field: {"bytes": pic, "path": None}}) for r, pic in zip(records, pictures)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_math_parquet_exports(tmp_path):
    pytest.importorskip("pyarrow")
    pics = [png_bytes(k) for k in range(3)]
    _write_parquet(tmp_path / "vista/data/testmini-00000-of-00001.parquet", mathvista_records(), "decoded_image", pics)
    _write_parquet(tmp_path / "vision/data/test-00000-of-00001.parquet", mathvision_records(), "decoded_image", pics)
    verse = [dict(r) for r in mathverse_records()]
    for r in verse:
        r.pop("image")
    _write_parquet(tmp_path / "verse/testmini.parquet", verse, "image", pics)
    for reader, sub in ((read_mathvista, "vista"), (read_mathvision, "vision"), (read_mathverse, "verse")):
        items = reader(tmp_path / sub)
        assert [it.image for it in items] == pics
        assert len({it.image_key for it in items}) == 3


def test_parquet_needs_pyarrow_message(tmp_path, monkeypatch):
    import sys

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(BenchmarkDataError, match="needs pyarrow"):
        read_mathvision(tmp_path)


def test_missing_image_is_not_a_reader_error(tmp_path):
    root = write_okvqa(tmp_path)
    shutil.rmtree(root / "val2014")
    assert len(read_okvqa(root, "val")) == 3  # reported by the run's errors file instead
