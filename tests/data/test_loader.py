"""The data-parallel sampler (resume, rank slicing), collation, and the multi-process loader."""

import re

import numpy as np
import pytest
import torch

from engine.data.dataset import PackedDataset, SampleError
from engine.data.images import normalize
from engine.data.loader import PretrainingSampler, build_loader, collate, to_device
from engine.data.packing import PackingConfig
from engine.data.tokenizer import SentencePieceTokenizer
from test_dataset import random_documents, write_corpus

# DataLoader workers are forked from this (multi-threaded) process, as torch does by default on
# Linux; they only read files and run CPU numpy/torch code.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_model):
    tok = SentencePieceTokenizer(tokenizer_model)
    prefix = tmp_path_factory.mktemp("loader") / "docs"
    write_corpus(prefix, tok, random_documents(np.random.default_rng(7), 16))
    return PackedDataset(prefix, PackingConfig(seq_length=2048, seed=11), split_weights="1,0,0",
                         cache_dir=prefix.parent / "cache")


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_gives_the_same_following_batches(drop_last):
    full = list(PretrainingSampler(103, 0, micro_batch_size=4, data_parallel_size=2, data_parallel_rank=1,
                                   drop_last=drop_last))
    for step in range(len(full)):
        resumed = list(PretrainingSampler(103, step * 8, micro_batch_size=4, data_parallel_size=2,
                                          data_parallel_rank=1, drop_last=drop_last))
        assert resumed == full[step:]
        assert len(PretrainingSampler(103, step * 8, 4, 1, 2, drop_last)) == len(resumed)


@pytest.mark.parametrize("drop_last", [True, False])
def test_data_parallel_ranks_partition_the_global_stream(drop_last):
    total, micro, world = 50, 3, 4
    single = list(PretrainingSampler(total, 5, micro * world, 0, 1, drop_last))  # DP=1, same global batch
    ranks = [list(PretrainingSampler(total, 5, micro, r, world, drop_last)) for r in range(world)]
    for step, global_batch in enumerate(single):
        union = [i for r in range(world) if step < len(ranks[r]) for i in ranks[r][step]]
        assert union == global_batch
    assert all(len(ranks[r]) <= len(single) for r in range(world))
    if drop_last:
        assert single[-1][-1] == 5 + (total - 5) // 12 * 12 - 1
    else:
        assert single[-1][-1] == total - 1


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="data_parallel_rank"):
        PretrainingSampler(10, 0, 2, data_parallel_rank=2, data_parallel_size=2)
    with pytest.raises(ValueError, match="consumed_samples"):
        PretrainingSampler(10, 11, 2)


def test_collate_flattens_offsets_and_boundaries(dataset):
    samples = [dataset[k] for k in range(3)]
    seq = dataset.config.seq_length
    batch = collate(samples)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert batch[key].shape == (3, seq)
        assert torch.equal(batch[key][1], samples[1][key])
    assert batch["images"].shape[0] == sum(len(s["images"]) for s in samples)
    flat_tokens = batch["tokens"].reshape(-1)
    assert torch.all(flat_tokens[batch["image_offsets"]] == dataset.reader.image_token_id)
    want_offsets = torch.cat([s["image_offsets"] + b * seq for b, s in enumerate(samples)])
    assert torch.equal(batch["image_offsets"], want_offsets)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 3 * seq
    assert len(cu) == sum(len(s["cu_seqlens"]) - 1 for s in samples) + 1
    # every sample boundary is a segment boundary; position ids restart at every boundary
    assert {b * seq for b in range(4)} <= set(cu.tolist())
    flat_pos = batch["position_ids"].reshape(-1)
    assert torch.all(flat_pos[cu[:-1].long()] == 0)
    assert batch["max_seqlen"] == int(torch.diff(cu).max()) <= seq


def test_workers_give_the_same_batches(dataset):
    def batches(workers):
        loader = build_loader(dataset, micro_batch_size=2, consumed_samples=2, data_parallel_rank=1,
                              data_parallel_size=2, num_workers=workers, prefetch_factor=2)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == (len(dataset) - 2) // 4
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    # rank 1 of 2, resumed after 2 samples: the first batch is samples 4 and 5, exactly as
    # collating the dataset's own samples gives it (images as stored, uint8)
    want = collate([dataset[4], dataset[5]])
    for key in want:
        assert torch.equal(torch.as_tensor(serial[0][key]), torch.as_tensor(want[key])), key


def test_worker_error_names_the_sample(tmp_path, tokenizer_model):
    tok = SentencePieceTokenizer(tokenizer_model)
    write_corpus(tmp_path / "bad", tok, [[None, "One picture."], ["Some text", None, "and a picture."]] * 3)
    with open(str(tmp_path / "bad") + ".images.bin", "r+b") as f:
        f.seek(3000)
        f.write(b"\x00" * 64)  # breaks the first image
    ds = PackedDataset(tmp_path / "bad", PackingConfig(seq_length=1024, seed=0), split_weights="1", cache=False)
    bad = next(k for k in range(len(ds)) if 0 in ds.index.segments_of(k)[:, 0])
    loader = build_loader(ds, micro_batch_size=1, num_workers=2, prefetch_factor=1)
    message = None
    try:
        for _ in loader:
            pass
    except SampleError as e:
        message = str(e)
    # Drop the loader (and with the exception gone, its iterator) now: its workers shut down in
    # order, rather than in whatever order the garbage collector would finalize their queues.
    del loader
    assert message is not None and re.search(rf"cannot build sample {bad} \(doc 0 tokens .*checksum", message)


@pytest.mark.parametrize("workers", [0, 2])
def test_images_stay_uint8_until_to_device_normalises_them(dataset, workers):
    loader = build_loader(dataset, micro_batch_size=2, num_workers=workers, prefetch_factor=1 if workers else 4)
    batch = next(iter(loader))
    stored = torch.cat([dataset[0]["images"], dataset[1]["images"]])
    assert len(stored) > 0
    assert batch["images"].dtype == torch.uint8 and torch.equal(batch["images"], stored)
    got = to_device(batch, "cuda" if torch.cuda.is_available() else "cpu")
    assert got["images"].dtype == torch.float32 and got["images"].shape == (len(stored), 3, 336, 336)
    assert torch.equal(got["images"].cpu(), normalize(stored))  # the one normalisation, bit for bit
    want = collate([dataset[0], dataset[1]])
    for key in want:
        if key != "images":
            assert torch.equal(torch.as_tensor(got[key]).cpu(), torch.as_tensor(want[key])), key
    del loader


def test_to_device_keeps_cu_seqlens_on_the_host(dataset):
    """The model reads document lengths from `cu_seqlens` every micro-batch: on the device that
    read would be a sync. Everything else moves (to 'meta' here, which any machine has)."""
    batch = next(iter(build_loader(dataset, micro_batch_size=2, num_workers=0)))
    out = to_device(batch, "meta")
    assert out["cu_seqlens"].device.type == "cpu"
    assert torch.equal(out["cu_seqlens"], batch["cu_seqlens"])
    for key in ("tokens", "labels", "loss_mask", "position_ids", "images", "image_offsets"):
        assert out[key].device.type == "meta", key
