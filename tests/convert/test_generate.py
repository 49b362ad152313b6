"""Generation on an imported checkpoint: prompts follow the training token stream, and the engine
and transformers continue alike through `llava-generate` (engine/cli/generate.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from engine.cli.generate import main
from engine.config import get_preset
from engine.data.tokenizer import SentencePieceTokenizer
from engine.inference.prompt import build_input, prompt_segments

PROMPT = "A lecture about pets. <image> The cat in the picture is"


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for i, p in enumerate(photos[:2]):
        paths.append(str(d / f"p{i}.jpg"))
        Image.fromarray(p).save(paths[-1], quality=95)
    return paths


def test_prompt_follows_the_training_token_stream(tokenizer_model, photo_files):
    assert prompt_segments("a <image>  b<image><image> c ") == ["a", None, "b", None, None, "c"]
    tok = SentencePieceTokenizer(tokenizer_model)
    tokens, images, offsets = build_input(tok, "Look:<image> then <image>", photo_files, 576, 336)
    ids = tokens[0].tolist()
    assert ids[0] == tok.bos_id and tok.eos_id not in ids
    assert ids[1: offsets[0]] == tok.encode("Look:")
    assert all(ids[o: o + 576] == [tok.image_token_id] * 576 for o in offsets.tolist())
    assert ids[offsets[0] + 576: offsets[1]] == tok.encode("then")
    assert images.shape == (2, 3, 336, 336) and images.dtype == torch.float32
    with pytest.raises(ValueError, match="2 <image> marker.*1 image"):
        build_input(tok, "<image> and <image>", photo_files[:1], 576, 336)


def _greedy_reference(model, tokens, images, steps: int, banned: list[int]) -> list[int]:
    """Plain argmax decoding with transformers, recomputing the sequence every step."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=tokens, pixel_values=images).logits[0, -1]
        logits[banned] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == 2:
            break
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.slow
def test_engine_and_transformers_continue_alike(imports, tiny_llava, llava_hf_dir, tokenizer_model, photo_files,
                                                capsys):
    ckpt = imports(1, 1)["target"]
    argv = ["--prompt", PROMPT, "--image", photo_files[0], "--max-new-tokens", "6", "--dtype", "fp32", "--json"]
    assert main(["--checkpoint", ckpt, *argv]) == 0
    engine = json.loads(capsys.readouterr().out)
    cfg = get_preset("tiny")
    tok = SentencePieceTokenizer(tokenizer_model)
    before, after = PROMPT.split("<image>")
    assert engine["prompt_tokens"] == 1 + len(tok.encode(before.strip())) + 576 + len(tok.encode(after.strip()))

    tokens, images, _ = build_input(tok, PROMPT, photo_files[:1], 576, 336)
    banned = [cfg.image_token_id] + list(range(cfg.language.vocab_size, cfg.language.padded_vocab_size))
    reference = _greedy_reference(tiny_llava, tokens, images, 6, banned)
    assert engine["new_tokens"] == reference and len(reference) == 6
    assert engine["text"] == tok.decode(reference)
    assert main(["--hf-model", str(llava_hf_dir), *argv]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == reference

    # Sampling: reproducible from the seed, and not the greedy continuation at a high temperature.
    sample = ["--checkpoint", ckpt, *argv, "--temperature", "3.0", "--seed", "7"]
    assert main(sample) == 0
    first = json.loads(capsys.readouterr().out)["new_tokens"]
    assert main(sample) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == first
    assert first != reference


def test_generate_errors(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--prompt", "x", "--tokenizer", str(tmp_path / "no.model")]) == 2
    assert "not an engine checkpoint" in capsys.readouterr().err
    assert main(["--hf-model", str(tmp_path), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
