"""Packed-document attention (CPU backends) against attention written out with a block-diagonal
causal mask, and the backend choice."""


import pytest
import torch

from engine.model import attention as attn


def reference(q, k, v, lengths, causal=True):
    """softmax(q k^T * scale + mask) v with the mask allowing only same-document (earlier) keys."""
    t, h, d = q.shape
    k = k.repeat_interleave(h // k.size(1), dim=1)
    v = v.repeat_interleave(h // v.size(1), dim=1)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / d ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


def docs(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return attn.PackedDocuments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                                max_seqlen_kv=max(lengths), cu_seqlens_device=cu, lengths=tuple(lengths))


@pytest.mark.parametrize("lengths", [[5, 17, 1, 9], [8, 8, 8], [31]])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_backend_matches_masked_attention(lengths, heads, groups, causal):
    torch.manual_seed(0)
    t, d = sum(lengths), 16
    q, k, v = torch.randn(t, heads, d), torch.randn(t, groups, d), torch.randn(t, groups, d)
    out = attn.packed_attention(q, k, v, docs(lengths), causal=causal, scale=d ** -0.5, backend="sdpa")
    torch.testing.assert_close(out, reference(q, k, v, lengths, causal), rtol=1e-5, atol=1e-5)


def test_documents_do_not_see_each_other():
    torch.manual_seed(0)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    out = attn.packed_attention(q, k, v, docs([6, 6]), causal=True, scale=8 ** -0.5, backend="sdpa")
    v2 = v.clone()
    v2[:6] += 10.0  # change the first document only
    out2 = attn.packed_attention(q, k, v2, docs([6, 6]), causal=True, scale=8 ** -0.5, backend="sdpa")
    assert torch.equal(out[6:], out2[6:])
    assert not torch.allclose(out[:6], out2[:6])


def test_core_attention_module_dense_and_packed():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0, use_cpu_initialization=True)
    torch.manual_seed(0)
    # dense, bidirectional (vision): [s, b, h, d]
    module = attn.PackedCoreAttention(cfg, 1, AttnMaskType.no_mask, "self")
    q, k, v = torch.randn(7, 3, 4, 8), torch.randn(7, 3, 2, 8), torch.randn(7, 3, 2, 8)
    out = module(q, k, v, None)
    assert out.shape == (7, 3, 32)
    for b in range(3):
        ref = reference(q[:, b], k[:, b], v[:, b], [7], causal=False)
        torch.testing.assert_close(out[:, b], ref.reshape(7, 32), rtol=1e-5, atol=1e-5)
    # packed, causal (language model): [t, h, d]
    module = attn.PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    out = module(q, k, v, None, packed_seq_params=docs([3, 7]))
    torch.testing.assert_close(out, reference(q, k, v, [3, 7]).reshape(10, 32), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_dropout"):
        attn.PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
