"""Where an import reads its weights: every source layout seen through one naming.

A `Source` hands out tensors by their llava-hf Hub name (`language_model.model.layers.0...`,
`vision_tower.vision_model...`, `multi_modal_projector.linear_1...`; see
`engine.convert.llava_hf.hub_name`), one at a time, with at least the vocabulary rows the engine
has (tokenizer vocabulary + `<image>`), so that the rest of the import never needs to know which
layout the weights came from. Layouts:

* `LlavaHFSource`: a `LlavaForConditionalGeneration` directory (this module);
* `OriginalLlavaSource`, `LlamaClipSource`: `engine.convert.original_llava`.

`check()` compares every tensor's shape with the one a transformers model built from the
source's config has, before any conversion starts, so a wrong or incomplete source fails fast
with the file and tensor named.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.convert.io import WeightReader
from engine.convert.llava_hf import hf_config, hub_name, read_model_config
from engine.errors import CheckpointError

EMBED = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"
VOCAB_TENSORS = (EMBED, LM_HEAD)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hub name -> shape of every tensor of a llava-hf model with this config (engine vocabulary),
    read off a transformers model built on the meta device (no memory, no duplicated table)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config(cfg))
    return {hub_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


class Source:
    """Base: subclasses set `config`, `directory`, `tokenizer_path` and implement `_raw_names`,
    `_raw_shape`, `_raw_get` and `_where` over Hub names (vocabulary rows as stored)."""

    config: ModelConfig
    directory: Path
    tokenizer_path: Path | None = None
    layout = "?"

    def _raw_names(self) -> list[str]:
        raise NotImplementedError

    def _raw_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _raw_get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _where(self, name: str) -> str:
        raise NotImplementedError

    # -- vocabulary ----------------------------------------------------------------------

    def _vocab_rows(self, name: str) -> torch.Tensor:
        """Embedding / LM-head rows, at least the engine's vocabulary (tokenizer + `<image>`).

        Rows beyond it (llava-hf's `<pad>` and its padding to 32064) are kept: they fill the
        engine's padding rows (`engine.convert.hf` cuts or zero-pads to the padded size), so a
        llava-hf checkpoint round-trips bit for bit. A checkpoint without an `<image>` row
        (LLaMA, original LLaVA: there `<image>` never reaches the embedding) gets the mean of
        the other rows, as a new token's row; in the embedding the row is never read (image
        positions take the projector's output), in the LM head it gives `<image>` an
        unremarkable logit."""
        t = self._raw_get(name)
        vocab = self.config.language.vocab_size
        if t.shape[0] >= vocab:
            return t
        if t.shape[0] == vocab - 1:
            return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype)])
        raise CheckpointError(f"{self._where(name)}: {t.shape[0]} vocabulary rows, expected at least {vocab - 1}")

    # -- public --------------------------------------------------------------------------

    @cached_property
    def names(self) -> list[str]:
        return sorted(self._raw_names())

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape as stored (vocabulary rows included)."""
        return self._raw_shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name in VOCAB_TENSORS:
            return self._vocab_rows(name)
        return self._raw_get(name)

    def check(self) -> list[str]:
        """Raise on a missing tensor or a shape that contradicts the config; returns the names of
        tensors the source has that the model does not use (reported, then ignored)."""
        expected = expected_shapes(self.config)
        have = set(self.names)
        missing = sorted(set(expected) - have)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(
                f"{self.layout} source {self.directory}: missing {len(missing)} tensor(s): "
                f"{', '.join(missing[:5])}{more}")
        vocab = self.config.language.vocab_size
        for name, shape in expected.items():
            got = self._raw_shape(name)
            if name in VOCAB_TENSORS:
                ok = len(got) == 2 and got[1] == shape[1] and got[0] >= vocab - 1
            else:
                ok = got == shape
            if not ok:
                raise CheckpointError(
                    f"{self._where(name)}: shape {list(got)}, but the config implies {list(shape)}")
        return sorted(have - set(expected))


class LlavaHFSource(Source):
    """`LlavaForConditionalGeneration`: config.json + safetensors (or .bin) shards."""

    layout = "llava-hf"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config, self.hf_config_dict = read_model_config(self.directory)
        self.reader = WeightReader(self.directory)
        self._names = {hub_name(k): k for k in self.reader.keys()}
        spm = self.directory / "tokenizer.model"
        self.tokenizer_path = spm if spm.is_file() else None

    def _raw_names(self) -> list[str]:
        return list(self._names)

    def _stored(self, name: str) -> str:
        try:
            return self._names[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} not found") from None

    def _raw_shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(self._stored(name))

    def _raw_get(self, name: str) -> torch.Tensor:
        return self.reader.get(self._stored(name))

    def _where(self, name: str) -> str:
        stored = self._names.get(name, name)
        return f"{self.directory / self.reader.file_of(stored)}: tensor {stored!r}" \
            if stored in self.reader else f"{self.directory}: tensor {stored!r}"
