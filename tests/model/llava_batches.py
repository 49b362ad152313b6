"""Real micro-batches for model tests, built independently of engine/data: real photographs
(scikit-image), the real SentencePiece tokenizer, the packed layout of docs/internals.md, and
Hugging Face reference models configured like an engine preset."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from engine.config import CLIP_MEAN, CLIP_STD, ModelConfig

BOS, EOS, PAD = 1, 2, 0

TEXTS = [
    "The cell membrane controls what enters and leaves the cell.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "A cat sits on the windowsill and watches the birds in the garden.",
    "Newton's second law says that force equals mass times acceleration.",
    "The rocket lifted off at dawn, carrying a weather satellite into orbit.",
    "Coffee beans are roasted to bring out their aroma.",
]


def photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def clip_pixels(img: np.ndarray, size: int = 336) -> torch.Tensor:
    """LLaVA's `pad` preprocessing: pad to square with the mean colour, resize, normalise."""
    h, w = img.shape[:2]
    side = max(h, w)
    mean = tuple(int(round(m * 255)) for m in CLIP_MEAN)
    canvas = Image.new("RGB", (side, side), mean)
    canvas.paste(Image.fromarray(img), ((side - w) // 2, (side - h) // 2))
    x = np.asarray(canvas.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def document(sp, items: list, image_token_id: int, tokens_per_image: int):
    """items: str (text) or int (index into photos()). Returns (LLM-position token list, image
    indices, LLM positions of the images): BOS, text, each image as its block, EOS."""
    ids, images, offsets = [BOS], [], []
    for item in items:
        if isinstance(item, str):
            ids += sp.encode(item)
        else:
            offsets.append(len(ids))
            images.append(item)
            ids += [image_token_id] * tokens_per_image
    return ids + [EOS], images, offsets


def pack(sp, cfg: ModelConfig, rows: list[list[list]], seq_length: int) -> dict:
    """A micro-batch of len(rows) rows; each row is a list of documents (lists of items)."""
    pics = [clip_pixels(p) for p in photos()]
    img_id, n_tok = cfg.image_token_id, cfg.vision.tokens_per_image
    tokens, labels, mask, positions, cu, images, offsets = [], [], [], [], [0], [], []
    for r, docs in enumerate(rows):
        row_t, row_l, row_m, row_p = [], [], [], []
        for items in docs:
            ids, imgs, offs = document(sp, items, img_id, n_tok)
            first_image = offs[0] if offs else len(ids)
            images += [pics[i] for i in imgs]
            offsets += [r * seq_length + len(row_t) + o for o in offs]
            for t in range(len(ids)):
                nxt = ids[t + 1] if t + 1 < len(ids) else PAD
                row_l.append(nxt)
                row_m.append(float(t + 1 < len(ids) and nxt != img_id and t >= first_image))
            row_t += ids
            row_p += range(len(ids))
            cu.append(r * seq_length + len(row_t))
        pad = seq_length - len(row_t)
        assert pad >= 0, f"row {r} needs {len(row_t)} positions > {seq_length}"
        if pad:
            row_t += [PAD] * pad
            row_l += [PAD] * pad
            row_m += [0.0] * pad
            row_p += range(pad)
            cu.append((r + 1) * seq_length)
        tokens.append(row_t), labels.append(row_l), mask.append(row_m), positions.append(row_p)
    lengths = np.diff(cu)
    return dict(
        tokens=torch.tensor(tokens), labels=torch.tensor(labels), loss_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=int(lengths.max()),
        images=torch.stack(images) if images else torch.zeros(0, 3, 336, 336),
        image_offsets=torch.tensor(offsets, dtype=torch.int64),
    )


# Three documents of different lengths, packed into 2 rows of 720 positions.
DOCS = [
    [TEXTS[0], 0, TEXTS[1]],
    [TEXTS[2], 1, TEXTS[3] + " " + TEXTS[4]],
    [TEXTS[5]],
]


def packed_batch(sp, cfg: ModelConfig) -> dict:
    return pack(sp, cfg, [[DOCS[0], DOCS[2]], [DOCS[1]]], seq_length=720)


# --------------------------------------------------------------------------- Hugging Face twins

def hf_vision_config(cfg: ModelConfig):
    from transformers import CLIPVisionConfig

    v = cfg.vision
    return CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                            num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
                            image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu",
                            layer_norm_eps=v.layernorm_eps, projection_dim=v.hidden_size)


def hf_text_config(cfg: ModelConfig, initializer_range: float = 0.02):
    from transformers import LlamaConfig

    lang = cfg.language
    return LlamaConfig(vocab_size=lang.padded_vocab_size, hidden_size=lang.hidden_size,
                       intermediate_size=lang.ffn_hidden_size, num_hidden_layers=lang.num_layers,
                       num_attention_heads=lang.num_attention_heads,
                       num_key_value_heads=lang.num_query_groups or lang.num_attention_heads,
                       max_position_embeddings=lang.max_position_embeddings, rms_norm_eps=lang.norm_eps,
                       rope_theta=lang.rotary_base, tie_word_embeddings=False, attention_bias=False,
                       mlp_bias=False, initializer_range=initializer_range)


def hf_llava(cfg: ModelConfig, seed: int = 0, initializer_range: float = 0.02):
    """A randomly initialised transformers LlavaForConditionalGeneration shaped like `cfg`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = LlavaConfig(vision_config=hf_vision_config(cfg), text_config=hf_text_config(cfg, initializer_range),
                         image_token_index=cfg.image_token_id, vision_feature_layer=cfg.vision.select_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         multimodal_projector_bias=True)
    hf_cfg._attn_implementation = "eager"
    return LlavaForConditionalGeneration(hf_cfg).eval()


def documents_of(batch: dict) -> list[tuple[int, int]]:
    """(start, end) of every non-padding document in the flattened batch."""
    cu = batch["cu_seqlens"].tolist()
    flat = batch["tokens"].reshape(-1)
    return [(a, b) for a, b in zip(cu[:-1], cu[1:]) if flat[a] == BOS]
