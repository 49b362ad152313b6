"""The kernel plan and the layer specs: the one place that chooses which kernels run.

`plan_kernels` turns the platform (CUDA or not, Transformer Engine, flash-attn, apex) and the run's
flags into a frozen `KernelPlan`, once per run; the model, the optimizer and the patches read it
(`engine.model.llava.build_model`, `engine.training.optim`, `engine.patches`) and decide nothing
themselves. Its one-line `describe()` is printed at start-up and its `as_dict()` goes into the
benchmark's JSON.

Two spec families, picked by the plan's attention backend:
  - "te": Transformer Engine layers (fused LayerNorm+Linear, TE attention with THD packing,
    fused RoPE), megatron-core's own TE specs.
  - "local", the torch-native path ("sdpa", "varlen", "flash_attn"): megatron-core's
    tensor-parallel linears, torch norms, and `PackedCoreAttention` (which also applies RoPE, see
    `engine.model.fusions`). RMSNorm is torch's fused kernel; SwiGLU is fused by megatron-core
    through torch.compile when `bias_activation_fusion` is set (CUDA only).

The language model and the vision tower each get a whole *block* spec (layers + final norm)
rather than a layer spec, because megatron-core would otherwise fill the final norm with its
`WrappedTorchNorm`, which refuses sequence parallelism.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from engine.model.attention import BACKENDS, PackedCoreAttention
from engine.platform import PlatformInfo, setup_platform

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the kernel plan


FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


@dataclass(frozen=True)
class Fp8Plan:
    """FP8 GEMMs through Transformer Engine (Megatron's --fp8-* flags).

    format        "e4m3" everywhere, or "hybrid" (e4m3 forward, e5m2 gradients)
    recipe        "delayed" (scales from an amax history), "tensorwise" (TE's current scaling) or
                  "blockwise" (per-block scales)
    amax_history_len, amax_compute_algo   the delayed recipe's history and how it is reduced
    bf16_layers_at_start, bf16_layers_at_end   language layers kept in bf16 (--first-last-layers-bf16)
    vision        the frozen vision tower's forward in FP8 too (--fp8-vision)
    """

    format: str = "hybrid"
    recipe: str = "delayed"
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    bf16_layers_at_start: int = 0
    bf16_layers_at_end: int = 0
    vision: bool = False

    def __post_init__(self):
        if self.format not in FP8_FORMATS:
            raise ValueError(f"--fp8-format {self.format!r}: choose from {', '.join(FP8_FORMATS)}")
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"--fp8-recipe {self.recipe!r}: choose from {', '.join(FP8_RECIPES)}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"--fp8-amax-compute-algo {self.amax_compute_algo!r}: choose from max, most_recent")
        if self.amax_history_len < 1:
            raise ValueError(f"--fp8-amax-history-len must be >= 1, got {self.amax_history_len}")
        if min(self.bf16_layers_at_start, self.bf16_layers_at_end) < 0:
            raise ValueError("--num-layers-at-start-in-bf16 / --num-layers-at-end-in-bf16 must be >= 0")
        if self.recipe == "delayed" and (self.bf16_layers_at_start or self.bf16_layers_at_end):
            raise ValueError("--first-last-layers-bf16 needs --fp8-recipe tensorwise or blockwise "
                             "(Transformer Engine's delayed scaling runs every layer of a block in one FP8 region)")

    def describe(self) -> str:
        bf16 = (f", bf16 layers {self.bf16_layers_at_start} first/{self.bf16_layers_at_end} last"
                if self.bf16_layers_at_start or self.bf16_layers_at_end else "")
        history = f" (amax history {self.amax_history_len}, {self.amax_compute_algo})" if self.recipe == "delayed" else ""
        return f"{self.format}/{self.recipe}{history}{bf16}, vision {'fp8' if self.vision else 'bf16'}"

    def transformer_config(self, *, language: bool) -> dict:
        """The TransformerConfig fields of the language model (or the vision tower)."""
        fields = dict(fp8=self.format, fp8_recipe=self.recipe, fp8_amax_history_len=self.amax_history_len,
                      fp8_amax_compute_algo=self.amax_compute_algo)
        if language and (self.bf16_layers_at_start or self.bf16_layers_at_end):
            fields.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=self.bf16_layers_at_start,
                          num_layers_at_end_in_bf16=self.bf16_layers_at_end)
        return fields


@dataclass(frozen=True)
class KernelPlan:
    """Which kernel fills each slot, for one run. Every field is a short name:

    spec               "te" (Transformer Engine layers) or "local" (torch-native layers)
    attention          packed-attention kernel: "te", "flash_attn", "varlen" or "sdpa"
    rope               "te-fused" (TE's THD kernel), "compiled" (one torch.compile kernel in the
                       core attention) or "eager"
    swiglu             the language MLP's activation: "compiled" (mcore's fused bias-SwiGLU) or "eager"
    vision_activation  CLIP's quick_gelu: "compiled" (mcore's) or "eager"
    wgrad_fusion       weight gradients accumulated into the fp32 main-grad buffer inside the GEMM by
                       mcore's linear layers: "off", "apex" or "torch" (engine.model.fusions)
    cross_entropy      "unfused", "native" (mcore's compiled vocab-parallel kernel) or "te"
    optimizer          the Adam kernel inside mcore's optimizer: "te-fused", "apex-fused" or
                       "torch-fused" (torch's single fused kernel instead of mcore's foreach fallback)
    grad_norm          "multi-tensor" (apex/TE), "mcore-local" (per-tensor fp32 norms) or "fp64"
                       (CPU: sums of squares in float64, engine.patches)
    device             "cuda" or "cpu"
    fp8                None (bf16/fp32 GEMMs) or the FP8 settings (Transformer Engine layers only)
    """

    spec: str
    attention: str
    rope: str
    swiglu: str
    vision_activation: str
    wgrad_fusion: str
    cross_entropy: str
    optimizer: str
    grad_norm: str
    device: str
    fp8: Fp8Plan | None = None

    @property
    def uses_te(self) -> bool:
        return self.spec == "te"

    def describe(self) -> str:
        return (f"kernels: {self.spec} spec, attention {self.attention}, rope {self.rope}, "
                f"swiglu {self.swiglu}, vision-activation {self.vision_activation}, "
                f"wgrad-fusion {self.wgrad_fusion}, cross-entropy {self.cross_entropy}, "
                f"optimizer {self.optimizer}, grad-norm {self.grad_norm}, "
                f"fp8 {self.fp8.describe() if self.fp8 else 'off'}, on {self.device}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KernelPlan:
        fp8 = d.get("fp8")
        return cls(**{**d, "fp8": Fp8Plan(**fp8) if fp8 else None})


def plan_kernels(*, attention_backend: str = "auto", half_precision: bool = False,
                 gradient_accumulation_fusion: bool = False, cross_entropy_loss_fusion: bool = False,
                 fp8: Fp8Plan | None = None, platform: PlatformInfo | None = None) -> KernelPlan:
    """The kernel plan for this process's platform and these flags (raises ValueError naming the
    flag when a requested kernel cannot run here)."""
    info = platform or setup_platform()
    cuda = info.device == "cuda"
    attention = _attention_backend(attention_backend, info, half_precision)
    te = attention == "te"
    if fp8 is not None:
        if info.fp8_unsupported:
            raise ValueError(f"--fp8-format needs FP8 tensor cores and Transformer Engine: {info.fp8_unsupported}")
        if not te:
            raise ValueError(f"--fp8-format runs on the Transformer Engine layers; --attention-backend "
                             f"{attention_backend} chose {attention!r} (use auto or te)")
        if not half_precision:
            raise ValueError("--fp8-format needs --bf16 (FP8 GEMMs with bf16 activations and fp32 main weights)")
    plan = KernelPlan(
        spec="te" if te else "local",
        attention=attention,
        rope="te-fused" if te else ("compiled" if cuda else "eager"),
        swiglu="compiled" if cuda else "eager",  # compiling costs ~20 s per CPU process for no gain
        vision_activation="compiled" if cuda else "eager",
        wgrad_fusion=_wgrad_fusion(gradient_accumulation_fusion),
        cross_entropy=("te" if te else "native") if cross_entropy_loss_fusion else "unfused",
        optimizer=_optimizer_kernel(),
        grad_norm=_grad_norm_kernel(cuda),
        device=info.device,
        fp8=fp8,
    )
    if plan not in _LOGGED:
        _LOGGED.add(plan)
        log.info("%s", plan.describe())
    return plan


_LOGGED: set[KernelPlan] = set()


def _attention_backend(requested: str, info: PlatformInfo, half_precision: bool) -> str:
    """`requested`, checked against the platform, or the fastest available for "auto"."""
    device, has_te, has_flash_attn = info.device, info.has_te, info.has_flash_attn
    if requested == "auto":
        if has_te:
            return "te"
        if device == "cuda" and half_precision:
            return "flash_attn" if has_flash_attn else "varlen"
        return "sdpa"
    if requested not in BACKENDS:
        raise ValueError(f"--attention-backend: unknown backend {requested!r}; choose from auto, {', '.join(BACKENDS)}")
    if requested == "te" and not has_te:
        raise ValueError("--attention-backend te needs transformer_engine (pip install .[te])")
    if requested in ("varlen", "flash_attn") and device != "cuda":
        raise ValueError(f"--attention-backend {requested} needs CUDA; use 'sdpa' on CPU")
    if requested == "flash_attn" and not has_flash_attn:
        raise ValueError("--attention-backend flash_attn needs the flash-attn package")
    if requested in ("varlen", "flash_attn") and not half_precision:
        raise ValueError(f"--attention-backend {requested} runs in bf16/fp16 only; train with --bf16 or use 'sdpa'")
    return requested


def _wgrad_fusion(requested: bool) -> str:
    if not requested:
        return "off"
    from megatron.core.tensor_parallel import layers

    from engine import patches

    # mcore imports apex's extension itself when it is installed; ours is installed by the model.
    return "apex" if layers._grad_accum_fusion_available and not patches.installed("wgrad-fusion") else "torch"


def _optimizer_kernel() -> str:
    """mcore picks TE's FusedAdam, else apex's, else torch's AdamW (which we run fused)."""
    import megatron.core.optimizer as mcore_optimizer

    if mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        return "torch-fused"
    return "te-fused" if mcore_optimizer.Adam.__module__.startswith("transformer_engine") else "apex-fused"


def _grad_norm_kernel(cuda: bool) -> str:
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    from engine import patches

    if not cuda:
        return "fp64"
    if patches.original(clip_grads, "l2_norm_impl") is mcore_utils.local_multi_tensor_l2_norm:
        return "mcore-local"
    return "multi-tensor"


# ----------------------------------------------------------------------------- layer specs


class TorchNorm:
    """torch LayerNorm / RMSNorm (per `config.normalization`) that also works with sequence
    parallelism: its parameters are marked so megatron-core's `finalize_model_grads` sums their
    gradients over the tensor-parallel group (each rank saw only its slice of the sequence)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def vision_activation(kernels: KernelPlan):
    """CLIP's quick_gelu: megatron-core's torch.compile-fused version, or eager (the plan's
    `vision_activation`)."""
    if kernels.vision_activation == "compiled":
        from megatron.core.activations import quick_gelu

        return quick_gelu
    return _quick_gelu


def _local_layer(mask: AttnMaskType, backend: str, rope: str | None) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(module=PackedCoreAttention,
                                                params={"backend": backend, "rope": rope}),
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm,
            mlp=partial(MLP.as_mlp_submodule, submodules=projector_submodules()),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def language_block_spec(config: TransformerConfig, kernels: KernelPlan) -> TransformerBlockSubmodules:
    """Causal LLaMA layers of this pipeline stage plus the final RMSNorm."""
    n = get_num_layers_to_build(config)
    if kernels.uses_te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return TransformerBlockSubmodules(layer_specs=[get_gpt_layer_with_transformer_engine_spec()] * n,
                                          layer_norm=TENorm)
    layer = _local_layer(AttnMaskType.causal, kernels.attention, kernels.rope)
    return TransformerBlockSubmodules(layer_specs=[layer] * n,
                                      layer_norm=TorchNorm)


def vision_block_spec(config: TransformerConfig, kernels: KernelPlan) -> TransformerBlockSubmodules:
    """All CLIP layers of the checkpoint (bidirectional, dense); no final norm."""
    if kernels.uses_te:
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        layer = get_vit_layer_with_transformer_engine_spec()
    else:
        # 577 tokens per image, one image per batch row: plain SDPA is the right kernel everywhere.
        layer = _local_layer(AttnMaskType.no_mask, "sdpa", rope=None)
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=None)


def projector_submodules() -> MLPSubmodules:
    """Column- then row-parallel linear: also the MLP of every torch-native layer."""
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
