"""`llava-generate` in batch mode, end to end: a JSONL file of requests in, one result line each out."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.cli.generate import main, read_requests
from generation_inputs import IMAGES


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


@pytest.fixture
def prompts(tmp_path):
    shutil.copy(IMAGES[0], tmp_path / "local.jpg")
    lines = [
        {"id": "a", "prompt": "A photo: <image> It shows", "images": ["local.jpg"]},  # relative to the file
        {"id": 7, "prompt": "Two pictures <image> and <image> compared:", "images": [IMAGES[1], IMAGES[2]]},
        {"id": "bad", "prompt": "<image> missing", "images": ["nope.jpg"]},
        {"id": "text", "prompt": "Once upon a time"},
    ]
    path = tmp_path / "prompts.jsonl"
    _write(path, lines)
    return path


def _run(source, prompts, out, *extra):
    argv = [*source, "--prompts-jsonl", str(prompts), "--output", str(out), "--max-new-tokens", "4",
            "--dtype", "fp32", "--batch-size", "2", *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_batch_mode_engine_equals_transformers(engine_ckpt, hf_dir, prompts, tmp_path, capsys):
    ours = _run(["--checkpoint", str(engine_ckpt)], prompts, tmp_path / "engine.jsonl")
    assert [r["id"] for r in ours] == ["a", "7", "bad", "text"]
    assert "nope.jpg" in ours[2]["error"] and ours[2]["finish_reason"] == "error" and ours[2]["token_ids"] == []
    good = [r for r in ours if "error" not in r]
    assert len(good) == 3 and all(len(r["token_ids"]) == 4 and isinstance(r["text"], str) for r in good)
    assert "1 error(s)" in capsys.readouterr().err
    ref = _run(["--hf-model", str(hf_dir)], prompts, tmp_path / "hf.jsonl")
    assert [r["token_ids"] for r in ref] == [r["token_ids"] for r in ours]
    # A stop string cuts the text where it starts.
    stop = ours[0]["text"][1:3]
    stopped = _run(["--checkpoint", str(engine_ckpt)], prompts, tmp_path / "stop.jsonl", "--stop", stop)
    assert stopped[0]["text"] == ours[0]["text"][: ours[0]["text"].find(stop)]
    assert stopped[0]["finish_reason"] == "stop"


def test_malformed_lines_name_file_and_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    cases = [
        ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": ', "p.jsonl:2: not valid JSON"),
        ('["a"]', "p.jsonl:1: expected a JSON object"),
        ('{"prompt": "x"}', "p.jsonl:1: field 'id'"),
        ('{"id": "a", "prompt": 3}', "p.jsonl:1: field 'prompt'"),
        ('{"id": "a", "prompt": "x", "images": "a.jpg"}', "p.jsonl:1: field 'images'"),
        ('{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}', "p.jsonl:3: id 'a' appears twice"),
    ]
    for text, message in cases:
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            read_requests(path)
        assert main(["--hf-model", str(tmp_path), "--prompts-jsonl", str(path), "--output", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert main(["--hf-model", str(tmp_path), "--prompts-jsonl", str(path)]) == 2
    assert "go together" in capsys.readouterr().err
