"""Per-source accounting from the indices, and a blend changed on resume: every source continues
after the samples it has given, none is served twice."""

import numpy as np
import pytest

from engine.data.dataset import BlendedDataset, DataBlend, DataSplit, PackedDataset, build_datasets
from engine.data.packing import PackingConfig
from engine.data.sources import BlendOrigin, SourceCounter, consumed_per_source, plan_origin, sample_stats
from engine.data.tokenizer import build_tokenizer
from tests.data.test_dataset import prose, random_documents, write_corpus


@pytest.fixture(scope="module")
def two(tmp_path_factory, tokenizer_model):
    tok = build_tokenizer("sentencepiece", tokenizer_model)
    root = tmp_path_factory.mktemp("sources")
    write_corpus(root / "mm", tok, random_documents(np.random.default_rng(7), 16))
    write_corpus(root / "text", tok, [[s] for s in prose()[:30]])  # text only
    return str(root / "mm"), str(root / "text"), root


@pytest.mark.parametrize("loss_policy", ["after-first-image", "all"])
def test_stats_from_the_index_equal_the_samples(two, loss_policy):
    mm, _, root = two
    ds = PackedDataset(mm, PackingConfig(seq_length=1024, tokens_per_image=8, seed=1, loss_policy=loss_policy),
                       split_weights="1", cache_dir=root / "cache")
    samples = [ds[k] for k in range(len(ds))]
    images = sum(len(s["images"]) for s in samples)
    loss_tokens = sum(int(s["loss_mask"].sum()) for s in samples)
    positions = int(ds.index.sample_lengths.sum())  # the LLM positions the segments fill
    assert sample_stats(ds, 0, len(ds)).tolist() == [images, positions, loss_tokens]
    assert (sample_stats(ds, 0, 3) + sample_stats(ds, 3, len(ds))).tolist() == sample_stats(ds, 0, len(ds)).tolist()


def _train(blend, root, n, origin=None):
    config = PackingConfig(seq_length=1024, tokens_per_image=8, seed=1)
    return build_datasets(blend, config, split=DataSplit.parse("1,0,0"), num_samples=(n, 0, 0),
                          cache_dir=root / "cache", train_origin=origin)[0]


def _served(ds, lo, hi):
    """(source index, its sample) of train samples [lo, hi)."""
    return [(ds.datasets.index(part), j) for part, j in (ds._locate(k) for k in range(lo, hi))]


def test_counts_and_a_changed_blend_continue_each_source(two):
    mm, text, root = two
    before = DataBlend.parse(["0.7", mm, "0.3", f"{text}:all"])
    first = _train(before, root, 40)
    counter = SourceCounter(first, before)
    at20 = counter.at(20)
    assert [v["samples"] for v in at20.values()] == consumed_per_source(first, 20) == [14, 6]
    assert list(at20) == ["mm", "text:all"] and at20["text:all"]["images"] == 0
    assert at20["text:all"]["loss_tokens"] > 0
    state = counter.data_state(20)

    # Unchanged: the saved origin, the same samples.
    origin, line = plan_origin(before, state, 20)
    assert origin == BlendOrigin(0, (0, 0)) and line is None
    # Changed weights and a dataset removed or added: each source continues after its count.
    after = DataBlend.parse(["0.5", mm, "0.5", f"{text}:all"])
    origin, line = plan_origin(after, state, 20)
    assert origin == BlendOrigin(20, (14, 6))
    assert "mm from 14, text:all from 6" in line and "new blending index from sample 20" in line
    resumed = _train(after, root, 40, origin)
    assert isinstance(resumed, BlendedDataset) and len(resumed) == 40
    old, new = _served(first, 0, 20), _served(resumed, 20, 40)
    assert not set(old) & set(new)  # nothing served twice
    for i, start in enumerate((14, 6)):  # each source picks up exactly where it stopped
        assert [j for s, j in new if s == i] == list(range(start, start + sum(s == i for s, _ in new)))
    assert sum(s == 1 for s, _ in new) == 10  # the new weights from there on
    # The counter of the resumed run agrees at the resume point and goes on from there.
    assert [v["samples"] for v in SourceCounter(resumed, after).at(20).values()] == [14, 6]
    # Only the multimodal dataset: it continues at 14, alone.
    only = DataBlend.parse([mm])
    origin, line = plan_origin(only, state, 20)
    assert origin == BlendOrigin(20, (14,)) and "dropped text" in line
    alone = _train(only, root, 40, origin)
    assert [j for _, j in _served(alone, 20, 23)] == [14, 15, 16]


def test_a_changed_loss_policy_packs_the_source_anew(two):
    mm, text, root = two
    before = DataBlend.parse(["0.5", mm, "0.5", f"{text}:all"])
    state = SourceCounter(_train(before, root, 20), before).data_state(10)
    origin, line = plan_origin(DataBlend.parse(["0.5", f"{mm}:all", "0.5", f"{text}:all"]), state, 10)
    assert origin == BlendOrigin(10, (0, 5)) and "loss policy after-first-image -> all: packed anew" in line
