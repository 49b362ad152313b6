"""The checkpoint converter (engine/cli/convert.py, `llava-convert`) end to end, on tiny random
transformers models (fp32, CPU, gloo).

The input is a real interleaved document (real tokenizer, two real photographs) with each image
expanded to 576 positions: the same token sequence goes into transformers and into the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.convert.io import WeightReader
from engine.convert.llava_hf import hub_name
from engine.cli.convert import main, run_export

pytestmark = pytest.mark.slow  # every test here starts gloo process groups
ATOL = 1e-4  # fp32, logits of magnitude ~2; observed differences are ~1e-6


def _checkpoint_tensors(ckpt, tmp_path) -> dict[str, torch.Tensor]:
    """Every tensor of an engine checkpoint's newest iteration, by its sharded-state-dict key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from engine.training.checkpoint import resolve_checkpoint_dir

    out = tmp_path / f"{ckpt.parent.name}.pt"
    dcp_to_torch_save(str(resolve_checkpoint_dir(ckpt)), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_llava_hf_import_logits_equal_hf(imports, hf_reference, tp, pp):
    report = imports(tp, pp)
    engine = report["engine_logits"]
    assert engine.shape == (hf_reference.shape[0], 32064)
    torch.testing.assert_close(engine, hf_reference, atol=ATOL, rtol=1e-4)
    assert report["max_logit_diff"] < ATOL
    assert report["trainer_flags"] == "--model tiny"
    assert (Path(report["target"]) / "tokenizer.model").is_file()


def test_layouts_hold_the_same_weights(imports, tmp_path):
    """A checkpoint written at TP=2 and one written at PP=2 contain the same global tensors."""
    a = _checkpoint_tensors(Path(imports(2, 1)["target"]), tmp_path)
    b = _checkpoint_tensors(Path(imports(1, 2)["target"]), tmp_path)
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_loads_in_transformers_with_same_logits_and_bit_exact_weights(
        imports, tmp_path, llava_hf_dir, hf_reference, interleaved, photos):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    source = imports(2, 1)["target"]  # exported from a TP=2 checkpoint
    out = tmp_path / "hf"
    report = run_export(source, out, dtype="fp32", verify_input=interleaved, max_shard_bytes=3 * 2**20,
                        progress=False, log=lambda *_: None)
    assert report["max_logit_diff"] < ATOL

    # Weights: the exported files hold exactly the source checkpoint's tensors, under the same names.
    a, b = WeightReader(llava_hf_dir), WeightReader(out)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(b)
    names = {hub_name(k): k for k in a.keys()}
    assert set(names) == set(b.keys())
    for name, key in names.items():
        assert torch.equal(a.get(key), b.get(name)), name

    # transformers loads it with nothing missing and computes the reference logits.
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens, images, _ = interleaved
    with torch.no_grad():
        logits = model.eval()(input_ids=tokens, pixel_values=images).logits[0]
    torch.testing.assert_close(logits, hf_reference, atol=ATOL, rtol=1e-4)

    # The processor loads, expands each <image> to 576 positions and preprocesses like the engine.
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaProcessor)
    wide = Image.fromarray(photos[0]).resize((400, 260))
    batch = processor(images=[wide, Image.fromarray(photos[1])], text="A figure:<image> and<image> done.",
                      return_tensors="pt")
    ids = batch["input_ids"][0]
    assert ids[0] == 1 and (ids == 32000).sum() == 2 * 576
    from engine.data.tokenizer import SentencePieceTokenizer

    sp = SentencePieceTokenizer(str(out / "tokenizer.model"))
    text = "The cat sat on the mat, and the coffee went cold."
    assert processor.tokenizer.encode(text) == [1] + sp.encode(text)
    from engine.data.images import normalize, preprocess

    ours = torch.from_numpy(normalize(preprocess(wide)))
    # Both pad to a square with the CLIP mean colour before the bicubic resize; PIL vs the
    # processor's resampling differ by a grey level or so at most.
    diff = (batch["pixel_values"][0] - ours).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.2


def test_original_layout_import_equals_llava_hf_import(imports, original_llava_dir, tmp_path):
    target = tmp_path / "orig"
    assert main(["import", "--from", "llava", "--source", str(original_llava_dir), "--target", str(target),
                 "--tp", "2", "--pp", "1", "--dtype", "fp32"]) == 0
    ours = _checkpoint_tensors(target, tmp_path)
    ref = _checkpoint_tensors(Path(imports(2, 1)["target"]), tmp_path)
    assert ours.keys() == ref.keys()
    for k in ref:
        if k.endswith(("word_embeddings.weight", "output_layer.weight")):
            # Rows past <image> (32001): llava-hf's <pad> and padding; the original has none.
            assert torch.equal(ours[k][:32001], ref[k][:32001]), k
            assert not ours[k][32001:].any(), k
        else:
            assert torch.equal(ours[k], ref[k]), k


def test_llama_clip_import_with_new_projector(llama_dir, clip_dir, tmp_path, capsys):
    target = tmp_path / "start"
    assert main(["import", "--from", "llama+clip", "--source", str(llama_dir), "--vision-source", str(clip_dir),
                 "--target", str(target), "--tp", "1", "--pp", "1", "--dtype", "bf16", "--verify"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["trainer_flags"] == "--model tiny" and report["dtype"] == "bf16"
    assert report["max_logit_diff"] < 0.1  # bf16 on both sides


def test_command_line_errors(llava_hf_dir, original_llava_dir, tmp_path, capsys):
    def run(*argv) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "is not LlavaLlamaForCausalLM" in run("import", "--from", "llava", "--source", str(llava_hf_dir),
                                                   "--target", str(tmp_path / "a"))
    assert "not divisible by tensor_model_parallel_size=3" in run(
        "import", "--from", "llava-hf", "--source", str(llava_hf_dir), "--target", str(tmp_path / "b"), "--tp", "3")
    assert "--vision-source is not used" in run("import", "--from", "llava-hf", "--source", str(llava_hf_dir),
                                                "--vision-source", str(tmp_path), "--target", str(tmp_path / "c"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in run("import", "--from", "llava-hf", "--source", str(llava_hf_dir),
                              "--target", str(tmp_path / "full"))
    assert "not an engine checkpoint" in run("export", "--source", str(llava_hf_dir), "--target", str(tmp_path / "d"))
    assert "unknown dtype" in run("import", "--from", "llava-hf", "--source", str(llava_hf_dir),
                                  "--target", str(tmp_path / "e"), "--dtype", "int8")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(original_llava_dir, broken)
    (broken / "pytorch_model-00002-of-00002.bin").write_bytes(b"truncated download")
    err = run("import", "--from", "llava", "--source", str(broken), "--target", str(tmp_path / "f"))
    assert "pytorch_model-00002-of-00002.bin: cannot load" in err
    assert not (tmp_path / "f").exists()
