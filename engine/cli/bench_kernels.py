"""The torch-native fusions (engine/model/fusions.py) against the unfused megatron-core path they
replace, at the 7B-shaped layer sizes, one H100/H200. Prints one JSON line per case.

    llava-bench-kernels [--tokens 8192] [--json-out PATH]      (or: python tools/bench_kernels.py ...)

wgrad: weight gradient of one linear layer over one micro-batch of T tokens, accumulated into an
fp32 main-grad buffer: unfused = bf16 GEMM + `main_grad.add_(grad)` (mcore's DDP hook), fused =
one GEMM with the fp32 accumulator in its epilogue. rope: q [T, 32, 128] and k [T, 32, 128],
forward + backward: unfused = mcore's `apply_rotary_pos_emb` (THD, per-token angle table) on each,
fused = `fusions.apply_rope` with cos/sin computed once. Times are CUDA-event medians.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from engine.bench.timing import median_cuda_seconds


def wgrad_cases(tokens: int) -> list[dict]:
    from engine.model import fusions

    rows = []
    for name, n_out, n_in in [("qkv", 12288, 4096), ("proj", 4096, 4096), ("fc1", 22016, 4096), ("fc2", 4096, 11008),
                              ("lm_head", 32064, 4096)]:
        x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(n_out, n_in, device="cuda", dtype=torch.float32)

        def unfused(x=x, g=g, main_grad=main_grad):
            main_grad.add_(g.t() @ x)

        def fused(x=x, g=g, main_grad=main_grad):
            fusions.wgrad_gemm_accum_fp32(x, g, main_grad)

        t_u, t_f = median_cuda_seconds(unfused), median_cuda_seconds(fused)
        flops = 2 * tokens * n_out * n_in
        rows.append({"case": f"wgrad_{name}", "shape": [tokens, n_out, n_in], "unfused_ms": round(t_u * 1e3, 3),
                     "fused_ms": round(t_f * 1e3, 3), "fused_tflops": round(flops / t_f / 1e12, 1),
                     "unfused_tflops": round(flops / t_u / 1e12, 1), "speedup": round(t_u / t_f, 3)})
        del x, g, main_grad, unfused, fused
    return rows


def rope_case(tokens: int) -> dict:
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from engine.model import fusions

    d, heads = 128, 32
    positions = torch.cat([torch.arange(n) for n in (tokens // 2, tokens // 4, tokens // 4)]).cuda()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
    ang = positions[:, None].float() * inv
    freqs = torch.cat([ang, ang], -1)[:, None, None, :]  # what the model gathers per token
    q = torch.randn(tokens, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def unfused():  # mcore's path for packed per-token angles: bshd RoPE on [T, 1, h, d], per layer
        qo = _apply_rotary_pos_emb_bshd(q.unsqueeze(1), freqs).squeeze(1)
        ko = _apply_rotary_pos_emb_bshd(k.unsqueeze(1), freqs).squeeze(1)
        torch.autograd.backward((qo, ko), (gq, gk))

    cos, sin = fusions.rope_tables(freqs)

    def fused():
        qo, ko = fusions.apply_rope(q, k, cos, sin, compiled=True)
        torch.autograd.backward((qo, ko), (gq, gk))

    t_u, t_f = median_cuda_seconds(unfused), median_cuda_seconds(fused)
    moved = 2 * 2 * q.numel() * q.element_size() * 2  # q and k, read + written, forward and backward
    return {"case": "rope_qk_fwd_bwd", "tokens": tokens, "unfused_ms": round(t_u * 1e3, 3),
            "fused_ms": round(t_f * 1e3, 3), "fused_gb_per_s": round(moved / t_f / 1e9, 1),
            "speedup": round(t_u / t_f, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (B*S)")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    rows = wgrad_cases(a.tokens) + [rope_case(a.tokens)]
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.json_out:
        Path(a.json_out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
