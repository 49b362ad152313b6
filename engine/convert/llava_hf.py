"""The `llava-hf` layout (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

Three things live here:

* the config mapping `config.json` ⇄ `engine.config.ModelConfig` (and the preset it matches);
* tensor-name conventions: the files on the Hub use `language_model.model.*`,
  `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`
  (`engine.convert.hf.LAYOUTS["llava-hf"]`); transformers 5 renames these in memory
  (`LAYOUTS["transformers"]`) and its `save_pretrained` writes the Hub names except CLIP's
  `vision_model.` level. `hub_name` maps any of these spellings to the Hub one, which is the one
  we write, since every transformers release (4.x and 5.x) loads it;
* the tokenizer / image-processor / processor files, so that `LlavaProcessor.from_pretrained`
  works on an exported directory.

Image preprocessing: LLaVA-1.5 (and this engine's data pipeline) pads each image to a square
with the CLIP mean colour, then resizes the shortest side to 336 (bicubic) and centre-crops
336. The processor shipped with llava-hf/llava-1.5-7b-hf is a plain `CLIPImageProcessor`,
which skips the padding: non-square images are cropped instead, so the model sees less of them
than in training. Our export writes a `LlavaImageProcessor` with `do_pad=True`, which
reproduces the training-time preprocessing.

Tokenization: the exported tokenizer encodes a prompt as one string, so the text right after an
`<image>` continues without SentencePiece's dummy-prefix space ("<image>b" -> "b", not "▁b").
Training documents, like LLaVA's `tokenizer_image_token`, encode the text between images chunk by
chunk (engine/data/tokenizer.py); for token-exact inputs use `encode_document`, as
tools/generate.py does. No chat template is written: the model is pretrained on documents, not
conversations.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from engine.config import LLAMA_SPECIAL_TOKENS, PRESETS, LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from engine.convert.hf import LAYOUTS, Layout
from engine.convert.io import read_json
from engine.errors import CheckpointError

ARCHITECTURE = "LlavaForConditionalGeneration"

# Fields a `--model` preset may be overridden with on the trainer's command line
# (engine/training/arguments.py: model_config_from_args).
TRAINER_OVERRIDES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


# ------------------------------------------------------------------------------ tensor names

# What a transformers-5 `save_pretrained` writes: Hub names, except that CLIP lost its
# `vision_model.` level (the prefixes of the other layouts are in engine.convert.hf.LAYOUTS).
SAVED_BY_TRANSFORMERS_5 = Layout("vision_tower.", ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."),
                                 "language_model.model.", "language_model.lm_head.")


def relayout(name: str, src: Layout, dst: Layout) -> str | None:
    """`name` of layout `src` spelled in layout `dst` (longest matching prefix wins, so that
    e.g. original LLaVA's `model.mm_projector.0.` beats its `model.`); None if no prefix of
    `src` matches or `dst` lacks that part."""
    pairs = [(src.vision, dst.vision), (src.llm, dst.llm), (src.lm_head, dst.lm_head)]
    if src.projector is not None:
        pairs += list(zip(src.projector, dst.projector or (None, None)))
    for prefix, target in sorted((p for p in pairs if p[0] is not None), key=lambda p: -len(p[0])):
        if name.startswith(prefix):
            return None if target is None else target + name[len(prefix):]
    return None


def hub_name(name: str) -> str:
    """Any llava-hf spelling of a tensor name (Hub files, transformers-5 memory or files) -> the
    Hub one; names of no layout are returned unchanged."""
    hub = LAYOUTS["llava-hf"]
    for layout in (hub, LAYOUTS["transformers"], SAVED_BY_TRANSFORMERS_5):
        new = relayout(name, layout, hub)
        if new is not None:
            return new
    return name


# ------------------------------------------------------------------------------ config mapping


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {msg}")


def rope_theta(text: dict, where: str) -> float:
    """rope base from a LLaMA config of any transformers version; rejects rope scaling."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling")
    kind = params.get("rope_type", "default")
    if scaling not in (None, {}) or kind != "default":
        raise CheckpointError(f"{where}: rope scaling {scaling or params} is not supported by the engine")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def language_config_from_llama(text: dict, where: str, vocab_size: int) -> LanguageConfig:
    """A HF LlamaConfig dict -> LanguageConfig (vocab_size is the engine's, tokens + <image>)."""
    _require(text.get("hidden_act", "silu") == "silu", where, f"hidden_act {text.get('hidden_act')!r} != 'silu'")
    _require(not text.get("attention_bias", False), where, "attention_bias=true is not supported")
    _require(not text.get("mlp_bias", False), where, "mlp_bias=true is not supported")
    _require(not text.get("tie_word_embeddings", False), where,
             "tie_word_embeddings=true is not supported (LLaMA unties them)")
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads") or heads
    hidden = text["hidden_size"]
    head_dim = text.get("head_dim") or hidden // heads
    _require(head_dim * heads == hidden, where, f"head_dim {head_dim} x heads {heads} != hidden_size {hidden}")
    return LanguageConfig(
        hidden_size=hidden,
        num_layers=text["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=None if kv == heads else kv,
        ffn_hidden_size=text["intermediate_size"],
        vocab_size=vocab_size,
        max_position_embeddings=text.get("max_position_embeddings", 4096),
        rotary_base=rope_theta(text, where),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
    )


def vision_config_from_clip(vision: dict, where: str, select_layer: int, drop_class_token: bool) -> VisionConfig:
    """A HF CLIPVisionConfig dict (plus LLaVA's feature selection) -> VisionConfig."""
    act = vision.get("hidden_act", "quick_gelu")
    _require(act == "quick_gelu", where, f"vision hidden_act {act!r} != 'quick_gelu' (CLIP)")
    _require(vision.get("num_channels", 3) == 3, where, "vision num_channels must be 3")
    return VisionConfig(
        hidden_size=vision["hidden_size"],
        num_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        ffn_hidden_size=vision["intermediate_size"],
        patch_size=vision["patch_size"],
        image_size=vision["image_size"],
        layernorm_eps=float(vision.get("layer_norm_eps", 1e-5)),
        activation=act,
        select_layer=select_layer,
        drop_class_token=drop_class_token,
    )


def named(cfg: ModelConfig) -> ModelConfig:
    """Give a config the name of the preset it equals (see `match_preset`), else 'custom'."""
    match = match_preset(cfg)
    return dataclasses.replace(cfg, name=match[0] if match else "custom")


def match_preset(cfg: ModelConfig) -> tuple[str, dict] | None:
    """(preset, overrides) such that `get_preset(preset, **overrides)` equals `cfg`, using only
    the overrides the trainer accepts as flags; None if no preset fits."""
    best = None
    for name, preset in PRESETS.items():
        if preset.vision != cfg.vision or preset.projector != cfg.projector \
                or preset.image_token_id != cfg.image_token_id:
            continue
        a, b = dataclasses.asdict(preset.language), dataclasses.asdict(cfg.language)
        diff = {k: b[k] for k in a if a[k] != b[k]}
        if set(diff) - set(TRAINER_OVERRIDES):
            continue
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best


def trainer_flags(cfg: ModelConfig) -> str | None:
    """The `--model ...` flags that make the trainer build exactly this model."""
    match = match_preset(cfg)
    if match is None:
        return None
    name, diff = match
    return " ".join([f"--model {name}"] + [f"--{k.replace('_', '-')} {v}" for k, v in diff.items()])


def complete_config(config: dict, where: str, cls: str = "LlavaConfig") -> dict:
    """Fill in the defaults a Hub `config.json` leaves out (llava-1.5-7b-hf omits most of the
    LLaMA fields), by round-tripping it through the transformers config class."""
    import transformers

    try:
        return getattr(transformers, cls).from_dict(config).to_dict()
    except Exception as e:  # transformers validates field types and values
        raise CheckpointError(f"{where}: not a valid {cls} ({e})") from None


def model_config_from_hf(config: dict, where: str) -> ModelConfig:
    """`config.json` of a LlavaForConditionalGeneration -> ModelConfig."""
    archs = config.get("architectures") or []
    _require(config.get("model_type") == "llava" and (not archs or ARCHITECTURE in archs), where,
             f"not a {ARCHITECTURE} checkpoint (model_type={config.get('model_type')!r}, architectures={archs})")
    _require(isinstance(config.get("vision_config"), dict) and isinstance(config.get("text_config"), dict),
             where, "needs vision_config and text_config")
    config = complete_config(config, where)
    vision, text = config["vision_config"], config["text_config"]
    _require(vision.get("model_type", "clip_vision_model") == "clip_vision_model", where,
             f"vision tower {vision.get('model_type')!r} is not CLIP")
    _require(text.get("model_type", "llama") == "llama", where, f"language model {text.get('model_type')!r} is not LLaMA")
    layer = config.get("vision_feature_layer", -2)
    _require(isinstance(layer, int), where, f"vision_feature_layer {layer!r}: only a single layer is supported")
    strategy = config.get("vision_feature_select_strategy", "default")
    _require(strategy in ("default", "full"), where, f"unknown vision_feature_select_strategy {strategy!r}")
    act = config.get("projector_hidden_act", "gelu")
    _require(act == "gelu", where, f"projector_hidden_act {act!r} != 'gelu' (mlp2x_gelu)")
    _require(config.get("multimodal_projector_bias", True), where, "projector without bias is not supported")
    image_token = config.get("image_token_index", config.get("image_token_id", 32000))
    hf_vocab = text.get("vocab_size", 32000)
    _require(image_token < hf_vocab, where,
             f"image_token_index {image_token} is outside the text vocabulary ({hf_vocab})")
    cfg = ModelConfig(
        name="custom",
        vision=vision_config_from_clip(vision, where, layer, strategy == "default"),
        projector=ProjectorConfig(),
        # The engine's vocabulary is the tokenizer's plus <image>, with <image> last; rows the
        # Hub model has beyond it (a <pad> token, padding to 64) are not part of the model.
        language=language_config_from_llama(text, where, vocab_size=image_token + 1),
        image_token_id=image_token,
    )
    expected = config.get("image_seq_length")
    if expected is not None:
        _require(expected == cfg.vision.tokens_per_image, where,
                 f"image_seq_length {expected} != {cfg.vision.tokens_per_image} positions per image")
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return named(cfg)


def read_model_config(directory: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(directory) / "config.json"
    config = read_json(path)
    return model_config_from_hf(config, str(path)), config


def hf_config(cfg: ModelConfig, dtype: str = "float32", vocab_size: int | None = None):
    """ModelConfig -> transformers LlavaConfig (what export writes as config.json).

    The text vocabulary is the engine's padded one (32064 for LLaMA + <image>, as llava-hf's):
    the engine's softmax runs over the padding columns too, so the exported model keeps them."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vis, lang = cfg.vision, cfg.language
    vision = CLIPVisionConfig(
        hidden_size=vis.hidden_size, intermediate_size=vis.ffn_hidden_size, num_hidden_layers=vis.num_layers,
        num_attention_heads=vis.num_attention_heads, image_size=vis.image_size, patch_size=vis.patch_size,
        hidden_act=vis.activation, layer_norm_eps=vis.layernorm_eps, projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=lang.hidden_size, intermediate_size=lang.ffn_hidden_size, num_hidden_layers=lang.num_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups or lang.num_attention_heads,
        vocab_size=vocab_size or lang.padded_vocab_size, max_position_embeddings=lang.max_position_embeddings,
        rms_norm_eps=lang.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": lang.rotary_base},
        bos_token_id=LLAMA_SPECIAL_TOKENS.bos, eos_token_id=LLAMA_SPECIAL_TOKENS.eos,
        pad_token_id=LLAMA_SPECIAL_TOKENS.pad, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
        image_seq_length=vis.tokens_per_image, projector_hidden_act="gelu",
        vision_feature_layer=vis.select_layer, vision_feature_select_strategy="default" if vis.drop_class_token else "full",
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    config.architectures = [ARCHITECTURE]
    config.dtype = dtype
    return config


# ------------------------------------------------------------------------------ processor files


def build_tokenizer(tokenizer: str | Path, image_token_id: int):
    """A transformers LlamaTokenizer with `<image>` at `image_token_id`, from a SentencePiece
    `.model` file or a directory of tokenizer files."""
    from transformers import AutoTokenizer, LlamaTokenizer

    path = Path(tokenizer)
    if path.is_file():
        # LlamaTokenizer reads `tokenizer.model` from a directory; give it one.
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(path, Path(tmp) / "tokenizer.model")
            # LLaMA adds BOS, not EOS, to every encoded text.
            tok = LlamaTokenizer.from_pretrained(tmp, pad_token="<unk>", add_bos_token=True, add_eos_token=False)
    elif path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path))
    else:
        raise CheckpointError(f"tokenizer {path}: no such file or directory")
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    got = tok.convert_tokens_to_ids("<image>")
    if got != image_token_id:
        raise CheckpointError(
            f"tokenizer {path}: '<image>' gets id {got} but the model's image token is {image_token_id} "
            f"(the tokenizer must have exactly {image_token_id} tokens before <image>)")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # LLaVA pads with <unk> (id 0); the model has no <pad> row
    return tok


def image_processor(cfg: ModelConfig):
    """LLaVA-1.5 preprocessing: pad to square with the mean colour, resize, centre-crop, normalise."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from engine.config import CLIP_MEAN, CLIP_STD

    size = cfg.vision.image_size
    return LlavaImageProcessorPil(
        do_pad=True, do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )


def write_processor(target: str | Path, cfg: ModelConfig, tokenizer: str | Path) -> None:
    """Tokenizer, image-processor and processor configs for `LlavaProcessor.from_pretrained`."""
    from transformers import LlavaProcessor

    target = Path(target)
    tok = build_tokenizer(tokenizer, cfg.image_token_id)
    proc = image_processor(cfg)
    processor = LlavaProcessor(
        image_processor=proc, tokenizer=tok, patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy="default" if cfg.vision.drop_class_token else "full",
        num_additional_image_tokens=1, image_token="<image>",
    )
    processor.save_pretrained(str(target))
    # transformers 4.x reads the image processor from its own file; 5.x from processor_config.json.
    proc.save_pretrained(str(target))
    spm = Path(tokenizer) if Path(tokenizer).is_file() else Path(tokenizer) / "tokenizer.model"
    if spm.is_file():  # the SentencePiece model itself, for the engine and slow tokenizers
        shutil.copy(spm, target / "tokenizer.model")
