"""Logits of the engine and of transformers on the same interleaved input, to compare them.

The engine's micro-batch already has each image expanded to `tokens_per_image` positions of the
`<image>` id (docs/internals.md); llava-hf in transformers 5 expects exactly that in `input_ids`
(its processor does the expansion), so one token sequence feeds both models.

`engine_logits` works at any TP/PP layout: it runs the model's own forward (through
megatron-core's pipeline schedule when PP > 1), copies the output layer's result in a forward
hook, and gathers the vocabulary shards of tensor parallelism. It returns the logits on the last
pipeline stage and None elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.config import ModelConfig


def random_interleaved_input(cfg: ModelConfig, seed: int = 0, num_images: int = 2,
                             text_lengths: tuple[int, ...] = (7, 12, 5)) -> tuple[Tensor, Tensor, Tensor]:
    """BOS, random text, an image, random text, ... as (tokens [1, S], images [N, 3, H, W], offsets [N]).
    Text ids avoid the special ids 0-2 and `<image>`; pixels are normal noise (already normalised)."""
    gen = torch.Generator().manual_seed(seed)
    n_tok = cfg.vision.tokens_per_image
    text_vocab = min(cfg.image_token_id, cfg.language.vocab_size)
    pieces, offsets, pos = [torch.tensor([1])], [], 1
    for i, n in enumerate(text_lengths):
        pieces.append(torch.randint(3, text_vocab, (n,), generator=gen))
        pos += n
        if i < num_images:
            offsets.append(pos)
            pieces.append(torch.full((n_tok,), cfg.image_token_id))
            pos += n_tok
    tokens = torch.cat(pieces).reshape(1, -1)
    size = cfg.vision.image_size
    images = torch.randn(len(offsets), 3, size, size, generator=gen)
    return tokens, images, torch.tensor(offsets, dtype=torch.int64)


def engine_batch(tokens: Tensor, images: Tensor, offsets: Tensor) -> dict:
    """The model's micro-batch (docs/internals.md) holding one document, tokens [1, S]."""
    if tokens.dim() != 2 or tokens.size(0) != 1:
        raise ValueError(f"expected tokens of one document, shape [1, S]; got {tuple(tokens.shape)}")
    s = tokens.size(1)
    return {
        "tokens": tokens,
        "labels": torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1),
        "loss_mask": torch.ones(1, s, dtype=torch.float32),
        "position_ids": torch.arange(s)[None],
        "cu_seqlens": torch.tensor([0, s], dtype=torch.int32),
        "max_seqlen": s,
        "images": images,
        "image_offsets": offsets,
    }


@torch.no_grad()
def engine_logits(model: torch.nn.Module, batch: dict) -> Tensor | None:
    """float32 logits [B*S, padded vocab] on the last pipeline stage, None on other stages.
    Collective over the model-parallel ranks."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from engine.model.llava import pipeline_shape

    inner = model.module if hasattr(model, "module") else model
    device = next(inner.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    caught: list[Tensor] = []
    hook = None
    if inner.post_process:
        # A copy: the model's cross-entropy then works on the logits in place.
        hook = inner.language_model.output_layer.register_forward_hook(
            lambda m, i, out: caught.append(out[0].detach().float().clone()))
    try:
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            model(batch)
        else:
            def step(iterator, m):
                out = m(next(iterator))
                return out, lambda loss: (loss.sum(), torch.ones((), dtype=torch.int), {"loss": loss.detach().sum()})

            seq, mbs = pipeline_shape(*batch["tokens"].shape)
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                        num_microbatches=1, seq_length=seq, micro_batch_size=mbs,
                                        forward_only=True)
    finally:
        if hook is not None:
            hook.remove()
    if not caught:
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(caught[0])  # [B*S, 1, vocab]
    return logits.squeeze(1).float()


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: Tensor, images: Tensor) -> Tensor:
    """float32 logits [B*S, vocab] of a transformers LlavaForConditionalGeneration."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = model(input_ids=tokens.to(device), pixel_values=images.to(device, dtype), use_cache=False)
    return out.logits.reshape(-1, out.logits.size(-1)).float()


def reference_model(source, dtype: torch.dtype = torch.float32):
    """A transformers LlavaForConditionalGeneration holding the source's weights, whatever its
    layout (built on the meta device, each tensor assigned as read: no second copy)."""
    from transformers import LlavaForConditionalGeneration

    from engine.convert.llava_hf import hf_config, hub_name

    vocab = max(source.shape("language_model.lm_head.weight")[0], source.config.language.vocab_size)
    config = hf_config(source.config, str(dtype).removeprefix("torch."), vocab_size=vocab)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = {k: source.get(hub_name(k)).to(dtype) for k in model.state_dict()}
    model.load_state_dict(state, assign=True, strict=True)
    del state
    _materialize_buffers(model)
    return model.eval()


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (RoPE inverse frequencies, CLIP position ids) are not in the state
    dict, so they are still on the meta device: take them from a fresh CPU copy of their module
    (these modules are small and built from their config alone)."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        fresh = type(module)(module.config)
        for n in meta:
            setattr(module, n, getattr(fresh, n))
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers still on the meta device: {left}")


def compare_logits(a: Tensor, b: Tensor) -> dict:
    """Largest and mean absolute difference, and how often the top-1 token agrees, over the
    vocabulary columns both have (the engine pads its vocabulary; the extra columns are not
    part of the Hugging Face model it came from)."""
    v = min(a.size(-1), b.size(-1))
    a, b = a[..., :v].float(), b[..., :v].float()
    diff = (a - b).abs()
    return {"max_logit_diff": diff.max().item(), "mean_logit_diff": diff.mean().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_logit": b.abs().max().item()}
