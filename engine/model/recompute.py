"""Activation recompute of the language model: Megatron's four flags, checked against our layers.

Recompute trades compute for memory: a recomputed part keeps only its input through the forward
pass and runs again during the backward pass to rebuild what the gradients need.

  --recompute-granularity full       whole transformer layers; which ones is --recompute-method:
      --recompute-method uniform     every layer of the stage, in chunks of --recompute-num-layers
                                     layers (only each chunk's input is kept); 1 = each layer alone
      --recompute-method block       only the first --recompute-num-layers layers of each pipeline
                                     stage; the others keep their activations (faster, more memory)
  --recompute-granularity selective  parts of every layer, named by --recompute-modules:
      core_attn                      the packed attention kernel (its softmax statistics, and with
                                     the torch-native spec the RoPE'd query/key)
      mlp                            the SwiGLU MLP (its 2 x ffn-wide intermediate activations)
      layernorm                      the two RMSNorms of a layer (torch-native spec only: Transformer
                                     Engine fuses each norm into the linear after it, so there is
                                     no norm output to drop)

megatron-core 0.19.2 accepts more module names (moe, moe_act, shared_experts, mla_up_proj,
gdn_norm_out); they name layers LLaVA's LLaMA does not have, and are refused here with a
ConfigError rather than silently doing nothing. `Recompute` holds one setting, checked when it is
built (the flags) and against the kernel plan's layer spec (`check_spec`); `transformer_config`
gives the TransformerConfig fields. The vision tower and the projector are never recomputed (the
tower is frozen and runs without gradients by default; the projector is one small MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")
# selective module -> the layer specs ("local", "te") on which it recomputes something
MODULES = {"core_attn": ("local", "te"), "mlp": ("local", "te"), "layernorm": ("local",)}
# megatron-core's other module names, and the layer each needs
FOREIGN_MODULES = {"moe": "mixture-of-experts layers", "moe_act": "mixture-of-experts layers",
                   "shared_experts": "mixture-of-experts shared experts",
                   "mla_up_proj": "multi-latent attention", "gdn_norm_out": "gated delta-net attention"}
SPEC_NAMES = {"local": "the torch-native layer spec", "te": "the Transformer Engine layer spec"}


@dataclass(frozen=True)
class Recompute:
    """One activation-recompute setting. `method` and `num_layers` belong to full recompute
    (default: uniform, 1 = every layer on its own, Megatron's usual full recompute); `modules` to
    selective (default: core_attn, as megatron-core)."""

    granularity: str
    method: str | None = None
    num_layers: int | None = None
    modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"--recompute-granularity {self.granularity!r}: choose from {', '.join(GRANULARITIES)}")
        if self.granularity == "full":
            self._check_full()
        else:
            self._check_selective()

    def _check_full(self) -> None:
        if self.modules:
            raise ConfigError("--recompute-modules selects parts of a layer: it needs "
                              "--recompute-granularity selective (full recomputes whole layers)")
        if self.method is None:
            object.__setattr__(self, "method", "uniform")
        if self.method not in METHODS:
            raise ConfigError(f"--recompute-method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", 1)
        if self.num_layers < 1:
            raise ConfigError(f"--recompute-num-layers must be >= 1, got {self.num_layers}")

    def _check_selective(self) -> None:
        if self.method is not None or self.num_layers is not None:
            raise ConfigError("--recompute-method and --recompute-num-layers choose whole layers: they need "
                              "--recompute-granularity full (selective recomputes --recompute-modules of every layer)")
        modules = tuple(self.modules) or ("core_attn",)
        for name in modules:
            if name in FOREIGN_MODULES:
                raise ConfigError(f"--recompute-modules {name}: recomputes {FOREIGN_MODULES[name]}, which "
                                  f"LLaVA's language model does not have; choose from {', '.join(MODULES)}")
            if name not in MODULES:
                raise ConfigError(f"--recompute-modules {name!r}: choose from {', '.join(MODULES)}")
        if len(set(modules)) != len(modules):
            raise ConfigError(f"--recompute-modules {' '.join(modules)}: a module is named twice")
        object.__setattr__(self, "modules", modules)

    @classmethod
    def from_flags(cls, granularity: str | None, method: str | None = None, num_layers: int | None = None,
                   modules=None) -> Recompute | None:
        """The setting of the four flags; None when --recompute-granularity is not given (then
        the other three must not be either)."""
        if granularity is None:
            given = [flag for flag, value in (("--recompute-method", method), ("--recompute-num-layers", num_layers),
                                              ("--recompute-modules", modules)) if value]
            if given:
                raise ConfigError(f"{', '.join(given)} without --recompute-granularity: say full or selective")
            return None
        return cls(granularity, method, num_layers, tuple(modules or ()))

    def check_layers(self, layers_per_stage: int) -> None:
        """--recompute-num-layers counts layers of one pipeline stage."""
        if self.granularity == "full" and self.num_layers > layers_per_stage:
            raise ConfigError(f"--recompute-num-layers {self.num_layers} exceeds the {layers_per_stage} language "
                              f"layers of each pipeline stage")

    def check_spec(self, spec: str) -> None:
        """Raise a ConfigError when a selected module recomputes nothing on this layer spec."""
        for name in self.modules:
            if spec not in MODULES[name]:
                raise ConfigError(
                    f"--recompute-modules {name} is not supported with {SPEC_NAMES[spec]}: Transformer Engine "
                    f"fuses each RMSNorm into the linear layer after it, so no norm output exists to drop; "
                    f"use {', '.join(m for m, specs in MODULES.items() if spec in specs)}, or the torch-native "
                    f"spec (--attention-backend sdpa, varlen or flash_attn)")

    def transformer_config(self) -> dict:
        """megatron-core TransformerConfig fields."""
        if self.granularity == "full":
            return dict(recompute_granularity="full", recompute_method=self.method,
                        recompute_num_layers=self.num_layers)
        return dict(recompute_granularity="selective", recompute_modules=list(self.modules))

    def describe(self) -> str:
        if self.granularity == "full":
            return f"full/{self.method}/{self.num_layers}"
        return f"selective/{'+'.join(self.modules)}"
