"""Where we run: device and collective backend, optional kernels, process groups.

`setup_platform()` is called once by every entry point (training, tools, tests) before any
megatron-core model is built. It detects CUDA and the optional accelerators (Transformer Engine,
flash-attn) and, only when CUDA is absent, installs megatron-core's CPU mode
(`engine.patches.install_cpu_mode`) so the very same megatron-core code runs on CPU processes
talking over gloo. That is how tensor and pipeline parallel numerics are tested on machines
without GPUs. Which kernels a run uses is decided from this information once, by
`engine.model.specs.plan_kernels`.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
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
    fp8_unsupported: str | None = "no GPU"  # why FP8 GEMMs cannot run here; None when they can


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


def _fp8_unsupported(cuda: bool) -> str | None:
    """Why this machine cannot run FP8 GEMMs (None when it can): they need a GPU of compute
    capability 8.9 or newer (Ada, Hopper, Blackwell) and Transformer Engine."""
    if not cuda:
        return "no GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no FP8 tensor cores; 8.9 or newer is needed"
    if not _imports("transformer_engine.pytorch"):
        return "Transformer Engine is not installed (pip install .[te])"
    return None


def setup_platform() -> PlatformInfo:
    """Detect the platform once; on CPU install the megatron-core CPU mode. Idempotent."""
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
        fp8_unsupported=_fp8_unsupported(cuda),
    )
    if not cuda:
        from engine import patches

        patches.install_cpu_mode()
    _INFO = info
    log.info("platform: %s", info)
    return info


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
