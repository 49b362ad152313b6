"""The kernel plan (engine.model.specs) and the patches module (engine.patches): one plan per
platform and flags, every kernel switch of the built model read from it, and patches that refuse
another megatron-core release and can be removed again."""

import pytest
import torch

from engine import patches
from engine.config import get_preset
from engine.model.llava import build_model
from engine.model.specs import KernelPlan, plan_kernels
from engine.platform import PlatformInfo

CPU = PlatformInfo(device="cpu", backend="gloo", device_name="cpu", has_te=False, has_flash_attn=False)


def _gpu(te=False, flash=False) -> PlatformInfo:
    return PlatformInfo(device="cuda", backend="nccl", device_name="NVIDIA H200", has_te=te, has_flash_attn=flash)


def test_attention_choice_follows_platform_and_precision():
    def pick(platform, half=True, requested="auto"):
        return plan_kernels(attention_backend=requested, half_precision=half, platform=platform).attention

    assert pick(CPU, half=False) == "sdpa" and pick(CPU, half=True) == "sdpa"
    assert pick(_gpu()) == "varlen"
    assert pick(_gpu(), half=False) == "sdpa"  # varlen is bf16/fp16 only
    assert pick(_gpu(flash=True)) == "flash_attn"
    assert pick(_gpu(te=True, flash=True)) == "te"
    for requested, platform, half, match in [
        ("varlen", CPU, True, "needs CUDA"),
        ("varlen", _gpu(), False, "bf16/fp16"),
        ("flash_attn", _gpu(), True, "flash-attn"),
        ("te", _gpu(), True, "transformer_engine"),
        ("xformers", _gpu(), True, "unknown backend"),
    ]:
        with pytest.raises(ValueError, match=match):
            pick(platform, half, requested)


def test_plan_fields_per_platform():
    cpu = plan_kernels(platform=CPU)
    assert (cpu.spec, cpu.rope, cpu.swiglu, cpu.vision_activation, cpu.grad_norm, cpu.device) == \
        ("local", "eager", "eager", "eager", "fp64", "cpu")
    assert cpu.wgrad_fusion == "off" and cpu.cross_entropy == "unfused"
    assert cpu.optimizer == "torch-fused"  # neither TE nor apex in this environment
    gpu = plan_kernels(half_precision=True, gradient_accumulation_fusion=True, cross_entropy_loss_fusion=True,
                       platform=_gpu())
    assert (gpu.spec, gpu.attention, gpu.rope, gpu.swiglu) == ("local", "varlen", "compiled", "compiled")
    assert (gpu.wgrad_fusion, gpu.cross_entropy) == ("torch", "native")
    te = plan_kernels(half_precision=True, cross_entropy_loss_fusion=True, platform=_gpu(te=True))
    assert (te.spec, te.attention, te.rope, te.cross_entropy) == ("te", "te", "te-fused", "te")


def test_plan_is_frozen_and_described_on_one_line():
    plan = plan_kernels(platform=CPU)
    with pytest.raises(AttributeError):
        plan.attention = "varlen"
    line = plan.describe()
    assert line.startswith("kernels: local spec, attention sdpa, rope eager") and "\n" not in line
    assert KernelPlan(**plan.as_dict()) == plan


def test_model_reads_every_switch_from_the_plan(mcore):
    cfg = get_preset("tiny")
    plan = plan_kernels(cross_entropy_loss_fusion=True)
    model = build_model(cfg, kernels=plan)
    assert model.kernels is plan
    lang = model.language_model.config
    assert lang.cross_entropy_loss_fusion and lang.cross_entropy_fusion_impl == "native"
    assert not lang.bias_activation_fusion and not lang.apply_rope_fusion and not lang.gradient_accumulation_fusion
    core = model.language_model.decoder.layers[0].self_attention.core_attention
    assert (core.backend, core.rope) == ("sdpa", "eager")
    vision_core = model.vision_model.decoder.layers[0].self_attention.core_attention
    assert vision_core.rope is None  # the vision tower never rotates
    default = build_model(cfg)
    assert default.kernels == plan_kernels() and not default.language_model.config.cross_entropy_loss_fusion


def test_patches_refuse_another_mcore_release(monkeypatch):
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(patches, "WRITTEN_FOR", "0.0.1")
    assert not patches.installed("wgrad-fusion")
    with pytest.raises(patches.PatchVersionError, match=r"'wgrad-fusion' patch was written for megatron-core 0\.0\.1"):
        patches.install_wgrad_accumulation()
    assert not patches.installed("wgrad-fusion") and not layers._grad_accum_fusion_available  # nothing replaced


def test_patch_groups_are_recorded_and_removable():
    from megatron.core.tensor_parallel import layers

    assert patches.installed("cpu-mode")  # the CPU platform installs it
    assert torch.cuda.current_device() == "cpu"
    before = layers.fused_weight_gradient_mlp_cuda if hasattr(layers, "fused_weight_gradient_mlp_cuda") else None
    with patches.scoped("wgrad-fusion", patches.install_wgrad_accumulation):
        assert layers._grad_accum_fusion_available and patches.installed("wgrad-fusion")
        assert patches.original(layers, "_grad_accum_fusion_available") is False
    assert not patches.installed("wgrad-fusion") and not layers._grad_accum_fusion_available
    assert getattr(layers, "fused_weight_gradient_mlp_cuda", None) is before


def test_fp8_needs_te_fp8_hardware_and_bf16():
    from engine.model.specs import Fp8Plan

    with pytest.raises(ValueError, match="no GPU"):
        plan_kernels(half_precision=True, fp8=Fp8Plan(), platform=CPU)
    ada_less = PlatformInfo(device="cuda", backend="nccl", device_name="NVIDIA A100", has_te=True, has_flash_attn=False,
                            fp8_unsupported="NVIDIA A100 (compute capability 8.0) has no FP8 tensor cores")
    with pytest.raises(ValueError, match="compute capability 8.0"):
        plan_kernels(half_precision=True, fp8=Fp8Plan(), platform=ada_less)
    hopper = PlatformInfo(device="cuda", backend="nccl", device_name="NVIDIA H200", has_te=True, has_flash_attn=False,
                          fp8_unsupported=None)
    with pytest.raises(ValueError, match="Transformer Engine layers"):
        plan_kernels(attention_backend="sdpa", half_precision=True, fp8=Fp8Plan(), platform=hopper)
    with pytest.raises(ValueError, match="needs --bf16"):
        plan_kernels(half_precision=False, fp8=Fp8Plan(), platform=hopper)
    plan = plan_kernels(half_precision=True, fp8=Fp8Plan(recipe="tensorwise", bf16_layers_at_start=1), platform=hopper)
    assert plan.spec == "te" and "fp8 hybrid/tensorwise, bf16 layers 1 first/0 last, vision bf16" in plan.describe()
    assert KernelPlan.from_dict(plan.as_dict()) == plan


def test_fp8_settings_are_checked_and_mapped_to_megatron_fields():
    from engine.model.specs import Fp8Plan

    for kwargs, match in [(dict(format="e5m2"), "--fp8-format"), (dict(recipe="mxfp8"), "--fp8-recipe"),
                          (dict(amax_compute_algo="mean"), "--fp8-amax-compute-algo"),
                          (dict(amax_history_len=0), "--fp8-amax-history-len"),
                          (dict(bf16_layers_at_end=1), "needs --fp8-recipe tensorwise")]:
        with pytest.raises(ValueError, match=match):
            Fp8Plan(**kwargs)
    fp8 = Fp8Plan(format="e4m3", recipe="blockwise", bf16_layers_at_start=2, bf16_layers_at_end=1)
    assert fp8.transformer_config(language=True) == dict(
        fp8="e4m3", fp8_recipe="blockwise", fp8_amax_history_len=1, fp8_amax_compute_algo="most_recent",
        first_last_layers_bf16=True, num_layers_at_start_in_bf16=2, num_layers_at_end_in_bf16=1)
    assert "first_last_layers_bf16" not in fp8.transformer_config(language=False)
