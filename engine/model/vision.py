"""CLIP ViT-L/14-336 vision tower, computed exactly as Hugging Face's `CLIPVisionModel`.

Parameter names and layers follow megatron-core's `CLIPViTModel` (conv1, class_token,
position_embeddings, ln_pre, decoder.layers.*), so checkpoints look like mcore's; the module is
composed here rather than taken from mcore because `CLIPViTModel`
  - allocates its position ids with `.cuda()` in `__init__` (no CPU mode),
  - always runs every layer of its block, while LLaVA reads the *penultimate* layer
    (`mm_vision_select_layer=-2`): running the last layer would waste 1/24 of the tower's compute.

All `num_layers` layers of the checkpoint are built, plus CLIP's `post_layernorm` (`ln_post`), so a
Hugging Face checkpoint converts to the engine and back bit for bit; the layers after
`select_layer` and `ln_post` never run and are always frozen (they cannot affect the output, and a
trainable parameter without gradients would stall gradient reduction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.fp8_utils import get_fp8_context
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from engine.config import VisionConfig

FP8_ROWS = 8  # Transformer Engine's FP8 GEMMs take a multiple of 8 rows


class CLIPVisionTower(MegatronModule):
    def __init__(self, config: TransformerConfig, block_spec: TransformerBlockSubmodules, vision: VisionConfig,
                 pg_collection=None):
        super().__init__(config=config)
        hidden = vision.hidden_size
        self.num_layers_run = vision.num_layers_run
        self.drop_class_token = vision.drop_class_token
        self.conv1 = torch.nn.Conv2d(3, hidden, kernel_size=vision.patch_size, stride=vision.patch_size,
                                     bias=False, dtype=config.params_dtype)
        self.class_token = torch.nn.Parameter(torch.randn(1, 1, hidden, dtype=config.params_dtype))
        self.position_embeddings = torch.nn.Embedding(vision.num_patches + 1, hidden, dtype=config.params_dtype)
        self.ln_pre = torch.nn.LayerNorm(hidden, eps=vision.layernorm_eps, dtype=config.params_dtype)
        self.decoder = TransformerBlock(config=config, spec=block_spec, pre_process=True, post_process=False,
                                        pg_collection=pg_collection)
        self.ln_post = torch.nn.LayerNorm(hidden, eps=vision.layernorm_eps, dtype=config.params_dtype)
        self.set_trainable(False)

    def set_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the tower; the layers that never run stay frozen either way."""
        unused = {id(p) for m in [self.ln_post, *self.decoder.layers[self.num_layers_run:]] for p in m.parameters()}
        for p in self.parameters():
            p.requires_grad_(trainable and id(p) not in unused)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def forward(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] (CLIP-normalised) -> features [N, tokens_per_image, hidden]:
        hidden_states[select_layer] of CLIPVisionModel, class token dropped. A frozen tower
        runs without autograd state."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._features(images)

    def _features(self, images: Tensor) -> Tensor:
        n = images.size(0)
        if self.config.fp8 and n % FP8_ROWS:
            # FP8 GEMMs need a multiple of 8 rows; 577 tokens per image is odd, so the image count
            # is padded (with blank images whose features are dropped)
            images = torch.cat([images, images.new_zeros(FP8_ROWS - n % FP8_ROWS, *images.shape[1:])])
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [N, hidden, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [N, patches, hidden]
        x = torch.cat([self.class_token.expand(x.size(0), -1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.position_embeddings.weight.to(x.dtype))
        x = x.transpose(0, 1).contiguous()  # megatron layers run [s, b, h]
        with get_fp8_context(self.config):  # FP8 GEMMs only with --fp8-vision (a no-op otherwise)
            for layer in self.decoder.layers[: self.num_layers_run]:
                x, _ = layer(hidden_states=x, attention_mask=None)
        x = x.transpose(0, 1)[:n]
        return x[:, 1:] if self.drop_class_token else x
