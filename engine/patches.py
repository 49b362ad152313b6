"""Every change the engine makes to megatron-core and torch, in one place.

megatron-core is used as a library, but six of its assumptions do not hold for us, and each is
corrected here by replacing one attribute:

  cpu-mode        the model, the pipeline schedules and the RNG tracker assume CUDA; on a machine
                  without it, the same code must run in CPU processes over gloo (that is how every
                  parallel layout is tested without GPUs)
  cpu-training    DDP, the optimizers and gradient clipping assume CUDA too (CPU only)
  wgrad-fusion    mcore's `gradient_accumulation_fusion` takes its GEMM from apex; without apex we
                  give it the same two functions built on torch (engine.model.fusions)
  adam-step-load  a bug of mcore 0.19.2 with torch's Adam when loading reshardable optimizer state
  recompute-without-te  a bug of mcore 0.19.2: recomputing layer norms needs Transformer Engine
  hybrid-optimizer  the CPU-offloaded optimizer: a state-placement bug of mcore 0.19.2, and its
                  offload path on CPU processes

Each group is installed by one function, idempotently, and only when the kernel plan or the
platform asks for it (`engine.model.specs.KernelPlan`, `engine.platform.setup_platform`). Every
replacement is recorded, so a group can be removed again (`remove`, used by tests that must
leave the process as they found it). Each was written against one megatron-core release
(`WRITTEN_FOR`); on another release the install fails loudly instead of patching code it has not
been checked against.

Where a patch can be scoped to megatron-core's own modules it is: tensor factories that allocate
on "cuda" get a `torch` proxy in just the mcore modules that do it (`TorchOnCpu`). The remaining
CPU-mode replacements (`torch.cuda.current_device`, `.synchronize`, `.current_stream` and
`Tensor.type`) are global, because mcore calls them from dozens of modules; they are installed
only in processes without CUDA, where torch's own versions could only fail.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict
from typing import Callable

import torch

WRITTEN_FOR = "0.19.2"

_MISSING = object()
# group -> [(object, attribute, original value)], in installation order
_INSTALLED: dict[str, list[tuple[object, str, object]]] = {}


class PatchVersionError(RuntimeError):
    """The installed megatron-core is not the release a patch was written for."""


def mcore_version() -> str:
    from megatron.core import package_info

    return package_info.__shortversion__


def _check_version(group: str) -> None:
    found = mcore_version()
    if found != WRITTEN_FOR:
        raise PatchVersionError(
            f"engine/patches.py: the {group!r} patch was written for megatron-core {WRITTEN_FOR}, but "
            f"{found} is installed; install megatron-core=={WRITTEN_FOR} (pyproject.toml pins it) or "
            f"check the patch against {found}")


def _replace(group: str, owner: object, name: str, value: object) -> None:
    if not hasattr(owner, name) and not isinstance(owner, types.ModuleType):
        raise PatchVersionError(f"engine/patches.py: {group!r} expects {owner!r}.{name} to exist")
    _INSTALLED.setdefault(group, []).append((owner, name, getattr(owner, name, _MISSING)))
    setattr(owner, name, value)


def installed(group: str) -> bool:
    return group in _INSTALLED


def original(owner: object, name: str) -> object:
    """`owner.name` as it was before any group replaced it."""
    for records in _INSTALLED.values():
        for o, n, value in records:
            if o is owner and n == name:
                return value
    return getattr(owner, name)


def remove(group: str) -> None:
    """Undo one group's replacements (newest first). A no-op when it is not installed."""
    for owner, name, original in reversed(_INSTALLED.pop(group, [])):
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


@contextlib.contextmanager
def scoped(group: str, install: Callable[[], object]):
    """Install a group for the duration of a block, then restore what was there before."""
    was = installed(group)
    install()
    try:
        yield
    finally:
        if not was:
            remove(group)


# ----------------------------------------------------------------------------- torch on CPU


class TorchOnCpu(types.ModuleType):
    """The real torch, except that tensor factories asked for "cuda" build CPU tensors. Assigned
    as the `torch` of an mcore module that allocates on "cuda"."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _on_cpu(kwargs: dict) -> dict:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return kwargs

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._on_cpu(kwargs))

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._on_cpu(kwargs))

    def ones(self, *args, **kwargs):
        return torch.ones(*args, **self._on_cpu(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._on_cpu(kwargs))


class _NullStream:
    """A CUDA stream on a machine with none: there is never anything to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None) -> "_NullEvent":
        return _NullEvent()


# ----------------------------------------------------------------------------- cpu-mode


def install_cpu_mode() -> None:
    """megatron-core's model and pipeline schedules on CPU processes. Where mcore 0.19.2 assumes
    CUDA on our code path, and what takes its place:

      1. `torch.cuda.current_device()` picks the device of new tensors (RoPE frequencies, pipeline
         p2p receive buffers)                                       -> "cpu"
      2. `torch.cuda.synchronize()` after pipeline p2p transfers    -> no-op
      3. the model-parallel RNG tracker snapshots CUDA generator states in `add`/`fork` (weight
         init of parallel layers, dropout in TP regions)            -> no-ops (one CPU generator;
         names are still recorded so `fork(name)` checks them)
      4. `pipeline_parallel/schedules.py` allocates its token counters with `device="cuda"`
                                                                    -> its `torch` is TorchOnCpu
      5. activation recompute (`tensor_parallel.checkpoint`, `CheckpointWithoutOutput`) saves and
         restores the CUDA generator's state around each recomputed part, next to the CPU
         generator's and the tracker's                              -> the CUDA part is None and
         setting it a no-op (the CPU generator, the only one, is still saved and restored)
    mcore's local DotProductAttention also builds a causal mask on "cuda"; our core attention
    (engine.model.attention) never needs it, so it is not patched. Idempotent; CPU only."""
    group = "cpu-mode"
    if installed(group):
        return
    if torch.cuda.is_available():
        raise RuntimeError("the megatron-core CPU mode must not be installed where CUDA is available")
    _check_version(group)
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    _replace(group, torch.cuda, "current_device", lambda: "cpu")  # 1
    _replace(group, torch.cuda, "synchronize", lambda device=None: None)  # 2

    def add(self, name, seed):  # 3
        self._is_initialized = True
        self.states_[name] = None

    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        return contextlib.nullcontext()

    _replace(group, mcore_random.CudaRNGStatesTracker, "add", add)
    _replace(group, mcore_random.CudaRNGStatesTracker, "fork", fork)
    _replace(group, schedules, "torch", TorchOnCpu())  # 4
    _replace(group, mcore_random, "_get_cuda_rng_state", lambda *args, **kwargs: None)  # 5
    _replace(group, mcore_random, "_set_cuda_rng_state", lambda *args, **kwargs: None)


# ----------------------------------------------------------------------------- cpu-training


def grad_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for mcore's local multi-tensor L2 norm (same signature and return), with the sums
    of squares accumulated in float64: float32 `torch.norm` on CPU drifts by ~5e-4 relative on
    million-element tensors (CUDA's tree reduction does not), which would make gradient clipping
    differ between parallel layouts."""
    total = torch.zeros((), dtype=torch.float64)
    for tensors in tensor_lists:
        for t in tensors:
            total += torch.linalg.vector_norm(t, dtype=torch.float64) ** 2
    return total.sqrt().float().reshape(1), None


def install_cpu_training(grad_norm: str = "fp64") -> None:
    """megatron-core's DDP, DistributedOptimizer and gradient clipping on CPU processes, so the
    training loop's data/tensor/pipeline-parallel numerics and checkpoint resharding are tested
    without GPUs. mcore 0.19.2 assumes CUDA here:

      1. `optimizer/optimizer.py`, `optimizer/clip_grads.py` and `utils.py` allocate small flags
         and norms with `device='cuda'`                      -> their `torch` is TorchOnCpu
      2. the optimizers and gradient clipping classify tensors by `t.type()` names
         ('torch.cuda.FloatTensor', ...)                     -> a CPU tensor reports its CUDA name
      3. DDP's bucket groups wait on `torch.cuda.current_stream()` events before reducing
                                                             -> a stream with nothing to wait for
      4. without apex/TE the gradient norm is mcore's `local_multi_tensor_l2_norm`
                                                             -> `grad_norm_fp64` (the kernel plan's
                                                                `grad_norm`: "fp64" or "mcore")
    Idempotent; CPU only."""
    group = "cpu-training"
    if installed(group):
        return
    if torch.cuda.is_available():
        raise RuntimeError("the megatron-core CPU training mode must not be installed where CUDA is available")
    _check_version(group)
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    proxy = TorchOnCpu()
    for module in (mcore_optimizer, clip_grads, mcore_utils):  # 1
        _replace(group, module, "torch", proxy)

    real_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):  # 2
        if dtype is None and not kwargs and self.device.type == "cpu":
            return real_type(self).replace("torch.", "torch.cuda.", 1)
        return real_type(self, dtype, non_blocking, **kwargs)

    _replace(group, torch.Tensor, "type", type_)
    null = _NullStream()
    _replace(group, torch.cuda, "current_stream", lambda device=None: null)  # 3
    if grad_norm == "fp64" and clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:  # 4
        _replace(group, clip_grads, "l2_norm_impl", grad_norm_fp64)


# ----------------------------------------------------------------------------- wgrad-fusion


def install_wgrad_accumulation() -> str:
    """Make megatron-core's `gradient_accumulation_fusion` available: its linear layers call
    `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32/_fp16` (apex) when
    `_grad_accum_fusion_available`. Where apex is installed its extension is left in place.
    Returns which implementation the layers use: "apex" or "torch". Idempotent."""
    group = "wgrad-fusion"
    from megatron.core.tensor_parallel import layers

    from engine.model.fusions import TORCH_WGRAD

    if installed(group):
        return "torch"
    if layers._grad_accum_fusion_available:
        return "apex"
    _check_version(group)
    _replace(group, layers, "fused_weight_gradient_mlp_cuda", TORCH_WGRAD)
    _replace(group, layers, "_grad_accum_fusion_available", True)
    return "torch"


# ----------------------------------------------------------------------------- adam-step-load


def install_adam_step_on_load() -> None:
    """mcore 0.19.2 bug with torch's Adam (no TE/apex: CPU, or GPUs without TE): loading
    reshardable optimizer state copies every tensor of a parameter's Adam state from the
    checkpoint, 'step' included, but the checkpoint restores 'step' through the param groups and
    leaves it out of the per-parameter tensors (KeyError: 'step'). Give the copy the parameter's
    own step, so that copy is a no-op. Idempotent."""
    group = "adam-step-load"
    if installed(group):
        return
    _check_version(group)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if isinstance(step, torch.Tensor):
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    _replace(group, DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)


# ----------------------------------------------------------------------------- recompute-without-te


def install_recompute_without_te() -> None:
    """mcore 0.19.2 bug: `CheckpointWithoutOutput(fp8=False)` (how `TransformerLayer` recomputes
    its norms, `--recompute-modules layernorm`) sets `self.fp8 = fp8 is not None`, i.e. always
    True, and so always enters Transformer Engine's FP8 recompute contexts; without TE installed
    that is a NameError. Where TE is missing no FP8 can be on, so the flag is set False after the
    constructor. Nothing is installed where TE is present (its contexts are harmless with FP8
    off). Idempotent."""
    group = "recompute-without-te"
    from megatron.core.tensor_parallel import random as mcore_random

    if installed(group) or mcore_random.HAVE_TE:
        return
    _check_version(group)
    original_init = mcore_random.CheckpointWithoutOutput.__init__

    def init(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = False

    _replace(group, mcore_random.CheckpointWithoutOutput, "__init__", init)


# ----------------------------------------------------------------------------- hybrid-optimizer


class _NullEvent:
    """A CUDA event on a machine with none: already complete."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _NullCuda(types.SimpleNamespace):
    """The `torch.cuda` streams HybridDeviceOptimizer uses, on a machine without CUDA."""

    def __init__(self):
        super().__init__(current_stream=lambda device=None: _NullStream(), Stream=lambda *a, **kw: _NullStream(),
                         stream=lambda stream=None: contextlib.nullcontext())


def _sub_optimizer_param_groups_on_cpu(self, offload_fraction: float):
    """`HybridDeviceOptimizer._get_sub_optimizer_param_groups` for a process without CUDA. mcore
    offloads parameters that are `is_cuda` (copied to pinned host memory) and leaves the others
    to the host optimizer as they are. Here the model's own parameters play the GPU's part and
    the offloaded share is copied into separate, unpinned CPU tensors, so the same host copies,
    gradient transfers, host optimizer and copy-back hooks run as on a GPU. Same return value."""
    params = [p for group in self.param_groups for p in group["params"]]
    threshold = sum(p.numel() for p in params) * offload_fraction
    offloaded = 0
    host_groups, device_groups, to_host, to_device, to_fp32 = [], [], {}, {}, {}
    for group in self.param_groups:
        device_group, host_group = {**group, "params": []}, {**group, "params": []}
        for orig in group["params"]:
            param, copied = orig, offloaded < threshold
            if copied:
                param = orig.detach().clone()
                offloaded += param.numel()
            if self.param_update_in_fp32 and param.dtype != torch.float32:
                param = param.detach().clone().float()
                to_fp32[orig] = param
            if copied:
                to_host[orig], to_device[param] = param, orig
            (host_group if copied else device_group)["params"].append(param)
        device_groups += [device_group] if device_group["params"] else []
        host_groups += [host_group] if host_group["params"] else []
    return host_groups, device_groups, to_host, to_device, to_fp32


def _move_state_to_its_params_device(self):
    """`HybridDeviceOptimizer._move_new_state_to_right_device`, after a checkpoint load: each
    sub-optimizer's state goes where its parameter is. mcore 0.19.2 decides by the optimizer's
    class, and moves the on-device optimizer's state to the host when both classes are torch's
    AdamW (no Transformer Engine or apex)."""
    for optimizer in self.sub_optimizers:
        for param, state in optimizer.state.items():
            orig_param = self.inner_param_to_orig_param.get(param, param)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self.state[orig_param][key] = state[key] = value.to(param.device)


def _sync_state_to_hdo(self):
    """`HybridDeviceOptimizer._sync_sub_optimizers_state_to_hdo`: the sub-optimizers' state
    becomes the HybridDeviceOptimizer's, which mcore's distributed optimizer saves. mcore 0.19.2
    adds a "master_param" entry (the copy the sub-optimizer updates) for every parameter; for the
    distributed optimizer's fp32 main weights that is the main weight itself, saved again under
    a key a checkpoint without offload lacks (so neither loads into the other). It is kept only
    where it is a real fp32 copy of a lower-precision parameter."""
    state = defaultdict(dict)
    for optimizer in self.sub_optimizers:
        for param, param_state in optimizer.state.items():
            orig_param = self.inner_param_to_orig_param[param]
            state[orig_param] = param_state
            if self.param_update_in_fp32 and orig_param in self.param_to_fp32_param:
                param_state["master_param"] = param
    self.state = state


def _update_inner_params_from_state(self):
    """`HybridDeviceOptimizer._update_fp32_params_by_new_state`, after a checkpoint load: each
    copy a sub-optimizer updates (an fp32 copy of a low-precision parameter, or a host copy)
    takes the loaded value: the "master_param" of an fp32 copy, else the parameter itself (the
    loaded fp32 main weight). mcore 0.19.2 looks every parameter up among the fp32 copies only, a
    KeyError for the distributed optimizer's fp32 main weights."""
    if not self.param_update_in_fp32:
        return
    for param, state in self.state.items():
        inner = self.param_to_inner_param.get(param, param)
        source = state.get("master_param", param)
        if source is not inner:
            inner.data.copy_(source)


def install_hybrid_optimizer(device: str) -> None:
    """megatron-core's CPU-offloaded optimizer (`--optimizer-cpu-offload`, HybridDeviceOptimizer):

      1. after a checkpoint load its on-device state is moved by optimizer class, which sends it
         to the host without TE/apex                    -> `_move_state_to_its_params_device`;
         and the loaded fp32 main weights are looked up among fp32 copies of bf16 weights only
                                                        -> `_update_inner_params_from_state`
      2. its state repeats each fp32 main weight as "master_param", so checkpoints with and
         without offload do not load into each other     -> `_sync_state_to_hdo`
    and, on a process without CUDA (so the offload path is tested on CPU):
      3. only `is_cuda` parameters are offloaded        -> `_sub_optimizer_param_groups_on_cpu`
      4. transfers run on CUDA streams with events      -> streams and events with nothing to wait for
    Idempotent."""
    group = "hybrid-optimizer"
    if installed(group):
        return
    _check_version(group)
    from megatron.core.optimizer.cpu_offloading import hybrid_optimizer

    hdo = hybrid_optimizer.HybridDeviceOptimizer
    _replace(group, hdo, "_move_new_state_to_right_device", _move_state_to_its_params_device)  # 1
    _replace(group, hdo, "_update_fp32_params_by_new_state", _update_inner_params_from_state)
    _replace(group, hdo, "_sync_sub_optimizers_state_to_hdo", _sync_state_to_hdo)  # 2
    if device == "cpu":
        if torch.cuda.is_available():
            raise RuntimeError("the CPU offload path without CUDA must not be installed where CUDA is available")
        _replace(group, hdo, "_get_sub_optimizer_param_groups", _sub_optimizer_param_groups_on_cpu)  # 3
        proxy = TorchOnCpu()
        proxy.cuda = _NullCuda()
        _replace(group, hybrid_optimizer, "torch", proxy)  # 4
