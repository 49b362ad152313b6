"""The engine side of a conversion: one tensor at a time between a live model and Hugging Face.

`engine.convert.hf` holds the weight table (names and reshapes, full unsharded tensors) and
`engine.model.sharding` the cut of a full tensor into this rank's tensor-parallel shard. Their
public functions convert whole state dicts; a 7B model is 13.5 GB in bf16, and a whole engine
state dict next to the live model does not fit a 24 GiB machine. So this module walks the same
table rule by rule:

* `fill_from_source`: for each parameter of this rank, read the few Hugging Face tensors its rule
  needs from a `Source`, build the full engine tensor, cut this rank's shard, copy it in, drop
  the rest. Peak extra memory is one full tensor (the 32064 x 4096 embedding, 0.5 GB in fp32).
* `iter_hf_tensors`: for a TP=PP=1 model, yield the Hugging Face tensors rule by rule (the
  parameters are the full tensors; only reshapes allocate).

Checkpoints are read and written by `engine.training.checkpoint` and `.saver` — the functions the trainer
itself uses — so an imported checkpoint is exactly what `--pretrained-checkpoint` loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from engine.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from engine.convert import hf
from engine.errors import CheckpointError
from engine.model import sharding

HF_LAYOUT = "llava-hf"  # the Hub tensor names every `Source` hands out and export writes


def conversion_rules(cfg: ModelConfig, hf_vocab_size: int | None = None) -> dict[str, "hf.Rule"]:
    """engine name -> rule of `engine.convert.hf`'s table, for the llava-hf layout."""
    layout, parts = hf.resolve(HF_LAYOUT, None)
    return {r.engine: r for r in hf.rules(cfg, layout, parts, hf_vocab_size)}


# ------------------------------------------------------------------------------ model config


def model_config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `dataclasses.asdict(ModelConfig)` (what checkpoints store as `model_config`).
    Fields a newer engine added take their defaults."""
    def part(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    return ModelConfig(
        name=d.get("name", "custom"),
        vision=part(VisionConfig, d.get("vision", {})),
        projector=part(ProjectorConfig, d.get("projector", {})),
        language=part(LanguageConfig, d.get("language", {})),
        image_token_id=d.get("image_token_id", ModelConfig.image_token_id),
    )


def read_checkpoint_config(path: str | Path) -> tuple[Path, ModelConfig, dict]:
    """(iteration directory, model config, common state) of an engine checkpoint: a save root with
    its tracker file, or one iteration directory."""
    from megatron.core import dist_checkpointing

    from engine.training.checkpoint import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(path)
    if ckpt is None or not ckpt.is_dir():
        raise CheckpointError(
            f"{path}: not an engine checkpoint (no latest_checkpointed_iteration.txt, no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    if "model_config" not in common:
        raise CheckpointError(f"{ckpt}: the checkpoint does not record its model_config")
    return ckpt, model_config_from_dict(common["model_config"]), common


def find_tokenizer(checkpoint: str | Path) -> Path:
    """The SentencePiece model stored next to an engine checkpoint (an import puts the source's
    `tokenizer.model` in the save directory)."""
    path = Path(checkpoint)
    for d in (path, path.parent):
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    raise CheckpointError(
        f"{path}: no tokenizer.model next to the checkpoint (an import puts one there); pass --tokenizer "
        f"PATH (the SentencePiece model the data was tokenized with)")


# ------------------------------------------------------------------------------ building and loading


def build(cfg: ModelConfig, dtype: torch.dtype, *, initialize: bool = True) -> torch.nn.Module:
    """This rank's stage of the model with parameters in `dtype`, for conversion or inference
    (`initialize=False` skips the random init of the language model: every weight is
    overwritten anyway, and for 7B on CPU that init costs minutes)."""
    from engine.model.llava import build_model

    overrides = {} if initialize else {"perform_initialization": False}
    model = build_model(cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16, **overrides)
    return model.eval()


def load_weights(model: torch.nn.Module, path: str | Path, cfg: ModelConfig) -> None:
    """Model weights from an engine checkpoint, via the trainer's `--pretrained-checkpoint` path
    (any saved TP/PP layout: megatron-core reshards)."""
    from engine.training.checkpoint import load_pretrained

    load_pretrained(path, model, None, cfg, log=lambda *_: None)


def save_weights(model: torch.nn.Module, target: str | Path, cfg: ModelConfig, info: dict) -> None:
    """An iteration-0 checkpoint (weights, no optimizer state) under `target`, with the tracker
    file; collective over all ranks."""
    from engine.training.saver import Saver

    Saver(target, log=lambda *_: None).save(0, model, None, None, 0, cfg, args_dict=info)


# ------------------------------------------------------------------------------ tensors


def _local_params(model) -> dict[str, Tensor]:
    return sharding.local_tensors(sharding.unwrap(model))


@torch.no_grad()
def fill_from_source(model: torch.nn.Module, source, cfg: ModelConfig, progress: bool = False) -> int:
    """Copy this rank's shard of every parameter from `source` (an `engine.convert.sources.Source`).
    Returns the number of tensors filled. Raises CheckpointError on a shape mismatch."""
    from tqdm import tqdm

    rules = conversion_rules(cfg)
    model = sharding.unwrap(model)
    params = _local_params(model)
    for name, param in tqdm(params.items(), desc="import", unit="tensor", disable=not progress):
        key = sharding.full_name(model, name)
        rule = rules.get(key)
        if rule is None:
            raise CheckpointError(f"engine parameter {key!r} has no conversion rule (engine.convert.hf)")
        full = rule.to_engine([source.get(k) for k in rule.hf])
        shard = sharding.tp_split(full, param, sharding.is_gated_fc1(model, name))
        if shard.shape != param.shape:
            raise CheckpointError(
                f"{key} from {', '.join(rule.hf)}: full tensor {list(full.shape)} gives this rank "
                f"{list(shard.shape)}, the model has {list(param.shape)}")
        param.copy_(shard)
        del full, shard
    return len(params)


@torch.no_grad()
def iter_hf_tensors(model: torch.nn.Module, cfg: ModelConfig,
                    hf_vocab_size: int | None = None) -> Iterator[tuple[str, Tensor]]:
    """(Hub name, tensor) for every weight of a TP=PP=1 model, rule by rule."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("iter_hf_tensors needs the whole model in this process (TP=PP=1)")
    model = sharding.unwrap(model)
    full = {sharding.full_name(model, k): v.detach() for k, v in _local_params(model).items()}
    rules = conversion_rules(cfg, hf_vocab_size)
    missing = sorted(set(rules) - set(full))
    if missing:
        raise CheckpointError(f"the engine model lacks {len(missing)} weight(s) of the table: {missing[:5]}")
    for engine_name, rule in rules.items():
        yield from zip(rule.hf, rule.to_hf(full[engine_name]))
