"""engine.convert.hf: the HF <-> engine table covers the model exactly and round-trips bit for bit."""

import pytest
import torch

import llava_batches as lb
from engine.config import get_preset
from engine.convert.hf import LAYOUTS, engine_names, engine_to_hf, hf_to_engine

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def hf_state():
    return lb.hf_llava(CFG, seed=5).state_dict()


def test_table_names_every_engine_weight(mcore):
    from engine.model.llava import build_model
    from engine.model.sharding import gather_state_dict

    names = engine_names(CFG)
    assert len(names) == len(set(names))
    assert set(names) == set(gather_state_dict(build_model(CFG)))


def test_round_trip_between_layouts(hf_state):
    engine = hf_to_engine(hf_state, CFG, layout="transformers")
    hub = engine_to_hf(engine, CFG, layout="llava-hf")
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in hub
    assert "vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias" in hub
    assert "multi_modal_projector.linear_2.weight" in hub and "language_model.lm_head.weight" in hub
    again = hf_to_engine(hub, CFG, layout="llava-hf")
    assert engine.keys() == again.keys() and all(torch.equal(engine[k], again[k]) for k in engine)
    back = engine_to_hf(again, CFG, layout="transformers")
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_fused_qkv_is_megatron_grouped_layout():
    cfg = get_preset("tiny", num_query_groups=2)  # 4 heads of 16, 2 groups
    hd, h = cfg.language.head_dim, cfg.language.hidden_size
    p = "model.layers.0.self_attn."
    # row r of each projection holds the value r, offset per projection
    hf = {p + "q_proj.weight": torch.arange(4 * hd)[:, None].expand(-1, h).float(),
          p + "k_proj.weight": 1000 + torch.arange(2 * hd)[:, None].expand(-1, h).float(),
          p + "v_proj.weight": 2000 + torch.arange(2 * hd)[:, None].expand(-1, h).float()}
    qkv = hf_to_engine({**_llama_state(cfg), **hf}, cfg, layout="llama")["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    rows = qkv[:, 0].long().tolist()
    q, k, v = list(range(4 * hd)), [1000 + r for r in range(2 * hd)], [2000 + r for r in range(2 * hd)]
    expected = (q[: 2 * hd] + k[:hd] + v[:hd]) + (q[2 * hd:] + k[hd:] + v[hd:])  # group 0, then group 1
    assert rows == expected


def _llama_state(cfg):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        names = LlamaForCausalLM(lb.hf_text_config(cfg)).state_dict()
    return {k: torch.zeros(v.shape) for k, v in names.items()}


def test_vocabulary_rows_padded_and_cut():
    cfg = CFG
    state = _llama_state(cfg)
    state["model.embed_tokens.weight"] = torch.randn(cfg.language.vocab_size, cfg.language.hidden_size)
    state["lm_head.weight"] = torch.randn(cfg.language.vocab_size, cfg.language.hidden_size)
    engine = hf_to_engine(state, cfg, layout="llama")
    emb = engine["language_model.embedding.word_embeddings.weight"]
    assert emb.shape[0] == cfg.language.padded_vocab_size == 32064
    assert torch.equal(emb[:32001], state["model.embed_tokens.weight"]) and not emb[32001:].any()
    out = engine_to_hf(engine, cfg, layout="llama", hf_vocab_size=32001)
    assert torch.equal(out["lm_head.weight"], state["lm_head.weight"])


def test_missing_and_unknown_weights_are_named(hf_state):
    broken = dict(hf_state)
    del broken["model.language_model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj"):
        hf_to_engine(broken, CFG, layout="transformers")
    extra = dict(hf_state, **{"model.language_model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="layers.9"):
        hf_to_engine(extra, CFG, layout="transformers")
    with pytest.raises(ValueError, match="no projector"):
        hf_to_engine(hf_state, CFG, layout="llama", parts=["projector"])
    assert set(LAYOUTS) >= {"llava-hf", "transformers", "clip-vision", "llama"}
