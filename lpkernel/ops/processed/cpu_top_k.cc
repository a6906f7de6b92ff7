// Each row's k largest float32 values and their indices, for XLA:CPU through
// JAX's typed FFI (lpkernel/ops/processed/cpu_top_k.py builds and registers it).
//
// The order is lax.top_k's on the CPU: the floats' total order (-NaN < -inf <
// ... < -0 < 0 < ... < inf < NaN), equal values by their index, lowest first;
// values descending. Rows are shared among XLA's intra-op threads.
//
// Per row, a buffer of at most 4k candidates: every value at least the k-th
// largest kept so far enters it, the block filter skipping 16 values at a time
// where none does; a full buffer is cut back to its k largest (nth_element),
// which raises the bar. The k kept are sorted once at the end.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

typedef float F4 __attribute__((vector_size(16)));   // GCC and Clang vectors:
typedef int32_t I4 __attribute__((vector_size(16)));  // SSE2 on x86-64, NEON on arm64

// Whether a value of x[0, 16) may reach the bar (NaN and -0 as 0 included; Offer decides).
inline bool AnyAtLeast(const float* x, float bar) {
  F4 b = {bar, bar, bar, bar};
  I4 any = {0, 0, 0, 0};
  for (int j = 0; j < 16; j += 4) {
    F4 v;
    std::memcpy(&v, x + j, sizeof v);
    any |= ~(v < b);
  }
  return (any[0] | any[1] | any[2] | any[3]) != 0;
}

// Key above, inverted index below: a larger rank is a larger value, or the same
// value at a lower index.
inline uint64_t Rank(uint32_t key, int64_t i) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}

class RowTopK {
 public:
  explicit RowTopK(int64_t k) : k_(k), capacity_(4 * k), buffer_(4 * k + 1), maxima_(2 * k) {}

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
    if (size_ > k_) Cut();
    std::sort(buffer_.begin(), buffer_.begin() + size_, std::greater<uint64_t>());
    for (int64_t j = 0; j < size_; ++j) {
      int64_t at = static_cast<uint32_t>(~static_cast<uint32_t>(buffer_[j]));
      ids[j] = static_cast<int32_t>(at);
      values[j] = x[at];
    }
  }

 private:
  // Written past the end and counted only when at the bar: no branch to mispredict.
  void Offer(float v, int64_t i) {
    uint32_t key = OrderKey(v);
    buffer_[size_] = Rank(key, i);
    size_ += key >= bar_;
    if (size_ == capacity_) Cut();
  }

  // A first bar: the k-th largest of the maxima of k to 2k blocks of 8 values
  // at the row's start (each block holds a value at least its maximum, so the
  // row holds k values at least the bar); 0 (all pass) for a row under 8k.
  uint32_t SeedBar(const float* x, int64_t n) {
    int64_t blocks = std::min(n / 8, 2 * k_);
    if (blocks < k_) return 0;
    for (int64_t b = 0; b < blocks; ++b) {
      uint32_t m = 0;
      for (int j = 0; j < 8; ++j) m = std::max(m, OrderKey(x[8 * b + j]));
      maxima_[b] = m;
    }
    std::nth_element(maxima_.begin(), maxima_.begin() + (k_ - 1), maxima_.begin() + blocks,
                     std::greater<uint32_t>());
    return maxima_[k_ - 1];
  }

  // Keeps the k largest ranks; a value under the k-th cannot be among the k largest.
  void Cut() {
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.begin() + size_,
                     std::greater<uint64_t>());
    size_ = k_;
    bar_ = static_cast<uint32_t>(buffer_[k_ - 1] >> 32);
  }

  int64_t k_, capacity_;
  std::vector<uint64_t> buffer_;  // capacity_ ranks and one written past them
  std::vector<uint32_t> maxima_;
  int64_t size_ = 0;
  uint32_t bar_ = 0;
};

// Rows in chunks, taken by the calling thread and the pool's tasks from one
// counter; the caller returns when every chunk is done (it can do them all
// itself, so a busy pool never stalls it). Tasks hold the state they share.
struct Rows {
  const float* x;
  float* values;
  int32_t* ids;
  int64_t n, k, rows, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Work() {
    RowTopK top(k);
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      int64_t end = std::min(rows, (c + 1) * chunk);
      for (int64_t r = c * chunk; r < end; ++r) top.Run(x + r * n, n, values + r * k, ids + r * k);
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> ids) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k of a scalar");
  int64_t n = dims.back();
  int64_t k = values->dimensions().back();
  if (k > n || n > INT32_MAX) return ffi::Error::InvalidArgument("top_k: k > n or n >= 2^31");
  if (k == 0 || x.element_count() == 0) return ffi::Error::Success();
  auto rows = std::make_shared<Rows>();
  rows->x = x.typed_data();
  rows->values = values->typed_data();
  rows->ids = ids->typed_data();
  rows->n = n;
  rows->k = k;
  rows->rows = x.element_count() / n;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About 64K values per chunk, at least 4 chunks per thread where the rows allow.
  rows->chunk = std::clamp<int64_t>((1 << 16) / n, 1, std::max<int64_t>(1, rows->rows / (4 * threads)));
  rows->chunks = (rows->rows + rows->chunk - 1) / rows->chunk;
  for (int64_t t = 1; t < std::min(threads, rows->chunks); ++t) pool.Schedule([rows] { rows->Work(); });
  rows->Work();
  std::unique_lock<std::mutex> lock(rows->mu);
  rows->all_done.wait(lock, [&] { return rows->done.load() == rows->chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
