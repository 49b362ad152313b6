"""LLaVA-1.5 on megatron-core: CLIP ViT -> mlp2x_gelu projector -> LLaMA, over packed documents.

Input is the micro-batch of docs/internals.md ("A packed sample", "The model"): B rows of S
positions, each image already expanded to `tokens_per_image` positions of `image_token_id`. The
model flattens the rows into one [B*S] THD sequence split by `cu_seqlens`, so RoPE positions and
causal attention restart at every document and never cross one; it embeds the tokens, overwrites
each image's block with projector(vision(image)), and runs the decoder. The sequence length never
changes inside the model.

Composition. The pieces are megatron-core's: `GPTModel` holds the LLaMA embedding, decoder block
and output layer (so state-dict names, sharded checkpoints and tensor parallelism are mcore's),
`MultimodalProjector` is the projector, and the vision tower is built from mcore layers
(`engine.model.vision` says why it is not `CLIPViTModel`). mcore's `LLaVAModel` is not used: it
expands image tokens into embeddings *inside* the model (changing the sequence length, with its own
label/mask shuffling), allows sequence parallelism only with Transformer Engine, and builds
`CLIPViTModel`. Our data pipeline already places images in the token stream, so the merge is one
`index_copy`. For the same reason `GPTModel.forward` is bypassed: we call its embedding, decoder and
output layer ourselves, because the image rows must be merged between embedding and decoder, and
RoPE is computed from `position_ids` (see `_rotary`).

Pipeline parallelism: the vision tower and projector live on the first stage only; every stage
needs `tokens` (for the shape), `position_ids`, `cu_seqlens`, `max_seqlen`; the last stage needs
`labels`. The tensor passed between stages is [B*S (/TP with sequence parallel), 1, hidden]: give
mcore's schedules `seq_length, micro_batch_size = pipeline_shape(B, S)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from engine.config import ModelConfig
from engine.model import specs
from engine import patches
from engine.model.attention import PackedDocuments
from engine.model.fusions import rope_tables
from engine.model.recompute import Recompute
from engine.model.sharding import canonical_name
from engine.model.specs import KernelPlan, plan_kernels
from engine.model.vision import CLIPVisionTower


# ----------------------------------------------------------------------------- configuration

def validate_layout(cfg: ModelConfig, tp: int, pp: int, sequence_parallel: bool = False) -> None:
    """Raise a ValueError naming the config field when (tp, pp) cannot shard `cfg`."""
    lang, vis = cfg.language, cfg.vision
    where = f"(model preset {cfg.name!r}, engine/config.py)"
    checks = [
        ("language.num_attention_heads", lang.num_attention_heads, tp),
        ("language.num_query_groups", lang.num_query_groups or lang.num_attention_heads, tp),
        ("language.ffn_hidden_size", lang.ffn_hidden_size, tp),
        ("language.padded_vocab_size (vocab_size rounded up to make_vocab_size_divisible_by)",
         lang.padded_vocab_size, tp),
        ("vision.num_attention_heads", vis.num_attention_heads, tp),
        ("vision.ffn_hidden_size", vis.ffn_hidden_size, tp),
        ("language.hidden_size (the projector's hidden size)", lang.hidden_size, tp),
    ]
    for field, value, size in checks:
        if value % size:
            raise ValueError(f"{field}={value} is not divisible by tensor_model_parallel_size={tp} {where}")
    if lang.num_layers % pp:
        raise ValueError(f"language.num_layers={lang.num_layers} is not divisible by "
                         f"pipeline_model_parallel_size={pp} {where}")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1")


def _parallel_sizes() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron-core model parallel state is not initialised: call "
                           "engine.platform.init_distributed(tp, pp) before building the model")
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())


def _common(kernels: KernelPlan, params_dtype: torch.dtype, bf16: bool, **overrides) -> dict:
    tp, _ = _parallel_sizes()
    cuda = kernels.device == "cuda"
    return dict(
        tensor_model_parallel_size=tp,
        params_dtype=params_dtype,
        bf16=bf16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
        # On CPU, mcore initialises every parallel weight as a full matrix and slices it, so all
        # layouts start from the same weights; on GPU it draws shards directly on the device.
        use_cpu_initialization=not cuda,
        init_method_std=0.02,
        **overrides,
    )


def language_transformer_config(cfg: ModelConfig, kernels: KernelPlan, *, params_dtype=torch.float32,
                                bf16=False, sequence_parallel=False, recompute: Recompute | None = None,
                                **overrides) -> TransformerConfig:
    """The LLaMA decoder's TransformerConfig (what mcore DDP / optimizer / schedules read); its
    kernel switches come from the plan, its activation recompute from `recompute`."""
    lang = cfg.language
    tp, pp = _parallel_sizes()
    if recompute is not None:
        recompute.check_spec(kernels.spec)
        recompute.check_layers(lang.num_layers // pp)
    kw = _common(kernels, params_dtype, bf16, **overrides)
    kw.setdefault("pipeline_dtype", torch.bfloat16 if bf16 else params_dtype)
    kw.update(
        bias_activation_fusion=kernels.swiglu == "compiled",  # mcore's bias_swiglu_impl
        apply_rope_fusion=kernels.rope == "te-fused",
        gradient_accumulation_fusion=kernels.wgrad_fusion != "off",
        # Fused vocab-parallel cross-entropy; opt-in (docs/benchmarks.md says why). Its backward
        # emits bf16 logit gradients.
        cross_entropy_loss_fusion=kernels.cross_entropy != "unfused",
        cross_entropy_fusion_impl="te" if kernels.cross_entropy == "te" else "native",
        **(kernels.fp8.transformer_config(language=True) if kernels.fp8 else {}),
    )
    return TransformerConfig(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_attention_heads,
        num_query_groups=lang.num_query_groups,
        ffn_hidden_size=lang.ffn_hidden_size,
        kv_channels=lang.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=lang.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        **(recompute.transformer_config() if recompute else {}),
        **kw,
    )


def vision_transformer_config(cfg: ModelConfig, kernels: KernelPlan, *, params_dtype=torch.float32,
                              bf16=False, **overrides) -> TransformerConfig:
    """CLIP ViT: LayerNorm, quick_gelu, biases; never pipeline-split, never sequence-parallel."""
    vis = cfg.vision
    return TransformerConfig(
        num_layers=vis.num_layers,
        hidden_size=vis.hidden_size,
        num_attention_heads=vis.num_attention_heads,
        ffn_hidden_size=vis.ffn_hidden_size,
        kv_channels=vis.hidden_size // vis.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vis.layernorm_eps,
        activation_func=specs.vision_activation(kernels),
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        bias_activation_fusion=False,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        gradient_accumulation_fusion=kernels.wgrad_fusion != "off",
        **(kernels.fp8.transformer_config(language=False) if kernels.fp8 and kernels.fp8.vision else {}),
        **_common(kernels, params_dtype, bf16, **overrides),
    )


def projector_transformer_config(cfg: ModelConfig, kernels: KernelPlan, *, params_dtype=torch.float32,
                                 bf16=False, **overrides) -> TransformerConfig:
    """mlp2x_gelu: Linear(vision -> llm) + exact GELU + Linear(llm -> llm), with biases."""
    lang = cfg.language
    if cfg.projector.kind != "mlp2x_gelu":
        raise ValueError(f"projector kind {cfg.projector.kind!r} is not supported (only mlp2x_gelu)")
    return TransformerConfig(
        num_layers=1,
        hidden_size=lang.hidden_size,
        ffn_hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_attention_heads,
        activation_func=F.gelu,  # exact erf GELU as nn.GELU(); mcore's fused bias-gelu is the tanh form
        gated_linear_unit=False,
        add_bias_linear=True,
        bias_activation_fusion=False,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        gradient_accumulation_fusion=kernels.wgrad_fusion != "off",
        **_common(kernels, params_dtype, bf16, **overrides),
    )


def pipeline_shape(micro_batch_size: int, seq_length: int) -> tuple[int, int]:
    """(seq_length, micro_batch_size) to give mcore's pipeline schedules: the model runs the
    micro-batch as one flattened packed sequence of micro_batch_size * seq_length positions."""
    return micro_batch_size * seq_length, 1


# ----------------------------------------------------------------------------- the model

class LLaVAModel(MegatronModule):
    """One pipeline stage of LLaVA. Build it with `build_model`."""

    def __init__(self, cfg: ModelConfig, *, language_config: TransformerConfig,
                 vision_config: TransformerConfig, projector_config: TransformerConfig,
                 kernels: KernelPlan, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=language_config)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.kernels = kernels
        self.model_type = ModelType.encoder_or_decoder  # read by mcore's schedules
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads
        self.vision_model = self.vision_projection = None
        groups = ProcessGroupCollection.use_mpu_process_groups()
        if pre_process:
            self.vision_model = CLIPVisionTower(
                vision_config, specs.vision_block_spec(vision_config, kernels), cfg.vision,
                pg_collection=groups)
            self.vision_projection = MultimodalProjector(
                projector_config, specs.projector_submodules(), "mlp", input_size=cfg.vision.hidden_size,
                pg_collection=groups)
        self.language_model = GPTModel(
            config=language_config,
            transformer_layer_spec=specs.language_block_spec(language_config, kernels),
            vocab_size=cfg.language.padded_vocab_size,
            max_sequence_length=cfg.language.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=not cfg.language.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.language.rotary_base,
            # Images are merged into the full sequence first; we scatter for sequence parallel after.
            scatter_embedding_sequence_parallel=False,
            pg_collection=groups,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """mcore's sharded state dict, with checkpoint keys in the torch-native spec's names, so a
        checkpoint saved under one spec loads under the other (Transformer Engine's extra state,
        FP8 scales among it, is saved under its own keys)."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for value in sharded.values():
            if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
                value.key = canonical_name(value.key)
        return sharded

    def set_input_tensor(self, input_tensor) -> None:
        """Activations from the previous pipeline stage (called by mcore's schedules)."""
        self.language_model.set_input_tensor(input_tensor)

    def freeze(self, *, vision: bool, projector: bool, llm: bool) -> None:
        if self.vision_model is not None:
            self.vision_model.set_trainable(not vision)
        if self.vision_projection is not None:
            self.vision_projection.requires_grad_(not projector)
        self.language_model.requires_grad_(not llm)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, batch: dict) -> Tensor:
        """Last stage: per-token cross-entropy [B, S] in fp32, not masked (apply `loss_mask`).
        Other stages: hidden states [B*S (/TP), 1, hidden] for the next stage."""
        tokens = batch["tokens"]
        b, s = tokens.shape
        docs = self._documents(batch, b * s, tokens.device)
        rotary = self._rotary(batch["position_ids"], docs)  # None: the core attention applies RoPE
        hidden = self._embed(batch) if self.pre_process else None  # else: set_input_tensor's
        hidden = self.language_model.decoder(
            hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=docs)
        if not self.post_process:
            return hidden
        logits, _ = self.language_model.output_layer(hidden)  # [B*S, 1, vocab/TP]
        loss = self.language_model.compute_language_model_loss(batch["labels"].reshape(1, b * s), logits)
        return loss.view(b, s)

    def _embed(self, batch: dict) -> Tensor:
        """Token embeddings with every image block replaced by its projected CLIP features."""
        tokens, images, offsets = batch["tokens"], batch["images"], batch["image_offsets"]
        if images.dim() != 4 or images.size(0) != offsets.numel():
            raise ValueError(f"batch has images {tuple(images.shape)} but {offsets.numel()} image_offsets")
        n_tok = self.cfg.vision.tokens_per_image
        emb = self.language_model.embedding(input_ids=tokens.reshape(1, -1), position_ids=None)  # [T, 1, H]
        if images.size(0):
            features = self.vision_model(images)
        else:  # keep the projector in the graph so its (zero) gradients still reach gradient reduction
            features = emb.new_zeros(0, n_tok, self.cfg.vision.hidden_size)
        projected = self.vision_projection(features)  # [N, n_tok, H]
        rows = (offsets.reshape(-1, 1) + torch.arange(n_tok, device=offsets.device)).reshape(-1)
        emb = emb.index_copy(0, rows.to(emb.device), projected.reshape(-1, 1, emb.size(-1)).to(emb.dtype))
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def _documents(self, batch: dict, total: int, device: torch.device) -> PackedSeqParams:
        """Document boundaries of the flattened micro-batch, checked on the host."""
        cu = batch["cu_seqlens"]
        host = cu.to("cpu", torch.int32)
        lengths = (host[1:] - host[:-1]).tolist()
        if host.dim() != 1 or host[0] != 0 or host[-1] != total or min(lengths, default=0) <= 0:
            raise ValueError(f"cu_seqlens must rise strictly from 0 to B*S={total}; got {host.tolist()}")
        if self.config.sequence_parallel and total % self.config.tensor_model_parallel_size:
            raise ValueError(f"with sequence parallel, B*S={total} must be divisible by "
                             f"tensor_model_parallel_size={self.config.tensor_model_parallel_size}")
        max_seqlen = int(batch.get("max_seqlen") or max(lengths))
        on_device = cu.to(device=device, dtype=torch.int32, non_blocking=True)
        if self.kernels.uses_te:
            return PackedSeqParams(qkv_format="thd", cu_seqlens_q=on_device, cu_seqlens_kv=on_device,
                                   max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
        return PackedDocuments(qkv_format="thd", cu_seqlens_q=host, cu_seqlens_kv=host,
                               max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
                               cu_seqlens_device=on_device, lengths=tuple(lengths))

    def _rotary(self, position_ids: Tensor, docs: PackedSeqParams) -> Tensor | None:
        """RoPE angles. TE's fused THD kernel takes the [max_seqlen] table and counts positions
        per document itself (returned for mcore's layers to pass on). For the torch-native spec
        we gather one row per token from `position_ids` (which restart at every document) and
        store its cos/sin in `docs`, once per micro-batch, for `PackedCoreAttention`'s fused RoPE;
        mcore's layers then get no angles (None)."""
        table = self.language_model.rotary_pos_emb(docs.max_seqlen_q, packed_seq=True)  # [L, 1, 1, d]
        if self.kernels.uses_te:
            return table
        docs.rope_cos, docs.rope_sin = rope_tables(table.to(position_ids.device)[position_ids.reshape(-1)])
        return None


def build_model(cfg: ModelConfig, *, kernels: KernelPlan | None = None, pre_process: bool | None = None,
                post_process: bool | None = None, params_dtype: torch.dtype = torch.float32, bf16: bool = False,
                sequence_parallel: bool = False, recompute: Recompute | None = None,
                freeze_vision: bool = True, freeze_projector: bool = False, freeze_llm: bool = False,
                **config_overrides) -> LLaVAModel:
    """This rank's stage of LLaVA, on this rank's device. TP/PP sizes and ranks come from
    megatron.core.parallel_state (see engine.platform.init_distributed). `kernels` is the run's
    kernel plan (default: `plan_kernels` for this platform and precision, no optional fusions).
    `pre_process` / `post_process` default to "first / last pipeline stage". `config_overrides` go
    to the language model's TransformerConfig (e.g. deallocate_pipeline_outputs=True).

    A plan with `wgrad_fusion` on is only for a model that megatron-core's DDP will wrap (DDP
    creates the `main_grad` buffers the weight-gradient GEMMs accumulate into); a bare model's
    backward would have nowhere to put them."""
    tp, pp = _parallel_sizes()
    cfg.validate()
    validate_layout(cfg, tp, pp, sequence_parallel)
    if kernels is None:
        kernels = plan_kernels(half_precision=bf16 or params_dtype in (torch.bfloat16, torch.float16))
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if kernels.wgrad_fusion == "torch":
        patches.install_wgrad_accumulation()
    if recompute is not None:
        patches.install_recompute_without_te()
    shared = dict(params_dtype=params_dtype, bf16=bf16)
    model = LLaVAModel(
        cfg,
        language_config=language_transformer_config(
            cfg, kernels, sequence_parallel=sequence_parallel, recompute=recompute,
            **shared, **config_overrides),
        vision_config=vision_transformer_config(cfg, kernels, **shared),
        projector_config=projector_transformer_config(cfg, kernels, **shared),
        kernels=kernels,
        pre_process=pre_process,
        post_process=post_process,
    )
    model.freeze(vision=freeze_vision, projector=freeze_projector, llm=freeze_llm)
    if kernels.device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model
