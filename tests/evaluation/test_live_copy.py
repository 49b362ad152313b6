"""The torch-native copy that the --fewshot-eval hook generates with when the live model has the
Transformer Engine spec (engine/inference/live.py). Transformer Engine does not run on the CPU, so
the copy is forced onto a torch-native live model (`always=True`): the tiny preset, the real
tokenizer, real photographs. The copy generates exactly as the live model does (the same greedy
tokens and logits, the same benchmark predictions and scores through the hook), follows the live
weights from one evaluation to the next, holds no weights between evaluations, and pairs
Transformer Engine's fused-norm names with the torch-native ones. tests/gpu/test_te_gpu.py
checks a real TE-spec model on CUDA."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from engine.config import get_preset
from engine.data.tokenizer import SentencePieceTokenizer
from engine.evaluation.during_training import add_fewshot_flags, fewshot_eval
from engine.inference import EngineGenerator, SamplingParams
from engine.inference.live import TorchNativeCopy, copy_weights
from engine.model.sharding import TE_NORM_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from generation_inputs import interleaved_requests  # noqa: E402

TINY = get_preset("tiny")
GREEDY = SamplingParams(max_new_tokens=4)


def _step(model, seed: int) -> None:
    """A stand-in for a training step: every weight moves (the norms away from 1 too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture(scope="module")
def live():
    """The live model: the tiny preset with the torch-native spec, fp32, on the CPU (TP=PP=1)."""
    from engine.inference.engine import build_inference_model, init_process_group
    from engine.platform import destroy_distributed

    if torch.cuda.is_available():
        pytest.skip("CPU suite (megatron-core CPU mode); tests/gpu/test_te_gpu.py checks the copy on CUDA")
    _, created = init_process_group(1)
    torch.manual_seed(0)
    model = build_inference_model(TINY, torch.float32, initialize=True)
    _step(model, seed=1)
    yield model
    if created:
        destroy_distributed()


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return SentencePieceTokenizer(tokenizer_model)


def _generate(model, tokenizer, requests):
    """(greedy token ids of each request, fp32 logits [n, vocab] of each prompt's last position)."""
    gen = EngineGenerator(model, TINY, tokenizer, batch_size=4)
    items, errors = gen.prepare(requests)
    assert not errors
    logits = gen.runner.prefill([p for _, _, p in items], None, None)
    results = gen.generate(requests, GREEDY)
    assert all(r.error is None for r in results)
    return [r.token_ids for r in results], logits


def test_the_copy_generates_as_the_live_model(live, tokenizer):
    requests = interleaved_requests(8)  # 0-3 photographs each
    assert TorchNativeCopy(TINY)(live) is live  # a torch-native live model needs no copy
    copier = TorchNativeCopy(TINY, always=True)
    copy = copier(live)
    assert copy is not live and not copy.kernels.uses_te
    assert not any(p.requires_grad for p in copy.parameters())
    want_tokens, want_logits = _generate(live, tokenizer, requests)
    got_tokens, got_logits = _generate(copy, tokenizer, requests)
    assert got_tokens == want_tokens and len({tuple(t) for t in want_tokens}) > 2
    assert torch.equal(got_logits, want_logits)

    copier.release()  # between evaluations the copy holds no weights
    assert all(p.numel() == 0 for p in copy.parameters())
    _step(live, seed=2)
    assert copier(live) is copy  # built once, refreshed at every evaluation
    tokens, logits = _generate(copy, tokenizer, requests)
    stepped_tokens, stepped_logits = _generate(live, tokenizer, requests)
    assert tokens == stepped_tokens and torch.equal(logits, stepped_logits)
    assert not torch.equal(logits, want_logits)
    copier.release()


class _TENamed(torch.nn.Module):
    """`inner`'s weights under Transformer Engine's names (each pre-norm fused into the next linear)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def state_dict(self, *args, keep_vars=False, **kwargs):
        fused = {local: te for te, local in TE_NORM_NAMES.items()}
        out = {}
        for name, value in self.inner.state_dict(keep_vars=keep_vars).items():
            local = next((k for k in fused if name.endswith("." + k)), None)
            out[name[: -len(local)] + fused[local] if local else name] = value
        return out


def test_te_names_pair_with_the_torch_native_ones(live):
    from engine.inference.engine import build_inference_model

    source = _TENamed(live)
    names = list(source.state_dict())
    for te, local in TE_NORM_NAMES.items():  # the biases: the vision tower's LayerNorms
        assert any(n.endswith("." + te) for n in names) and not any(n.endswith("." + local) for n in names)
    target = build_inference_model(TINY, torch.float32)
    copy_weights(source, target)
    want = live.state_dict()
    got = target.state_dict()
    tensors = [k for k, v in want.items() if torch.is_tensor(v) and not k.endswith("_extra_state")]
    assert tensors and all(torch.equal(got[k], want[k]) for k in tensors)

    class Fewer(_TENamed):  # a model without one of the weights
        def state_dict(self, *args, **kwargs):
            out = super().state_dict(*args, **kwargs)
            out.pop(next(k for k in out if k.endswith("linear_fc1.layer_norm_weight")))
            return out

    with pytest.raises(ValueError, match="pre_mlp_layernorm.weight.*only in the target"):
        copy_weights(Fewer(live), target)


class _Recorded:
    """A generator that keeps every result it returns."""

    def __init__(self, generator):
        self.generator, self.results = generator, []

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def generate(self, requests, params):
        results = self.generator.generate(requests, params)
        self.results += [(r.id, r.token_ids, r.text, r.error) for r in results]
        return results


def test_the_hook_scores_the_copy_as_the_live_model(live, tokenizer, data_root):
    p = argparse.ArgumentParser()
    add_fewshot_flags(p.add_argument_group("few-shot evaluation"))
    config = p.parse_args(["--fewshot-eval", "okvqa:0,1", "textvqa", "--fewshot-eval-interval", "5",
                           "--fewshot-eval-limit", "2", "--fewshot-eval-data-root", str(data_root)])
    copier = TorchNativeCopy(TINY, always=True)
    runs = {}
    for name, wrap in (("live", lambda m: m), ("copy", copier)):
        made = []

        def make_generator(m, wrap=wrap, made=made):
            made.append(_Recorded(EngineGenerator(wrap(m), TINY, tokenizer)))
            return made[-1]

        runs[name] = fewshot_eval(live, config, 5, make_generator=make_generator), made[0].results
    copier.release()
    (live_logs, live_results), (copy_logs, copy_results) = runs["live"], runs["copy"]
    assert len(live_results) == 2 * 2 + 2  # okvqa at 0 and 1 shots, textvqa at 0 shots
    assert all(error is None for *_, error in live_results)
    assert copy_results == live_results
    assert copy_logs.keys() == live_logs.keys() and "fewshot/okvqa/1shot" in copy_logs
    assert all(copy_logs[k] == live_logs[k] for k in live_logs)
