"""engine.model.fusions on CPU: weight gradients accumulated inside the GEMM equal megatron-core's
unfused path (bf16/fp32 gradient + DDP hook add) over several micro-batches, and the fused RoPE
equals mcore's own THD RoPE, forward and backward."""

import pytest
import torch

import llava_batches as lb
from engine import patches
from engine.config import get_preset
from engine.model import fusions
from engine.model.llava import build_model
from engine.model.specs import plan_kernels

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def batch(sp):
    return lb.packed_batch(sp, CFG)


def _ddp_model(fusion: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    patches.install_cpu_training()
    torch.manual_seed(0)
    model = build_model(CFG, kernels=plan_kernels(gradient_accumulation_fusion=fusion))
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    return ddp


def _accumulated_grads(ddp, batch, micro_batches: int = 3) -> dict:
    ddp.zero_grad_buffer()
    mask = batch["loss_mask"]
    for k in range(micro_batches):
        loss = ddp(batch)
        ((loss * mask).sum() * (k + 1)).backward()  # a different gradient each time
    return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters() if p.requires_grad}


@pytest.fixture
def wgrad_patch():
    """mcore's linear layers get the torch weight-gradient GEMMs for one test only."""
    assert not patches.installed("wgrad-fusion")
    with patches.scoped("wgrad-fusion", patches.install_wgrad_accumulation):
        yield
    from megatron.core.tensor_parallel import layers

    assert not layers._grad_accum_fusion_available  # removed again: no apex here


def test_wgrad_accumulation_equals_unfused_path(mcore, batch, monkeypatch, wgrad_patch):
    assert plan_kernels(gradient_accumulation_fusion=True).wgrad_fusion == "torch"  # no apex here
    calls = []

    def counted(total_input, grad_output, main_grad):
        calls.append(tuple(main_grad.shape))
        fusions.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)

    monkeypatch.setattr(fusions.TORCH_WGRAD, "wgrad_gemm_accum_fp32", counted)
    fused, plain = _ddp_model(True), _ddp_model(False)
    linear = fused.module.language_model.decoder.layers[0].mlp.linear_fc1
    assert linear.gradient_accumulation_fusion and not plain.module.language_model.output_layer.gradient_accumulation_fusion
    g_plain = _accumulated_grads(plain, batch)
    assert not calls
    g_fused = _accumulated_grads(fused, batch)
    # every trainable linear weight (LLM layers, output layer, projector) went through it, 3 times
    linears = [n for n in g_fused if n.endswith("weight") and ("linear" in n or "output_layer" in n)]
    assert len(calls) == 3 * len(linears) and (tuple(linear.weight.shape)) in calls
    assert g_fused.keys() == g_plain.keys()
    for name in g_fused:
        assert g_plain[name].abs().sum() > 0, name
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_wgrad_accumulation_kernels_accumulate():
    x, g = torch.randn(64, 24, dtype=torch.float64), torch.randn(64, 16, dtype=torch.float64)
    start = torch.randn(16, 24, dtype=torch.float64)
    acc = start.clone()
    fusions.wgrad_gemm_accum_fp32(x, g, acc)
    torch.testing.assert_close(acc, start + g.t() @ x)
    # half-precision operands on the CPU: accumulated in the buffer's precision
    acc32 = start.float().clone()
    fusions.wgrad_gemm_accum_fp32(x.bfloat16(), g.bfloat16(), acc32)
    torch.testing.assert_close(acc32, (start + g.bfloat16().double().t() @ x.bfloat16().double()).float(),
                               rtol=1e-5, atol=1e-5)
    acc16 = start.bfloat16().clone()
    fusions.wgrad_gemm_accum_fp16(x.bfloat16(), g.bfloat16(), acc16)
    torch.testing.assert_close(acc16.double(), start.bfloat16().double() + g.bfloat16().double().t() @ x.bfloat16().double(),
                               rtol=2e-2, atol=5e-2)


def test_bare_model_without_fusion_still_trains(mcore, batch):
    """The default (no DDP wrapper, no main_grad) keeps plain .grad gradients."""
    torch.manual_seed(0)
    model = build_model(CFG)
    (model(batch) * batch["loss_mask"]).sum().backward()
    assert model.language_model.decoder.layers[0].mlp.linear_fc1.weight.grad is not None


def test_fused_rope_equals_mcore_thd_rope(mcore):
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from engine.model.llava import language_transformer_config

    config = language_transformer_config(CFG, plan_kernels())
    torch.manual_seed(1)
    lengths = [5, 11, 3]
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    d = 32
    table = RotaryEmbedding(d, rotary_percent=1.0, rotary_base=10000)(max(lengths), packed_seq=True)  # [L,1,1,d]
    q = torch.randn(19, 4, d, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(19, 2, d).requires_grad_()
    cos, sin = fusions.rope_tables(table[positions])
    q_fused, k_fused = fusions.apply_rope(q, k, cos, sin, compiled=False)
    cp = parallel_state.get_context_parallel_group()
    # mcore's own reference: THD RoPE with the [max_seqlen] table, positions restarting per document
    q_ref = apply_rotary_pos_emb(q, table, config=config, cu_seqlens=cu, cp_group=cp)
    k_ref = apply_rotary_pos_emb(k, table, config=config, cu_seqlens=cu, cp_group=cp)
    torch.testing.assert_close(q_fused, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_fused, k_ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(q_fused, q)  # it rotated something
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    fused_grads = torch.autograd.grad((q_fused * gq).sum() + (k_fused * gk).sum(), (q, k))
    ref_grads = torch.autograd.grad((q_ref * gq).sum() + (k_ref * gk).sum(), (q, k))
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
