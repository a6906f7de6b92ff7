// Top-k kernels for XLA:CPU through JAX's typed FFI (lpkernel/ops/processed/
// cpu_top_k.py builds and registers them); rows are shared among XLA's
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
// LpkernelGroupsTopK: the k largest values among the columns of k given groups
// of each row (float32 or bfloat16), descending, as LpkernelTopK orders them;
// the least of the groups' maxima is the first bar, so few values enter.
//
// LpkernelGroupTops: each group of `group` columns' c largest values (c <= 4),
// descending, equal values counted as often as they occur, -inf past a short
// group's columns, NaN for a group holding one: lane-wise sorted lists of 4
// lanes updated by maxima and minima, then the lanes merged (the record of
// lpkernel.ops.processed.record.group_tops, in registers).

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
inline F4 Min(F4 a, F4 b) { return a < b ? a : b; }

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

// The C largest of two lane-wise descending lists: the r-th is the best split of
// r + 1 values between them, max_i min(a[i - 1], b[r - i]).
template <int C>
void MergeLists(F4* a, const F4* b) {
  F4 r[C];
  for (int q = 0; q < C; ++q) {
    F4 best = Max(a[q], b[q]);
    for (int i = 1; i <= q; ++i) best = Max(best, Min(a[i - 1], b[q - i]));
    r[q] = best;
  }
  for (int q = 0; q < C; ++q) a[q] = r[q];
}

// One row's groups: out[g * C + j] is group g's j-th largest value.
template <int C>
void GroupTopsRow(const float* z, int64_t w, int64_t group, float* out) {
  const float inf = std::numeric_limits<float>::infinity();
  const F4 none = {-inf, -inf, -inf, -inf};
  for (int64_t g = 0, lo = 0; lo < w; ++g, lo += group) {
    int64_t hi = std::min(w, lo + group);
    F4 t[C];
    for (int j = 0; j < C; ++j) t[j] = none;
    I4 nan = {0, 0, 0, 0};
    auto take = [&](F4 v) {
      nan |= v != v;
      for (int j = 0; j < C; ++j) {
        F4 larger = Max(t[j], v);
        v = Min(t[j], v);
        t[j] = larger;
      }
    };
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4) take(Load4(z + i));
    if (i < hi) {
      F4 v = none;
      for (int j = 0; i + j < hi; ++j) v[j] = z[i + j];
      take(v);
    }
    F4 other[C];
    for (int j = 0; j < C; ++j) other[j] = __builtin_shufflevector(t[j], t[j], 2, 3, 0, 1);
    MergeLists<C>(t, other);
    for (int j = 0; j < C; ++j) other[j] = __builtin_shufflevector(t[j], t[j], 1, 0, 3, 2);
    MergeLists<C>(t, other);
    bool any_nan = (nan[0] | nan[1] | nan[2] | nan[3]) != 0;
    for (int j = 0; j < C; ++j) out[g * C + j] = any_nan ? std::numeric_limits<float>::quiet_NaN() : t[j][0];
  }
}

// Key above, inverted index below: a larger rank is a larger value, or the same
// value at a lower index.
inline uint64_t Rank(uint32_t key, int64_t i) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}

class RowTopK {
 public:
  explicit RowTopK(int64_t k) : k_(k), capacity_(4 * k), buffer_(4 * k + 1), maxima_(4 * k) {}

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

  // The k largest values of the columns of groups ids[0, m) of a row x[0, n)
  // (group j: columns [j * group, (j + 1) * group) below n; k <= the columns).
  // With m >= k groups the first bar is the least of their maxima (each holds a
  // value at least it). Values only: which of equal values enters is immaterial.
  template <typename T>
  void RunGroups(const T* x, int64_t n, const int32_t* ids, int64_t m, int64_t group,
                 float* values) {
    uint32_t bar = m >= k_ ? UINT32_MAX : 0;
    for (int64_t g = 0; g < m && bar > 0; ++g) {
      int64_t lo = std::max<int64_t>(ids[g], 0) * group, hi = std::min(n, lo + group), i = lo;
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
    for (int64_t g = 0; g < m; ++g) {
      if (ids[g] < 0) continue;
      int64_t lo = int64_t{ids[g]} * group, hi = std::min(n, lo + group), i = lo;
      for (; i + 4 <= hi; i += 4) {  // 4 values at a time where one may reach the bar
        I4 pass = ~(Load4(x + i) < F4{barf, barf, barf, barf});
        if ((pass[0] | pass[1] | pass[2] | pass[3]) == 0) continue;
        for (int64_t j = i; j < i + 4; ++j) Offer(Widen(x[j]), j);
        barf = KeyValue(bar_);
      }
      for (; i < hi; ++i) Offer(Widen(x[i]), i);
    }
    Finish(values, nullptr, [&](int64_t at) { return Widen(x[at]); });
  }

 private:
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

template <typename T>
void RowsGroupsTopK(ffi::ThreadPool& pool, const T* x, int64_t rows, int64_t n, const int32_t* ids,
                    int64_t m, int64_t group, int64_t k, float* values) {
  ParallelRows(pool, rows, m * group, [=](int64_t lo, int64_t hi) {
    RowTopK top(k);
    for (int64_t r = lo; r < hi; ++r) {
      top.RunGroups(x + r * n, n, ids + r * m, m, group, values + r * k);
    }
  });
}

// x [..., n] float32 or bfloat16; ids int32 [..., m], distinct, each in
// [0, ceil(n / group)); values [..., k], k at most the groups' columns.
ffi::Error GroupsTopK(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> ids,
                      ffi::ResultBuffer<ffi::F32> values, int64_t group) {
  auto dims = x.dimensions();
  if (dims.size() == 0 || ids.dimensions().size() == 0 || group < 1) {
    return ffi::Error::InvalidArgument("groups_top_k: x [..., n], ids [..., m], group >= 1");
  }
  int64_t n = dims.back(), m = ids.dimensions().back(), k = values->dimensions().back();
  if (n == 0 || m == 0 || k == 0) return ffi::Error::Success();
  int64_t rows = x.element_count() / n;
  if (static_cast<int64_t>(ids.element_count()) / m != rows) return ffi::Error::InvalidArgument("groups_top_k: rows");
  const int32_t* i = ids.typed_data();
  float* v = values->typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      RowsGroupsTopK(pool, static_cast<const float*>(x.untyped_data()), rows, n, i, m, group, k, v);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      RowsGroupsTopK(pool, static_cast<const uint16_t*>(x.untyped_data()), rows, n, i, m, group, k, v);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("groups_top_k: float32 or bfloat16");
  }
}

ffi::Error GroupTops(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> out,
                     int64_t group, int64_t c) {
  auto dims = z.dimensions();
  if (dims.size() == 0 || group < 1 || c < 1 || c > 4) {
    return ffi::Error::InvalidArgument("group_tops: a row, group >= 1 and 1 <= c <= 4");
  }
  int64_t w = dims.back();
  if (w == 0 || z.element_count() == 0) return ffi::Error::Success();
  int64_t width = (w + group - 1) / group * c;  // out values per row
  const float* in = z.typed_data();
  float* o = out->typed_data();
  auto row = c == 1 ? GroupTopsRow<1> : c == 2 ? GroupTopsRow<2> : c == 3 ? GroupTopsRow<3> : GroupTopsRow<4>;
  ParallelRows(pool, z.element_count() / w, w, [=](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) row(in + r * w, w, group, o + r * width);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelGroupTops, GroupTops,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("c"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelGroupsTopK, GroupsTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));
