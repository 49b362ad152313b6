"""Each packed-attention backend on CUDA against SDPA's math kernel in fp32, forward and backward."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.model import attention as attn

BACKENDS = ["sdpa", "varlen"] + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])
LAYOUTS = {"one_doc": [4096], "equal_4x1024": [1024] * 4, "ragged": [1500, 37, 2000, 559]}


def _docs(lengths, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return attn.PackedDocuments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                                max_seqlen_kv=max(lengths), cu_seqlens_device=cu.to(device), lengths=tuple(lengths))


def _reference(q, k, v, lengths):
    """fp32 math-kernel attention, one causal call per document."""
    rep = q.size(1) // k.size(1)
    outs = []
    with sdpa_kernel(SDPBackend.MATH):
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(*(x.float().transpose(0, 1)[None] for x in (qs, ks, vs)), is_causal=True)
            outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,groups", [(32, 32), (32, 8)], ids=["mha", "gqa"])
def test_backend_matches_math_sdpa(backend, layout, heads, groups):
    torch.manual_seed(0)
    lengths, d = LAYOUTS[layout], 128
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, groups, groups))
    grad_out = torch.randn(t, heads, d, device="cuda", dtype=torch.bfloat16)
    out = attn.packed_attention(q, k, v, _docs(lengths, "cuda"), causal=True, scale=d ** -0.5, backend=backend)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = _reference(q, k, v, lengths)
    want = torch.autograd.grad(ref, (q, k, v), grad_out.float())

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(out, ref) < 1e-2, rel(out, ref)
    for name, g, w in zip("qkv", got, want):
        assert rel(g, w) < 2e-2, (name, rel(g, w))
