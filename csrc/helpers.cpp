// Index builders for the data pipeline, exposed to Python as `engine._helpers`.
//
// The loops here touch every document (tens of millions) once per epoch, so they live in C++.
// Everything is deterministic: the same inputs and seed give the same arrays on every machine.
// The pure-Python reference in tests/data/test_packing.py mirrors these functions line by line;
// change both together (and bump INDEX_VERSION in engine/data/packing.py).
//
// build_packing_index: documents -> packed samples of at most `seq_length` LLM positions.
//   A document's token stream holds one `<image>` token per image; in the language model each
//   image occupies `tokens_per_image` positions. A segment (doc, start, end) costs
//   (end - start) + (tokens_per_image - 1) * (images in [start, end)) positions. Cuts happen at
//   token boundaries, so an image (one token) is never split.
//
//   Greedy fill, documents in a fresh random order each epoch:
//   - policy "split": a document is appended to the current sample; the longest prefix of its
//     remainder that fits the free positions and the image budget goes in, the sample is closed
//     and the remainder continues at the start of the next sample. Every token of every document
//     is used exactly once per epoch.
//   - policy "truncate": a document that does not fit the free space of the current sample
//     closes it and starts a new sample; a document that does not fit an empty sample keeps its
//     longest fitting prefix and the rest is dropped.
//   Useful pieces only: a piece (doc, start, end) is kept only when one of its positions has a
//   target that can carry loss: a text token t of the document with start < t <= end, t < the
//   document's length and t >= loss_start[doc] (`loss_start` encodes the loss policy: 1 when
//   every text token trains, the first image's position + 1 under "after-first-image", the
//   document's length when nothing can train). A document with no such token is skipped. Under
//   "split", a useless first piece of a document that would close a non-empty sample (e.g. a
//   lone BOS in its last position) moves the document to a fresh sample instead; a useless piece
//   of an empty sample (a lone EOS left by a cut, or a whole sample of text before the first
//   image) is skipped, the rest of the document continues. Under "truncate", a document whose
//   kept prefix is useless is skipped. A skipped piece holds no target that could train, so
//   nothing learnable is lost (the previous piece's last position already predicts its first
//   token).
//   An epoch's last sample is closed at the epoch's end, so epochs never share a sample; the
//   samples of each epoch are then shuffled among themselves. Epochs are built until at least
//   `num_samples` samples exist (at least one epoch).
//
// build_blending_index: which dataset, and which of its samples, feeds each blended sample —
//   always the dataset furthest behind its target share (weight * samples so far).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// ---- Random numbers: SplitMix64, a tiny generator that is trivial to mirror in Python. ----

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

struct Rng {
  uint64_t state;
  // One independent stream per (seed, stream id): epochs use 2*epoch (documents) and 2*epoch+1
  // (samples), so adding epochs never changes the earlier ones.
  Rng(uint64_t seed, uint64_t stream) : state(mix64(mix64(seed) ^ stream)) {}

  uint64_t next() {
    state += kGolden;
    return mix64(state);
  }

  // Uniform in [0, n) without modulo bias: reject the top (2^64 mod n) values.
  uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;  // == 2^64 mod n
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }
};

// Fisher-Yates, last position first.
template <typename T>
void shuffle(T* a, int64_t n, Rng& rng) {
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(a[i], a[j]);
  }
}

// Hand a std::vector to numpy without copying: the array owns the vector through a capsule.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owned->data(), free_when_done);
}

// ---- Packing ----

struct Fit {
  int64_t end;     // segment is [start, end)
  int64_t cost;    // LLM positions it occupies
  int64_t images;  // images inside it
};

class Packer {
 public:
  Packer(const int64_t* lengths, const int64_t* image_offsets, const int64_t* image_positions,
         const int64_t* loss_start, int64_t seq_length, int64_t tokens_per_image, int64_t max_images, bool split)
      : lengths_(lengths), image_offsets_(image_offsets), image_positions_(image_positions),
        loss_start_(loss_start), seq_length_(seq_length), tokens_per_image_(tokens_per_image), max_images_(max_images),
        split_(split) {
    sample_offsets.push_back(0);
  }

  void add_document(int64_t doc) {
    const int64_t length = lengths_[doc];
    if (!useful(doc, 0, length)) return;  // empty, or nothing in it carries loss
    if (split_) {
      int64_t start = 0;
      while (start < length) {
        Fit f = fit(doc, start);
        if (f.end == start) {  // the next token is an image that no longer fits this sample
          close_sample();
          continue;
        }
        if (!useful(doc, start, f.end)) {
          if (used_ > 0 && start == 0) {  // start the document in a fresh sample instead
            close_sample();
            continue;
          }
          start = f.end;  // nothing in this piece can train: skip it
          continue;
        }
        append(doc, start, f);
        if (f.end < length) close_sample();  // the remainder starts the next sample
        start = f.end;
      }
    } else {
      Fit f = fit(doc, 0);
      if (f.end < length && used_ > 0) {  // would not fit whole here: try a fresh sample
        close_sample();
        f = fit(doc, 0);
      }
      // f.end < length only when the document exceeds an empty sample
      if (useful(doc, 0, f.end)) append(doc, 0, f);
    }
  }

  void prefetch_offsets(int64_t doc) const {
    __builtin_prefetch(lengths_ + doc);
    __builtin_prefetch(image_offsets_ + doc);
  }
  void prefetch_positions(int64_t doc) const { __builtin_prefetch(image_positions_ + image_offsets_[doc]); }

  void close_sample() {
    if (used_ == 0) return;
    sample_offsets.push_back(static_cast<int64_t>(segments.size() / 3));
    sample_lengths.push_back(static_cast<int32_t>(used_));
    used_ = 0;
    images_ = 0;
  }

  int64_t num_samples() const { return static_cast<int64_t>(sample_lengths.size()); }

  std::vector<int64_t> sample_offsets;  // [N + 1]
  std::vector<int64_t> segments;        // [M * 3]: doc, start, end
  std::vector<int32_t> sample_lengths;  // [N]: LLM positions used

 private:
  // The longest segment [start, end) of `doc` that fits the free positions and image budget of
  // the current sample. end == start when nothing fits (the next token is an image too big for
  // what is left).
  Fit fit(int64_t doc, int64_t start) const {
    const int64_t room = seq_length_ - used_;
    const int64_t image_room = max_images_ - images_;
    const int64_t* first = image_positions_ + image_offsets_[doc];
    const int64_t* last = image_positions_ + image_offsets_[doc + 1];
    int64_t cost = 0, images = 0, cursor = start;
    for (const int64_t* p = std::lower_bound(first, last, start); p != last; ++p) {
      const int64_t text = *p - cursor;  // text tokens before this image
      if (cost + text >= room) return {cursor + (room - cost), room, images};
      cost += text;
      if (images == image_room || cost + tokens_per_image_ > room) return {*p, cost, images};
      cost += tokens_per_image_;
      images += 1;
      cursor = *p + 1;
    }
    const int64_t text = lengths_[doc] - cursor;
    if (cost + text > room) return {cursor + (room - cost), room, images};
    return {lengths_[doc], cost + text, images};
  }

  // Does the piece [start, end) of `doc` hold a position whose target can carry loss: a text
  // token t (not an image) with max(start + 1, loss_start) <= t <= min(end, length - 1)?
  bool useful(int64_t doc, int64_t start, int64_t end) const {
    const int64_t lo = std::max(start + 1, loss_start_[doc]);
    const int64_t hi = std::min(end, lengths_[doc] - 1);
    if (lo > hi) return false;
    const int64_t* first = image_positions_ + image_offsets_[doc];
    const int64_t* last = image_positions_ + image_offsets_[doc + 1];
    const int64_t images = std::upper_bound(first, last, hi) - std::lower_bound(first, last, lo);
    return images < hi - lo + 1;
  }

  void append(int64_t doc, int64_t start, const Fit& f) {
    if (f.end <= start) throw std::logic_error("packing made no progress (inputs not validated?)");
    segments.push_back(doc);
    segments.push_back(start);
    segments.push_back(f.end);
    used_ += f.cost;
    images_ += f.images;
  }

  const int64_t* lengths_;
  const int64_t* image_offsets_;
  const int64_t* image_positions_;
  const int64_t* loss_start_;
  const int64_t seq_length_, tokens_per_image_, max_images_;
  const bool split_;
  int64_t used_ = 0;    // LLM positions in the open sample
  int64_t images_ = 0;  // images in the open sample
};

[[noreturn]] void fail(const std::string& message) { throw py::value_error(message); }

std::string str(int64_t v) { return std::to_string(v); }

// Inputs come from a file written by another program: check them once, here, so the loops can
// trust them. Messages are built only on failure (this runs over every image).
void validate(const Int64Array& documents, const Int64Array& lengths, const Int64Array& image_offsets,
              const Int64Array& image_positions, const Int64Array& loss_start, int64_t seq_length, int64_t tokens_per_image,
              int64_t max_images) {
  if (documents.ndim() != 1 || lengths.ndim() != 1 || image_offsets.ndim() != 1 || image_positions.ndim() != 1 ||
      loss_start.ndim() != 1)
    fail("packing inputs must be 1-D arrays");
  if (tokens_per_image < 1) fail("tokens_per_image must be >= 1");
  if (seq_length < tokens_per_image)
    fail("seq_length (" + str(seq_length) + ") must hold at least one image (" + str(tokens_per_image) +
         " positions)");
  if (seq_length > INT32_MAX) fail("seq_length too large");
  if (max_images < 1) fail("max_images_per_sample must be >= 1");
  const int64_t num_docs = lengths.shape(0);
  if (image_offsets.shape(0) != num_docs + 1)
    fail("doc_image_offsets must have num_documents + 1 entries, got " + str(image_offsets.shape(0)) + " for " +
         str(num_docs) + " documents");
  if (loss_start.shape(0) != num_docs)
    fail("loss_start must have one entry per document, got " + str(loss_start.shape(0)) + " for " +
         str(num_docs) + " documents");
  if (documents.shape(0) == 0) fail("no documents to pack (empty split?)");
  const int64_t* len = lengths.data();
  const int64_t* off = image_offsets.data();
  const int64_t* pos = image_positions.data();
  if (off[0] != 0 || off[num_docs] != image_positions.shape(0))
    fail("doc_image_offsets must start at 0 and end at the number of images");
  for (int64_t d = 0; d < num_docs; ++d) {
    if (len[d] < 0) fail("document " + str(d) + " has a negative length");
    if (off[d] > off[d + 1]) fail("doc_image_offsets decrease at document " + str(d));
    int64_t previous = -1;
    for (int64_t i = off[d]; i < off[d + 1]; ++i) {
      if (pos[i] <= previous || pos[i] >= len[d])
        fail("image " + str(i) + " of document " + str(d) + " is at position " + str(pos[i]) +
             ": positions must increase and lie inside the document (length " + str(len[d]) + ")");
      previous = pos[i];
    }
  }
  const int64_t* docs = documents.data();
  for (int64_t k = 0; k < documents.shape(0); ++k) {
    if (docs[k] < 0 || docs[k] >= num_docs)
      fail("document id " + str(docs[k]) + " out of range [0, " + str(num_docs) + ")");
  }
}

py::dict build_packing_index(const Int64Array& documents, const Int64Array& doc_lengths,
                             const Int64Array& doc_image_offsets, const Int64Array& image_positions,
                             const Int64Array& loss_start, int64_t seq_length, int64_t tokens_per_image, int64_t max_images_per_sample,
                             const std::string& policy, uint64_t seed, int64_t num_samples) {
  if (policy != "split" && policy != "truncate") fail("policy must be 'split' or 'truncate', got '" + policy + "'");
  validate(documents, doc_lengths, doc_image_offsets, image_positions, loss_start, seq_length, tokens_per_image,
           max_images_per_sample);

  Packer packer(doc_lengths.data(), doc_image_offsets.data(), image_positions.data(), loss_start.data(), seq_length,
                tokens_per_image, max_images_per_sample, policy == "split");
  std::vector<int64_t> order(documents.data(), documents.data() + documents.shape(0));
  std::vector<int64_t> epoch_offsets{0};
  {
    py::gil_scoped_release no_gil;
    for (uint64_t epoch = 0;; ++epoch) {
      std::vector<int64_t> perm(order);
      Rng doc_rng(seed, 2 * epoch);
      shuffle(perm.data(), static_cast<int64_t>(perm.size()), doc_rng);
      // Documents come in random order, so each one is a few cache misses: ask for the next
      // ones' lengths and offsets early, and for their image positions once the offsets are in.
      const int64_t n = static_cast<int64_t>(perm.size());
      for (int64_t k = 0; k < n; ++k) {
        if (k + 16 < n) packer.prefetch_offsets(perm[k + 16]);
        if (k + 8 < n) packer.prefetch_positions(perm[k + 8]);
        packer.add_document(perm[k]);
      }
      packer.close_sample();
      const int64_t total = packer.num_samples();
      if (total == epoch_offsets.back()) break;  // reported below, with the GIL held
      epoch_offsets.push_back(total);
      if (total >= num_samples) break;
    }
  }
  const int64_t total = packer.num_samples();
  if (total == 0) fail("no document to pack holds a token that carries loss (all empty, or no text where the loss policy trains)");

  // Shuffle each epoch's samples among themselves; training reads epoch 0 fully before epoch 1.
  std::vector<int64_t> shuffle_index(total);
  {
    py::gil_scoped_release no_gil;
    for (size_t e = 0; e + 1 < epoch_offsets.size(); ++e) {
      const int64_t lo = epoch_offsets[e], hi = epoch_offsets[e + 1];
      for (int64_t i = lo; i < hi; ++i) shuffle_index[i] = i;
      Rng sample_rng(seed, 2 * e + 1);
      shuffle(shuffle_index.data() + lo, hi - lo, sample_rng);
    }
  }
  const auto num_segments = static_cast<py::ssize_t>(packer.segments.size() / 3);
  py::dict out;
  out["sample_offsets"] = to_numpy(std::move(packer.sample_offsets), {total + 1});
  out["segments"] = to_numpy(std::move(packer.segments), {num_segments, 3});
  out["shuffle"] = to_numpy(std::move(shuffle_index), {total});
  const auto num_epoch_offsets = static_cast<py::ssize_t>(epoch_offsets.size());
  out["epoch_offsets"] = to_numpy(std::move(epoch_offsets), {num_epoch_offsets});
  out["sample_lengths"] = to_numpy(std::move(packer.sample_lengths), {total});
  return out;
}

// ---- Blending ----

py::tuple build_blending_index(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                               int64_t num_samples) {
  if (weights.ndim() != 1 || weights.shape(0) < 1) fail("weights must be a non-empty 1-D array");
  if (weights.shape(0) > INT16_MAX) fail("too many datasets to blend");
  if (num_samples < 0) fail("num_samples must be >= 0");
  const int64_t k = weights.shape(0);
  const double* w = weights.data();
  for (int64_t d = 0; d < k; ++d)
    if (!(w[d] > 0)) fail("blend weights must be positive");

  std::vector<int16_t> dataset_index(num_samples);
  std::vector<int64_t> dataset_sample_index(num_samples);
  {
    py::gil_scoped_release no_gil;
    std::vector<int64_t> taken(k, 0);
    for (int64_t i = 0; i < num_samples; ++i) {
      // Give sample i to the dataset with the largest shortfall w * (i + 1) - taken; ties go to
      // the lower index. `volatile` keeps the product rounded on its own (no fused multiply-add),
      // so the result matches the Python reference bit for bit on every architecture.
      int64_t best = 0;
      double best_error = 0;
      for (int64_t d = 0; d < k; ++d) {
        volatile double target = w[d] * static_cast<double>(i + 1);
        const double error = target - static_cast<double>(taken[d]);
        if (d == 0 || error > best_error) {
          best = d;
          best_error = error;
        }
      }
      dataset_index[i] = static_cast<int16_t>(best);
      dataset_sample_index[i] = taken[best]++;
    }
  }
  return py::make_tuple(to_numpy(std::move(dataset_index), {num_samples}),
                        to_numpy(std::move(dataset_sample_index), {num_samples}));
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "Packing, shuffling and blending indices for engine.data (see csrc/helpers.cpp).";
  m.def("build_packing_index", &build_packing_index, py::arg("documents"), py::arg("doc_lengths"),
        py::arg("doc_image_offsets"), py::arg("image_positions"), py::arg("loss_start"), py::arg("seq_length"),
        py::arg("tokens_per_image"), py::arg("max_images_per_sample"), py::arg("policy"), py::arg("seed"),
        py::arg("num_samples"),
        "Pack documents into samples; returns a dict of sample_offsets [N+1], segments [M,3] "
        "(doc, token_start, token_end), shuffle [N], epoch_offsets [E+1], sample_lengths [N].");
  m.def("build_blending_index", &build_blending_index, py::arg("weights"), py::arg("num_samples"),
        "Returns (dataset_index int16 [N], dataset_sample_index int64 [N]).");
}
