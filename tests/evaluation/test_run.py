"""Runs on the scripted generator: prompts, scores, the errors file, output files, rescoring."""

import json

import pytest

from _scripted import ScriptedGenerator
from engine.cli import evaluate as cli
from engine.evaluation.runner import EvalSettings, run_benchmark, summarize


def test_okvqa_scores_and_demos(data_root, inference_api):
    gen = ScriptedGenerator({"200": "cat\nmore text", "201": "dog", "202": "kitten"})
    run = run_benchmark(gen, data_root, EvalSettings("okvqa", shots=(0, 2)), progress=False)
    assert [(p["shots"], p["id"]) for p in run.predictions] == [(0, "200"), (0, "201"), (0, "202"),
                                                                (2, "200"), (2, "201"), (2, "202")]
    # "cat": 5 of 10 annotators (1.0), "dog": 2 (0.6), "kitten": 1 (0.3)
    assert [p["score"] for p in run.predictions[:3]] == pytest.approx([1.0, 0.6, 0.3])
    assert summarize(run, (0, 2))["0"] == {"score": pytest.approx(100 * 1.9 / 3), "n": 3, "errors": 0}
    reqs, params = gen.calls[-1]
    assert params.max_new_tokens == 10 and params.temperature == 0.0 and params.stop == ("\n",)
    two_shot = run.predictions[3]
    assert len(two_shot["demo_ids"]) == 2 and all(d.startswith("10") for d in two_shot["demo_ids"])  # train ids
    assert reqs[0].prompt.count("<image>") == 3 and len(reqs[0].images) == 3
    assert str(reqs[0].images[-1]).endswith("COCO_val2014_000000001200.jpg")
    assert two_shot["prompt_length"] > 0 and two_shot["output"] == "cat"


def test_missing_and_broken_images_are_listed(data_root, inference_api):
    (data_root / "okvqa/val2014/COCO_val2014_000000001201.jpg").unlink()
    (data_root / "okvqa/val2014/COCO_val2014_000000001202.jpg").write_bytes(b"not a jpeg")
    (data_root / "okvqa/train2014/COCO_train2014_000000001100.jpg").unlink()
    run = run_benchmark(ScriptedGenerator(), data_root, EvalSettings("okvqa", shots=(0, 1)), progress=False)
    assert [p["id"] for p in run.predictions] == ["200", "200"]
    reasons = {(e["shots"], e["id"], e["role"]): e["reason"] for e in run.errors}
    assert set(reasons) == {(None, "100", "demo"), (0, "201", "question"), (0, "202", "question"),
                            (1, "201", "question"), (1, "202", "question")}
    assert "not found" in reasons[(0, "201", "question")] and "COCO_val2014_000000001201.jpg" in reasons[(0, "201", "question")]
    assert "not a readable image" in reasons[(0, "202", "question")]
    assert summarize(run, (0, 1)) == {"0": {"score": 100.0, "n": 1, "errors": 2},
                                      "1": {"score": 100.0, "n": 1, "errors": 2}}
    assert all(d != "100" for p in run.predictions for d in p["demo_ids"])


def test_generator_errors_are_listed(data_root, inference_api):
    class Refusing(ScriptedGenerator):
        def _result(self, req, params):
            if req.id == "51":
                return inference_api.Result(id=req.id, finish_reason="error", error="prompt too long")
            return super()._result(req, params)

    run = run_benchmark(Refusing(default="stop"), data_root, EvalSettings("textvqa_ocr", shots=(1,)), progress=False)
    assert [p["id"] for p in run.predictions] == ["50", "52"] and run.predictions[0]["score"] == pytest.approx(1.0)
    assert run.errors == [{"benchmark": "textvqa_ocr", "shots": 1, "id": "51", "role": "question",
                           "image": str(data_root / "textvqa/train_images/valimg001.jpg"),
                           "reason": "generation: prompt too long"}]


def test_scienceqa_and_math(data_root, inference_api):
    run = run_benchmark(ScriptedGenerator({"6": "A", "7": "C", "8": "C. bird"}), data_root,
                        EvalSettings("scienceqa", shots=(0,)), progress=False)
    assert [p["parsed"] for p in run.predictions] == ["A", "C", "C"]
    assert [p["score"] for p in run.predictions] == [1.0, 0.0, 1.0]  # answers A, B, C
    gen = ScriptedGenerator({"1": "B", "2": "2.5 cm", "3": "The answer is A"}, default="")
    run = run_benchmark(gen, data_root, EvalSettings("mathvista", shots=(0, 2), demos="rices",
                                                     cache_dir=data_root / "cache"),
                        encoder=gen.image_features, progress=False)
    assert [p["score"] for p in run.predictions if p["shots"] == 0] == [1.0, 1.0, 0.0]
    assert gen.calls[0][1].max_new_tokens == 512 and gen.calls[0][1].stop == ("</s>", "USER:")
    assert all(len(p["demo_ids"]) == 2 for p in run.predictions if p["shots"] == 2)  # from MathVision's test


def test_cli_writes_outputs_and_score_rescores(data_root, inference_api, tmp_path, monkeypatch, capsys):
    gen = ScriptedGenerator({"200": "cat", "201": "dog", "6": "B", "7": "B"})
    monkeypatch.setattr(cli, "build_generator", lambda args: gen)
    (data_root / "scienceqa/images/test/7/image.png").unlink()
    out = tmp_path / "out"
    rc = cli.main(["--hf-model", str(tmp_path / "hf-tiny"), "--benchmark", "okvqa", "scienceqa", "--data-root",
                   str(data_root), "--shots", "0", "1", "--limit", "2", "--output", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["okvqa"]["0"] == {"score": pytest.approx(80.0), "n": 2, "errors": 0}
    assert results["scienceqa"]["0"] == {"score": 0.0, "n": 1, "errors": 1}  # --limit 2: problems 6, 7 (answer A)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * 2 + 2 * 1
    assert set(preds[0]) >= {"id", "demo_ids", "prompt_length", "output", "parsed", "score"}
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert {(e["benchmark"], e["shots"], e["id"]) for e in errors} == {("scienceqa", 0, "7"), ("scienceqa", 1, "7")}
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| Model | Shots | ScienceQA-IMG | OKVQA |"
    assert "| hf-tiny | 0 | 0.0 (1 err) | 80.0 |" in table
    capsys.readouterr()
    rc = cli.main(["score", "--benchmark", "okvqa", "scienceqa", "--predictions", str(out / "predictions.jsonl"),
                   "--data-root", str(data_root), "--output", str(tmp_path / "rescored")])
    assert rc == 0
    assert json.loads((tmp_path / "rescored/results.json").read_text()) == results


def test_cli_flag_errors(data_root, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--hf-model", "x", "--benchmark", "vqav2", "--data-root", str(data_root), "--output", "o"])
    assert "invalid choice: 'vqav2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--hf-model", "x", "--benchmark", "okvqa", "--data-root", "d", "--shots", "3", "--output", "o"])
