"""Activation recompute changes memory, never results: every --recompute-* setting gives the
gradients of the run without recompute, on one process and through megatron-core's pipeline
schedule at PP=2 (and TP=2 with sequence parallelism) over gloo; and each setting that would do
nothing, or nothing we support, is refused with the flag's name."""

import pytest
import torch

import llava_batches as lb
from engine.config import get_preset
from engine.errors import ConfigError
from engine.model.recompute import Recompute
from helpers import run_distributed

TINY = get_preset("tiny")  # 4 language layers

SETTINGS = {  # name: Recompute (None: the reference, no recompute)
    "full_uniform_1": Recompute("full"),
    "full_uniform_2": Recompute("full", "uniform", 2),
    "full_block_1": Recompute("full", "block", 1),
    "selective_core_attn": Recompute("selective"),
    "selective_mlp": Recompute("selective", modules=("mlp",)),
    "selective_layernorm": Recompute("selective", modules=("layernorm",)),
    "selective_all": Recompute("selective", modules=("core_attn", "mlp", "layernorm")),
}


def _assert_same_grads(name: str, got: dict, want: dict) -> None:
    assert set(got) == set(want), name
    for key, g in want.items():
        if "layernorm" in SETTINGS[name].modules:
            # The recomputed norm's input gradient is added to the residual's in a second
            # backward call: the same terms summed in another order (float32 rounding).
            torch.testing.assert_close(got[key], g, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        else:
            assert torch.equal(got[key], g), (name, key, (got[key] - g).abs().max().item())


def _grads(model, batch) -> dict:
    loss = model(batch)
    mask = batch["loss_mask"]
    ((loss * mask).sum() / mask.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_every_setting_gives_the_same_gradients(mcore, sp):
    from engine.model.llava import build_model
    from engine.model.sharding import gather_state_dict, load_full_state_dict

    batch = lb.packed_batch(sp, TINY)
    torch.manual_seed(0)
    model = build_model(TINY, freeze_vision=False)
    weights = gather_state_dict(model)
    want = _grads(model, batch)
    for name, recompute in SETTINGS.items():
        model = build_model(TINY, recompute=recompute, freeze_vision=False)
        assert model.language_model.decoder.config.recompute_granularity == recompute.granularity
        load_full_state_dict(model, weights)
        _assert_same_grads(name, _grads(model, batch), want)


def test_selected_modules_reach_the_layers(mcore):
    from engine.model.llava import build_model

    layer = build_model(TINY, recompute=SETTINGS["selective_all"]).language_model.decoder.layers[0]
    assert layer.recompute_mlp and layer.recompute_input_layernorm and layer.recompute_pre_mlp_layernorm
    assert layer.self_attention.checkpoint_core_attention
    layer = build_model(TINY, recompute=SETTINGS["selective_mlp"]).language_model.decoder.layers[0]
    assert layer.recompute_mlp and not layer.recompute_input_layernorm
    assert not layer.self_attention.checkpoint_core_attention


@pytest.mark.parametrize("modules, words", [
    (("moe_act",), "mixture-of-experts"), (("mla_up_proj",), "multi-latent attention"),
    (("core_attn", "core_attn"), "named twice"), (("attention",), "choose from core_attn, mlp, layernorm"),
])
def test_unsupported_modules_are_refused(modules, words):
    with pytest.raises(ConfigError, match="--recompute-modules") as e:
        Recompute("selective", modules=modules)
    assert words in str(e.value)


def test_layernorm_is_refused_with_the_transformer_engine_spec():
    recompute = Recompute("selective", modules=("core_attn", "layernorm"))
    recompute.check_spec("local")
    with pytest.raises(ConfigError, match="--recompute-modules layernorm is not supported with "
                                          "the Transformer Engine layer spec"):
        recompute.check_spec("te")
    Recompute("selective", modules=("core_attn", "mlp")).check_spec("te")


def test_flag_combinations():
    assert Recompute.from_flags(None) is None
    assert Recompute.from_flags("full").transformer_config() == dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert Recompute.from_flags("selective").transformer_config() == dict(
        recompute_granularity="selective", recompute_modules=["core_attn"])
    with pytest.raises(ConfigError, match="--recompute-num-layers without --recompute-granularity"):
        Recompute.from_flags(None, num_layers=2)
    with pytest.raises(ConfigError, match="need --recompute-granularity full"):
        Recompute.from_flags("selective", method="block")
    with pytest.raises(ConfigError, match="needs --recompute-granularity selective"):
        Recompute.from_flags("full", modules=["mlp"])
    with pytest.raises(ConfigError, match="--recompute-num-layers must be >= 1"):
        Recompute.from_flags("full", "block", 0)
    with pytest.raises(ConfigError, match="exceeds the 2 language layers of each pipeline stage"):
        Recompute("full", "block", 3).check_layers(2)


# --------------------------------------------------------------------------- PP=2, TP=2 over gloo


def _schedule_grads(model, batch) -> dict:
    """One micro-batch through mcore's forward-backward schedule; this rank's gradients."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from engine.model.llava import pipeline_shape

    def forward_step(data_iterator, model):
        b = next(data_iterator)

        def loss_func(per_token):
            mask = b["loss_mask"]
            return (per_token * mask).sum() / mask.sum(), {}

        return model(b), loss_func

    seq_length, micro_batch_size = pipeline_shape(*batch["tokens"].shape)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=seq_length, micro_batch_size=micro_batch_size,
                                forward_only=False)
    if model.config.sequence_parallel:  # what finalize_model_grads does for the norms
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _layout_worker(tokenizer_model: str, tp: int, pp: int, settings: list[str]) -> dict:
    import sentencepiece
    from megatron.core import parallel_state

    from engine.model.llava import build_model
    from engine.model.sharding import gather_state_dict, load_full_state_dict
    from engine.platform import init_distributed

    batch = lb.packed_batch(sentencepiece.SentencePieceProcessor(model_file=tokenizer_model), TINY)
    init_distributed(tp, pp, seed=1234)
    model = build_model(TINY, sequence_parallel=tp > 1, freeze_vision=False)
    weights = gather_state_dict(model)
    want = _schedule_grads(model, batch)
    for name in settings:
        model = build_model(TINY, sequence_parallel=tp > 1, recompute=SETTINGS[name], freeze_vision=False)
        load_full_state_dict(model, weights)
        _assert_same_grads(name, _schedule_grads(model, batch), want)
    stages = (parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage())
    parallel_state.destroy_model_parallel()
    return {"stages": stages, "n_grads": len(want)}


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, settings", [
    (1, 2, list(SETTINGS)),
    (2, 1, ["full_uniform_1", "full_block_1", "selective_all"]),
])
def test_parallel_layouts_give_the_same_gradients(tokenizer_model, tp, pp, settings):
    if torch.cuda.is_available():
        pytest.skip("gloo CPU processes need the megatron-core CPU mode, which is off when CUDA is present")
    reports = run_distributed(_layout_worker, 2, tokenizer_model, tp, pp, settings, timeout=400)
    if pp == 2:  # both stages ran and had gradients to compare
        assert [r["stages"] for r in reports] == [(True, False), (False, True)]
    assert all(r["n_grads"] > 0 for r in reports)
