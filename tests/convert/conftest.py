"""Tiny random Hugging Face checkpoints in every source layout, built with transformers.

Shapes follow the engine's `tiny` preset (engine/config.py): CLIP 3 layers x 32 wide at the
real 336 px / 14 px geometry (576 patches), LLaMA 4 layers x 64 wide, the real 32000-token
vocabulary + <image> = 32000. The llava-hf model has 32064 vocabulary rows like
llava-1.5-7b-hf. Every weight (norms and biases included) is random, so that a mix-up of any two
tensors changes the logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import get_preset

HF_VOCAB = 32064
IMAGE_TOKEN = 32000


def tiny_hf_config(vocab_size: int = HF_VOCAB):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = get_preset("tiny")
    vis, lang = cfg.vision, cfg.language
    vision = CLIPVisionConfig(hidden_size=vis.hidden_size, intermediate_size=vis.ffn_hidden_size,
                              num_hidden_layers=vis.num_layers, num_attention_heads=vis.num_attention_heads,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=32)
    text = LlamaConfig(hidden_size=lang.hidden_size, intermediate_size=lang.ffn_hidden_size,
                       num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_attention_heads,
                       num_key_value_heads=lang.num_attention_heads, vocab_size=vocab_size,
                       max_position_embeddings=lang.max_position_embeddings, rms_norm_eps=lang.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": lang.rotary_base})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "eager"
    return config


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: weights ~ N(0, 0.05), norm scales ~ 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.05 * noise)


def build_tiny_llava(seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_hf_config()).eval()
    randomize(model, seed)
    # The original LLaVA has no <image> row; an import gives it the mean row (see
    # engine.convert.sources). Give the llava-hf model the same so both layouts hold one model.
    with torch.no_grad():
        for w in (model.model.language_model.embed_tokens.weight, model.lm_head.weight):
            w[IMAGE_TOKEN] = w[:IMAGE_TOKEN].float().mean(0)
    return model


@pytest.fixture(scope="session")
def tiny_llava():
    return build_tiny_llava()


@pytest.fixture(scope="session")
def llava_hf_dir(tmp_path_factory, tiny_llava, tokenizer_model) -> Path:
    """llava-hf layout, as transformers' save_pretrained writes it (Hub tensor names), in 3 shards."""
    out = tmp_path_factory.mktemp("llava_hf")
    tiny_llava.save_pretrained(out, max_shard_size="2MB")
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    return out


def _llm_state(model) -> dict[str, torch.Tensor]:
    """The language model under LLaMA's own names (`model.*`, `lm_head`), 32000 vocabulary rows."""
    out = {}
    for k, v in model.model.language_model.state_dict().items():
        out["model." + k] = v[:IMAGE_TOKEN].clone() if k == "embed_tokens.weight" else v.clone()
    out["lm_head.weight"] = model.lm_head.weight[:IMAGE_TOKEN].clone()
    return out


def _llama_config(model) -> dict:
    text = model.config.text_config.to_dict()
    text.update(vocab_size=IMAGE_TOKEN, architectures=["LlamaForCausalLM"], model_type="llama")
    return text


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory, tiny_llava) -> Path:
    """A CLIPModel-style checkpoint: `vision_model.*` next to a text tower, `.bin` weights."""
    import json

    out = tmp_path_factory.mktemp("clip")
    state = {"vision_model." + k: v.clone() for k, v in tiny_llava.model.vision_tower.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    state["logit_scale"] = torch.tensor(2.6592)
    torch.save(state, out / "pytorch_model.bin")
    vision = tiny_llava.config.vision_config.to_dict()
    vision.pop("model_type", None)
    (out / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"],
                                                 "vision_config": vision, "text_config": {}}))
    return out


@pytest.fixture(scope="session")
def original_llava_dir(tmp_path_factory, tiny_llava, tokenizer_model, clip_dir) -> Path:
    """LlavaLlamaForCausalLM layout (liuhaotian/llava-v1.5-7b): `model.mm_projector.0/2`, no tower,
    `mm_vision_tower` naming the CLIP checkpoint, sharded `.bin` files with an index."""
    import json

    out = tmp_path_factory.mktemp("llava_orig")
    state = _llm_state(tiny_llava)
    projector = tiny_llava.model.multi_modal_projector.state_dict()
    for i, j in ((1, 0), (2, 2)):
        for part in ("weight", "bias"):
            state[f"model.mm_projector.{j}.{part}"] = projector[f"linear_{i}.{part}"].clone()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, out / file)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    config = _llama_config(tiny_llava)
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_vision_tower=str(clip_dir),
                  mm_hidden_size=tiny_llava.config.vision_config.hidden_size, mm_projector_type="mlp2x_gelu",
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
                  mm_use_im_patch_token=False, image_aspect_ratio="pad")
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tiny_llava, tokenizer_model) -> Path:
    """A plain LlamaForCausalLM (Vicuna-style) checkpoint in one safetensors file."""
    import json

    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("llama")
    save_file(_llm_state(tiny_llava), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_llama_config(tiny_llava)))
    shutil.copy(tokenizer_model, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Three real photographs of different aspect ratios, as uint8 RGB."""
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]


@pytest.fixture(scope="session")
def interleaved(photos, tokenizer_model):
    """A real interleaved document (text, image, text, image, text) as the same token sequence
    for the engine and for transformers: each image expanded to 576 `<image>` positions.
    (tokens [1, S] int64, images [N, 3, 336, 336] float32 CLIP-normalised, offsets [N])."""
    from engine.data.images import normalize, preprocess
    from engine.data.tokenizer import SentencePieceTokenizer, encode_document

    tok = SentencePieceTokenizer(tokenizer_model)
    texts = ["A page of a textbook about cats and coffee.", "The figure above shows a cup.",
             "And here is a cat, sitting calmly."]
    segments = [texts[0], None, texts[1], None, texts[2]]
    ids = encode_document(tok, segments)
    pics = [preprocess(Image.fromarray(p)) for p in photos[:2]]
    expanded, offsets = [], []
    for t in ids.tolist():
        if t == tok.image_token_id:
            offsets.append(len(expanded))
            expanded.extend([t] * 576)
        else:
            expanded.append(t)
    tokens = torch.tensor([expanded], dtype=torch.int64)
    images = torch.from_numpy(normalize(np.stack(pics)))
    return tokens, images, torch.tensor(offsets, dtype=torch.int64)


# ------------------------------------------------------------------------------ conversions


@pytest.fixture(scope="session")
def hf_reference(tiny_llava, interleaved):
    tokens, images, _ = interleaved
    with torch.no_grad():
        return tiny_llava(input_ids=tokens, pixel_values=images).logits[0].float()


@pytest.fixture(scope="session")
def imports(tmp_path_factory, llava_hf_dir, interleaved):
    """Imports of the llava-hf checkpoint, one per (tp, pp), made once and verified on `interleaved`."""
    done = {}

    def get(tp: int, pp: int) -> dict:
        if (tp, pp) not in done:
            target = tmp_path_factory.mktemp(f"engine_tp{tp}_pp{pp}") / "ckpt"
            from engine.cli.convert import run_import

            done[tp, pp] = run_import("llava-hf", llava_hf_dir, target, tp, pp, dtype="fp32",
                                      verify_input=interleaved, progress=False, log=lambda *_: None)
        return done[tp, pp]

    return get
