"""Packed-document causal attention on one GPU: every backend on the same documents.

Prints one JSON line per (layout, backend): forward+backward time and useful TFLOP/s, where
useful FLOPs = 6 x sum_docs(s_doc^2) x heads x head_dim (causal, within-document pairs only, the
same count whichever kernel runs, as engine/training/metrics.py counts attention). Also checks each
backend's output and gradients against fp32 SDPA on a small layout first.

    llava-bench-attention [--heads 32] [--head-dim 128] [--json-out FILE]
    (or: python tools/bench_attention.py ...)
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from engine.bench.timing import median_cuda_seconds


def _cudnn_thd():
    try:
        import cudnn  # nvidia-cudnn-frontend

        return cudnn.sdpa_torch
    except Exception as e:  # noqa: BLE001 - optional accelerator
        print(f"# cudnn frontend unavailable: {e}", file=sys.stderr)
        return None


def backends():
    from torch.nn.attention.varlen import varlen_attn

    out = {}

    def varlen(q, k, v, cu, max_s):
        return varlen_attn(q, k, v, cu, cu, max_s, max_s, window_size=(-1, 0))

    out["varlen"] = varlen

    fe = _cudnn_thd()
    if fe is not None:
        def cudnn_thd(q, k, v, cu, max_s):
            o, _ = fe(q, k, v, is_causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                      max_seqlen_q=max_s, max_seqlen_kv=max_s, return_lse=True)
            return o

        out["cudnn_thd"] = cudnn_thd

    def sdpa_loop(q, k, v, cu, max_s):
        # one cuDNN SDPA call per document (what a naive loop over documents costs)
        outs = []
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            qq, kk, vv = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outs)

    out["sdpa_per_doc"] = sdpa_loop
    return out


def reference(q, k, v, cu):
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qq, kk, vv = (t[a:b].float().transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)[0].transpose(0, 1))
    return torch.cat(outs)


def make(lengths, heads, dim, dev):
    t = sum(lengths)
    q, k, v = (torch.randn(t, heads, dim, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=dev, dtype=torch.int32)
    return q, k, v, cu, max(lengths)


def check(fn, heads, dim, dev):
    lengths = [300, 17, 1000, 731]
    q, k, v, cu, m = make(lengths, heads, dim, dev)
    go = torch.randn(q.shape, device=dev, dtype=torch.bfloat16)
    o = fn(q, k, v, cu, m)
    grads = torch.autograd.grad(o, (q, k, v), go)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr, cu)
    rgrads = torch.autograd.grad(ref, (qr, kr, vr), go.float())
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    return {"out": rel(o, ref), **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, rgrads)}}


def bench(fn, lengths, heads, dim, dev, iters=20):
    q, k, v, cu, m = make(lengths, heads, dim, dev)
    go = torch.randn(q.shape, device=dev, dtype=torch.bfloat16)

    def step():
        o = fn(q, k, v, cu, m)
        torch.autograd.grad(o, (q, k, v), go)

    t = median_cuda_seconds(step, iters=iters)
    flops = 6 * sum(s * s for s in lengths) * heads * dim
    return t, flops / t / 1e12


def layouts():
    g = torch.Generator().manual_seed(0)

    def rand_docs(total, mean):
        out, left = [], total
        while left > 0:
            s = int(min(left, max(64, torch.empty(1).exponential_(1 / mean, generator=g).item())))
            out.append(s)
            left -= s
        return out

    return {
        "1x4096": [4096], "4x1024": [1024] * 4, "rand_mean1500_4096": rand_docs(4096, 1500),
        "1x8192": [8192], "4x2048": [2048] * 4, "rand_mean3000_8192": rand_docs(8192, 3000),
    }


def run(heads: int, head_dim: int) -> tuple[dict, list[dict]]:
    """(the backends, one row per backend and layout), each row printed as it is measured."""
    dev = torch.device("cuda")
    rows = []
    fns = backends()
    for name, fn in fns.items():
        try:
            err = check(fn, heads, head_dim, dev)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            print(json.dumps({"backend": name, "error": repr(e)[:300]}))
            continue
        for lname, lengths in layouts().items():
            t, tf = bench(fn, lengths, heads, head_dim, dev)
            row = {"backend": name, "layout": lname, "docs": len(lengths), "tokens": sum(lengths),
                   "ms": round(t * 1e3, 3), "useful_tflops": round(tf, 1),
                   "max_rel_err": round(max(err.values()), 5)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return fns, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    fns, rows = run(a.heads, a.head_dim)
    if a.json_out:
        with open(a.json_out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"{'layout':22s} " + " ".join(f"{n:>14s}" for n in fns))
    for lname in layouts():
        cells = []
        for n in fns:
            r = [x for x in rows if x["backend"] == n and x["layout"] == lname]
            cells.append(f"{r[0]['useful_tflops']:14.1f}" if r else f"{'-':>14s}")
        print(f"{lname:22s} " + " ".join(cells))
    assert not math.isnan(sum(r["useful_tflops"] for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
