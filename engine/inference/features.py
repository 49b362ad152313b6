"""Pooled image features for retrieval (e.g. RICES few-shot example selection).

LLaVA feeds the language model hidden_states[select_layer] of CLIP without the class token; a
retrieval feature is CLIP's own pooled output instead: the class token after every layer and the
post-LayerNorm, as `CLIPVisionModel(...).pooler_output` computes it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pooled_features(tower, images: Tensor) -> Tensor:
    """images [N, 3, H, W] (CLIP-normalised) -> [N, hidden] with `tower` an engine CLIPVisionTower."""
    x = tower.conv1(images.to(tower.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [N, patches, hidden]
    x = torch.cat([tower.class_token.expand(x.size(0), -1, -1).to(x.dtype), x], dim=1)
    x = tower.ln_pre(x + tower.position_embeddings.weight.to(x.dtype)).transpose(0, 1).contiguous()
    for layer in tower.decoder.layers:  # all of them, unlike the LLaVA features
        x, _ = layer(hidden_states=x, attention_mask=None)
    return tower.ln_post(x[0])
