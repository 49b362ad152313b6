"""Reading every source layout, and the errors a wrong or incomplete source gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.config import get_preset
from engine.convert.io import ShardedSafetensorsWriter, WeightReader
from engine.errors import CheckpointError
from engine.convert.llava_hf import hub_name, match_preset, trainer_flags
from engine.convert.original_llava import LlamaClipSource, OriginalLlavaSource
from engine.convert.sources import LlavaHFSource


def test_llava_hf_source_reads_the_model(llava_hf_dir, tiny_llava):
    src = LlavaHFSource(llava_hf_dir)
    assert src.config == get_preset("tiny")
    assert src.check() == []
    assert len(WeightReader(llava_hf_dir).keys()) == len(src.names)
    state = {hub_name(k): v for k, v in tiny_llava.state_dict().items()}
    assert set(state) == set(src.names)
    for name in src.names:
        assert torch.equal(src.get(name), state[name]), name


def test_original_layout_equals_llava_hf(llava_hf_dir, original_llava_dir):
    hf, orig = LlavaHFSource(llava_hf_dir), OriginalLlavaSource(original_llava_dir)
    assert orig.config == hf.config
    assert orig.check() == []
    assert orig.names == hf.names
    for name in hf.names:  # the <image> row is created by the import for `orig`: still equal
        want = hf.get(name)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            want = want[:32001]  # llava-hf's rows past <image>: padding, zero after an import of `orig`
        assert torch.equal(orig.get(name), want), name


def test_llama_clip_gets_a_fresh_projector(llama_dir, clip_dir, llava_hf_dir):
    hf = LlavaHFSource(llava_hf_dir)
    src = LlamaClipSource(llama_dir, clip_dir, seed=3)
    assert src.config == hf.config
    assert src.check() == []
    for name in hf.names:
        if not name.startswith("multi_modal_projector."):
            assert torch.equal(src.get(name), hf.get(name)[:32001] if "embed" in name or "lm_head" in name
                               else hf.get(name)), name
    w = src.get("multi_modal_projector.linear_1.weight")
    assert w.shape == (64, 32) and w.abs().max() <= 32 ** -0.5 and w.std() > 0.05
    again = LlamaClipSource(llama_dir, clip_dir, seed=3).get("multi_modal_projector.linear_1.weight")
    other = LlamaClipSource(llama_dir, clip_dir, seed=4).get("multi_modal_projector.linear_1.weight")
    assert torch.equal(w, again) and not torch.equal(w, other)


# config.json of llava-hf/llava-1.5-7b-hf as published: most LLaMA fields are left to defaults.
LLAVA_15_7B_HF = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_published_llava_config_is_the_7b_preset():
    from engine.convert.llava_hf import model_config_from_hf

    cfg = model_config_from_hf(LLAVA_15_7B_HF, "config.json")
    assert cfg == get_preset("llava-1.5-7b") and trainer_flags(cfg) == "--model llava-1.5-7b"
    scaled = {**LLAVA_15_7B_HF, "text_config": {**LLAVA_15_7B_HF["text_config"],
                                                "rope_scaling": {"rope_type": "linear", "factor": 2.0}}}
    with pytest.raises(CheckpointError, match="rope scaling"):
        model_config_from_hf(scaled, "config.json")


def test_preset_matching():
    assert match_preset(get_preset("tiny")) == ("tiny", {})
    assert trainer_flags(get_preset("llava-1.5-7b", num_layers=8)) in (
        "--model llava-7b-bench", "--model llava-1.5-7b --num-layers 8")
    odd = get_preset("tiny").replace(rotary_base=500000.0)
    assert match_preset(odd) is None


# ------------------------------------------------------------------------------ errors


def _copy(src, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def test_missing_shard(llava_hf_dir, tmp_path):
    d = _copy(llava_hf_dir, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard}"):
        LlavaHFSource(d)


def test_missing_tensor(llava_hf_dir, tmp_path):
    d = _copy(llava_hf_dir, tmp_path)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["language_model.model.layers.2.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*layers\.2\.mlp\.up_proj"):
        LlavaHFSource(d).check()


def test_shape_mismatch_names_file_and_tensor(llava_hf_dir, tmp_path):
    d = _copy(llava_hf_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 160
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-0000\d\.safetensors: tensor .*mlp.*shape \[176, 64\]"
                                              r".*implies \[160, 64\]"):
        LlavaHFSource(d).check()


def test_unknown_architecture(llava_hf_dir, original_llava_dir, tmp_path):
    d = _copy(llava_hf_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl",
                                               "architectures": ["Qwen2VLForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="not a LlavaForConditionalGeneration"):
        LlavaHFSource(d)
    with pytest.raises(CheckpointError, match="is not LlavaLlamaForCausalLM.*--from llava-hf"):
        OriginalLlavaSource(llava_hf_dir)


def test_original_layout_needs_the_vision_tower(original_llava_dir, clip_dir, tmp_path):
    d = _copy(original_llava_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(CheckpointError, match="--vision-source"):
        OriginalLlavaSource(d)
    assert OriginalLlavaSource(d, clip_dir).config == get_preset("tiny")
    (d / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(CheckpointError, match="mm_projector_type 'linear'"):
        OriginalLlavaSource(d)


def test_corrupt_bin_shard(original_llava_dir, tmp_path):
    d = _copy(original_llava_dir, tmp_path)
    (d / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a zip file")
    src = OriginalLlavaSource(d)
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin: cannot load"):
        for name in src.names:
            src.get(name)


def test_sharded_writer_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(100 + i, 50, generator=gen).to(torch.bfloat16) for i in range(7)}
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=30_000)
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.close()
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in tensors.values())
    assert not list(tmp_path.glob(".shard-*"))
    reader = WeightReader(tmp_path)
    assert sorted(reader.keys()) == sorted(tensors)
    for k, v in tensors.items():
        assert reader.shape(k) == tuple(v.shape) and torch.equal(reader.get(k), v)
    with pytest.raises(CheckpointError, match="not found"):
        reader.get("nope")
