"""Generation from the model being trained (the `--fewshot-eval` hook).

Generation runs the torch-native layers: the KV cache lives in their attention
(engine.model.attention.PackedCoreAttention). A live model of that spec is generated with as it
is. A live model with the Transformer Engine spec is generated with through a copy: a
torch-native model of the same config, dtype and device, and the same tensor-parallel shard
(it is built in the run's own model-parallel groups), built once at the first evaluation and
given the live weights before every evaluation. The weights pair up under the torch-native names
the checkpoints use under either spec (`engine.model.sharding.canonical_name`), so a TE-spec
model and its copy hold the same numbers in the same layout.

Memory: while an evaluation runs the copy holds a second copy of this rank's weights (in the
training dtype); `release` frees them after it, so training runs without them.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.model.sharding import canonical_name, local_tensors, unwrap


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every weight of `source` into `target`: the same model config and tensor-parallel
    shard, either layer spec (paired by canonical name; Transformer Engine's extra state, such
    as FP8 scales, has no torch-native counterpart and is not copied)."""
    src = {canonical_name(k): v for k, v in local_tensors(unwrap(source)).items()}
    dst = {canonical_name(k): v for k, v in local_tensors(unwrap(target)).items()}
    missing, unexpected = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
    if missing or unexpected:
        raise ValueError(f"the models' weights differ: {missing[:5]} only in the target, "
                         f"{unexpected[:5]} only in the source")
    for name, t in dst.items():
        if src[name].shape != t.shape:
            raise ValueError(f"{name}: source {tuple(src[name].shape)}, target {tuple(t.shape)}")
        t.copy_(src[name])


class TorchNativeCopy:
    """`copy(live)` -> the model to generate with: `live` itself when it has the torch-native
    spec, else the torch-native copy, built at the first call and refreshed from `live` at every
    call. `always`: use the copy for a torch-native live model too (the tests check the copy so).
    `before_copy`: called before the weights are read (e.g. to finish the data-parallel weight
    all-gather that --overlap-param-gather defers to the next forward)."""

    def __init__(self, cfg, *, always: bool = False, before_copy: Callable[[], None] | None = None):
        self.cfg, self.always, self.before_copy = cfg, always, before_copy
        self.model = None
        self._shapes: list[tuple[torch.nn.Parameter, torch.Size]] = []

    def __call__(self, live: torch.nn.Module) -> torch.nn.Module:
        live = unwrap(live)
        if not (self.always or live.kernels.uses_te):
            return live
        if self.before_copy is not None:
            self.before_copy()
        if self.model is None:
            self.model = self._build(live)
        else:
            for p, shape in self._shapes:  # after `release`
                if p.shape != shape:
                    p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
        copy_weights(live, self.model)
        return self.model

    def release(self) -> None:
        """Free the copy's weights (until the next call); the module itself is kept."""
        for p, _ in self._shapes:
            p.data = p.data.new_empty(0)

    def _build(self, live: torch.nn.Module) -> torch.nn.Module:
        from engine.inference.engine import build_inference_model

        weight = next(live.language_model.parameters())
        model = build_inference_model(self.cfg, weight.dtype).requires_grad_(False)
        device = next(model.parameters()).device
        if device != weight.device:
            raise RuntimeError(f"the inference copy was built on {device}, the live model is on {weight.device}")
        self._shapes = [(p, p.shape) for p in model.parameters()]
        return model
