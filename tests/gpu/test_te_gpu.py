"""The Transformer Engine path on CUDA: checkpoints move between the TE and torch-native layer
specs, a TE-spec checkpoint exports to Hugging Face and back, the torch-native copy that
--fewshot-eval generates with matches the TE model, and FP8 (delayed and current scaling) trains,
keeps its scaling state in checkpoints, and stays close to bf16. Skipped without Transformer
Engine."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava_batches as lb
from engine.config import get_preset
from engine.model.llava import build_model
from engine.model.specs import Fp8Plan, plan_kernels
from engine.platform import setup_platform

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not setup_platform().has_te, reason="Transformer Engine not installed")]
TINY = get_preset("tiny")
REPO = Path(__file__).resolve().parents[2]


def _cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) and k != "cu_seqlens" else v for k, v in batch.items()}


def _loss(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).float()


def _save(model, root: Path) -> None:
    from engine.training.saver import Saver

    Saver(root, log=lambda *_: None).save(0, model, None, None, 0, TINY)


def _load(model, root: Path) -> None:
    from engine.training.checkpoint import load_pretrained

    load_pretrained(root, model, None, TINY, log=lambda *_: None)


@pytest.mark.parametrize("saved,loaded", [("te", "sdpa"), ("sdpa", "te")])
def test_checkpoint_loads_under_the_other_spec(mcore_cuda, sp, tmp_path, saved, loaded):
    batch = _cuda(lb.packed_batch(sp, TINY))
    torch.manual_seed(0)
    source = build_model(TINY, kernels=plan_kernels(attention_backend=saved)).eval()
    _save(source, tmp_path / "ckpt")
    target = build_model(TINY, kernels=plan_kernels(attention_backend=loaded)).eval()
    before = _loss(target, batch)
    _load(target, tmp_path / "ckpt")
    want, got = _loss(source, batch), _loss(target, batch)
    assert (before - want).abs().max() > 1e-2  # the target started elsewhere
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_te_checkpoint_exports_to_hugging_face_and_back(mcore_cuda, sp, tmp_path, tokenizer_model):
    torch.manual_seed(0)
    model = build_model(TINY, kernels=plan_kernels(attention_backend="te")).eval()
    _save(model, tmp_path / "te")
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    subprocess.run(tool + ["export", "--source", str(tmp_path / "te"), "--target", str(tmp_path / "hf"),
                           "--tokenizer", tokenizer_model, "--dtype", "fp32", "--verify"], check=True, cwd=REPO)
    subprocess.run(tool + ["import", "--from", "llava-hf", "--source", str(tmp_path / "hf"),
                           "--target", str(tmp_path / "back"), "--tp", "1", "--pp", "1", "--dtype", "fp32"], check=True,
                   cwd=REPO)
    back = build_model(TINY, kernels=plan_kernels(attention_backend="te")).eval()
    _load(back, tmp_path / "back")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        if torch.is_tensor(a) and not name.endswith("_extra_state"):
            assert torch.equal(a, b), name


def _greedy_agrees(model, prompt, tokens: list[int], banned: torch.Tensor) -> int:
    """How many of `tokens` (a greedy continuation of `prompt`) `model`'s own forward picks too, one
    whole forward per token, until a near tie (either token is then right). Asserts the agreement
    up to there."""
    from engine.convert.verify import engine_batch, engine_logits

    ids = prompt.ids
    for i, token in enumerate(tokens):
        logits = engine_logits(model, engine_batch(ids[None], prompt.pixels, prompt.offsets))[-1]
        logits[banned] = float("-inf")
        top = logits.topk(2)
        if top.values[0] - top.values[1] < 1e-3:
            return i
        assert token == int(top.indices[0]), (i, token, top)
        ids = torch.cat([ids, torch.tensor([token])])
    return len(tokens)


def _check_copy(live, copier, tokenizer_model: str) -> None:
    """`copier(live)` (a TorchNativeCopy) gives a model whose logits are `live`'s own forward's,
    whose greedy tokens `live` picks too, and whose weights `copier.release()` frees."""
    from engine.convert.verify import engine_batch, engine_logits
    from engine.data.tokenizer import SentencePieceTokenizer
    from engine.inference import EngineGenerator, SamplingParams

    sys.path.insert(0, str(REPO / "tests" / "inference"))
    from generation_inputs import interleaved_requests

    with torch.no_grad():  # a trained model's norms are not all ones: their fused names must pair up
        for p in live.parameters():
            p.add_(0.02 * torch.randn_like(p))
    native = copier(live)
    assert native is not live and not native.kernels.uses_te
    gen = EngineGenerator(native, TINY, SentencePieceTokenizer(tokenizer_model), batch_size=4)
    requests = interleaved_requests(6)
    items, errors = gen.prepare(requests)
    assert not errors
    prompts = [p for _, _, p in items]
    prefill = gen.runner.prefill(prompts, None, None)
    results = gen.generate(requests, SamplingParams(max_new_tokens=4))
    agreed = 0
    for prompt, first, result in zip(prompts, prefill, results):
        batch = engine_batch(prompt.ids[None], prompt.pixels, prompt.offsets)
        want = engine_logits(live, batch)
        torch.testing.assert_close(engine_logits(native, batch), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(first, want[-1], rtol=1e-4, atol=1e-4)
        assert result.error is None and result.token_ids
        agreed += _greedy_agrees(live, prompt, list(result.token_ids), gen.banned)
    assert agreed >= 2 * len(results), agreed

    weights = sum(p.numel() * p.element_size() for p in native.parameters())
    del gen
    before = torch.cuda.memory_allocated()
    copier.release()
    assert before - torch.cuda.memory_allocated() >= weights
    assert copier(live) is native  # the next evaluation: the same module, the weights again
    torch.testing.assert_close(engine_logits(native, batch), want, rtol=1e-4, atol=1e-4)
    copier.release()


def test_fewshot_eval_copy_matches_the_te_model(mcore_cuda, tokenizer_model):
    """--fewshot-eval under the TE spec generates with a torch-native copy of the live model
    (engine/inference/live.py): its logits are the TE model's own forward's, its greedy tokens the
    TE model's, and its weights are freed after the evaluation."""
    from engine.inference.live import TorchNativeCopy

    torch.manual_seed(0)
    te = build_model(TINY, kernels=plan_kernels(attention_backend="te")).eval()
    assert te.kernels.uses_te
    _check_copy(te, TorchNativeCopy(TINY), tokenizer_model)


def _bench_model(kernels):
    torch.manual_seed(0)
    cfg = get_preset("llava-7b-bench", num_layers=2)
    return cfg, build_model(cfg, params_dtype=torch.bfloat16, bf16=True, kernels=kernels)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_trains_close_to_bf16_and_checkpoints_its_scales(mcore_cuda, tmp_path, recipe):
    from test_model_gpu import _bench_batch

    fp8 = Fp8Plan(recipe=recipe)
    cfg, bf16_model = _bench_model(plan_kernels(attention_backend="te", half_precision=True))
    _, fp8_model = _bench_model(plan_kernels(attention_backend="te", half_precision=True, fp8=fp8))
    fp8_model.load_state_dict(bf16_model.state_dict(), strict=False)
    batch = _cuda(_bench_batch(cfg))
    mask = batch["loss_mask"].bool()
    for _ in range(3):  # the delayed recipe's scales come from the amax of earlier steps
        loss = fp8_model(batch)
        loss[mask].mean().backward()
    ref = _loss(bf16_model, batch)[mask].mean()
    got = _loss(fp8_model, batch)[mask].mean()
    print(f"fp8 {recipe}: loss {got.item():.5f} vs bf16 {ref.item():.5f}")
    assert torch.isfinite(got) and abs(got - ref) / ref < 0.02
    for name, p in fp8_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name

    from megatron.core import dist_checkpointing

    dist_checkpointing.save({"model": fp8_model.sharded_state_dict()}, str(tmp_path))
    _, restored = _bench_model(plan_kernels(attention_backend="te", half_precision=True, fp8=fp8))
    from engine.training.checkpoint import trusted_te_extra_state

    loaded = dist_checkpointing.load({"model": restored.sharded_state_dict()}, str(tmp_path))
    with trusted_te_extra_state():
        restored.load_state_dict(loaded["model"])
    qkv, qkv_back = (m.language_model.decoder.layers[0].self_attention.linear_qkv for m in (fp8_model, restored))
    if recipe == "delayed":  # the amax history and scales are module state, saved as extra state
        meta, meta_back = qkv.fp8_meta["scaling_fwd"], qkv_back.fp8_meta["scaling_fwd"]
        assert meta.amax_history.abs().sum() > 0
        torch.testing.assert_close(meta_back.amax_history, meta.amax_history)
        torch.testing.assert_close(meta_back.scale, meta.scale)
    torch.testing.assert_close(_loss(restored, batch), _loss(fp8_model, batch))


def test_fp8_vision_changes_the_projected_features_little(mcore_cuda):
    cfg = get_preset("llava-7b-bench", num_layers=2)
    photos = [lb.clip_pixels(p) for p in lb.photos()]
    pics = torch.stack([photos[i % len(photos)] for i in range(5)]).cuda()  # 5: not a multiple of 8
    outs = {}
    for vision in (False, True):
        torch.manual_seed(0)
        kernels = plan_kernels(attention_backend="te", half_precision=True, fp8=Fp8Plan(recipe="tensorwise", vision=vision))
        model = build_model(cfg, params_dtype=torch.bfloat16, bf16=True, kernels=kernels).eval()
        with torch.no_grad():
            outs[vision] = model.vision_projection(model.vision_model(pics.to(torch.bfloat16))).float()
    a, b = outs[False], outs[True]
    assert a.shape == b.shape == (5, cfg.vision.tokens_per_image, cfg.language.hidden_size)
    rel = ((b - a).norm() / a.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()
    print(f"fp8 vision: projected features relative error {rel:.4f}, min cosine {cos:.5f}")
    assert 0 < rel < 0.1 and cos > 0.99
