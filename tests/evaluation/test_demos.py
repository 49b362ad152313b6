"""Demonstration choice: RICES order, exclusion and feature cache; random demos per question id."""

import torch

from _eval_layouts import write_okvqa
from _scripted import ScriptedGenerator
from engine.evaluation import rices
from engine.evaluation.demos import demos_for, random_selection, rices_selection
from engine.evaluation.items import Item
from engine.evaluation.sharding import World, merge_shards, shard_indices
from engine.evaluation.vqa_readers import read_okvqa


def _items(n, prefix="p"):
    return [Item(f"{prefix}{i}", "q", None, f"{prefix}img{i}", ("a",)) for i in range(n)]


def test_rices_order_most_similar_last():
    pool = _items(4)
    pf = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    q = Item("q0", "q", None, "qimg", ("a",))
    qf = torch.tensor([[2.0, 0.2]])  # cosine: p0 .995, p2 .774, p1 .099, p3 -.995 (scale does not matter)
    (sel,) = rices_selection(qf, pf, [q], pool, 3)
    assert sel == [0, 2, 1]
    assert [d.id for d in demos_for(sel, pool, 2)] == ["p2", "p0"]  # most similar next to the query
    assert [d.id for d in demos_for(sel, pool, 1)] == ["p0"]


def test_rices_never_the_query_itself():
    pool = _items(3)
    feats = torch.eye(3)
    # the query is pool item 1 (same source): its own entry is the most similar but excluded
    (sel,) = rices_selection(feats[1:2], feats + 0.01, [pool[1]], pool, 3, same_source=True)
    assert 1 not in sel and len(sel) == 2
    # the same picture under another id is excluded too
    twin = Item("other", "q", None, "pimg2", ("a",))
    (sel,) = rices_selection(feats[2:3], feats, [twin], pool, 2)
    assert 2 not in sel


def test_random_demos_per_question_and_nested():
    pool = _items(20)
    q = Item("q7", "q", None, "qimg", ("a",))
    a = random_selection(q, pool, 8, seed=3, benchmark="okvqa")
    assert a == random_selection(q, list(pool), 8, seed=3, benchmark="okvqa")
    assert a != random_selection(q, pool, 8, seed=4, benchmark="okvqa")
    assert len(set(a)) == 8
    assert demos_for(a, pool, 4) == list(reversed([pool[j] for j in a[:4]]))  # 4-shot uses 8-shot's first 4
    same = Item("p5", "q", None, "pimg5", ("a",))
    assert all(5 not in random_selection(same, pool, 19, seed=s, benchmark="b", same_source=True) for s in range(5))


def test_random_demos_independent_of_world_size():
    pool = _items(30)
    queries = _items(11, "q")
    single = [random_selection(q, pool, 4, seed=0, benchmark="textvqa") for q in queries]
    for world_size in (2, 3, 4):
        per_rank = [[random_selection(queries[i], pool, 4, seed=0, benchmark="textvqa")
                     for i in shard_indices(len(queries), r, world_size)] for r in range(world_size)]
        assert merge_shards(per_rank) == single


def test_rices_cache_keyed_and_reused(tmp_path):
    items = read_okvqa(write_okvqa(tmp_path / "okvqa"), "val")
    gen = ScriptedGenerator()
    calls = []

    def encode(images):
        calls.append(len(images))
        return gen.image_features(images)

    kw = dict(benchmark="okvqa", split="val", encoder_id="clip:a", cache_dir=tmp_path / "cache")
    f1 = rices.features(items, encode, **kw)
    assert f1.shape == (3, 16) and calls == [3]
    f2 = rices.features(items, encode, **kw)
    assert torch.equal(f1, f2) and calls == [3]  # from the cache
    rices.features(items, encode, **{**kw, "encoder_id": "clip:b"})
    rices.features(items[:2], encode, **kw)
    rices.features(items, encode, **{**kw, "split": "train"})
    assert calls == [3, 3, 2, 3]  # another encoder, image list or split: computed again
    assert len(list((tmp_path / "cache").glob("rices_okvqa_*.pt"))) == 4
    keys = {rices.cache_key("okvqa", "val", "e", ["a", "b"]), rices.cache_key("okvqa", "val", "e", ["b", "a"]),
            rices.cache_key("textvqa", "val", "e", ["a", "b"])}
    assert len(keys) == 3


def test_sharding_roundtrip():
    for n in range(0, 12):
        for w in range(1, 5):
            parts = [shard_indices(n, r, w) for r in range(w)]
            assert sorted(sum(parts, [])) == list(range(n))
            assert merge_shards(parts) == list(range(n))
    assert World(0, 1).merge(["x", "y"]) == ["x", "y"]


def test_clip_encoder_directory(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from _eval_layouts import photo

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    enc = rices.ClipEncoder(tmp_path / "clip")
    feats = enc([photo(0), photo(1), photo(0)])
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    assert torch.allclose(feats[0], feats[2]) and not torch.allclose(feats[0], feats[1])
    assert enc.encoder_id.startswith("clip:") and str((tmp_path / "clip").resolve()) in enc.encoder_id
