"""Full (unsharded) state dicts in and out of a tensor/pipeline-parallel LLaVA stage.

A *full* state dict has the names of a TP=PP=1 model with the torch-native spec (global layer
numbers; `engine.convert.hf` reads and writes this form). This rank's tensors are derived from it
with the tensor-parallel attributes megatron-core sets on each parameter (`tensor_model_parallel`,
`partition_dim`); the one layout that a plain split cannot express is SwiGLU's fused fc1, whose
rank shard is [gate shard; up shard].

For checkpoints of large runs use megatron-core's distributed checkpointing; these helpers are for
loading converted weights into a live model, for conversion on a few ranks, and for tests (they
also gather gradients).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from megatron.core import parallel_state

_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)\.(.*)$")
# Transformer Engine fuses the pre-norms into the next linear; names differ from the local spec.
# Checkpoints and full state dicts always use the local names (`canonical_name`).
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "language_model"):
        model = model.module  # DDP / Float16Module wrappers
    return model


def canonical_name(name: str) -> str:
    """A parameter or checkpoint key with Transformer Engine's fused-norm names replaced by the
    torch-native spec's (the same weights under either spec)."""
    for te, local in TE_NORM_NAMES.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


def full_name(model, name: str) -> str:
    name = canonical_name(name)
    m = _LAYER.match(name)
    if m:
        layer = model.language_model.decoder.layers[int(m.group(2))]
        name = f"{m.group(1)}{layer.layer_number - 1}.{m.group(3)}"
    return name


def is_gated_fc1(model, name: str) -> bool:
    return (name.startswith("language_model.") and name.endswith("mlp.linear_fc1.weight")
            and model.language_model.config.gated_linear_unit)


def local_tensors(model) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, Tensor) and not k.endswith("_extra_state")}


def tp_split(full: Tensor, param: Tensor, gated: bool) -> Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if gated:
        return torch.cat([half.chunk(tp, dim=dim)[rank] for half in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def shard_state_dict(model: torch.nn.Module, full: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This rank's state dict (local names) cut from a full one."""
    model = unwrap(model)
    out = {}
    for name, param in local_tensors(model).items():
        key = full_name(model, name)
        if key not in full:
            raise KeyError(f"full state dict has no {key!r} (needed for {name!r} on this rank)")
        shard = tp_split(full[key], param, is_gated_fc1(model, name))
        if shard.shape != param.shape:
            raise ValueError(f"{key}: full {tuple(full[key].shape)} gives shard {tuple(shard.shape)}, "
                             f"model has {tuple(param.shape)}")
        out[name] = shard
    return out


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: Mapping[str, Tensor]) -> None:
    """Copy this rank's part of `full` into the model's parameters."""
    target = local_tensors(unwrap(model))
    for name, shard in shard_state_dict(model, full).items():
        target[name].copy_(shard)


def gather_state_dict(model: torch.nn.Module, tensors: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Full state dict on every rank, gathered over the tensor- and pipeline-parallel groups.
    `tensors` (local names -> tensors shaped like the parameters, e.g. gradients; None entries are
    skipped) replaces the parameters themselves. Collective: every rank of the TP and PP groups
    must call it."""
    model = unwrap(model)
    params = local_tensors(model)
    tensors = {k: v.detach() for k, v in params.items()} if tensors is None else tensors
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    stage = {}
    for name, param in params.items():
        t = tensors.get(name)
        if t is None:
            continue
        t = t.detach().cpu()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            torch.distributed.all_gather(parts, t.contiguous(), group=tp_group)
            dim = param.partition_dim
            if is_gated_fc1(model, name):
                halves = [p.chunk(2, dim=dim) for p in parts]
                t = torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)],
                              dim=dim)
            else:
                t = torch.cat(parts, dim=dim)
        stage[full_name(model, name)] = t
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(stages, stage, group=pp_group)
    return {k: v for s in stages for k, v in s.items()}
