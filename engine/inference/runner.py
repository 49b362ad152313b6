"""The model's forward for generation: one packed prefill of many prompts, one-token decode steps.

`LLaVAModel.forward` computes the training loss; generation needs logits of the last position of
each sequence and a key/value cache, so this module drives the same pieces itself: the token
embedding with every image block replaced by its projected CLIP features (`LLaVAModel._embed`,
exactly as in training), mcore's decoder over a THD-packed sequence (`PackedDocuments`, the
cache riding in `kv_cache`), the final norm inside the decoder and the output layer on the
selected rows only. RoPE angles come from one table built for the whole context and are gathered
per token, so a decode token at position p rotates exactly as position p did in the prefill.

Under tensor parallelism every rank runs the same steps; the output layer's vocabulary shards are
gathered so every rank holds the full logits (and samples the same token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.inference.cache import KVCache, to_device
from engine.inference.prompt import Prompt
from engine.model.attention import PackedDocuments
from engine.model.fusions import rope_tables


class ModelRunner:
    def __init__(self, model, max_context: int):
        from megatron.core import parallel_state

        self.model = model
        self.lm = model.language_model
        self.device = next(model.parameters()).device
        self.dtype = next(self.lm.parameters()).dtype
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.max_context = max_context
        freqs = self.lm.rotary_pos_emb(max_context, packed_seq=True)  # [L, 1, 1, d]
        self.cos, self.sin = rope_tables(freqs.to(self.device))
        cfg = self.lm.config
        self.kv_heads = (cfg.num_query_groups or cfg.num_attention_heads) // self.tp
        self.head_dim = cfg.kv_channels
        self.num_layers = cfg.num_layers

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.num_layers, slots, max_len, self.kv_heads, self.head_dim, self.dtype, self.device)

    def _documents(self, lengths: list[int], positions: Tensor, step) -> PackedDocuments:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        m = max(lengths)
        return PackedDocuments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m,
                               cu_seqlens_device=to_device(cu, self.device), lengths=tuple(lengths),
                               rope_cos=self.cos[positions], rope_sin=self.sin[positions], kv_cache=step)

    @torch.no_grad()
    def prefill(self, prompts: list[Prompt], slots: list[int] | None, cache: KVCache | None) -> Tensor:
        """Run whole prompts as one packed sequence; with a cache, store their keys/values in
        `slots`. Returns fp32 logits [len(prompts), padded vocab] of each prompt's last position."""
        lengths = [p.length for p in prompts]
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        tokens = to_device(torch.cat([p.ids for p in prompts]), self.device)
        offsets = to_device(torch.cat([p.offsets + s for p, s in zip(prompts, starts)]), self.device)
        pixels = to_device(torch.cat([p.pixels for p in prompts]), self.device)
        hidden = self.model._embed({"tokens": tokens.view(1, -1), "images": pixels, "image_offsets": offsets})
        positions = to_device(torch.cat([torch.arange(n) for n in lengths]), self.device)
        step = cache.prefill(slots, lengths) if cache is not None else None
        hidden = self._decoder(hidden, self._documents(lengths, positions, step))
        last = to_device(torch.tensor([s + n - 1 for s, n in zip(starts, lengths)]), self.device)
        return self._logits(hidden.index_select(0, last))

    @torch.no_grad()
    def decode(self, tokens: Tensor, slots: list[int], positions: list[int], cache: KVCache) -> Tensor:
        """One new token per sequence (`tokens` [B] on the device, at `positions`, in `slots`).
        Returns fp32 logits [B, padded vocab] for the position after it."""
        hidden = self.lm.embedding(input_ids=tokens.view(1, -1), position_ids=None)  # [B, 1, H]
        pos = to_device(torch.tensor(positions), self.device)
        hidden = self._decoder(hidden, self._documents([1] * len(slots), pos, cache.decode(slots, positions)))
        return self._logits(hidden)

    @torch.no_grad()
    def decode_all(self, tokens: Tensor, positions: Tensor, cache: KVCache, read_len: int,
                   cu_seqlens: tuple[Tensor, Tensor]) -> Tensor:
        """The decode step in fixed shapes (engine.inference.graphs captures it): every slot of the
        cache decodes one token, `tokens`/`positions` [slots] on the device, keys read up to
        `read_len`. `cu_seqlens`: the (host, device) offsets of `slots` one-token documents, made
        once. Returns fp32 logits [slots, padded vocab]; no host work depends on device values."""
        hidden = self.lm.embedding(input_ids=tokens.view(1, -1), position_ids=None)  # [S, 1, H]
        cu, cu_device = cu_seqlens
        docs = PackedDocuments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=1, max_seqlen_kv=1,
                               cu_seqlens_device=cu_device, lengths=(1,) * cache.slots,
                               rope_cos=self.cos[positions], rope_sin=self.sin[positions],
                               kv_cache=cache.decode_all(positions, read_len))
        return self._logits(self._decoder(hidden, docs))

    def _decoder(self, hidden: Tensor, docs: PackedDocuments) -> Tensor:
        return self.lm.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=None, packed_seq_params=docs)

    def _logits(self, hidden: Tensor) -> Tensor:
        from megatron.core import tensor_parallel

        logits, _ = self.lm.output_layer(hidden)  # [n, 1, vocab / TP]
        if self.tp > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits[:, 0].float()
