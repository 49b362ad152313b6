"""Where we run: device and collective backend, optional kernels, and megatron-core's CPU mode.

`setup_platform()` is called once by every entry point (training, tools, tests) before any
megatron-core model is built. It detects CUDA and the optional accelerators (Transformer Engine,
flash-attn, apex) and, only when CUDA is absent, applies the small set of patches below so the very
same megatron-core code runs on CPU processes talking over gloo. That is how tensor and pipeline
parallel numerics are tested on machines without GPUs. With CUDA present nothing is patched.

megatron-core 0.19 assumes CUDA in exactly these places on our code path:
  1. `torch.cuda.current_device()` picks the device of new tensors (RoPE frequencies, pipeline p2p
     receive buffers)                                          -> returns "cpu"
  2. `torch.cuda.synchronize()` after pipeline p2p transfers   -> no-op
  3. the model-parallel RNG tracker snapshots CUDA generator states in `add`/`fork` (weight init of
     parallel layers, dropout in TP regions)                   -> no-ops (there is one CPU generator)
  4. `pipeline_parallel/schedules.py` allocates its token counters with `device="cuda"`
                                                               -> allocated on the CPU
mcore's local DotProductAttention also builds a causal mask on "cuda"; our own core attention
(`engine.model.attention`) never needs it, so it is not patched.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import logging
import os
import types
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlatformInfo:
    device: str  # "cuda" or "cpu"
    backend: str  # torch.distributed backend: "nccl" or "gloo"
    device_name: str
    has_te: bool  # transformer_engine.pytorch imports
    has_flash_attn: bool  # flash_attn (Dao-AILab) imports
    has_apex: bool
    cpu_mode: bool  # the megatron-core CPU patches are active


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


_INFO: PlatformInfo | None = None


def _imports(module: str) -> bool:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
        return True
    except Exception as exc:  # a broken optional install must not stop us; say why it is unused
        log.warning("%s is installed but does not import (%s: %s); not using it", module, type(exc).__name__, exc)
        return False


def setup_platform() -> PlatformInfo:
    """Detect the platform once; on CPU apply the megatron-core CPU mode. Idempotent."""
    global _INFO
    if _INFO is not None:
        return _INFO
    cuda = torch.cuda.is_available()
    info = PlatformInfo(
        device="cuda" if cuda else "cpu",
        backend="nccl" if cuda else "gloo",
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        has_te=cuda and _imports("transformer_engine.pytorch"),
        has_flash_attn=cuda and _imports("flash_attn"),
        has_apex=_imports("apex"),
        cpu_mode=not cuda,
    )
    if not cuda:
        _apply_cpu_mode()
    _INFO = info
    log.info("platform: %s", info)
    return info


def _apply_cpu_mode() -> None:
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"  # 1
    torch.cuda.synchronize = lambda device=None: None  # 2

    # 3: one CPU generator serves every "state"; record names so `fork(name)` still checks them.
    def add(self, name, seed):
        self._is_initialized = True
        self.states_[name] = None

    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        return contextlib.nullcontext()

    mcore_random.CudaRNGStatesTracker.add = add
    mcore_random.CudaRNGStatesTracker.fork = fork

    # 4: the schedules module sees a `torch` whose `zeros(device="cuda")` lands on the CPU;
    # every other attribute is the real torch.
    schedules.torch = TorchOnCpu()


class TorchOnCpu(types.ModuleType):
    """The real torch, except that tensor factories asked for "cuda" build CPU tensors. Assigned
    as the `torch` of an mcore module that allocates on "cuda" (here and in
    engine/training/cpu_mode.py)."""

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


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    *,
    vpp: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelInfo:
    """torch.distributed from the torchrun environment (or a single process without it),
    megatron-core's model-parallel groups, and the model-parallel seeds. Idempotent."""
    from megatron.core import parallel_state, tensor_parallel

    info = setup_platform()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}); data parallel size must be a whole number")
    if info.device == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=info.backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch.device("cuda", local_rank) if info.device == "cuda" else None,
        )
    if parallel_state.model_parallel_is_initialized():
        got = (parallel_state.get_tensor_model_parallel_world_size(),
               parallel_state.get_pipeline_model_parallel_world_size())
        if got != (tp, pp):
            raise RuntimeError(f"model parallel already initialised with (tp, pp)={got}, asked for {(tp, pp)}")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            distributed_timeout_minutes=timeout_minutes,
        )
        # Same seed on every rank for data-parallel regions, tp-rank dependent inside TP regions.
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    """Tear down what `init_distributed` built (tests re-initialise with other layouts)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
