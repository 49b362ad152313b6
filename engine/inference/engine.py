"""`EngineGenerator`: generation from an engine checkpoint, where the model was trained.

The checkpoint may have been saved at any TP/PP layout; it loads at TP=N, PP=1 (megatron-core
reshards on load, the trainer's own `--pretrained-checkpoint` path). Under `torchrun` with N
processes every rank holds one tensor-parallel shard and runs the same steps; every rank returns
the same results. Without `torchrun` the generator makes a private one-process group.

The attention is the torch-native packed path (engine.model.attention), which also carries the
KV cache; with Transformer Engine installed, generation still builds the torch-native layers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from engine.inference.api import Request, Result, SamplingParams, error_result
from engine.inference.prompt import Prompt, load_images, prepare
from engine.inference.runner import ModelRunner
from engine.inference.sampling import banned_ids
from engine.inference.scheduler import advance, new_sequences, run_batched


def init_process_group(tp: int | None) -> tuple[int, bool]:
    """(tp, whether this call created the process group)."""
    from engine.platform import init_distributed

    created = not torch.distributed.is_initialized()
    if created and "RANK" not in os.environ:  # not under torchrun: a private one-process group
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    world = torch.distributed.get_world_size() if not created else int(os.environ.get("WORLD_SIZE", 1))
    tp = tp or world
    if tp != world:
        raise ValueError(f"--tp {tp} needs exactly {tp} processes (torchrun --nproc-per-node {tp}); "
                         f"this run has {world}")
    init_distributed(tp, 1)
    return tp, created


def build_inference_model(cfg, dtype: torch.dtype, *, initialize: bool = False):
    """This rank's TP shard of the whole model (PP=1) with the torch-native attention, in eval
    mode; random weights only when `initialize` (a checkpoint overwrites them anyway)."""
    import dataclasses

    from engine.model.llava import build_model
    from engine.model.specs import plan_kernels
    from engine.platform import setup_platform

    # The KV cache lives in PackedCoreAttention: the torch-native layers, even where TE is installed.
    torch_native = dataclasses.replace(setup_platform(), has_te=False)
    kernels = plan_kernels(half_precision=dtype in (torch.bfloat16, torch.float16), platform=torch_native)
    overrides = {} if initialize else {"perform_initialization": False}
    return build_model(cfg, kernels=kernels, params_dtype=dtype, bf16=dtype == torch.bfloat16, **overrides).eval()


def load_model(path: str | Path, dtype: torch.dtype, cfg):
    """This rank's TP shard of the whole model (PP=1), weights from the checkpoint."""
    from engine.training.checkpoint import load_pretrained

    model = build_inference_model(cfg, dtype)
    load_pretrained(path, model, None, cfg, log=lambda *_: None)
    return model


DECODE_MODES = ("auto", "eager", "static", "graphs")
GRAPH_MAX_SLOTS = 8  # "auto": CUDA graphs up to this many sequences decoding together


class EngineGenerator:
    """Batched generation with a KV cache (see engine.inference.scheduler).

    `decode`: how decode steps run. "eager": only the live sequences, op by op; "static": every
    slot in fixed shapes (engine.inference.graphs), op by op; "graphs": the fixed-shape step
    replayed from CUDA graphs; "auto": graphs on CUDA at TP=1 for batches of up to GRAPH_MAX_SLOTS
    sequences, eager otherwise. All give the same tokens (up to the kernels' rounding on CUDA).

    Why the split (7B, bf16, one H200, docs/benchmarks.md): at batch 1 a decode step waits on
    the host, and graphs take it from 26.7 to 191.5 tokens/s; with 32 sequences of ~3.2k
    positions each step moves tens of GB of keys and values, so there is little launch time to
    save, while every slot decodes and each new read length is captured first: few-shot
    VQA-shaped requests ran at 8.64/s eager against 7.68/s with graphs."""

    def __init__(self, model, cfg, tokenizer, *, batch_size: int = 16, prefill_tokens: int = 32768,
                 owns_process_group: bool = False, decode: str = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.batch_size, self.prefill_tokens = batch_size, prefill_tokens
        self.tokens_per_image = cfg.vision.tokens_per_image
        self.max_context = cfg.language.max_position_embeddings
        self.runner = ModelRunner(model, self.max_context)
        self.banned = torch.tensor(banned_ids(cfg), device=self.runner.device)
        self.decode_mode = decode
        self._cache = self._decoder = None
        self._owns_process_group = owns_process_group

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, tp: int | None = None, dtype: torch.dtype | None = None,
                        batch_size: int = 16, tokenizer=None, prefill_tokens: int = 32768,
                        decode: str = "auto") -> "EngineGenerator":
        """`path`: a save directory or one iter_* directory. `tokenizer`: a Tokenizer or a path
        (default: the tokenizer.model stored next to the checkpoint)."""
        from engine.convert.engine_io import find_tokenizer, read_checkpoint_config
        from engine.data.tokenizer import load_tokenizer
        from engine.platform import setup_platform

        _, cfg, _ = read_checkpoint_config(path)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            spm = tokenizer or find_tokenizer(path)
            tokenizer = load_tokenizer(spm)
        dtype = dtype or (torch.bfloat16 if setup_platform().device == "cuda" else torch.float32)
        _, created = init_process_group(tp)
        model = load_model(path, dtype, cfg)
        return cls(model, cfg, tokenizer, batch_size=batch_size, prefill_tokens=prefill_tokens,
                   owns_process_group=created, decode=decode)

    def close(self) -> None:
        """Free the cache; tear down the process group if `from_checkpoint` made it."""
        self._cache = self._decoder = None
        if self._owns_process_group:
            from engine.platform import destroy_distributed

            destroy_distributed()
            self._owns_process_group = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests --------------------------------------------------------------------------

    def prepare(self, requests: Seq[Request]) -> tuple[list, dict[int, Result]]:
        """([(index, request, Prompt)], {index: error Result}) for the requests in order."""
        items, errors = [], {}
        for i, r in enumerate(requests):
            try:
                items.append((i, r, prepare(self.tokenizer, r, tokens_per_image=self.tokens_per_image,
                                            image_size=self.cfg.vision.image_size, max_context=self.max_context)))
            except ValueError as e:
                errors[i] = error_result(r.id, str(e))
        return items, errors

    def decode_mode_for(self, slots: int) -> str:
        """The decode mode a batch of `slots` sequences runs in ("auto" resolved)."""
        if self.decode_mode != "auto":
            return self.decode_mode
        # Under tensor parallelism each step all-gathers the logits; capturing NCCL collectives has
        # not been tried on more than one GPU, so "auto" keeps TP > 1 op by op ("graphs" forces it).
        graphable = self.runner.device.type == "cuda" and self.runner.tp == 1
        return "graphs" if graphable and slots <= GRAPH_MAX_SLOTS else "eager"

    def _cache_for(self, slots: int, max_len: int):
        """(KV cache, decode-step runner bound to it or None for eager decoding) for `slots` x
        `max_len`. The fixed-shape decode runs every slot of its cache, so it gets a cache of
        exactly `slots`; its captured graphs stay with the cache for the next batch."""
        from engine.inference.graphs import StaticDecoder

        mode = self.decode_mode_for(slots)
        static = mode != "eager"
        reuse = self._cache is not None and self._cache.fits(slots, max_len, self.runner.dtype)
        if not reuse or (static and self._cache.slots != slots):
            self._cache = self._decoder = None  # free the old ones first
            self._cache = self.runner.new_cache(slots, max_len)
        if not static:
            return self._cache, None
        d = self._decoder
        if d is None or d.cache is not self._cache or d.requested_graphs != (mode == "graphs"):
            self._decoder = StaticDecoder(self.runner, self._cache, graphs=mode == "graphs")
        return self._cache, self._decoder

    def generate(self, requests: Seq[Request], params: SamplingParams = SamplingParams()) -> list[Result]:
        params.validate()
        items, results = self.prepare(requests)
        if items:
            seqs = new_sequences(items, params, self.max_context, self.runner.device)
            slots = min(self.batch_size, len(seqs))
            max_len = min(self.max_context, max(s.prompt.length for s in seqs) + params.max_new_tokens)
            cache, decoder = self._cache_for(slots, max_len)
            run_batched(self.runner, cache, seqs, slots=slots, prefill_tokens=self.prefill_tokens,
                        banned=self.banned, tokenizer=self.tokenizer, decoder=decoder)
            results.update({s.index: s.result(self.tokenizer) for s in seqs})
        return [results[i] for i in range(len(requests))]

    def generate_recompute(self, requests: Seq[Request], params: SamplingParams = SamplingParams()) -> list[Result]:
        """The reference path without a cache: every step runs the whole sequence of every live
        request (prompt and tokens so far) through one packed forward. Slow; for tests."""
        params.validate()
        items, results = self.prepare(requests)
        live = new_sequences(items, params, self.max_context, self.runner.device)
        seqs = list(live)
        while live:
            prompts = [Prompt(torch.cat([s.prompt.ids, torch.tensor(s.ids, dtype=torch.int64)]), s.prompt.pixels,
                              s.prompt.offsets) for s in live]
            live = advance(live, self.runner.prefill(prompts, None, None), params, self.banned, self.tokenizer)
        results.update({s.index: s.result(self.tokenizer) for s in seqs})
        return [results[i] for i in range(len(requests))]

    @torch.no_grad()
    def image_features(self, images: Seq) -> torch.Tensor:
        """[N, D] float32 pooled CLS features (CLIP's pooler output: every layer, then ln_post)."""
        from engine.inference.features import pooled_features

        pixels = load_images(list(images), self.cfg.vision.image_size).to(self.runner.device)
        return pooled_features(self.model.vision_model, pixels).float().cpu()
