"""megatron-core's DDP and optimizer on CPU: the training-side complement of the CPU mode in
engine/platform.py, applied by `apply()` only when CUDA is absent (never with a GPU).

It lets the real mcore DistributedDataParallel, DistributedOptimizer and gradient clipping run
in gloo CPU processes, which is how the training loop's data/tensor/pipeline-parallel numerics and
checkpoint resharding are tested without GPUs. megatron-core 0.19.2 assumes CUDA here:

  1. `optimizer/optimizer.py`, `optimizer/clip_grads.py` and `utils.py` (the multi-tensor L2
     norm without apex) allocate small flags and norms with `device='cuda'`
                                                       -> their `torch` allocates on the CPU
  2. the optimizers and gradient clipping classify tensors by `t.type()` names
     ('torch.cuda.FloatTensor', ...)                   -> a CPU tensor reports its CUDA name
  3. DDP's bucket groups wait on `torch.cuda.current_stream()` events before reducing
                                                       -> a stream that has nothing to wait for
  4. without apex/TE the gradient norm is mcore's `local_multi_tensor_l2_norm`: float32
     `torch.norm` per tensor, whose CPU reduction drifts by ~5e-4 relative on million-element
     tensors (CUDA's tree reduction does not)        -> sums of squares accumulated in float64,
     so gradient clipping gives the same answer in every parallel layout
"""

from __future__ import annotations

import torch

from engine.platform import TorchOnCpu

_APPLIED = False


class _NullStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _l2_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for mcore's local multi-tensor L2 norm (same signature and return)."""
    total = torch.zeros((), dtype=torch.float64)
    for tensors in tensor_lists:
        for t in tensors:
            total += torch.linalg.vector_norm(t, dtype=torch.float64) ** 2
    return total.sqrt().float().reshape(1), None


def apply() -> None:
    """Idempotent; a no-op when CUDA is available."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    proxy = TorchOnCpu()
    for module in (mcore_optimizer, clip_grads, mcore_utils):  # 1
        module.torch = proxy

    real_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):  # 2
        if dtype is None and not kwargs and self.device.type == "cpu":
            return real_type(self).replace("torch.", "torch.cuda.", 1)
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:  # 4
        clip_grads.l2_norm_impl = _l2_norm_fp64
    null = _NullStream()
    torch.cuda.current_stream = lambda device=None: null  # 3
    _APPLIED = True
