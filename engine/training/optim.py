"""Data parallelism, optimizer and LR schedule, all megatron-core's.

- `wrap_ddp`: mcore DistributedDataParallel: gradients land in contiguous fp32 buckets and are
  reduced (reduce-scatter with the distributed optimizer) bucket by bucket while the backward
  pass is still running (`--overlap-grad-reduce`).
- `build_optimizer`: `get_megatron_optimizer` → Adam(W) (the kernel plan's `optimizer`) with fp32 main weights for bf16 models,
  its state sharded over data-parallel ranks (`--use-distributed-optimizer`), global-norm
  gradient clipping (`--clip-grad`) done inside `optimizer.step()`; weight decay is skipped for
  biases and norm weights (mcore's standard parameter groups).
- `--optimizer-cpu-offload`: mcore's HybridDeviceOptimizer inside the distributed optimizer keeps
  `--optimizer-offload-fraction` of this rank's fp32 main weights and Adam moments in host memory
  and updates them there with torch's fused CPU AdamW (the rest stays on the GPU); gradients go to
  the host and updated weights come back each step (on side streams with
  `--overlap-cpu-optimizer-d2h-h2d`). 7B's 12 bytes of optimizer state per parameter (~80 GB)
  leave the GPU. Checkpoints hold the same tensors under the same keys as without offload.
- `build_scheduler`: mcore OptimizerParamScheduler stepping once per iteration: linear warmup
  from 0, then constant / cosine / linear decay to --min-lr.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from engine import patches
from engine.model.specs import KernelPlan
from engine.training.config import TrainingConfig


def _kernels(model) -> KernelPlan:
    """The kernel plan the model was built with (engine.model.llava.build_model)."""
    return getattr(model, "module", model).kernels


def _install_cpu_training(kernels: KernelPlan) -> None:
    if kernels.device == "cpu":
        patches.install_cpu_training(kernels.grad_norm)


def wrap_ddp(model: torch.nn.Module, cfg: TrainingConfig) -> DistributedDataParallel:
    _install_cpu_training(_kernels(model))
    par = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # accumulate micro-batch gradients in fp32 even for bf16 weights
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather_active,
        use_distributed_optimizer=par.use_distributed_optimizer,
        bucket_size=par.ddp_bucket_size,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    # Every DP replica starts from DP rank 0's weights (they are equal when seeded alike; this
    # makes it a guarantee).
    ddp.broadcast_params()
    return ddp


def build_optimizer(model_chunks: list, cfg: TrainingConfig):
    kernels = _kernels(model_chunks[0])
    _install_cpu_training(kernels)
    opt = cfg.optimizer
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=cfg.precision.bf16,
        params_dtype=cfg.precision.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather_active,
        optimizer_cpu_offload=opt.optimizer_cpu_offload,
        # With offload the fp32 main weights live only in the HybridDeviceOptimizer (host copies
        # for the offloaded share): the distributed optimizer keeps no fp32 copy on the GPU.
        use_precision_aware_optimizer=opt.optimizer_cpu_offload,
        optimizer_offload_fraction=opt.optimizer_offload_fraction,
        overlap_cpu_optimizer_d2h_h2d=opt.overlap_cpu_optimizer_d2h_h2d,
        # Pinned host buffers make the transfers asynchronous; pinning needs CUDA.
        pin_cpu_grads=kernels.device == "cuda",
        pin_cpu_params=kernels.device == "cuda",
    )
    if opt.optimizer_cpu_offload:
        patches.install_hybrid_optimizer(kernels.device)
    optimizer = get_megatron_optimizer(config, model_chunks)
    if kernels.optimizer == "torch-fused":
        use_fused_adam(optimizer)
    return optimizer


def hybrid_optimizers(optimizer) -> list[HybridDeviceOptimizer]:
    """The CPU-offloading optimizers inside a megatron-core optimizer (--optimizer-cpu-offload)."""
    return [inner for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(inner := getattr(opt, "optimizer", None), HybridDeviceOptimizer)]


def torch_adams(optimizer) -> list[torch.optim.Adam]:
    """The torch Adam(W) optimizers inside a megatron-core optimizer: one per chained optimizer,
    or, with --optimizer-cpu-offload, the host (and on-device) sub-optimizers of each
    HybridDeviceOptimizer; none when mcore uses TE's or apex's FusedAdam on the device."""
    found = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        parts = inner.sub_optimizers if isinstance(inner, HybridDeviceOptimizer) else [inner]
        found += [p for p in parts if isinstance(p, torch.optim.Adam)]  # AdamW is a subclass
    return found


def sync_offloaded_state(optimizer, *, loaded: bool = False) -> None:
    """After the sub-optimizers' state was created directly: the HybridDeviceOptimizer (what
    mcore's distributed optimizer reads and writes) sees it. `loaded`: after a checkpoint load,
    which wrote the HybridDeviceOptimizer's state (its "master_param" among it) but, in the
    per-DP-rank layout, not the host copies the sub-optimizers update: they take the loaded
    values first."""
    for hybrid in hybrid_optimizers(optimizer):
        if loaded:
            hybrid._sync_hdo_state_to_sub_optimizers()
        hybrid._sync_sub_optimizers_state_to_hdo()


def use_fused_adam(optimizer) -> None:
    """Without apex/TE, megatron-core falls back to torch's AdamW with its default multi-tensor
    (`foreach`) kernels, several launches per chunk of tensors; torch's single fused kernel does
    the same update in one pass over the fp32 main weights and state. Set on every param group
    before any state exists, so each `step` counter is created on the weights' device."""
    for torch_opt in torch_adams(optimizer):
        for group in torch_opt.param_groups:
            group["foreach"], group["fused"] = False, True
        torch_opt.defaults.update(foreach=False, fused=True)


def build_scheduler(optimizer, cfg: TrainingConfig) -> OptimizerParamScheduler:
    opt = cfg.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=opt.lr_decay_iters,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=cfg.training.train_iters,
        wd_incr_style="constant",
    )


def current_lr(scheduler: OptimizerParamScheduler) -> float:
    """The scheduled LR (from the schedule itself: a pipeline stage may hold no trainable
    parameter group to read it from)."""
    return float(scheduler.get_lr({}))
