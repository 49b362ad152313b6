"""Packed samples from real binary datasets (real tokenizer, real photographs): the sample dict,
its loss-mask semantics, splits, blending, caching and error reporting."""

import inspect
import pickle

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from engine.data.dataset import (BlendedDataset, DataBlend, DataSplit, PackedDataset, SampleError, build_datasets,
                                 parse_data_path, parse_split, split_ranges)
from engine.data.format import IndexedDatasetWriter
from engine.data.images import encode_jpeg, normalize, preprocess
from engine.data.packing import PackingConfig
from engine.data.tokenizer import SentencePieceTokenizer, encode_document

TPI = 576
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")

# ------------------------------------------------------------------ corpus builders (shared with test_loader)

_photos = None


def photos() -> list[np.ndarray]:
    """Real photographs, preprocessed to 336x336 as the preprocessing tool stores them."""
    global _photos
    if _photos is None:
        _photos = [preprocess(Image.fromarray(getattr(skimage.data, n)())) for n in PHOTOS]
    return _photos


def prose() -> list[str]:
    """Real English sentences: the descriptions of scikit-image's sample images."""
    text = " ".join(inspect.getdoc(getattr(skimage.data, n)) or "" for n in skimage.data.__all__)
    return [s.strip() + "." for s in " ".join(text.split()).split(". ") if len(s.split()) > 3]


def random_documents(rng: np.random.Generator, n: int) -> list[list[str | None]]:
    """Interleaved documents: some long (several samples), some without images, some starting
    with an image, up to a few images each."""
    sentences = prose()
    docs = []
    for _ in range(n):
        segments = []
        for _ in range(int(rng.integers(1, 7))):
            if rng.random() < 0.4:
                segments.append(None)
            else:
                k = int(rng.integers(1, 12 if rng.random() < 0.9 else 120))
                start = int(rng.integers(0, len(sentences)))
                segments.append(" ".join(sentences[(start + j) % len(sentences)] for j in range(k)))
        docs.append(segments)
    return docs


def write_corpus(prefix, tokenizer, documents, storage="jpeg") -> list[np.ndarray]:
    """Write `documents` (lists of text / None = image) with the format's writer; images cycle
    through the photos. Returns each document's token stream."""
    streams, k = [], 0
    pics = photos()
    with IndexedDatasetWriter(prefix, image_token_id=tokenizer.image_token_id, image_size=336,
                              image_storage=storage) as w:
        for segments in documents:
            stream = encode_document(tokenizer, segments)
            images = []
            for _ in range(int(np.count_nonzero(stream == tokenizer.image_token_id))):
                pix = pics[k % len(pics)]
                images.append(encode_jpeg(pix) if storage == "jpeg" else pix.tobytes())
                k += 1
            w.add_document(stream, images)
            streams.append(stream)
    return streams


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return SentencePieceTokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    """40 random real documents, raw storage (exact pixels)."""
    prefix = tmp_path_factory.mktemp("corpus") / "docs"
    streams = write_corpus(prefix, tokenizer, random_documents(np.random.default_rng(0), 40), storage="raw")
    return str(prefix), streams


# ------------------------------------------------------------------ an independent reference


_expanded = {}


def expand(stream, image_id):
    """A whole document in LLM positions: [(token, its index in the document)], and where each
    document token starts."""
    key = (id(stream), image_id)
    if key not in _expanded:
        expanded = [(tok, j) for j, tok in enumerate(stream.tolist()) for _ in range(TPI if tok == image_id else 1)]
        starts = {}
        for t, (_, j) in enumerate(expanded):
            starts.setdefault(j, t)
        starts[len(stream)] = len(expanded)
        _expanded[key] = (expanded, starts)
    return _expanded[key]


def expected_sample(streams, segments, image_id, seq, pad=0):
    """The sample dict, computed position by position from whole documents expanded into LLM
    positions."""
    tokens, labels, mask, pos, cu, offsets, n_images = [], [], [], [], [0], [], 0
    for d, a, b in segments:
        stream = streams[d].tolist()
        expanded, starts = expand(streams[d], image_id)
        first_image = stream.index(image_id) if image_id in stream else len(stream)
        lo, hi = starts[a], starts[b]
        for t in range(lo, hi):
            tok, j = expanded[t]
            if tok == image_id and (t == 0 or expanded[t - 1][1] != j):
                offsets.append(len(tokens))
                n_images += 1
            tokens.append(tok)
            pos.append(t - lo)
            if t + 1 < len(expanded):
                target, tj = expanded[t + 1]
                labels.append(target)
                mask.append(float(target != image_id and tj > first_image))
            else:
                labels.append(pad)
                mask.append(0.0)
        cu.append(len(tokens))
    fill = seq - len(tokens)
    if fill:
        tokens += [pad] * fill
        labels += [pad] * fill
        mask += [0.0] * fill
        pos += list(range(fill))
        cu.append(seq)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": pos, "cu_seqlens": cu,
            "image_offsets": offsets}, n_images


def check_sample(sample, streams, segments, image_id, seq):
    want, n_images = expected_sample(streams, segments, image_id, seq)
    for key, value in want.items():
        assert sample[key].tolist() == value, key
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert sample["cu_seqlens"].dtype == torch.int32
    assert sample["images"].shape == (n_images, 336, 336, 3) and sample["images"].dtype == torch.uint8


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("policy", ["split", "truncate"])
def test_samples_match_reference(corpus, tokenizer, tmp_path, policy):
    prefix, streams = corpus
    seq = 2048
    ds = PackedDataset(prefix, PackingConfig(seq_length=seq, policy=policy, seed=5), split_weights="1,0,0",
                       cache_dir=tmp_path)
    seen = {d: np.zeros(len(s), int) for d, s in enumerate(streams)}
    targeted = {d: np.zeros(len(s) + 1, int) for d, s in enumerate(streams)}
    pics = photos()
    for k in range(len(ds)):
        segments = ds.index.segments_of(k).tolist()
        sample = ds[k]
        check_sample(sample, streams, segments, tokenizer.image_token_id, seq)
        for d, a, b in segments:
            seen[d][a:b] += 1
            targeted[d][a + 1:b + 1] += 1
        if k < 6:  # pixels: the stored photos in order of appearance, as stored (raw storage: exact)
            expect = []
            for d, a, b in segments:
                before = sum(int(np.count_nonzero(s == tokenizer.image_token_id)) for s in streams[:d])
                before += int(np.count_nonzero(streams[d][:a] == tokenizer.image_token_id))
                n = int(np.count_nonzero(streams[d][a:b] == tokenizer.image_token_id))
                expect += [pics[(before + j) % len(pics)] for j in range(n)]
            if expect:
                assert torch.equal(sample["images"], torch.from_numpy(np.stack(expect)))
    if policy == "split":  # one epoch: every token at most once, every target that trains exactly once
        assert all(np.all(v <= 1) for v in seen.values())
        for d, stream in enumerate(streams):
            images = np.flatnonzero(stream == tokenizer.image_token_id)
            trains = np.zeros(len(stream), bool)
            trains[images[0] + 1 if len(images) else len(stream):] = True
            trains[images] = False
            assert np.all(targeted[d][:-1][trains] == 1), d


def test_loss_mask_on_hand_built_documents(tmp_path, tokenizer):
    docs = [
        ["Text before the first picture is context only.", None, "The astronaut smiles.", None, None, "Two cats."],
        ["A document without any picture gets no loss at all."],
        [None, "Starts with a picture."],
    ]
    streams = write_corpus(tmp_path / "hand", tokenizer, docs)
    image_id = tokenizer.image_token_id
    ds = PackedDataset(tmp_path / "hand", PackingConfig(seq_length=4096, seed=0), split_weights="1,0,0",
                       cache=False)
    assert len(ds) == 1  # 4 images + a few dozen tokens fit one 4096 sample
    sample = ds[0]
    cu = sample["cu_seqlens"].tolist()
    order = [int(d) for d, _, _ in ds.index.segments_of(0)]
    assert sorted(order) == [0, 2]  # doc 1 has no image: nothing of it trains, it is not packed
    for (lo, hi), d in zip(zip(cu, cu[1:]), order):
        toks, labels = sample["tokens"][lo:hi], sample["labels"][lo:hi]
        mask, pos = sample["loss_mask"][lo:hi], sample["position_ids"][lo:hi]
        assert pos.tolist() == list(range(hi - lo))  # position ids restart per document
        assert toks[0] == tokenizer.bos_id
        stream = streams[d].tolist()
        first = (toks == image_id).nonzero()[0].item()  # first image position (LLM coordinates)
        assert mask[:first].sum() == 0  # text before the first image, and the token predicting it
        assert torch.all(mask[labels == image_id] == 0)  # image positions as targets
        # The last position of each image block predicts the text after it, with loss.
        block_ends = [t for t in range(first, hi - lo - 1) if toks[t] == image_id and toks[t + 1] != image_id]
        for t in block_ends:
            assert labels[t] == toks[t + 1] and mask[t] == 1
        assert labels[-2] == tokenizer.eos_id and mask[-2] == 1  # EOS is a trained target
        assert mask[-1] == 0 and toks[-1] == tokenizer.eos_id  # nothing follows the document
        n_text_after = sum(1 for j, t in enumerate(stream) if t != image_id and j > stream.index(image_id))
        assert mask.sum() == n_text_after  # exactly the text after the first image
    # the padding tail: its own segment, pad ids, no loss, positions from 0
    assert cu[-1] == 4096 and len(cu) == len(order) + 2
    tail = slice(cu[-2], cu[-1])
    assert sample["tokens"][tail].eq(0).all() and sample["loss_mask"][tail].eq(0).all()
    assert sample["position_ids"][tail].tolist() == list(range(cu[-1] - cu[-2]))


def test_loss_policy_all_trains_every_text_token(tmp_path, tokenizer):
    docs = [["Text before the first picture trains too.", None, "The astronaut smiles."],
            ["A document without any picture trains under this policy."]]
    streams = write_corpus(tmp_path / "all", tokenizer, docs)
    image_id = tokenizer.image_token_id
    ds = PackedDataset(tmp_path / "all", PackingConfig(seq_length=4096, seed=0, loss_policy="all"),
                       split_weights="1,0,0", cache=False)
    sample = ds[0]
    cu = sample["cu_seqlens"].tolist()
    order = [int(d) for d, _, _ in ds.index.segments_of(0)]
    assert sorted(order) == [0, 1]
    for (lo, hi), d in zip(zip(cu, cu[1:]), order):
        labels, mask = sample["labels"][lo:hi], sample["loss_mask"][lo:hi]
        want = (labels != image_id).float()
        want[-1] = 0  # the EOS predicts nothing
        assert torch.equal(mask, want)
        n_text = sum(1 for t in streams[d].tolist()[1:] if t != image_id)  # every token after the BOS
        assert mask.sum() == n_text
    # The same documents under the seed's rule: only the text after doc 0's image.
    seed_rule = PackedDataset(tmp_path / "all", PackingConfig(seq_length=4096, seed=0), split_weights="1,0,0",
                              cache=False)
    stream = streams[0].tolist()
    assert seed_rule[0]["loss_mask"].sum() == len(stream) - stream.index(image_id) - 1


def test_split_document_keeps_its_targets_and_mask(tmp_path, tokenizer):
    sentences = prose()
    long_text = " ".join(sentences[:120])
    docs = [[long_text[:2000], None, "Caption of the picture.", long_text]]
    streams = write_corpus(tmp_path / "long", tokenizer, docs)
    image_id = tokenizer.image_token_id
    stream = streams[0]
    first = int(np.flatnonzero(stream == image_id)[0])
    seq = 1024
    assert first + TPI > seq  # the image cannot follow the opening text in one sample
    ds = PackedDataset(tmp_path / "long", PackingConfig(seq_length=seq, seed=1), split_weights="1,0,0", cache=False)
    by_start = {int(ds.index.segments_of(k)[0, 1]): ds[k] for k in range(len(ds))}
    starts = sorted(by_start)
    for s, e in zip(starts, starts[1:] + [len(stream)]):
        sample = by_start[s]
        n = int(sample["cu_seqlens"][1])
        # The last position of a cut segment predicts the document's next token.
        if e < len(stream):
            assert sample["labels"][n - 1] == stream[e]
            assert sample["loss_mask"][n - 1] == float(stream[e] != image_id and e > first)
        if s > first:  # a continuation after the first image: every text target trains
            text_targets = sample["labels"][: n - (e == len(stream))] != image_id
            assert torch.all(sample["loss_mask"][: n - (e == len(stream))] == text_targets.float())
        assert sample["loss_mask"].sum() > 0  # every packed piece trains something
    # The opening text would have been cut right before the image, which opens the next sample;
    # under the seed's rule that piece trains nothing, so it is not packed at all.
    assert starts[0] == first


def test_truncate_reads_the_next_token(tmp_path, tokenizer):
    docs = [[None, " ".join(prose()[:80])]]
    streams = write_corpus(tmp_path / "t", tokenizer, docs)
    ds = PackedDataset(tmp_path / "t", PackingConfig(seq_length=1024, policy="truncate", seed=0),
                       split_weights="1,0,0", cache=False)
    assert len(ds) == 1
    sample = ds[0]
    d, a, b = ds.index.segments_of(0)[0].tolist()
    assert (a, b) == (0, 1024 - TPI + 1) and sample["cu_seqlens"].tolist() == [0, 1024]
    assert sample["labels"][-1] == streams[0][b] and sample["loss_mask"][-1] == 1


def test_splits_follow_megatron_semantics():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    assert split_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(7, "1,0,0") == [(0, 7), (7, 7), (7, 7)]
    with pytest.raises(ValueError, match="--split"):
        parse_split("a,b")
    assert parse_data_path(["0.7", "A", "0.3", "B"]) == (["A", "B"], [0.7, 0.3])
    assert parse_data_path("A") == (["A"], [1.0])
    with pytest.raises(ValueError, match="weight/prefix pairs"):
        parse_data_path(["0.7", "A", "B"])


def test_split_datasets_partition_documents(corpus, tmp_path):
    prefix, streams = corpus
    config = PackingConfig(seq_length=2048, seed=2)
    # loss policy all: the text-only documents are packed too
    train, valid, test = build_datasets(DataBlend.parse([prefix], "all"), config, split=DataSplit.parse("80,15,5"),
                                        cache_dir=tmp_path)
    ranges = split_ranges(len(streams), "80,15,5")
    for ds, (lo, hi) in zip((train, valid, test), ranges):
        docs = set(ds.index.segments[:, 0].tolist())
        assert docs == set(range(lo, hi)) - {d for d in range(lo, hi) if len(streams[d]) == 0}
    assert build_datasets(DataBlend.parse([prefix], "all"), config, split=DataSplit.parse("1,0,0"),
                          cache_dir=tmp_path)[1:] == [None, None]
    with pytest.raises(ValueError, match="valid split .* has no documents"):
        PackedDataset(prefix, config, split="valid", split_weights="1000,1,0")


def test_multi_epoch_and_blend(tmp_path, tokenizer):
    rng = np.random.default_rng(3)
    write_corpus(tmp_path / "a", tokenizer, random_documents(rng, 12))
    write_corpus(tmp_path / "b", tokenizer, [[None, s] for s in prose()[:10]])
    config = PackingConfig(seq_length=2048, seed=4)
    single = PackedDataset(tmp_path / "b", config, split_weights="1,0,0", cache_dir=tmp_path / "cache")
    epoch = len(single)
    more = PackedDataset(tmp_path / "b", config, split_weights="1,0,0", num_samples=3 * epoch + 1,
                         cache_dir=tmp_path / "cache")
    assert len(more) == 3 * epoch + 1 and more.index.num_epochs == 4
    (blend,) = [d for d in build_datasets(DataBlend.parse(["0.7", str(tmp_path / "a"), "0.3", str(tmp_path / "b")]),
                                          config, split=DataSplit.parse("1,0,0"), num_samples=(40, 0, 0), cache_dir=tmp_path / "cache") if d]
    assert isinstance(blend, BlendedDataset) and len(blend) == 40
    counts = np.bincount(blend.dataset_index, minlength=2)
    assert counts.tolist() == [28, 12]
    for k in (0, 1, 2, 39):
        part = blend.datasets[blend.dataset_index[k]]
        assert torch.equal(blend[k]["tokens"], part[int(blend.sample_index[k])]["tokens"])


def test_jpeg_storage_close_to_raw(tmp_path, tokenizer):
    docs = [[None, "A picture.", None, "Another picture."]]
    write_corpus(tmp_path / "j", tokenizer, docs, storage="jpeg")
    write_corpus(tmp_path / "r", tokenizer, docs, storage="raw")
    config = PackingConfig(seq_length=2048, seed=0)
    j = PackedDataset(tmp_path / "j", config, split_weights="1", cache=False)[0]
    r = PackedDataset(tmp_path / "r", config, split_weights="1", cache=False)[0]
    assert torch.equal(j["tokens"], r["tokens"])
    assert (normalize(j["images"]) - normalize(r["images"])).abs().mean() < 0.03  # JPEG q95 4:4:4, in normalised units


def test_index_is_cached_and_pickles_without_arrays(corpus, tmp_path):
    prefix, _ = corpus
    config = PackingConfig(seq_length=2048, seed=9)
    ds = PackedDataset(prefix, config, split_weights="1,0,0", cache_dir=tmp_path)
    (index_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    stamp = (index_dir / "shuffle.npy").stat().st_mtime_ns
    again = PackedDataset(prefix, config, split_weights="1,0,0", cache_dir=tmp_path)
    assert (index_dir / "shuffle.npy").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    np.testing.assert_array_equal(again.index.segments, ds.index.segments)
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # the memory-mapped index and reader are re-opened, not copied
    clone = pickle.loads(blob)
    assert torch.equal(clone[3]["labels"], ds[3]["labels"])


def test_corrupt_image_names_the_sample(tmp_path, tokenizer):
    write_corpus(tmp_path / "c", tokenizer, [[None, "One picture."], ["Text, then", None, "a picture."]])
    with open(str(tmp_path / "c") + ".images.bin", "r+b") as f:  # flip bytes inside the first image
        f.seek(5000)
        f.write(b"\x00" * 64)
    ds = PackedDataset(tmp_path / "c", PackingConfig(seq_length=1024, seed=0), split_weights="1", cache=False)
    bad = [k for k in range(len(ds)) if 0 in {int(d) for d in ds.index.segments_of(k)[:, 0]}][0]
    with pytest.raises(SampleError, match=rf"cannot build sample {bad} \(doc 0 tokens .*checksum"):
        ds[bad]
