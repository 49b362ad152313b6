"""Fused kernels of the torch-native path: what Transformer Engine or apex would otherwise provide.

Weight-gradient accumulation into the fp32 main-grad buffer
    With `gradient_accumulation_fusion`, megatron-core's linear layers hand their weight-gradient
    GEMM the DDP buffer (`weight.main_grad`) to accumulate into, instead of writing a bf16
    gradient that a backward hook then adds to the fp32 buffer (one extra pass over every
    gradient, every micro-batch: read bf16, read and write fp32). mcore takes that GEMM from
    apex's `fused_weight_gradient_mlp_cuda` extension; `TORCH_WGRAD` holds the same two functions
    built on cuBLAS through `torch.addmm(..., out_dtype=float32)` (bf16 operands, fp32
    accumulator read and written in the GEMM's epilogue), which
    `engine.patches.install_wgrad_accumulation` hands to mcore where apex is not installed.

Rotary embeddings for packed documents
    mcore's unfused THD RoPE runs ~10 kernels per tensor per layer (cos/sin of the angle table,
    casts, the half rotation as chunk + neg + cat, two muls, an add, a final cat) and re-derives
    the angles in every layer. `PackedCoreAttention` instead receives the cos/sin of each token's
    angles once per micro-batch (`rope_tables`) and applies them to q and k in one
    torch.compile-generated kernel forward and one backward (`apply_rope`), computed in fp32 and
    rounded once. Where the kernel plan says "eager" (CPU) the same function runs uncompiled
    (identical fp32 arithmetic to mcore's).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor


# ----------------------------------------------------------------------------- wgrad accumulation

def wgrad_gemm_accum_fp32(total_input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """main_grad [out, in] (fp32) += grad_output[T, out]^T @ total_input[T, in], in one GEMM."""
    a, b = grad_output.t(), total_input
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda:
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    else:  # CPU with half-precision activations: no mixed-dtype GEMM there; upcast the operands
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


def wgrad_gemm_accum_fp16(total_input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """The same for a bf16/fp16 main-grad buffer (`grad_reduce_in_fp32=False`)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


TORCH_WGRAD = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32,
                                    wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16)


# ----------------------------------------------------------------------------- RoPE

def rope_tables(freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token angles [T, 1, 1, d] (fp32) -> (cos, sin) [T, 1, d], shared by every layer."""
    freqs = freqs.reshape(freqs.size(0), 1, freqs.size(-1)).float()
    return freqs.cos(), freqs.sin()


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x = t.float()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(t.dtype)


def _rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


# Not fullgraph: past the recompile limit (many shapes and dtypes in one process, as in a test
# session) dynamo falls back to running the same function eagerly instead of failing. A second
# token count makes that dimension dynamic (generation), so one run compiles once or twice.
_rope_qk_compiled = torch.compile(_rope_qk)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, compiled: bool) -> tuple[Tensor, Tensor]:
    """Rotate q [T, hq, d] and k [T, hk, d] (non-interleaved halves, as LLaMA) by per-token
    cos/sin [T, 1, d]: one fused kernel (`compiled`), or eagerly."""
    fn = _rope_qk_compiled if compiled else _rope_qk
    return fn(q, k, cos, sin)
