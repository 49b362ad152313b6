"""The tiny LLaVA on one CPU process: forward/backward, parity with transformers' CLIP, LLaMA and
LLaVA (same weights through engine.convert.hf), packing, freezing, invalid layouts."""

import pytest
import torch
import torch.nn.functional as F

import llava_batches as lb
from engine.config import get_preset
from engine.convert.hf import hf_to_engine
from engine.model.llava import build_model, validate_layout
from engine.model.sharding import gather_state_dict, load_full_state_dict

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def batch(sp):
    return lb.packed_batch(sp, CFG)


def _model(cfg=CFG, **kw):
    torch.manual_seed(0)
    return build_model(cfg, **kw)


def _with(model, converted: dict) -> None:
    """Load `converted` (a subset of the full names) over the model's own weights."""
    full = gather_state_dict(model)
    assert set(converted) <= set(full), set(converted) - set(full)
    full.update(converted)
    load_full_state_dict(model, full)


def test_forward_backward(mcore, batch):
    model = _model()
    loss = model(batch)
    assert loss.shape == batch["tokens"].shape and loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    mask = batch["loss_mask"]
    ((loss * mask).sum() / mask.sum()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("vision_model.") for n in trainable)  # frozen by default
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.vision_projection.encoder.linear_fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_model.parameters())


def test_frozen_vision_tower_runs_without_autograd(mcore, batch):
    model = _model()
    features = model.vision_model(batch["images"])
    assert features.shape == (2, CFG.vision.tokens_per_image, CFG.vision.hidden_size)
    assert not features.requires_grad and features.grad_fn is None
    model.freeze(vision=False, projector=True, llm=True)
    features = model.vision_model(batch["images"])
    assert features.requires_grad
    # the checkpoint's last CLIP layer and post-layernorm never run: they stay frozen
    unused = [*model.vision_model.decoder.layers[CFG.vision.num_layers_run:], model.vision_model.ln_post]
    assert all(not p.requires_grad for m in unused for p in m.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.vision_projection.parameters())


def test_vision_tower_matches_hf_clip(mcore, batch):
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    hf = CLIPVisionModel(lb.hf_vision_config(CFG)).eval()
    model = _model()
    _with(model, hf_to_engine(hf.state_dict(), CFG, layout="clip-vision"))
    with torch.no_grad():
        ref = hf(pixel_values=batch["images"], output_hidden_states=True).hidden_states[CFG.vision.select_layer]
        ours = model.vision_model(batch["images"])
    assert ours.shape == (2, 576, CFG.vision.hidden_size)
    torch.testing.assert_close(ours, ref[:, 1:], rtol=1e-5, atol=1e-5)
    # and the photographs are told apart: features differ between the two images
    assert (ours[0] - ours[1]).abs().mean() > 0.1


def _per_document_reference(hf, batch, images: bool):
    """Per-token cross-entropy of the HF model run on each document alone, flattened like the batch."""
    flat_tokens, flat_labels = batch["tokens"].reshape(-1), batch["labels"].reshape(-1)
    offsets = batch["image_offsets"].tolist()
    out = {}
    for a, b in lb.documents_of(batch):
        kw = {}
        if images:
            idx = [i for i, o in enumerate(offsets) if a <= o < b]
            kw = dict(pixel_values=batch["images"][idx]) if idx else {}
        with torch.no_grad():
            logits = hf(input_ids=flat_tokens[a:b][None], **kw).logits[0]
        out[(a, b)] = F.cross_entropy(logits.float(), flat_labels[a:b], reduction="none")
    return out


@pytest.mark.parametrize("query_groups", [None, 2], ids=["mha", "gqa"])
def test_language_model_matches_hf_llama(mcore, sp, query_groups):
    from transformers import LlamaForCausalLM

    cfg = get_preset("tiny", num_query_groups=query_groups)
    torch.manual_seed(2)
    hf = LlamaForCausalLM(lb.hf_text_config(cfg, initializer_range=0.1)).eval()
    # text-only documents (no images in the micro-batch), several per row
    docs = [[t] for t in lb.TEXTS]
    batch = lb.pack(sp, cfg, [docs[:3], docs[3:]], seq_length=64)
    model = _model(cfg)
    _with(model, hf_to_engine(hf.state_dict(), cfg, layout="llama"))
    with torch.no_grad():
        loss = model(batch).reshape(-1)
    refs = _per_document_reference(hf, batch, images=False)
    assert len(refs) == 6
    for (a, b), ref in refs.items():
        assert ref.std() > 0.3  # logits that vary, so the comparison can fail
        torch.testing.assert_close(loss[a:b], ref, rtol=1e-5, atol=2e-5)


def test_llava_matches_hf_llava(mcore, batch):
    hf = lb.hf_llava(CFG, seed=3, initializer_range=0.1)
    model = _model()
    _with(model, hf_to_engine(hf.state_dict(), CFG, layout="transformers"))
    with torch.no_grad():
        loss = model(batch).reshape(-1)
    refs = _per_document_reference(hf, batch, images=True)
    assert len(refs) == 3
    for (a, b), ref in refs.items():
        torch.testing.assert_close(loss[a:b], ref, rtol=1e-5, atol=2e-5)


def test_packed_documents_equal_documents_alone(mcore, sp, batch):
    model = _model()
    with torch.no_grad():
        packed = model(batch).reshape(-1)
        for (a, b), items in zip(lb.documents_of(batch), [lb.DOCS[0], lb.DOCS[2], lb.DOCS[1]]):
            alone = lb.pack(sp, CFG, [[items]], seq_length=b - a)
            assert torch.equal(alone["tokens"].reshape(-1), batch["tokens"].reshape(-1)[a:b])
            torch.testing.assert_close(packed[a:b], model(alone).reshape(-1), rtol=1e-5, atol=1e-5)
        # and a document boundary matters: the second document run as a continuation of the first
        # (one segment) gives a different loss
        merged = dict(batch, cu_seqlens=torch.tensor([0, 623, 720, 1342, 1440], dtype=torch.int32))
        continued = model(merged).reshape(-1)
    assert (continued[609:623] - packed[609:623]).abs().max() > 1e-3


def test_batch_without_images_still_reaches_projector(mcore, sp):
    model = _model()
    batch = lb.pack(sp, CFG, [[[lb.TEXTS[0]]]], seq_length=32)
    assert batch["images"].shape[0] == 0
    model(batch).sum().backward()
    grad = model.vision_projection.encoder.linear_fc1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_bad_batches_raise(mcore, batch):
    model = _model()
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(dict(batch, cu_seqlens=torch.tensor([0, 700, 1400], dtype=torch.int32)))
    with pytest.raises(ValueError, match="image_offsets"):
        model(dict(batch, image_offsets=batch["image_offsets"][:1]))


@pytest.mark.parametrize("tp,pp,overrides,field", [
    (3, 1, {}, "language.num_attention_heads=4"),
    (1, 3, {}, "language.num_layers=4"),
    (8, 1, {}, "language.num_attention_heads=4"),
    (2, 1, {"make_vocab_size_divisible_by": 1}, "padded_vocab_size"),
    (2, 1, {"ffn_hidden_size": 175}, "language.ffn_hidden_size=175"),
    (2, 1, {"vision_num_attention_heads": 1, "vision_hidden_size": 32}, "vision.num_attention_heads=1"),
])
def test_invalid_layouts_raise(tp, pp, overrides, field):
    cfg = get_preset("tiny", **overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("(", r"\(")):
        validate_layout(cfg, tp, pp)


def test_sequence_parallel_needs_tensor_parallel():
    with pytest.raises(ValueError, match="sequence_parallel"):
        validate_layout(CFG, 1, 1, sequence_parallel=True)
    validate_layout(get_preset("llava-1.5-7b"), 8, 4, sequence_parallel=True)  # a real layout passes


def test_world_size_must_fit_layout(mcore):
    from engine.platform import init_distributed

    with pytest.raises(ValueError, match="not divisible"):
        init_distributed(2, 1)  # one process cannot hold TP=2
