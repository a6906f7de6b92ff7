// Top-k kernels for XLA:CPU through JAX's typed FFI (lpkernel/ops/processed/
// cpu_library.py builds and registers them); rows are shared among XLA's
// intra-op threads.
//
// LpkernelTopK: each row's k largest float32 values and their indices, in
// lax.top_k's order on the CPU: the floats' total order (-NaN < -inf < ... <
// -0 < 0 < ... < inf < NaN), equal values by their index, lowest first; values
// descending. Per row, a buffer of at most 4k candidates: every value at least the k-th
// largest kept so far enters it, the block filter skipping 16 values at a time
// where none does; a full buffer is cut back to its k largest (nth_element),
// which raises the bar. The k kept are sorted once at the end.
//
// LpkernelGroupsTopK: each row's k largest values (float32 or bfloat16),
// descending, as LpkernelTopK orders them, from the row and its groups' maxima
// (float32 or bfloat16, in the order of the row's values, or of any increasing
// function of them: capped logits): only the groups whose maximum is at least
// the k-th largest maximum can hold one; the least of those groups' own maxima
// is the first bar, so few values enter.
//
// LpkernelBufferTopK: a row's running candidates for its k largest values (a
// buffer and its bar, updated in place) given one more block of the row (the
// sweep from hidden states keeps them across the unembedding's blocks).

#include <cmath>
#include <limits>

#include "cpu_common.h"

namespace {

using namespace lpkernel;  // NOLINT: the shared vectors, loads and thread split

// The float's bits as an unsigned key in the floats' total order.
inline uint32_t OrderKey(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(b) >> 31);
  return b ^ (negative | 0x80000000u);
}

// The float of an OrderKey.
inline float KeyValue(uint32_t key) {
  uint32_t b = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Whether a value of x[0, 16) may reach the bar (NaN and -0 as 0 included; Offer decides).
inline bool AnyAtLeast(const float* x, float bar) {
  F4 b = {bar, bar, bar, bar};
  I4 any = {0, 0, 0, 0};
  for (int j = 0; j < 16; j += 4) any |= ~(Load4(x + j) < b);
  return (any[0] | any[1] | any[2] | any[3]) != 0;
}

inline F4 Max(F4 a, F4 b) { return a > b ? a : b; }

// The largest OrderKey of x[0, width) (width: a positive multiple of 4), or a
// smaller key of one of its values (NaN). By float maxima, except where the
// maximum is a zero or subnormal: XLA:CPU runs with subnormals flushed, which
// may turn a negative subnormal maximum into a -0 it does not hold, so such a
// block is read again by bit keys.
template <typename T>
inline uint32_t BlockMaxKey(const T* x, int64_t width) {
  F4 m = Load4(x);
  for (int64_t j = 4; j < width; j += 4) m = Max(m, Load4(x + j));
  float a = m[0] > m[1] ? m[0] : m[1], b = m[2] > m[3] ? m[2] : m[3];
  float top = a > b ? a : b;
  if (!(std::fabs(top) < std::numeric_limits<float>::min())) return OrderKey(top);
  uint32_t key = 0;
  for (int64_t j = 0; j < width; ++j) key = std::max(key, OrderKey(Widen(x[j])));
  return key;
}

// Key above, inverted index below: a larger rank is a larger value, or the same
// value at a lower index.
inline uint64_t Rank(uint32_t key, int64_t i) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}

class RowTopK {
 public:
  explicit RowTopK(int64_t k)
      : k_(k), capacity_(4 * k), buffer_(4 * k + 1), maxima_(4 * k), counts_(4 * 256) {}

  void Run(const float* x, int64_t n, float* values, int32_t* ids) {
    size_ = 0;
    bar_ = SeedBar(x, n);
    float bar = KeyValue(bar_);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      if (AnyAtLeast(x + i, bar)) {
        for (int64_t j = i; j < i + 16; ++j) Offer(x[j], j);
        bar = KeyValue(bar_);
      }
    }
    for (; i < n; ++i) Offer(x[i], i);
    Finish(values, ids, [&](int64_t at) { return x[at]; });
  }

  // A row's k largest values come from the groups of `group` columns whose
  // maxima mx[0, g) (g = ceil(n / group); or an increasing function of them:
  // capped logits) are at least the k-th largest maximum: the k largest maxima
  // are k values of the row. Choose puts those groups in `chosen` and
  // prefetches their columns of x (scattered over the row: read from memory,
  // they are latency-bound).
  template <typename T, typename M>
  void Choose(const T* x, int64_t n, const M* mx, int64_t g, int64_t group,
              std::vector<int64_t>& chosen) {
    uint32_t least = 0;
    if (g > k_) {
      least = KthFloor(mx, g);
      // XLA:CPU flushes subnormals, so a maximum that is a zero or subnormal may
      // be off by one (BlockMaxKey): every group is read then.
      if (std::fabs(KeyValue(least)) < std::numeric_limits<float>::min()) least = 0;
    }
    chosen.clear();
    for (int64_t j = 0; j < g; ++j) {
      if (OrderKey(Widen(mx[j])) < least) continue;
      chosen.push_back(j);
      for (int64_t c = j * group; c < std::min(n, (j + 1) * group); c += 64 / sizeof(T)) {
        __builtin_prefetch(x + c);
      }
    }
  }

  // The k largest values of the row x[0, n) among its `chosen` groups. With k
  // or more of them the first bar is the least of their maxima (each holds a
  // value at least it).
  template <typename T>
  void Scan(const T* x, int64_t n, const std::vector<int64_t>& chosen, int64_t group,
            float* values) {
    uint32_t bar = static_cast<int64_t>(chosen.size()) >= k_ ? UINT32_MAX : 0;
    for (int64_t j : chosen) {
      if (bar == 0) break;
      int64_t lo = j * group, hi = std::min(n, lo + group), i = lo;
      uint32_t top = 0;
      if (hi - lo >= 4) {
        top = BlockMaxKey(x + lo, (hi - lo) / 4 * 4);
        i = lo + (hi - lo) / 4 * 4;
      }
      for (; i < hi; ++i) top = std::max(top, OrderKey(Widen(x[i])));
      bar = std::min(bar, top);
    }
    size_ = 0;
    bar_ = bar;
    float barf = KeyValue(bar_);
    for (int64_t j : chosen) {
      int64_t lo = j * group, hi = std::min(n, lo + group), i = lo;
      for (; i + 4 <= hi; i += 4) {  // 4 values at a time where one may reach the bar
        I4 pass = ~(Load4(x + i) < F4{barf, barf, barf, barf});
        if ((pass[0] | pass[1] | pass[2] | pass[3]) == 0) continue;
        for (int64_t c = i; c < i + 4; ++c) Offer(Widen(x[c]), c);
        barf = KeyValue(bar_);
      }
      for (; i < hi; ++i) Offer(Widen(x[i]), i);
    }
    Finish(values, nullptr, [&](int64_t at) { return Widen(x[at]); });
  }

 private:
  // The k-th largest key of mx[0, g) (g > k) with its low 16 bits cleared (at
  // most it; in its float's sign, exponent and 7 high mantissa bits): a count
  // of the keys' high bytes, then of the next byte within the k-th's bin (an
  // nth_element of 256 keys takes 2 us, these two passes a fraction of it).
  // Four interleaved counts: most keys share a few high bytes, and one count's
  // increments would wait on each other.
  template <typename M>
  uint32_t KthFloor(const M* mx, int64_t g) {
    uint32_t prefix = 0;
    int64_t rank = k_;  // the k-th's rank within the bins still in play
    for (int shift = 24; shift >= 16; shift -= 8) {
      std::fill(counts_.begin(), counts_.end(), 0);
      for (int64_t j = 0; j < g; ++j) {
        uint32_t key = OrderKey(Widen(mx[j]));
        if (shift == 24 || key >> 24 == prefix >> 24) {
          ++counts_[(j & 3) * 256 + ((key >> shift) & 255)];
        }
      }
      auto in_bin = [&](int64_t b) {
        return counts_[b] + counts_[256 + b] + counts_[512 + b] + counts_[768 + b];
      };
      int64_t bin = 255;
      for (; rank > in_bin(bin); --bin) rank -= in_bin(bin);
      prefix |= static_cast<uint32_t>(bin) << shift;
    }
    return prefix;
  }

  // Sorts the buffer's k largest and writes their values (and indices, if asked).
  template <typename Value>
  void Finish(float* values, int32_t* ids, Value value) {
    if (size_ > k_) Cut();
    std::sort(buffer_.begin(), buffer_.begin() + size_, std::greater<uint64_t>());
    for (int64_t j = 0; j < size_; ++j) {
      int64_t at = static_cast<uint32_t>(~static_cast<uint32_t>(buffer_[j]));
      if (ids != nullptr) ids[j] = static_cast<int32_t>(at);
      values[j] = value(at);
    }
    for (int64_t j = size_; j < k_; ++j) {  // fewer values than k: only from bad group ids
      if (ids != nullptr) ids[j] = -1;
      values[j] = -std::numeric_limits<float>::infinity();
    }
  }

  // Written past the end and counted only when at the bar: no branch to mispredict.
  void Offer(float v, int64_t i) {
    uint32_t key = OrderKey(v);
    buffer_[size_] = Rank(key, i);
    size_ += key >= bar_;
    if (size_ == capacity_) Cut();
  }

  // A first bar: the k-th largest of the maxima of up to 4k blocks at the row's
  // start, 64 values wide (narrower, down to 8, where the row holds fewer than
  // 2k such blocks); each block holds a value at least its maximum, so the row
  // holds k values at least the bar. 0 (all pass) for a row under 8k values.
  uint32_t SeedBar(const float* x, int64_t n) {
    int64_t width = 64;
    while (width > 8 && n / width < 2 * k_) width /= 2;
    int64_t blocks = std::min(n / width, 4 * k_);
    if (blocks < k_) return 0;
    for (int64_t b = 0; b < blocks; ++b) maxima_[b] = BlockMaxKey(x + b * width, width);
    std::nth_element(maxima_.begin(), maxima_.begin() + (k_ - 1), maxima_.begin() + blocks,
                     std::greater<uint32_t>());
    return maxima_[k_ - 1];
  }

  // Keeps the k largest ranks; a value under the k-th cannot be among the k largest.
  void Cut() {
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.begin() + size_,
                     std::greater<uint64_t>());
    size_ = k_;
    // A later value equal to the k-th comes at a higher index, so below it: only
    // larger keys may enter now (rows of many ties, e.g. bfloat16, pass fewer).
    uint32_t kth = static_cast<uint32_t>(buffer_[k_ - 1] >> 32);
    bar_ = kth == UINT32_MAX ? kth : kth + 1;
  }

  int64_t k_, capacity_;
  std::vector<uint64_t> buffer_;  // capacity_ ranks and one written past them
  std::vector<uint32_t> maxima_;
  std::vector<int32_t> counts_;  // KthFloor's bins, four times
  int64_t size_ = 0;
  uint32_t bar_ = 0;
};

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> ids) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k of a scalar");
  int64_t n = dims.back();
  int64_t k = values->dimensions().back();
  if (k > n || n > INT32_MAX) return ffi::Error::InvalidArgument("top_k: k > n or n >= 2^31");
  if (k == 0 || x.element_count() == 0) return ffi::Error::Success();
  const float* in = x.typed_data();
  float* v = values->typed_data();
  int32_t* i = ids->typed_data();
  ParallelRows(pool, x.element_count() / n, n, [=](int64_t lo, int64_t hi) {
    RowTopK top(k);
    for (int64_t r = lo; r < hi; ++r) top.Run(in + r * n, n, v + r * k, i + r * k);
  });
  return ffi::Error::Success();
}

template <typename T, typename M>
void RowsGroupsTopK(ffi::ThreadPool& pool, const T* x, int64_t rows, int64_t n, const M* mx,
                    int64_t g, int64_t group, int64_t k, float* values) {
  ParallelRows(pool, rows, g + 2 * k * group, [=](int64_t lo, int64_t hi) {
    RowTopK top(k);
    std::vector<int64_t> chosen;
    for (int64_t r = lo; r < hi; ++r) {
      top.Choose(x + r * n, n, mx + r * g, g, group, chosen);
      top.Scan(x + r * n, n, chosen, group, values + r * k);
    }
  });
}

template <typename T>
ffi::Error GroupsTopKOf(ffi::ThreadPool& pool, const T* x, int64_t rows, int64_t n,
                        ffi::AnyBuffer mx, int64_t g, int64_t group, int64_t k, float* values) {
  switch (mx.element_type()) {
    case ffi::DataType::F32:
      RowsGroupsTopK(pool, x, rows, n, static_cast<const float*>(mx.untyped_data()), g, group, k,
                     values);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      RowsGroupsTopK(pool, x, rows, n, static_cast<const uint16_t*>(mx.untyped_data()), g, group, k,
                     values);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("groups_top_k: maxima float32 or bfloat16");
  }
}

// x [..., n] float32 or bfloat16; maxima [..., ceil(n / group)] float32 or
// bfloat16; values [..., k], k at most n.
ffi::Error GroupsTopK(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer maxima,
                      ffi::ResultBuffer<ffi::F32> values, int64_t group) {
  auto dims = x.dimensions();
  if (dims.size() == 0 || maxima.dimensions().size() == 0 || group < 1) {
    return ffi::Error::InvalidArgument("groups_top_k: x [..., n], maxima [..., g], group >= 1");
  }
  int64_t n = dims.back(), g = maxima.dimensions().back(), k = values->dimensions().back();
  if (n == 0 || k == 0) return ffi::Error::Success();
  int64_t rows = x.element_count() / n;
  if (g != (n + group - 1) / group || k > n ||
      static_cast<int64_t>(maxima.element_count()) / g != rows) {
    return ffi::Error::InvalidArgument("groups_top_k: maxima [..., ceil(n / group)], k <= n");
  }
  float* v = values->typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return GroupsTopKOf(pool, static_cast<const float*>(x.untyped_data()), rows, n, maxima, g,
                          group, k, v);
    case ffi::DataType::BF16:
      return GroupsTopKOf(pool, static_cast<const uint16_t*>(x.untyped_data()), rows, n, maxima,
                          g, group, k, v);
    default:
      return ffi::Error::InvalidArgument("groups_top_k: float32 or bfloat16");
  }
}

// One row's block x[0, n) into its running buffer buf[0, cap) of candidates for
// its k largest values (meta: the count held and the bar, an OrderKey: only
// values at least the bar enter). A full buffer is cut back to its k largest
// (nth_element), which raises the bar past the k-th: values only, an equal
// value is not needed.
void BufferRow(const float* x, int64_t n, float* buf, int32_t* meta, int64_t k, int64_t cap) {
  int64_t size = meta[0];
  uint32_t bar = static_cast<uint32_t>(meta[1]);
  float barf = KeyValue(bar);
  auto offer = [&](float v) {
    if (OrderKey(v) < bar) return;
    buf[size++] = v;
    if (size < cap) return;
    std::nth_element(buf, buf + (k - 1), buf + size,
                     [](float a, float b) { return OrderKey(a) > OrderKey(b); });
    size = k;
    uint32_t kth = OrderKey(buf[k - 1]);
    bar = kth == UINT32_MAX ? kth : kth + 1;
    barf = KeyValue(bar);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if (AnyAtLeast(x + i, barf)) {
      for (int64_t j = i; j < i + 16; ++j) offer(x[j]);
    }
  }
  for (; i < n; ++i) offer(x[i]);
  meta[0] = static_cast<int32_t>(size);
  meta[1] = static_cast<int32_t>(bar);
}

// x float32 [..., n]; buf float32 [..., cap] and meta int32 [..., 2] (updated in
// place: the results alias them), cap > k.
ffi::Error BufferTopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> buf,
                      ffi::Buffer<ffi::S32> meta, ffi::ResultBuffer<ffi::F32> buf_out,
                      ffi::ResultBuffer<ffi::S32> meta_out, int64_t k) {
  auto dims = x.dimensions();
  if (dims.size() == 0 || buf.dimensions().size() == 0) {
    return ffi::Error::InvalidArgument("buffer_top_k: x [..., n], buf [..., cap], meta [..., 2]");
  }
  int64_t n = dims.back(), cap = buf.dimensions().back();
  if (k < 1 || cap <= k) return ffi::Error::InvalidArgument("buffer_top_k: 1 <= k < cap");
  int64_t rows = buf.element_count() / cap;
  if (rows == 0) return ffi::Error::Success();
  if (static_cast<int64_t>(meta.element_count()) != 2 * rows ||
      (n > 0 && static_cast<int64_t>(x.element_count()) / n != rows)) {
    return ffi::Error::InvalidArgument("buffer_top_k: rows");
  }
  float* b = buf_out->typed_data();
  int32_t* m = meta_out->typed_data();
  if (b != buf.typed_data()) std::copy(buf.typed_data(), buf.typed_data() + rows * cap, b);
  if (m != meta.typed_data()) std::copy(meta.typed_data(), meta.typed_data() + 2 * rows, m);
  const float* in = x.typed_data();
  ParallelRows(pool, rows, n + 64, [=](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) BufferRow(in + r * n, n, b + r * cap, m + 2 * r, k, cap);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelGroupsTopK, GroupsTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelBufferTopK, BufferTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));
