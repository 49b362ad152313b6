"""engine.model.fusions on CUDA: the bf16 -> fp32 accumulating weight-gradient GEMM and the compiled
RoPE against fp64 references on fresh random data; and a whole training micro-batch (DDP, fused
wgrad, packed attention, fused RoPE, uint8 images normalised on the device) that never makes the
host wait for the GPU."""

import numpy as np
import pytest
import torch
from PIL import Image

import llava_batches as lb
from engine.config import get_preset
from engine.model import fusions

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(4096, 4096, 11008), (8192, 1024, 4096), (77, 40, 24)])
def test_wgrad_accumulates_bf16_into_fp32(shape):
    t, n_in, n_out = shape
    x = torch.randn(t, n_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(t, n_out, device="cuda", dtype=torch.bfloat16)
    start = torch.randn(n_out, n_in, device="cuda", dtype=torch.float32)
    acc = start.clone()
    ptr = acc.data_ptr()
    fusions.wgrad_gemm_accum_fp32(x, g, acc)
    fusions.wgrad_gemm_accum_fp32(x, g, acc)  # accumulates, in place
    ref = start.double() + 2 * (g.double().t() @ x.double())
    assert acc.data_ptr() == ptr and acc.dtype == torch.float32
    assert _rel(acc, ref) < 1e-5  # fp32 accumulation of exact bf16 products


def test_compiled_rope_matches_fp64_reference():
    t, d = 4096, 128
    q = torch.randn(t, 32, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, 8, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in (1000, 3000, 96)]).cuda()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
    ang = positions[:, None].float() * inv
    freqs = torch.cat([ang, ang], -1)[:, None, None, :]
    cos, sin = fusions.rope_tables(freqs)
    qo, ko = fusions.apply_rope(q, k, cos, sin, compiled=True)

    def ref(x):
        x = x.double()
        x1, x2 = x.chunk(2, -1)
        return x * cos.double() + torch.cat((-x2, x1), -1) * sin.double()

    assert qo.dtype == torch.bfloat16 and _rel(qo, ref(q)) < 4e-3 and _rel(ko, ref(k)) < 4e-3
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum(), (q, k))
    qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    rq, rk = torch.autograd.grad((ref(qd) * gq.double()).sum() + (ref(kd) * gk.double()).sum(), (qd, kd))
    assert _rel(dq, rq) < 4e-3 and _rel(dk, rk) < 4e-3


def test_training_micro_batch_never_waits_for_the_gpu(mcore_cuda, sp):
    """Forward and backward of a micro-batch, from the loader's pinned batch to the gradients in
    the DDP buffers, queue work without one device-to-host synchronisation: the host stays ahead
    of the GPU (each sync would drain its queue and leave it idle while the host catches up)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from engine.data.loader import to_device
    from engine.model.llava import build_model
    from engine.model.specs import plan_kernels

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, params_dtype=torch.bfloat16, bf16=True,
                        kernels=plan_kernels(half_precision=True, gradient_accumulation_fusion=True))
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    batch = lb.packed_batch(sp, cfg)
    # as the loader hands it over: pinned host tensors, images as stored (uint8 HWC, 336 px photos)
    size = cfg.vision.image_size
    photos = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in lb.photos()]
    batch["images"] = torch.from_numpy(np.stack(photos[: batch["images"].shape[0]]))
    host = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}

    def micro_batch():
        b = to_device(host, torch.device("cuda"))
        loss = ddp(b)
        (loss * b["loss_mask"]).sum().backward()

    micro_batch()  # warm-up: compilation, cuBLAS handles, the allocator's first blocks
    torch.cuda.synchronize()
    ddp.zero_grad_buffer()
    torch.cuda.set_sync_debug_mode("error")
    try:
        micro_batch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    grads = [p.main_grad for p in ddp.module.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
