"""The C++ packing and blending indices against a plain-Python reference, plus their invariants
and the on-disk cache."""

import dataclasses

import numpy as np
import pytest

from engine.data.packing import (PackingConfig, build_blending_index, build_packing_index, cache_key,
                                 load_or_build)

# ------------------------------------------------------------------------ Python reference
# Written from the rule in csrc/helpers.cpp, not from its code: the longest fitting prefix is
# found token by token here, by walking image to image there.

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class Rng:
    def __init__(self, seed, stream):
        self.state = mix64(mix64(seed) ^ stream)

    def below(self, n):
        threshold = (1 << 64) % n
        while True:
            self.state = (self.state + GOLDEN) & M64
            r = mix64(self.state)
            if r >= threshold:
                return r % n


def ref_shuffle(items, rng):
    for i in range(len(items) - 1, 0, -1):
        j = rng.below(i + 1)
        items[i], items[j] = items[j], items[i]


def ref_loss_start(d, lengths, images, loss_policy):
    if loss_policy == "all":
        return 1
    return min(images[d]) + 1 if images[d] else lengths[d]


def ref_pack(documents, lengths, image_offsets, image_positions, seq, tpi, max_images, policy, seed, num_samples,
             loss_policy="after-first-image"):
    images = [set(image_positions[image_offsets[d]:image_offsets[d + 1]].tolist()) for d in range(len(lengths))]

    def useful(d, start, end):  # a text target t with start < t <= end, t < length, t >= the loss start
        lo = max(start + 1, ref_loss_start(d, lengths, images, loss_policy))
        return any(t not in images[d] for t in range(lo, min(end, lengths[d] - 1) + 1))
    samples, lengths_out, current = [], [], []
    state = {"used": 0, "images": 0}

    def close():
        if current:
            samples.append(list(current))
            lengths_out.append(state["used"])
            current.clear()
            state["used"] = state["images"] = 0

    def fit(d, start):
        cost = n = 0
        end = start
        while end < lengths[d]:
            is_image = end in images[d]
            c = tpi if is_image else 1
            if state["used"] + cost + c > seq or (is_image and state["images"] + n + 1 > max_images):
                break
            cost, n, end = cost + c, n + is_image, end + 1
        return end, cost, n

    def add(d, start, end, cost, n):
        current.append((d, start, end))
        state["used"] += cost
        state["images"] += n

    epoch_offsets, order = [0], []
    for epoch in range(10_000):
        perm = [int(d) for d in documents]
        ref_shuffle(perm, Rng(seed, 2 * epoch))
        for d in perm:
            if not useful(d, 0, lengths[d]):
                continue
            if policy == "split":
                start = 0
                while start < lengths[d]:
                    end, cost, n = fit(d, start)
                    if end == start:
                        close()
                        continue
                    if not useful(d, start, end):
                        if current and start == 0:
                            close()
                        else:
                            start = end
                        continue
                    add(d, start, end, cost, n)
                    if end < lengths[d]:
                        close()
                    start = end
            else:
                end, cost, n = fit(d, 0)
                if end < lengths[d] and current:
                    close()
                    end, cost, n = fit(d, 0)
                if useful(d, 0, end):
                    add(d, 0, end, cost, n)
        close()
        lo, hi = epoch_offsets[-1], len(samples)
        epoch_offsets.append(hi)
        ids = list(range(lo, hi))
        ref_shuffle(ids, Rng(seed, 2 * epoch + 1))
        order += ids
        if hi >= num_samples:
            break
    offsets = np.cumsum([0] + [len(s) for s in samples])
    segments = np.array([seg for s in samples for seg in s], dtype=np.int64).reshape(-1, 3)
    return {"sample_offsets": offsets, "segments": segments, "shuffle": np.array(order),
            "epoch_offsets": np.array(epoch_offsets), "sample_lengths": np.array(lengths_out)}


def ref_blend(weights, n):
    taken = [0] * len(weights)
    which, index = [], []
    for i in range(n):
        errors = [w * (i + 1) - t for w, t in zip(weights, taken)]
        best = max(range(len(weights)), key=lambda d: (errors[d], -d))
        which.append(best)
        index.append(taken[best])
        taken[best] += 1
    return np.array(which), np.array(index)


# ------------------------------------------------------------------------ random corpora


def random_corpus(rng, num_docs, max_len, image_rate):
    """Per-document lengths and sorted image positions, like a real index (offsets + positions)."""
    lengths = rng.integers(0, max_len + 1, num_docs)
    lengths[rng.random(num_docs) < 0.1] = 0  # a few empty documents
    positions, offsets = [], [0]
    for n in lengths:
        mask = rng.random(n) < image_rate
        positions.extend(np.flatnonzero(mask).tolist())
        offsets.append(len(positions))
    return lengths.astype(np.int64), np.array(offsets, np.int64), np.array(positions, np.int64)


def random_case(seed):
    rng = np.random.default_rng(seed)
    tpi = int(rng.choice([1, 3, 8]))
    seq = int(rng.integers(tpi, 40))
    lengths, offsets, positions = random_corpus(rng, int(rng.integers(1, 30)), int(rng.integers(1, 60)),
                                                float(rng.choice([0.0, 0.05, 0.3])))
    documents = np.sort(rng.choice(len(lengths), int(rng.integers(1, len(lengths) + 1)), replace=False))
    if lengths[documents].sum() == 0:
        lengths[documents[0]] = 1
    max_images = None if rng.random() < 0.4 else int(rng.integers(1, 4))
    config = PackingConfig(seq_length=seq, tokens_per_image=tpi, max_images_per_sample=max_images,
                           policy=str(rng.choice(["split", "truncate"])), seed=int(rng.integers(0, 2**63)),
                           loss_policy=str(rng.choice(["after-first-image", "all"])))
    if not any(ref_useful_document(d, lengths, offsets, positions, config.loss_policy) for d in documents):
        config = dataclasses.replace(config, loss_policy="all")
        lengths[documents[0]] = max(lengths[documents[0]], 2)
    return documents, lengths, offsets, positions, config, int(rng.integers(0, 60))


def ref_useful_document(d, lengths, offsets, positions, loss_policy):
    imgs = set(positions[offsets[d]:offsets[d + 1]].tolist())
    lo = ref_loss_start(d, lengths, [imgs] * (d + 1), loss_policy)
    return any(t not in imgs for t in range(lo, lengths[d]))


def cost_of(segment, offsets, positions, tpi):
    d, a, b = segment
    imgs = positions[offsets[d]:offsets[d + 1]]
    n = int(np.count_nonzero((imgs >= a) & (imgs < b)))
    return (b - a) + (tpi - 1) * n, n


@pytest.mark.parametrize("seed", range(60))
def test_cpp_matches_python_reference(seed):
    documents, lengths, offsets, positions, config, num_samples = random_case(seed)
    got = build_packing_index(documents, lengths, offsets, positions, config, num_samples)
    want = ref_pack(documents, lengths, offsets, positions, config.seq_length, config.tokens_per_image,
                    config.image_limit, config.policy, config.seed, num_samples, config.loss_policy)
    for name in want:
        np.testing.assert_array_equal(getattr(got, name), want[name], err_msg=f"{name} (seed {seed})")


def trainable_targets(d, lengths, offsets, positions, loss_policy):
    """bool [length]: token t of document d is a target that carries loss under the policy."""
    out = np.zeros(lengths[d], bool)
    imgs = positions[offsets[d]:offsets[d + 1]]
    lo = 1 if loss_policy == "all" else (imgs[0] + 1 if len(imgs) else lengths[d])
    out[lo:lengths[d]] = True
    out[imgs] = False
    return out


@pytest.mark.parametrize("loss_policy", ["after-first-image", "all"])
@pytest.mark.parametrize("policy", ["split", "truncate"])
@pytest.mark.parametrize("seed", range(8))
def test_invariants(policy, seed, loss_policy):
    rng = np.random.default_rng(100 + seed)
    tpi = 576
    lengths, offsets, positions = random_corpus(rng, 200, 2500, 0.002)
    documents = np.arange(len(lengths))
    config = PackingConfig(seq_length=2048, tokens_per_image=tpi, max_images_per_sample=3, policy=policy, seed=seed,
                           loss_policy=loss_policy)
    trainable = {d: trainable_targets(d, lengths, offsets, positions, loss_policy) for d in documents}
    index = build_packing_index(documents, lengths, offsets, positions, config, num_samples=1)
    wanted = len(index) * 2 + 1
    index3 = build_packing_index(documents, lengths, offsets, positions, config, num_samples=wanted)
    # Whole epochs, just enough of them (epochs differ a little in length: other orders pack differently).
    assert index3.epoch_offsets[-2] < wanted <= index3.epoch_offsets[-1] and index3.num_epochs >= 2
    # Adding epochs never changes the earlier ones.
    n = len(index)
    np.testing.assert_array_equal(index3.shuffle[:n], index.shuffle)
    np.testing.assert_array_equal(index3.segments[:len(index.segments)], index.segments)

    for e in range(index3.num_epochs):
        lo, hi = index3.epoch_offsets[e], index3.epoch_offsets[e + 1]
        assert sorted(index3.shuffle[lo:hi].tolist()) == list(range(lo, hi))  # a permutation per epoch
        covered = {d: np.zeros(lengths[d], int) for d in documents}
        targeted = {d: np.zeros(lengths[d], int) for d in documents}
        for s in range(lo, hi):
            segs = index3.segments[index3.sample_offsets[s]:index3.sample_offsets[s + 1]]
            assert len(segs) > 0
            costs = [cost_of(seg, offsets, positions, tpi) for seg in segs]
            total = sum(c for c, _ in costs)
            assert total == index3.sample_lengths[s] <= config.seq_length
            assert sum(k for _, k in costs) <= config.max_images_per_sample
            for d, a, b in segs:
                assert 0 <= a < b <= lengths[d]
                covered[d][a:b] += 1
                targeted[d][a + 1:b + 1] += 1  # the targets of the segment's positions
                assert trainable[d][a + 1:b + 1].any(), (d, a, b)  # no segment without a useful token
        for d in documents:
            if not trainable[d].any():  # nothing could train: never packed
                assert not covered[d].any(), d
            elif policy == "split":  # every token at most once, every trainable target exactly once
                assert np.all(covered[d] <= 1), d
                assert np.all(targeted[d][trainable[d]] == 1), d
            else:  # one prefix per epoch; the whole document when it fits a sample
                first_gap = np.flatnonzero(covered[d] == 0)
                kept = first_gap[0] if len(first_gap) else lengths[d]
                assert np.all(covered[d][:kept] == 1) and np.all(covered[d][kept:] == 0)
                cost, n = cost_of((d, 0, lengths[d]), offsets, positions, tpi)
                if cost <= config.seq_length and n <= config.max_images_per_sample:
                    assert kept == lengths[d]


def test_split_never_cuts_inside_image_budget_and_images_stay_whole():
    # One image (576 positions) does not fit after 1500 text tokens in 2048: the segment ends
    # before the image, which opens the next sample.
    lengths = np.array([1500 + 1 + 100])
    offsets = np.array([0, 1])
    positions = np.array([1500])
    config = PackingConfig(seq_length=2048, policy="split", seed=0, loss_policy="all")
    index = build_packing_index([0], lengths, offsets, positions, config)
    segs = [index.segments[index.sample_offsets[s]:index.sample_offsets[s + 1]].tolist() for s in range(len(index))]
    assert sorted(segs) == [[[0, 0, 1500]], [[0, 1500, 1601]]]
    assert sorted(index.sample_lengths.tolist()) == [576 + 100, 1500]
    # Under the seed's rule the first piece (text before the first image) trains nothing: dropped.
    seed_rule = build_packing_index([0], lengths, offsets, positions, dataclasses.replace(config, loss_policy="after-first-image"))
    assert seed_rule.segments.tolist() == [[0, 1500, 1601]]


def test_split_never_leaves_a_lone_bos_or_eos():
    # Doc 0 fills 1023 of 1024 positions; doc 1 (10 text, an image, 500 text tokens) would leave
    # only its BOS in the last position, which trains nothing under the seed's rule: doc 1 starts
    # the next sample instead.
    config = PackingConfig(seq_length=1024, tokens_per_image=8, policy="split", seed=0)
    index = build_packing_index([0, 1], np.array([1023, 512]), np.array([0, 1, 2]), np.array([5, 10]), config)
    segments = [tuple(s) for s in index.segments.tolist()]
    assert all(b - a > 1 for _, a, b in segments) and (1, 0, 512) in segments, segments
    # A cut that would leave only the EOS (no target) drops that piece: 1017 tokens + 7 more for
    # the image fill the sample, token 1017 (the EOS) is already the last position's target.
    for loss_policy in ("after-first-image", "all"):
        one = build_packing_index([0], np.array([1018]), np.array([0, 1]), np.array([3]),
                                  dataclasses.replace(config, loss_policy=loss_policy))
        assert one.segments.tolist() == [[0, 0, 1017]]


def test_text_only_documents_pack_only_under_loss_all():
    lengths, offsets, positions = np.array([40, 30]), np.array([0, 1, 1]), np.array([3])
    seed_rule = build_packing_index([0, 1], lengths, offsets, positions, PackingConfig(seq_length=1024, seed=0))
    assert sorted(seed_rule.segments[:, 0].tolist()) == [0]  # doc 1 (no image) trains nothing: skipped
    everything = build_packing_index([0, 1], lengths, offsets, positions,
                                     PackingConfig(seq_length=1024, seed=0, loss_policy="all"))
    assert sorted(everything.segments[:, 0].tolist()) == [0, 1]


def test_truncate_keeps_longest_prefix_and_starts_new_sample():
    lengths = np.array([3000, 10, 10])
    offsets = np.array([0, 1, 1, 1])
    positions = np.array([5])
    config = PackingConfig(seq_length=1024, policy="truncate", seed=3, loss_policy="all")  # docs 1, 2: text only
    index = build_packing_index([0, 1, 2], lengths, offsets, positions, config)
    segs = sorted(tuple(map(tuple, index.segments[index.sample_offsets[s]:index.sample_offsets[s + 1]]))
                  for s in range(len(index)))
    # Doc 0 is cut to 1024 positions (5 text + 576 image + 443 text tokens).
    assert (((0, 0, 5 + 1 + 443),)) in segs
    assert sum(len(s) for s in segs) == 3


def test_bad_inputs_raise_clear_errors():
    config = PackingConfig(seq_length=1024)
    with pytest.raises(ValueError, match="image 0 of document 0 is at position 7"):
        build_packing_index([0], np.array([5]), np.array([0, 1]), np.array([7]), config)
    with pytest.raises(ValueError, match="out of range"):
        build_packing_index([3], np.array([5]), np.array([0, 0]), np.array([], np.int64), config)
    with pytest.raises(ValueError, match="no documents"):
        build_packing_index([], np.array([5]), np.array([0, 0]), np.array([], np.int64), config)
    with pytest.raises(ValueError, match="all empty"):
        build_packing_index([0], np.array([0]), np.array([0, 0]), np.array([], np.int64), config)
    with pytest.raises(ValueError, match="PREFIX:all"):  # text only under the seed's rule
        build_packing_index([0], np.array([9]), np.array([0, 0]), np.array([], np.int64), config)
    with pytest.raises(ValueError, match="cannot hold one image"):
        PackingConfig(seq_length=512)
    with pytest.raises(ValueError, match="policy"):
        PackingConfig(seq_length=1024, policy="drop")


@pytest.mark.parametrize("seed", range(20))
def test_blending_matches_reference(seed):
    rng = np.random.default_rng(seed)
    w = rng.random(int(rng.integers(1, 6))) + 0.01
    n = int(rng.integers(0, 500))
    which, index = build_blending_index(w, n)
    want_which, want_index = ref_blend((w / w.sum()).tolist(), n)
    np.testing.assert_array_equal(which, want_which)
    np.testing.assert_array_equal(index, want_index)
    # Each dataset's share tracks its weight within one sample at every prefix.
    counts = np.zeros(len(w))
    for i, d in enumerate(which):
        counts[d] += 1
        assert np.all(np.abs(counts - (w / w.sum()) * (i + 1)) <= 1 + 1e-9)


def test_blending_rejects_bad_weights():
    with pytest.raises(ValueError, match="positive"):
        build_blending_index([0.5, 0.0], 10)


def test_cache_builds_once_and_keys_on_parameters(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5), "b": np.ones((2, 3))}

    first = load_or_build(tmp_path, "x", {"seed": 1}, build)
    again = load_or_build(tmp_path, "x", {"seed": 1}, build)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["a"], np.arange(5))
    assert isinstance(again["b"], np.memmap) and first["b"].shape == (2, 3)
    load_or_build(tmp_path, "x", {"seed": 2}, build)
    assert len(calls) == 2
    assert cache_key({"seed": 1}) != cache_key({"seed": 2})
    # Only the published directories exist: no temporary leftovers.
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["x", "x"]


def test_cache_ignores_unpublished_directory(tmp_path):
    # A directory without params.json (a crashed writer never leaves one, a person copying files
    # might) is not trusted, and the error says what to do.
    stale = tmp_path / f"x-{cache_key({'k': 1})}"
    stale.mkdir()
    np.save(stale / "a.npy", np.zeros(3))
    with pytest.raises(FileExistsError, match="delete it"):
        load_or_build(tmp_path, "x", {"k": 1}, lambda: {"a": np.arange(3)})
