"""Core attention for the torch-native layer spec: packed documents (THD) and dense vision tokens.

megatron-core's `SelfAttention` projects q/k/v, applies RoPE and calls a *core attention* module;
its local `DotProductAttention` materialises [b, h, s, s] scores and rejects packed sequences.
`PackedCoreAttention` takes its place in `engine.model.specs` and dispatches to a fused kernel:

  backend      kernel                                                 where
  ----------   ----------------------------------------------------   -------------------------
  varlen       torch.nn.attention.varlen.varlen_attn, causal through   CUDA, bf16/fp16
               window_size=(-1, 0) (flash-attention 2 inside torch)
  flash_attn   flash_attn.flash_attn_varlen_func(causal=True)          CUDA with flash-attn
  sdpa         F.scaled_dot_product_attention per document             anywhere (CPU: the
               (cuDNN/flash/efficient on CUDA, flash/math on CPU)       reference backend)

The backend is the kernel plan's (`engine.model.specs.plan_kernels`), given to each layer by its spec.

Every backend first checks whether all documents of the micro-batch have the same length (one
document per row is the common case): then the packed tensor is just a [n, L] batch and one causal
SDPA call runs torch's default pick (cuDNN on an H100), which is faster than varlen for the same
work (docs/benchmarks.md, "Packed-document causal attention"). The lengths come from the host copy of
`cu_seqlens`, so this check never syncs the device.

For packed documents the core attention also applies RoPE to q and k (angles per token in
`PackedDocuments`; the plan's `rope` says compiled into one kernel or eager, see
`engine.model.fusions`).

Generation (engine.inference) adds a key/value cache through `PackedDocuments.kv_cache`: each
layer writes its new keys and values there; a prefill then attends within the packed prompts as
above, and a decode step (one query per sequence) runs one SDPA call of each query against its
sequence's cached keys (`decode_attention`, a padding mask where the sequences differ in length).

Attention never crosses a document boundary: each segment of `cu_seqlens` is its own causal
sequence. The vision tower's attention is dense and bidirectional over 577 tokens (one image per
batch row), so it takes the plain SDPA path (no packed params).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from engine.model.fusions import apply_rope

BACKENDS = ("te", "flash_attn", "varlen", "sdpa")


@dataclass
class PackedDocuments(PackedSeqParams):
    """`PackedSeqParams` (qkv_format='thd') as the torch-native spec uses them.

    `cu_seqlens_q/kv` live on the host (a device tensor there would cost a device-to-host sync
    wherever mcore reads them); the kernels read `cu_seqlens_device`; `lengths` are the document
    lengths as Python ints. `rope_cos`/`rope_sin` [T, 1, d]: each token's rotary angles, computed
    once per micro-batch; the core attention rotates q and k with them in one fused kernel
    (`engine.model.fusions.apply_rope`), so mcore's layers get no `rotary_pos_emb`.
    """

    cu_seqlens_device: Tensor | None = None
    lengths: tuple[int, ...] = ()
    rope_cos: Tensor | None = None
    rope_sin: Tensor | None = None
    # Generation only: an engine.inference.cache.CacheStep (write(layer_number, k, v), decoding,
    # read(layer_number) -> cached keys, values, mask).
    kv_cache: object | None = None


class PackedCoreAttention(MegatronModule):
    """mcore core-attention module (same constructor and forward contract as DotProductAttention).

    Input q [s, b, np, hn] (dense) or [t, np, hn] (THD, with `packed_seq_params`); k/v may have
    fewer (grouped) heads. Output [s, b, np*hn] or [t, np*hn].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "sdpa",
        rope: str | None = "eager",
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine spec")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout}: the packed attention kernels run without dropout "
                             "(LLaVA trains without it); set attention_dropout=0")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"unsupported attention mask type {attn_mask_type}")
        if backend not in ("sdpa", "varlen", "flash_attn"):
            raise ValueError(f"PackedCoreAttention has no backend {backend!r}")
        if rope not in (None, "eager", "compiled"):
            raise ValueError(f"PackedCoreAttention has no RoPE kernel {rope!r}")
        self.causal = attn_mask_type == AttnMaskType.causal
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.backend = backend
        self.rope = rope  # None: this attention never sees rotary angles (the vision tower)
        self.layer_number = layer_number  # indexes the generation KV cache

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedCoreAttention")
        if packed_seq_params is None:
            return self._dense(query, key, value)
        if not isinstance(packed_seq_params, PackedDocuments) or packed_seq_params.qkv_format != "thd":
            raise TypeError("PackedCoreAttention expects engine.model.attention.PackedDocuments (qkv_format='thd')")
        if packed_seq_params.rope_cos is not None:
            query, key = apply_rope(query, key, packed_seq_params.rope_cos, packed_seq_params.rope_sin,
                                    compiled=self.rope == "compiled")
        step = packed_seq_params.kv_cache
        if step is not None:
            step.write(self.layer_number, key, value)
        if step is not None and step.decoding:
            out = decode_attention(query, *step.read(self.layer_number), scale=self.scale)
        else:
            out = packed_attention(query, key, value, packed_seq_params, causal=self.causal, scale=self.scale,
                                   backend=self.backend)
        return out.reshape(out.size(0), -1)

    def _dense(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s, b = q.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]
        k, v = _repeat_kv(k, q), _repeat_kv(v, q)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _repeat_kv(kv: Tensor, q: Tensor) -> Tensor:
    """Grouped-query attention for SDPA: repeat each k/v head for its query heads."""
    rep = q.size(-2) // kv.size(-2)
    return kv if rep == 1 else kv.repeat_interleave(rep, dim=-2)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, docs: PackedDocuments, *, causal: bool,
                     scale: float, backend: str) -> Tensor:
    """Attention within each document of a THD-packed [t, h, d] tensor; returns [t, h, d]."""
    lengths = docs.lengths
    if len(set(lengths)) == 1:  # an ordinary batch of equal-length documents
        return _sdpa_equal(q, k, v, len(lengths), lengths[0], causal, scale)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu, m = docs.cu_seqlens_device, docs.max_seqlen_q
        return varlen_attn(q, k, v, cu, cu, m, m, scale=scale, window_size=(-1, 0) if causal else (-1, -1))
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        cu, m = docs.cu_seqlens_device, docs.max_seqlen_q
        return flash_attn_varlen_func(q, k, v, cu, cu, m, m, softmax_scale=scale, causal=causal)
    # sdpa: one call per document; each is an ordinary causal sequence.
    outs = [
        _sdpa_equal(qs, ks, vs, 1, n, causal, scale)
        for qs, ks, vs, n in zip(q.split(lengths), k.split(lengths), v.split(lengths), lengths)
    ]
    return torch.cat(outs)


def _sdpa_equal(q: Tensor, k: Tensor, v: Tensor, n: int, length: int, causal: bool, scale: float) -> Tensor:
    """[n*L, h, d] as n sequences of length L -> one SDPA call -> [n*L, h, d]."""
    def bhsd(x: Tensor) -> Tensor:
        return _repeat_kv(x, q).view(n, length, q.size(1), x.size(-1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), is_causal=causal, scale=scale)
    return out.transpose(1, 2).reshape(n * length, q.size(1), v.size(-1))


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, *, scale: float) -> Tensor:
    """One query per sequence, q [B, h, d], against its cached keys/values [B, L, hk, d] (grouped
    heads allowed); `mask` [B, 1, 1, L] bool (True = attend) or None. Returns [B, h, d]."""
    b, h, d = q.shape
    k, v = keys.transpose(1, 2), values.transpose(1, 2)  # [B, hk, L, d]
    out = F.scaled_dot_product_attention(q.view(b, h, 1, d), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=k.size(1) != h)
    return out.view(b, h, v.size(-1))
