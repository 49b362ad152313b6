"""Data parallelism, optimizer and LR schedule, all megatron-core's.

- `wrap_ddp`: mcore DistributedDataParallel: gradients land in contiguous fp32 buckets and are
  reduced (reduce-scatter with the distributed optimizer) bucket by bucket while the backward
  pass is still running (`--overlap-grad-reduce`).
- `build_optimizer`: `get_megatron_optimizer` → Adam(W) (the kernel plan's `optimizer`) with fp32 main weights for bf16 models,
  its state sharded over data-parallel ranks (`--use-distributed-optimizer`), global-norm
  gradient clipping (`--clip-grad`) done inside `optimizer.step()`; weight decay is skipped for
  biases and norm weights (mcore's standard parameter groups).
- `build_scheduler`: mcore OptimizerParamScheduler stepping once per iteration: linear warmup
  from 0, then constant / cosine / linear decay to --min-lr.
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from engine import patches
from engine.model.specs import KernelPlan


def _kernels(model) -> KernelPlan:
    """The kernel plan the model was built with (engine.model.llava.build_model)."""
    return getattr(model, "module", model).kernels


def _install_cpu_training(kernels: KernelPlan) -> None:
    if kernels.device == "cpu":
        patches.install_cpu_training(kernels.grad_norm)


def wrap_ddp(model: torch.nn.Module, args: argparse.Namespace) -> DistributedDataParallel:
    _install_cpu_training(_kernels(model))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # accumulate micro-batch gradients in fp32 even for bf16 weights
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather and args.use_distributed_optimizer,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=args.ddp_bucket_size,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    # Every DP replica starts from DP rank 0's weights (they are equal when seeded alike; this
    # makes it a guarantee).
    ddp.broadcast_params()
    return ddp


def build_optimizer(model_chunks: list, args: argparse.Namespace):
    kernels = _kernels(model_chunks[0])
    _install_cpu_training(kernels)
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather and args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    if kernels.optimizer == "torch-fused":
        use_fused_adam(optimizer)
    return optimizer


def torch_adams(optimizer) -> list[torch.optim.Adam]:
    """The torch Adam(W) optimizers inside a megatron-core optimizer (one per chained
    optimizer; none when mcore uses TE's or apex's FusedAdam)."""
    return [inner for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(inner := getattr(opt, "optimizer", None), torch.optim.Adam)]  # AdamW is a subclass


def use_fused_adam(optimizer) -> None:
    """Without apex/TE, megatron-core falls back to torch's AdamW with its default multi-tensor
    (`foreach`) kernels, several launches per chunk of tensors; torch's single fused kernel does
    the same update in one pass over the fp32 main weights and state. Set on every param group
    before any state exists, so each `step` counter is created on the weights' device."""
    for torch_opt in torch_adams(optimizer):
        for group in torch_opt.param_groups:
            group["foreach"], group["fused"] = False, True
        torch_opt.defaults.update(foreach=False, fused=True)


def build_scheduler(optimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )


def current_lr(scheduler: OptimizerParamScheduler) -> float:
    """The scheduled LR (from the schedule itself: a pipeline stage may hold no trainable
    parameter group to read it from)."""
    return float(scheduler.get_lr({}))
