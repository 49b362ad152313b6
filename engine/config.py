"""Model configuration: one dataclass per concern, and the named presets.

A preset is a complete, validated description of a LLaVA model (vision tower,
projector, language model). Training flags live in ``engine.training.arguments``;
they pick a preset by name and may override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# CLIP's normalisation constants (openai/clip-vit-large-patch14-336 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Vocabulary of the LLaMA/Vicuna SentencePiece model; the <image> placeholder gets the next id.
LLAMA_VOCAB_SIZE = 32000
IMAGE_TOKEN_ID = 32000


@dataclass(frozen=True)
class SpecialTokens:
    """BOS, EOS and pad ids of a vocabulary."""

    bos: int
    eos: int
    pad: int


# The special ids of that vocabulary: <s> 1, </s> 2; it defines no pad piece, and LLaVA pads with
# <unk> 0. A tokenizer reads its own from its files (engine/data/tokenizer.py); this is the source
# for code with no tokenizer at hand: padding packed samples, the exported Hugging Face configs.
LLAMA_SPECIAL_TOKENS = SpecialTokens(bos=1, eos=2, pad=0)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT as Hugging Face's CLIPVisionModel computes it."""

    hidden_size: int = 1024
    num_layers: int = 24  # layers in the checkpoint; only those up to `select_layer` run
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    patch_size: int = 14
    image_size: int = 336
    layernorm_eps: float = 1e-5
    activation: str = "quick_gelu"
    # LLaVA's mm_vision_select_layer: index into HF hidden_states (0 = embeddings after pre-LN).
    select_layer: int = -2
    drop_class_token: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_layers_run(self) -> int:
        """Transformer layers that must run to produce hidden_states[select_layer]."""
        n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"select_layer={self.select_layer} out of range for {self.num_layers} layers")
        return n

    @property
    def tokens_per_image(self) -> int:
        """Embeddings one image contributes to the language model."""
        return self.num_patches + (0 if self.drop_class_token else 1)


@dataclass(frozen=True)
class ProjectorConfig:
    """LLaVA-1.5 `mlp2x_gelu`: Linear(vision→llm), GELU, Linear(llm→llm)."""

    kind: str = "mlp2x_gelu"
    activation: str = "gelu"


@dataclass(frozen=True)
class LanguageConfig:
    """LLaMA / Vicuna decoder."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_query_groups: int | None = None  # None = multi-head attention (no GQA)
    ffn_hidden_size: int = 11008
    vocab_size: int = LLAMA_VOCAB_SIZE + 1  # tokenizer vocab + <image>
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    untie_embeddings: bool = True
    # Embedding/output rows are padded to a multiple of this (Megatron's
    # --make-vocab-size-divisible-by). 64 gives 32064 rows, the layout of the llava-hf checkpoints,
    # and is divisible by every power-of-two tensor-parallel size up to 64.
    make_vocab_size_divisible_by: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_token_id: int = IMAGE_TOKEN_ID

    def replace(self, **changes) -> "ModelConfig":
        """Override fields; `num_layers` etc. address the language model,
        `vision_<field>` the vision tower."""
        lang = {k: v for k, v in changes.items() if k in _LANG_FIELDS}
        vis = {k[len("vision_"):]: v for k, v in changes.items() if k.startswith("vision_")}
        top = {k: v for k, v in changes.items() if k not in lang and not k.startswith("vision_")}
        unknown = set(top) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model config field(s): {sorted(unknown)}")
        cfg = dataclasses.replace(
            self,
            language=dataclasses.replace(self.language, **lang),
            vision=dataclasses.replace(self.vision, **vis),
            **top,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        lang, vis = self.language, self.vision
        if lang.hidden_size % lang.num_attention_heads:
            raise ValueError(
                f"language hidden_size {lang.hidden_size} not divisible by heads {lang.num_attention_heads}")
        if lang.num_query_groups and lang.num_attention_heads % lang.num_query_groups:
            raise ValueError("num_attention_heads must be divisible by num_query_groups")
        if vis.hidden_size % vis.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {vis.hidden_size} not divisible by heads {vis.num_attention_heads}")
        if vis.image_size % vis.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if not 0 <= self.image_token_id < lang.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside vocab {lang.vocab_size}")
        vis.num_layers_run  # raises on a bad select_layer


_LANG_FIELDS = {f.name for f in dataclasses.fields(LanguageConfig)}

PRESETS: dict[str, ModelConfig] = {
    # LLaVA-1.5-7B: Vicuna-7B v1.5 + CLIP ViT-L/14-336 + mlp2x_gelu.
    "llava-1.5-7b": ModelConfig("llava-1.5-7b"),
    # LLaVA-1.5-13B: Vicuna-13B v1.5.
    "llava-1.5-13b": ModelConfig(
        "llava-1.5-13b",
        language=LanguageConfig(hidden_size=5120, num_layers=40, num_attention_heads=40, ffn_hidden_size=13824),
    ),
    # 7B-shaped layers, fewer of them: fits one 80 GB GPU for throughput work (override num_layers).
    # Positions up to 8192 so the same preset measures seq 4096 and 8192 (RoPE needs no table).
    "llava-7b-bench": ModelConfig(
        "llava-7b-bench", language=LanguageConfig(num_layers=8, max_position_embeddings=8192)),
    # Tiny shapes, real vocabulary and real image geometry (576 tokens per 336x336 image):
    # CPU tests, the quickstart and CI.
    "tiny": ModelConfig(
        "tiny",
        vision=VisionConfig(hidden_size=32, num_layers=3, num_attention_heads=4, ffn_hidden_size=64),
        language=LanguageConfig(
            hidden_size=64, num_layers=4, num_attention_heads=4, ffn_hidden_size=176, max_position_embeddings=8192),
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None
    cfg = cfg.replace(**overrides) if overrides else cfg
    cfg.validate()
    return cfg
