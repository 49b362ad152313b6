"""The original LLaVA layouts, read as llava-hf named tensors (see `engine.convert.sources`).

* `OriginalLlavaSource`: `LlavaLlamaForCausalLM` (haotian-liu/LLaVA, e.g. liuhaotian/llava-v1.5-7b):
  a LLaMA checkpoint (`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`) plus the
  projector as `model.mm_projector.0` / `.2` (an nn.Sequential: Linear, GELU, Linear). The
  vision tower is not stored there: `mm_vision_tower` names a CLIP checkpoint
  (openai/clip-vit-large-patch14-336) that LLaVA loads at start-up; pass a local copy with
  `--vision-source` (or let `mm_vision_tower` be a local path). Checkpoints trained with an
  unfrozen tower also store it, as `model.vision_tower.vision_tower.vision_model.*`; those
  tensors then replace the CLIP checkpoint's (whose config still gives the tower's shape).
* `LlamaClipSource`: the published recipe's starting point, a plain LLaMA/Vicuna checkpoint plus
  a CLIP checkpoint; the projector is new, initialised as PyTorch initialises LLaVA's
  `nn.Linear` layers (uniform in ±1/sqrt(fan_in)), from `seed`.

The original LLaVA has no `<image>` row in its vocabulary (it splices image features in by
position); the engine's vocabulary gets one, see `Source._vocab_rows`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.config import ModelConfig, ProjectorConfig
from engine.convert.hf import LAYOUTS, Layout
from engine.convert.io import WeightReader, read_json
from engine.convert.llava_hf import (complete_config, language_config_from_llama, named, relayout,
                                     vision_config_from_clip)
from engine.convert.sources import Source
from engine.errors import CheckpointError

ARCHITECTURE = "LlavaLlamaForCausalLM"

# Key prefixes (in the form of engine.convert.hf.LAYOUTS) of the checkpoints read here.
# liuhaotian/llava-v1.5-*: mm_projector is Sequential(Linear, GELU, Linear); a tower trained with
# LLaVA sits under model.vision_tower.vision_tower.
ORIGINAL_LLAVA = Layout("model.vision_tower.vision_tower.vision_model.",
                        ("model.mm_projector.0.", "model.mm_projector.2."), "model.", "lm_head.")
LLAMA = Layout(llm="model.", lm_head="lm_head.")  # LlamaForCausalLM (Vicuna)
CLIP = Layout(vision="vision_model.")  # CLIPModel (openai/clip-vit-large-patch14-336), transformers-4 CLIPVisionModel
CLIP_VISION_5 = Layout(vision="")  # CLIPVisionModel as transformers 5 writes it
_CLIP_OTHER = ("text_model", "visual_projection", "text_projection", "logit_scale")  # CLIPModel's text half

def read_clip_vision_config(directory: Path) -> dict:
    """The vision half of a CLIP checkpoint's config (a CLIPModel's or a CLIPVisionModel's)."""
    path = directory / "config.json"
    config = read_json(path)
    kind = config.get("model_type")
    if kind == "clip":
        return complete_config(config, str(path), "CLIPConfig")["vision_config"]
    if kind == "clip_vision_model":
        return complete_config(config, str(path), "CLIPVisionConfig")
    raise CheckpointError(f"{path}: model_type {kind!r} is not a CLIP checkpoint ('clip' or 'clip_vision_model')")


class _ClipTower:
    """The vision tensors of a CLIP checkpoint directory, under llava-hf Hub names."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.reader = WeightReader(directory)
        keys = self.reader.keys()
        # A CLIPModel (openai/clip-vit-large-patch14-336) or a CLIPVisionModel of transformers 4
        # has `vision_model.*`; a CLIPVisionModel written by transformers 5 has no such level.
        layout = CLIP if any(k.startswith("vision_model.") for k in keys) else CLIP_VISION_5
        self.names = {}
        for key in keys:
            new = relayout(key, layout, LAYOUTS["llava-hf"])
            if new is not None and key.split(".")[0] not in _CLIP_OTHER:
                self.names[new] = key
        if not self.names:
            raise CheckpointError(f"{directory}: no CLIP vision tensors (vision_model.*) in the checkpoint")


class OriginalLlavaSource(Source):
    layout = "llava"

    def __init__(self, directory: str | Path, vision_directory: str | Path | None = None):
        self.directory = Path(directory)
        path = self.directory / "config.json"
        config = read_json(path)
        archs = config.get("architectures") or []
        if ARCHITECTURE not in archs:
            raise CheckpointError(
                f"{path}: architectures {archs} is not {ARCHITECTURE} (for a LlavaForConditionalGeneration "
                f"checkpoint use --from llava-hf; for a plain LLaMA use --from llama+clip)")
        self.llm = WeightReader(self.directory)
        self._llm_names = self._map_llm(self.llm, ORIGINAL_LLAVA)
        # The CLIP directory gives the tower's config, and its weights unless the LLaVA
        # checkpoint stores its own (a tower trained with LLaVA).
        self.tower = _ClipTower(self._vision_dir(config, vision_directory, path))
        if any(n.startswith("vision_tower.") for n in self._llm_names):
            self.tower.names = {}
        self.config = self._model_config(config, path)
        spm = self.directory / "tokenizer.model"
        self.tokenizer_path = spm if spm.is_file() else None

    @staticmethod
    def _vision_dir(config: dict, given, path: Path) -> Path:
        if given is not None:
            return Path(given)
        named_tower = config.get("mm_vision_tower")
        if named_tower and Path(named_tower).is_dir():
            return Path(named_tower)
        raise CheckpointError(
            f"{path}: mm_vision_tower {named_tower!r} is not a local directory; pass --vision-source DIR "
            f"(a local copy of that CLIP checkpoint, e.g. openai/clip-vit-large-patch14-336)")

    def _map_llm(self, reader: WeightReader, layout: Layout) -> dict[str, str]:
        """Hub name -> stored name."""
        names, unknown = {}, []
        for key in reader.keys():
            new = relayout(key, layout, LAYOUTS["llava-hf"])
            if new is None:
                unknown.append(key)
            else:
                names[new] = key
        if unknown:
            raise CheckpointError(
                f"{reader.directory}: {len(unknown)} tensor(s) this layout does not have, e.g. {unknown[:3]} "
                f"(wrong --from?)")
        return names

    def _model_config(self, config: dict, path: Path) -> ModelConfig:
        where = str(path)
        projector = config.get("mm_projector_type", "linear")
        if projector != "mlp2x_gelu":
            raise CheckpointError(f"{where}: mm_projector_type {projector!r}; the engine builds 'mlp2x_gelu' only")
        for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if config.get(flag):
                raise CheckpointError(f"{where}: {flag}=true needs extra tokens the engine does not have")
        feature = config.get("mm_vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"{where}: unknown mm_vision_select_feature {feature!r}")
        return self._build_config(config, where, select_layer=config.get("mm_vision_select_layer", -2),
                                  drop_class_token=feature == "patch", mm_hidden=config.get("mm_hidden_size"))

    def _build_config(self, config: dict, where: str, select_layer: int, drop_class_token: bool,
                      mm_hidden: int | None) -> ModelConfig:
        text = complete_config({**config, "model_type": "llama"}, where, "LlamaConfig")
        vision = read_clip_vision_config(self.tower.directory)
        vwhere = str(self.tower.directory / "config.json")
        vcfg = vision_config_from_clip(vision, vwhere, select_layer, drop_class_token)
        if mm_hidden is not None and mm_hidden != vcfg.hidden_size:
            raise CheckpointError(f"{where}: mm_hidden_size {mm_hidden} != vision hidden size {vcfg.hidden_size}")
        vocab = text["vocab_size"]
        cfg = ModelConfig(
            name="custom", vision=vcfg, projector=ProjectorConfig(),
            # <image> takes the first id after the tokenizer's vocabulary.
            language=language_config_from_llama(text, where, vocab_size=vocab + 1), image_token_id=vocab,
        )
        try:
            cfg.validate()
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        return named(cfg)

    # -- Source ----------------------------------------------------------------------------

    def _lookup(self, name: str) -> tuple[WeightReader, str]:
        if name in self._llm_names:
            return self.llm, self._llm_names[name]
        if name in self.tower.names:
            return self.tower.reader, self.tower.names[name]
        raise CheckpointError(f"{self.layout} source {self.directory}: no tensor for {name!r}")

    def _raw_names(self) -> list[str]:
        return list(self._llm_names) + list(self.tower.names)

    def _raw_shape(self, name: str) -> tuple[int, ...]:
        reader, key = self._lookup(name)
        return reader.shape(key)

    def _raw_get(self, name: str) -> torch.Tensor:
        reader, key = self._lookup(name)
        return reader.get(key)

    def _where(self, name: str) -> str:
        try:
            reader, key = self._lookup(name)
        except CheckpointError:
            return f"{self.directory}: tensor for {name!r}"
        return f"{reader.directory / reader.file_of(key)}: tensor {key!r}"


class LlamaClipSource(OriginalLlavaSource):
    """A LLaMA/Vicuna checkpoint + a CLIP checkpoint; the projector is initialised here."""

    layout = "llama+clip"

    def __init__(self, directory: str | Path, vision_directory: str | Path, seed: int = 0,
                 select_layer: int = -2):
        self.directory = Path(directory)
        path = self.directory / "config.json"
        config = read_json(path)
        kind = config.get("model_type")
        if kind != "llama":
            raise CheckpointError(f"{path}: model_type {kind!r} is not 'llama' (LLaMA / Vicuna)")
        if vision_directory is None:
            raise CheckpointError("--from llama+clip needs --vision-source DIR (a CLIP checkpoint)")
        self.llm = WeightReader(self.directory)
        self._llm_names = self._map_llm(self.llm, LLAMA)
        self.tower = _ClipTower(Path(vision_directory))
        # LLaVA-1.5's feature choice: the penultimate layer's patch tokens.
        self.config = self._build_config(config, str(path), select_layer=select_layer, drop_class_token=True,
                                         mm_hidden=None)
        self._projector = self._init_projector(seed)
        spm = self.directory / "tokenizer.model"
        self.tokenizer_path = spm if spm.is_file() else None

    def _init_projector(self, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        v, h = self.config.vision.hidden_size, self.config.language.hidden_size
        out = {}
        for i, (fan_out, fan_in) in ((1, (h, v)), (2, (h, h))):
            bound = 1.0 / math.sqrt(fan_in)
            for part, shape in (("weight", (fan_out, fan_in)), ("bias", (fan_out,))):
                out[f"multi_modal_projector.linear_{i}.{part}"] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        return out

    def _raw_names(self) -> list[str]:
        return super()._raw_names() + list(self._projector)

    def _raw_shape(self, name: str) -> tuple[int, ...]:
        if name in self._projector:
            return tuple(self._projector[name].shape)
        return super()._raw_shape(name)

    def _raw_get(self, name: str) -> torch.Tensor:
        if name in self._projector:
            return self._projector[name].clone()
        return super()._raw_get(name)

    def _where(self, name: str) -> str:
        return "new projector" if name in self._projector else super()._where(name)
