"""Layer specs: the one place that chooses which kernels fill each slot of a transformer layer.

Two families, picked by the attention backend chosen in `engine.model.attention`:
  - "te": Transformer Engine layers (fused LayerNorm+Linear, TE attention with THD packing,
    fused RoPE), megatron-core's own TE specs.
  - torch-native ("sdpa", "varlen", "flash_attn"): megatron-core's tensor-parallel linears,
    torch norms, and `PackedCoreAttention`. RMSNorm is torch's fused kernel; SwiGLU is fused
    by megatron-core through torch.compile when `bias_activation_fusion` is set (CUDA only, see
    `engine.model.llava.language_transformer_config`).

The language model and the vision tower each get a whole *block* spec (layers + final norm)
rather than a layer spec, because megatron-core would otherwise fill the final norm with its
`WrappedTorchNorm`, which refuses sequence parallelism.
"""

from __future__ import annotations

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

from engine.model.attention import PackedCoreAttention


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


def uses_te(backend: str) -> bool:
    return backend == "te"


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def vision_activation(cuda: bool):
    """CLIP's quick_gelu: megatron-core's torch.compile-fused version on CUDA; eager on CPU, where
    compiling costs ~20 s per process for no gain at test sizes."""
    if cuda:
        from megatron.core.activations import quick_gelu

        return quick_gelu
    return _quick_gelu


def _local_layer(mask: AttnMaskType, backend: str) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(module=PackedCoreAttention, params={"backend": backend}),
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TorchNorm,
            mlp=partial(MLP.as_mlp_submodule, submodules=projector_submodules()),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def language_block_spec(config: TransformerConfig, backend: str) -> TransformerBlockSubmodules:
    """Causal LLaMA layers of this pipeline stage plus the final RMSNorm."""
    n = get_num_layers_to_build(config)
    if uses_te(backend):
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return TransformerBlockSubmodules(layer_specs=[get_gpt_layer_with_transformer_engine_spec()] * n,
                                          layer_norm=TENorm)
    return TransformerBlockSubmodules(layer_specs=[_local_layer(AttnMaskType.causal, backend)] * n,
                                      layer_norm=TorchNorm)


def vision_block_spec(config: TransformerConfig, backend: str) -> TransformerBlockSubmodules:
    """All CLIP layers of the checkpoint (bidirectional, dense); no final norm."""
    if uses_te(backend):
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        layer = get_vit_layer_with_transformer_engine_spec()
    else:
        # 577 tokens per image, one image per batch row: plain SDPA is the right kernel everywhere.
        layer = _local_layer(AttnMaskType.no_mask, "sdpa")
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=None)


def projector_submodules() -> MLPSubmodules:
    """Column- then row-parallel linear: also the MLP of every torch-native layer."""
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
