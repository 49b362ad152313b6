"""megatron-core distributed checkpoints: what one holds, and resuming from it exactly, in any
layout (writing them, atomically and agreed by every rank: engine/training/saver.py).

Layout of a save directory (Megatron's):

    <save>/iter_0000100/               one dist_checkpointing directory per saved iteration
    <save>/latest_checkpointed_iteration.txt   the tracker: the newest *complete* iteration

A save writes `<save>/.tmp_iter_0000100`, renames it once every rank has written its shards, and
only then rewrites the tracker (itself via a temporary file and os.replace). A crash at any
point therefore leaves the previous checkpoint as the one a resume finds.

What a checkpoint holds:
- `model`: the model's sharded state dict (ShardedTensors with global shapes: a resume may use
  another TP/PP layout), `optimizer`: the distributed optimizer's state (per DP shard, or in the
  model's layout to allow any TP/PP change: OPTIM_LAYOUTS), `scheduler`: the LR schedule,
- `iteration`, `consumed_samples` (the data position: the sampler restarts there),
- `data`: the blend, where its index starts and what each source has given (samples, images,
  tokens, loss tokens): a resume with a changed blend continues each source from there,
- `rng`: each rank's Python/NumPy/torch (+CUDA, + mcore tracker) RNG states, keyed by its
  (pipeline, tensor, data) coordinates; restored only when the layout is unchanged,
- `model_config` and `layout`, checked before anything is loaded so that a checkpoint of another
  model shape fails with a message naming the differing fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from engine import patches
from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.training.optim import sync_offloaded_state, torch_adams

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's state layout in a checkpoint (--[no-]dist-ckpt-optim-fully-reshardable):
# - "dp" (default, as Megatron's): every rank writes its own shard, no gather; a resume may change
#   the DP size, not TP/PP (the weights themselves always reshard).
# - "reshardable": in the model's own layout, so a resume may change TP, PP and DP. Each DP group
#   gathers its optimizer shards on its DP rank 0 over gloo ("mem_efficient": instead of an NCCL
#   all-gather onto every rank), which holds its model shard's fp32 weights and Adam moments in
#   host memory while writing them (12 bytes per parameter: 84 GB for 7B at TP=PP=1), alone, so
#   it saves much slower than "dp" (docs/benchmarks.md, "Checkpoint save time").
OPTIM_LAYOUTS = {
    "reshardable": {"distrib_optim_sharding_type": "fully_reshardable",
                    "distrib_optim_fully_reshardable_mem_efficient": True},
    "dp": {"distrib_optim_sharding_type": "dp_reshardable"},
}

# Fields whose change alters parameter shapes: a checkpoint that differs in any cannot be loaded.
_SHAPE_FIELDS = {
    "language": ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "vocab_size", "untie_embeddings"),
    "vision": ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
               "patch_size", "image_size"),
    "projector": ("kind",),
}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str | Path) -> int | None:
    """The newest complete iteration saved under `root`, or None when there is none."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


# --------------------------------------------------------------------------- state pieces


def _layout() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data) -> ShardedObject:
    """One object per rank, at its (pp, tp, dp) coordinate of the layout."""
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_data_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _materialize_adam_state(optimizer) -> None:
    """torch's Adam creates its state at the first step; mcore's DistributedOptimizer without
    TE/apex reads that state (its 'step' above all) to describe what it will load. Before a
    resume the state is therefore created as Adam would (zeros, step 0); loading overwrites it."""
    for adam in torch_adams(optimizer):
        if len(adam.state):
            continue
        for group in adam.param_groups:
            for p in group["params"]:
                adam.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
    sync_offloaded_state(optimizer)


def _unshare_adam_steps(optimizer) -> None:
    """mcore 0.19.2 bug with torch's Adam: loading puts ONE 'step' tensor into every parameter's
    state, and torch's Adam increments each parameter's step in place, so after a resume the shared
    counter ran ahead by the number of parameters per step (wrong bias correction). Give each
    parameter its own copy."""
    for adam in torch_adams(optimizer):
        for state in adam.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _adam_steps(optimizer) -> int | None:
    """torch Adam's step count (every trained parameter steps together). The per-DP-rank
    optimizer layout of mcore 0.19.2 does not save it (only fused optimizers keep 'step' in their
    param groups), and a resume whose Adam restarts at step 0 takes bias-corrected steps several
    times too large; the checkpoint therefore carries it in its common state."""
    for adam in torch_adams(optimizer):
        for state in adam.state.values():
            if "step" in state:
                return int(state["step"])
    return None


def _set_adam_steps(optimizer, steps: int) -> None:
    for adam in torch_adams(optimizer):
        for state in adam.state.values():
            state["step"] = torch.tensor(float(steps))  # one tensor each (see _unshare_adam_steps)


def _state_dict(model, optimizer, *, loading: bool, with_optimizer: bool, with_rng: bool,
                optim_metadata: dict | None = None) -> dict:
    model_sd = _unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if with_optimizer and optimizer is not None:
        if loading:
            _materialize_adam_state(optimizer)
            patches.install_adam_step_on_load()
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=dict(optim_metadata or OPTIM_LAYOUTS["dp"]))
    if with_rng:
        state["rng"] = _rng_sharded_object(None if loading else _rng_state())
    return state


# --------------------------------------------------------------------------- load


def resolve_checkpoint_dir(path: str | Path) -> Path | None:
    """A save root (newest complete iteration via its tracker) or one checkpoint directory."""
    path = Path(path)
    if (path / TRACKER).is_file():
        return iteration_dir(path, read_tracker(path))
    if (path / "metadata.json").is_file():
        return path
    return None


def _read(ckpt: Path, load, *args):
    """`load(*args)`, with a checkpoint whose files are missing or damaged reported as a
    CheckpointError naming it, the first underlying error and the other checkpoints beside it."""
    try:
        return load(*args)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        failures = getattr(e, "failures", None)  # {rank: (exception, traceback)}
        root = next(iter(failures.values()))[0] if failures else e
        others = sorted(p.name for p in ckpt.parent.glob("iter_*") if p != ckpt)
        raise CheckpointError(
            f"checkpoint {ckpt} cannot be read ({type(root).__name__}: {root}): its files are missing or damaged. "
            + (f"Other checkpoints in {ckpt.parent}: {', '.join(others)} (--load one of them)" if others else "")
        ) from None


def check_compatible(saved: dict, current: ModelConfig, where: Path) -> None:
    """Raise CheckpointError naming every shape-relevant field that differs."""
    now = dataclasses.asdict(current)
    diffs = []
    for part, fields in _SHAPE_FIELDS.items():
        for name in fields:
            old, new = saved.get(part, {}).get(name), now[part][name]
            if old != new:
                diffs.append(f"{part}.{name}: checkpoint {old!r}, this run {new!r}")
    if saved.get("image_token_id", now["image_token_id"]) != now["image_token_id"]:
        diffs.append(f"image_token_id: checkpoint {saved['image_token_id']!r}, this run {now['image_token_id']!r}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was saved for a different model (preset {saved.get('name')!r}) "
            f"than this run's (preset {current.name!r}):\n  " + "\n  ".join(diffs))


def _spec_of(common: dict) -> str:
    return (common.get("kernels") or {}).get("spec", "local")


def _check_optimizer_spec(common: dict, model, ckpt: Path, per_rank_optimizer: bool) -> None:
    """The per-DP-rank optimizer layout is a flat buffer in the order of the model's parameters,
    which differs between the Transformer Engine and torch-native layer specs (TE fuses each
    pre-norm into the next linear): that state only loads under the spec that saved it."""
    saved, now = _spec_of(common), _unwrap(model).kernels.spec
    if per_rank_optimizer and saved != now:
        raise CheckpointError(
            f"{ckpt} was saved with the {saved!r} layer spec and its optimizer state in the per-rank layout "
            f"(--no-dist-ckpt-optim-fully-reshardable), whose order of parameters differs under this run's "
            f"{now!r} spec. Resume with the {saved!r} spec (--attention-backend), or pass --no-load-optim to "
            "take the weights (they load under either spec) and restart the optimizer")


def _drop_absent_extra_state(model_state: dict, ckpt: Path) -> None:
    """A checkpoint saved under the other layer spec has no Transformer Engine extra state (FP8
    scaling state and the like) for some modules: those start fresh instead of failing the load."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    present = set(_read(ckpt, load_sharded_metadata, str(ckpt)))
    for key in [k for k, v in model_state.items()
                if isinstance(v, ShardedObject) and k.endswith("_extra_state") and v.unique_key not in present]:
        del model_state[key]


@contextlib.contextmanager
def trusted_te_extra_state():
    """Transformer Engine keeps the delayed-scaling FP8 state (amax histories, scales) as a pickled
    extra state and refuses to unpickle it unless told that the checkpoint is trusted. A
    checkpoint this engine loads is trusted already: its common state is a pickle too."""
    name = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _load_model_state(model, state: dict, ckpt: Path) -> None:
    """load_state_dict, strict except for module extra states the checkpoint did not hold."""
    with trusted_te_extra_state():
        result = _unwrap(model).load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{ckpt}: weights do not match this model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")


def load_checkpoint(root: str | Path, model, optimizer, scheduler, model_config: ModelConfig, *,
                    load_optimizer: bool = True, load_rng: bool = True, log=print) -> tuple[int, int]:
    """Resume from the newest checkpoint under `root`. Returns (iteration, consumed_samples);
    (0, 0) when `root` holds no checkpoint yet (a fresh run that saves there)."""
    ckpt = resolve_checkpoint_dir(root)
    if ckpt is None:
        log(f"no checkpoint under {root}: starting from scratch")
        return 0, 0
    if not ckpt.is_dir():
        raise CheckpointError(f"{Path(root) / TRACKER} points at {ckpt.name}, which does not exist")
    common = _read(ckpt, dist_checkpointing.load_common_state_dict, str(ckpt))
    if "model_config" not in common:
        raise CheckpointError(f"{ckpt} is not a checkpoint of this trainer (no model_config)")
    check_compatible(common["model_config"], model_config, ckpt)
    if load_optimizer and common.get("optimizer") is None:
        raise CheckpointError(
            f"{ckpt} holds model weights only (e.g. written by tools/convert_checkpoint.py): start "
            "from it with --pretrained-checkpoint, or pass --no-load-optim to resume its weights")
    layout = common.get("layout", {})
    same_layout = layout == _layout()
    optim_metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    optim_metadata = optim_metadata or OPTIM_LAYOUTS["dp"]
    model_parallel = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    if load_optimizer and optim_metadata.get("distrib_optim_sharding_type") == "dp_reshardable" and \
            any(layout.get(k) != _layout()[k] for k in model_parallel):
        raise CheckpointError(
            f"{ckpt} was saved with --no-dist-ckpt-optim-fully-reshardable at TP={layout.get(model_parallel[0])} "
            f"PP={layout.get(model_parallel[1])}: its optimizer state only loads into that TP/PP layout "
            f"(this run: TP={_layout()[model_parallel[0]]} PP={_layout()[model_parallel[1]]}). Resume with "
            "that layout, or pass --no-load-optim to take the weights and restart the optimizer")
    _check_optimizer_spec(common, model, ckpt, load_optimizer and optim_metadata.get("distrib_optim_sharding_type")
                          == "dp_reshardable")
    with_rng = load_rng and same_layout
    if load_rng and not same_layout:
        log(f"checkpoint layout {common.get('layout')} differs from this run's {_layout()}: "
            "RNG states start fresh (weights, optimizer, schedule and data position are restored)")

    state = _state_dict(model, optimizer, loading=True, with_optimizer=load_optimizer,
                        with_rng=with_rng, optim_metadata=optim_metadata)
    _drop_absent_extra_state(state["model"], ckpt)
    loaded = _read(ckpt, dist_checkpointing.load, state, str(ckpt))
    _load_model_state(model, loaded["model"], ckpt)
    if load_optimizer:
        with torch.no_grad():  # fp32 main weights are views of the (grad-requiring) parameters
            optimizer.load_state_dict(loaded["optimizer"])
        sync_offloaded_state(optimizer, loaded=True)
        _unshare_adam_steps(optimizer)
        if common.get("adam_steps") is not None:
            _set_adam_steps(optimizer, common["adam_steps"])
        if scheduler is not None and common.get("scheduler") is not None:
            scheduler.load_state_dict(common["scheduler"])
    else:
        optimizer.reload_model_params()  # fp32 main weights from the loaded model weights
    if with_rng:
        _set_rng_state(loaded["rng"])
    log(f"resumed from {ckpt} (iteration {common['iteration']}, consumed samples {common['consumed_samples']})")
    return int(common["iteration"]), int(common["consumed_samples"])


def read_data_state(root: str | Path) -> dict | None:
    """The per-source data state of the newest checkpoint under `root` (its blend, the blend's
    origin, each source's consumption: engine/data/sources.py); None without a checkpoint or
    for one saved without it."""
    ckpt = resolve_checkpoint_dir(root)
    if ckpt is None or not ckpt.is_dir():
        return None
    return _read(ckpt, dist_checkpointing.load_common_state_dict, str(ckpt)).get("data")


def load_pretrained(path: str | Path, model, optimizer, model_config: ModelConfig, log=print) -> None:
    """Model weights only (e.g. a converted LLaVA checkpoint): the run starts at iteration 0.
    `optimizer` (None for conversion and inference) re-reads its fp32 main weights from them."""
    ckpt = resolve_checkpoint_dir(path)
    if ckpt is None:
        raise CheckpointError(
            f"--pretrained-checkpoint {path}: neither a save directory ({TRACKER}) nor a "
            "distributed checkpoint (metadata.json)")
    common = _read(ckpt, dist_checkpointing.load_common_state_dict, str(ckpt))
    if "model_config" in common:
        check_compatible(common["model_config"], model_config, ckpt)
    state = {"model": _unwrap(model).sharded_state_dict()}
    _drop_absent_extra_state(state["model"], ckpt)
    loaded = _read(ckpt, dist_checkpointing.load, state, str(ckpt))
    _load_model_state(model, loaded["model"], ckpt)
    if optimizer is not None:
        optimizer.reload_model_params()
    log(f"loaded pretrained weights from {ckpt}")
