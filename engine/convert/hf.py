"""Weight names and shapes: Hugging Face / original LLaVA  <->  engine (full, unsharded) state dicts.

Conversion is data: `rules(cfg)` lists, for every engine tensor, the Hugging Face tensors it is
made of and the reshape between them. Engine names are those of `engine.model.llava.LLaVAModel`
built with tensor and pipeline parallel size 1 and the torch-native spec (global layer numbers);
`engine.model.sharding` moves such a dict in and out of a parallel model.

Reshapes:
  - attention q/k/v -> one `linear_qkv`, in megatron-core's grouped layout: for each query group
    g, its q heads, then its k head, then its v head (rows of head_dim), so that a contiguous
    split over tensor-parallel ranks gives each rank whole groups;
  - LLaMA gate_proj/up_proj -> `linear_fc1` = [gate; up] (mcore's SwiGLU takes the first half
    through SiLU);
  - CLIP's class_embedding [H] <-> class_token [1, 1, H];
  - embedding and output rows are padded with zeros to `language.padded_vocab_size` (llava-hf
    checkpoints already have 32064 rows; original LLaVA has 32000, without the <image> row);
    going back, rows are cut (or zero-padded) to `hf_vocab_size`.
RoPE needs no permutation: HF LLaMA and mcore (rotary_interleaved=False) both rotate halves.

Layouts (`LAYOUTS`) only differ in prefixes. `engine.convert.sources` reads every supported
checkpoint family (llava-hf, original LLaVA, LLaMA + CLIP) under llava-hf names, so "llava-hf" is
the layout conversions use; the others name transformers models held in memory. The CLIP layers after `select_layer` and CLIP's
post-layernorm are part of the engine model (unused, frozen), so round trips are lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    """Key prefixes of one checkpoint family; None = that part is not in such checkpoints."""

    vision: str | None = None  # CLIP vision transformer (embeddings., encoder.layers., ...)
    projector: tuple[str, str] | None = None  # the two projector linears
    llm: str | None = None  # LlamaModel (embed_tokens., layers., norm.)
    lm_head: str | None = None


LAYOUTS: dict[str, Layout] = {
    # llava-hf/llava-1.5-*-hf safetensors on the Hub.
    "llava-hf": Layout("vision_tower.vision_model.",
                       ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."),
                       "language_model.model.", "language_model.lm_head."),
    # transformers >= 4.52 LlavaForConditionalGeneration.state_dict().
    "transformers": Layout("model.vision_tower.",
                           ("model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_2."),
                           "model.language_model.", "lm_head."),
    "clip-vision": Layout(vision=""),  # transformers' CLIPVisionModel.state_dict()
    "llama": Layout(llm="model.", lm_head="lm_head."),  # LlamaForCausalLM (Vicuna)
}
PARTS = ("vision", "projector", "language")
# Buffers some checkpoints carry that hold no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


@dataclass(frozen=True)
class Rule:
    engine: str
    hf: tuple[str, ...]
    to_engine: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]


def _copy(engine: str, hf: str) -> Rule:
    return Rule(engine, (hf,), lambda t: t[0], lambda t: [t])


def _qkv(engine: str, q: str, k: str, v: str, heads: int, groups: int, head_dim: int) -> Rule:
    per_group = heads // groups

    def fuse(t: list[Tensor]) -> Tensor:
        q_, k_, v_ = (x.reshape(groups, -1, head_dim, *x.shape[1:]) for x in t)
        return torch.cat([q_, k_, v_], dim=1).reshape(-1, *t[0].shape[1:])

    def split(t: Tensor) -> list[Tensor]:
        g = t.reshape(groups, per_group + 2, head_dim, *t.shape[1:])
        q_, k_, v_ = g.split([per_group, 1, 1], dim=1)
        return [x.reshape(-1, *t.shape[1:]).contiguous() for x in (q_, k_, v_)]

    return Rule(engine, (q, k, v), fuse, split)


def _gate_up(engine: str, gate: str, up: str) -> Rule:
    return Rule(engine, (gate, up), lambda t: torch.cat(t, dim=0), lambda t: [c.contiguous() for c in t.chunk(2)])


def _rows(t: Tensor, n: int) -> Tensor:
    """First n rows of t, zero rows appended where t has fewer."""
    if t.size(0) >= n:
        return t[:n].contiguous()
    return torch.cat([t, t.new_zeros(n - t.size(0), *t.shape[1:])])


def _vocab(engine: str, hf: str, padded: int, hf_rows: int | None) -> Rule:
    return Rule(engine, (hf,), lambda t: _rows(t[0], padded),
                 lambda t: [_rows(t, hf_rows if hf_rows is not None else padded)])


def rules(cfg: ModelConfig, layout: Layout, parts, hf_vocab_size: int | None) -> list[Rule]:
    out: list[Rule] = []
    if "vision" in parts:
        vis, p = cfg.vision, layout.vision
        out += [
            _copy("vision_model.conv1.weight", p + "embeddings.patch_embedding.weight"),
            Rule("vision_model.class_token", (p + "embeddings.class_embedding",),
                  lambda t: t[0].reshape(1, 1, -1), lambda t: [t.reshape(-1)]),
            _copy("vision_model.position_embeddings.weight", p + "embeddings.position_embedding.weight"),
        ]
        for wb in ("weight", "bias"):
            out += [_copy(f"vision_model.ln_pre.{wb}", f"{p}pre_layrnorm.{wb}"),
                      _copy(f"vision_model.ln_post.{wb}", f"{p}post_layernorm.{wb}")]
        for i in range(vis.num_layers):
            e, h = f"vision_model.decoder.layers.{i}.", f"{p}encoder.layers.{i}."
            heads = vis.num_attention_heads
            for wb in ("weight", "bias"):
                out += [
                    _copy(f"{e}input_layernorm.{wb}", f"{h}layer_norm1.{wb}"),
                    _qkv(f"{e}self_attention.linear_qkv.{wb}", *(f"{h}self_attn.{x}_proj.{wb}" for x in "qkv"),
                         heads, heads, vis.hidden_size // heads),
                    _copy(f"{e}self_attention.linear_proj.{wb}", f"{h}self_attn.out_proj.{wb}"),
                    _copy(f"{e}pre_mlp_layernorm.{wb}", f"{h}layer_norm2.{wb}"),
                    _copy(f"{e}mlp.linear_fc1.{wb}", f"{h}mlp.fc1.{wb}"),
                    _copy(f"{e}mlp.linear_fc2.{wb}", f"{h}mlp.fc2.{wb}"),
                ]
    if "projector" in parts:
        fc1, fc2 = layout.projector
        for wb in ("weight", "bias"):
            out += [_copy(f"vision_projection.encoder.linear_fc1.{wb}", fc1 + wb),
                      _copy(f"vision_projection.encoder.linear_fc2.{wb}", fc2 + wb)]
    if "language" in parts:
        lang, p = cfg.language, layout.llm
        out += [
            _vocab("language_model.embedding.word_embeddings.weight", p + "embed_tokens.weight",
                   lang.padded_vocab_size, hf_vocab_size),
            _copy("language_model.decoder.final_layernorm.weight", p + "norm.weight"),
            _vocab("language_model.output_layer.weight", layout.lm_head + "weight", lang.padded_vocab_size,
                   hf_vocab_size),
        ]
        for i in range(lang.num_layers):
            e, h = f"language_model.decoder.layers.{i}.", f"{p}layers.{i}."
            out += [
                _copy(f"{e}input_layernorm.weight", f"{h}input_layernorm.weight"),
                _qkv(f"{e}self_attention.linear_qkv.weight", *(f"{h}self_attn.{x}_proj.weight" for x in "qkv"),
                     lang.num_attention_heads, lang.num_query_groups or lang.num_attention_heads, lang.head_dim),
                _copy(f"{e}self_attention.linear_proj.weight", f"{h}self_attn.o_proj.weight"),
                _copy(f"{e}pre_mlp_layernorm.weight", f"{h}post_attention_layernorm.weight"),
                _gate_up(f"{e}mlp.linear_fc1.weight", f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"),
                _copy(f"{e}mlp.linear_fc2.weight", f"{h}mlp.down_proj.weight"),
            ]
    return out


def resolve(layout: str | Layout, parts) -> tuple[Layout, tuple[str, ...]]:
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    present = {"vision": lay.vision is not None, "projector": lay.projector is not None,
               "language": lay.llm is not None and lay.lm_head is not None}
    parts = tuple(p for p in PARTS if present[p]) if parts is None else tuple(parts)
    for part in parts:
        if part not in present:
            raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
        if not present[part]:
            raise ValueError(f"layout {layout!r} has no {part} weights")
    return lay, parts


def hf_to_engine(hf: Mapping[str, Tensor], cfg: ModelConfig, *, layout: str | Layout = "llava-hf",
                 parts=None) -> dict[str, Tensor]:
    """Engine state dict (full, TP=PP=1 names) from a Hugging Face one. Every tensor of the
    requested `parts` must be present, and every key of `hf` must be used (or be a known buffer)."""
    lay, parts = resolve(layout, parts)
    table = rules(cfg, lay, parts, None)
    missing = [k for r in table for k in r.hf if k not in hf]
    if missing:
        raise KeyError(f"{len(missing)} weight(s) missing for layout {layout!r}, parts {parts}: {missing[:8]}")
    used = {k for r in table for k in r.hf}
    unused = [k for k in hf if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unused:
        raise KeyError(f"{len(unused)} weight(s) not understood for layout {layout!r}, parts {parts} "
                       f"(wrong layout or model config?): {unused[:8]}")
    out = {}
    for r in table:
        tensors = [hf[k] for k in r.hf]
        out[r.engine] = r.to_engine(tensors).contiguous()
    return out


def engine_to_hf(engine: Mapping[str, Tensor], cfg: ModelConfig, *, layout: str | Layout = "llava-hf",
                 parts=None, hf_vocab_size: int | None = None) -> dict[str, Tensor]:
    """Hugging Face state dict from a full engine one. `hf_vocab_size`: rows of the embedding and
    lm_head to write (default: the engine's padded vocabulary, 32064 = llava-hf's)."""
    lay, parts = resolve(layout, parts)
    table = rules(cfg, lay, parts, hf_vocab_size)
    missing = [r.engine for r in table if r.engine not in engine]
    if missing:
        raise KeyError(f"{len(missing)} engine weight(s) missing for parts {parts}: {missing[:8]}")
    out = {}
    for r in table:
        out.update(zip(r.hf, r.to_hf(engine[r.engine])))
    return out


def engine_names(cfg: ModelConfig) -> list[str]:
    """Every weight name of the full engine model, in table order."""
    return [r.engine for r in rules(cfg, LAYOUTS["transformers"], PARTS, None)]
