// What the CPU kernels (cpu_top_k.cc, cpu_replay.cc, cpu_search.cc) share: GCC/Clang vectors
// of 4 floats and their loads from float32 or bfloat16, and the work split
// among XLA's intra-op threads and the library's own helpers.

#ifndef LPKERNEL_OPS_PROCESSED_CPU_COMMON_H_
#define LPKERNEL_OPS_PROCESSED_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace lpkernel {

namespace ffi = xla::ffi;

typedef float F4 __attribute__((vector_size(16)));   // SSE2 on x86-64, NEON on arm64
typedef int32_t I4 __attribute__((vector_size(16)));
typedef uint16_t U16x4 __attribute__((vector_size(8)));
typedef uint32_t U4 __attribute__((vector_size(16)));

// x[0, lanes) as the vector V of the same element type (unaligned), and back.
template <typename V, typename T>
inline V Lanes(const T* x) {
  V v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
template <typename V, typename T>
inline void Store(T* x, V v) {
  std::memcpy(x, &v, sizeof v);
}
inline F4 Load4(const float* x) { return Lanes<F4>(x); }

// x[0, lanes) of bfloat16 bits (XLA's uint16_t) as a vector F of floats,
// exactly (U: its uint32 lanes, H: its uint16 ones).
template <typename F, typename U, typename H>
inline F WidenedLanes(const uint16_t* x) {
  H half;
  std::memcpy(&half, x, sizeof half);
  U bits = __builtin_convertvector(half, U) << 16;
  F v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline F4 Load4(const uint16_t* x) { return WidenedLanes<F4, U4, U16x4>(x); }

// A float32, or a bfloat16 widened exactly.
inline float Widen(float v) { return v; }
inline float Widen(uint16_t bits) {
  uint32_t b = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

inline I4 Splat(int32_t v) { return I4{v, v, v, v}; }

// Vectors of kLanes floats or ints for the loops that run as wide as the build
// allows: 4 (SSE2, NEON: the portable build) or 8 (the AVX2 build,
// cpu_library.py). Compared lanes are all ones.
#ifndef LPKERNEL_LANES
#define LPKERNEL_LANES 4
#endif
constexpr int kLanes = LPKERNEL_LANES;
static_assert(kLanes == 4 || kLanes == 8, "lanes: 4 (portable) or 8 (AVX2)");
typedef float FV __attribute__((vector_size(4 * kLanes)));
typedef int32_t IV __attribute__((vector_size(4 * kLanes)));
typedef uint32_t UV __attribute__((vector_size(4 * kLanes)));
typedef uint16_t U16V __attribute__((vector_size(2 * kLanes)));

inline FV LoadV(const float* x) { return Lanes<FV>(x); }
inline FV LoadV(const uint16_t* x) { return WidenedLanes<FV, UV, U16V>(x); }
inline IV LoadIV(const int32_t* x) { return Lanes<IV>(x); }
inline IV SplatV(int32_t v) { return IV{} + v; }
inline FV SplatV(float v) { return FV{} + v; }
inline float MaxOf(FV v) {  // of ordered lanes
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
inline int32_t MinOf(IV v) {
  int32_t m = v[0];
  for (int l = 1; l < kLanes; ++l) m = std::min(m, v[l]);
  return m;
}
inline int32_t MaxOf(IV v) {
  int32_t m = v[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, v[l]);
  return m;
}
inline int32_t SumOf(IV v) {
  int32_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}
inline float Sum(F4 a) { return (a[0] + a[1]) + (a[2] + a[3]); }

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

// Bit c set where lane c of the comparison's result is (all ones).
inline uint32_t Mask(I4 lanes) {
#if defined(__SSE__)
  return static_cast<uint32_t>(__builtin_ia32_movmskps(reinterpret_cast<F4>(lanes)));
#else
  return (lanes[0] & 1) | (lanes[1] & 2) | (lanes[2] & 4) | (lanes[3] & 8);
#endif
}
#if LPKERNEL_LANES == 8  // the AVX2 build
inline uint32_t Mask(IV lanes) {
  return static_cast<uint32_t>(__builtin_ia32_movmskps256(reinterpret_cast<FV>(lanes)));
}
#endif

// The lanes of v whose bit is set in `mask` written in order at out[0, count)
// (out has room for kLanes; past the count it holds anything); the count. The
// AVX2 build packs them with one permutation from a table of 256 (a value at
// a time made the running candidates' offers a chain of 8 dependent stores).
#if LPKERNEL_LANES == 8  // the AVX2 build
struct PackTable {
  int32_t lanes[256][8];
  constexpr PackTable() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int l = 0; l < 8; ++l) {
        if (m >> l & 1) lanes[m][c++] = l;
      }
    }
  }
};
inline constexpr PackTable kPack{};
inline int Pack(float* out, FV v, uint32_t mask) {
  IV lanes = LoadIV(kPack.lanes[mask]);
  Store(out, reinterpret_cast<FV>(__builtin_ia32_permvarsf256(v, lanes)));
  return __builtin_popcount(mask);
}
#else
inline int Pack(float* out, FV v, uint32_t mask) {
  int count = 0;
  for (int l = 0; l < kLanes; ++l) {
    out[count] = v[l];
    count += (mask >> l) & 1;
  }
  return count;
}
#endif

// The ranges [bounds[c], bounds[c + 1]), taken by the calling thread and the
// pool's tasks from one counter; the caller returns when every range is done
// (it can do them all itself, so a busy pool never stalls it), and offered to
// the Helpers too. Each taker is a worker numbered from 0 (at most
// min(threads, ranges) of them; a later taker finds nothing to do). Tasks hold
// the state they share.
struct Chunks {
  std::function<void(int64_t, int64_t, int)> run;  // [lo, hi), worker
  std::vector<int64_t> bounds;
  int64_t count;
  int most;  // workers
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> workers{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Work() {
    int worker = workers.fetch_add(1);
    if (worker >= most) return;
    for (int64_t c; (c = next.fetch_add(1)) < count;) {
      run(bounds[c], bounds[c + 1], worker);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

// Threads of the library's own (at most 3, one fewer than XLA's pool) that
// offer to take ranges beside XLA's pool: after an XLA:CPU fusion its pool's
// workers may stay busy for a while (waiting for more work), and a kernel
// called then ran on its calling thread alone, at half speed on two cores.
// Made once per process (again after a fork, which copies no threads).
class Helpers {
 public:
  // `task` queued `times` times for the helpers (none where there are none).
  static void Offer(const std::function<void()>& task, int times, int pool_threads) {
    static std::atomic<Helpers*> current{nullptr};
    static std::mutex making;
    Helpers* h = current.load();
    if (h == nullptr || h->pid_ != getpid()) {
      std::lock_guard<std::mutex> lock(making);
      h = current.load();
      if (h == nullptr || h->pid_ != getpid()) {
        h = new Helpers(std::min(3, pool_threads - 1));  // never freed: its threads run on
        current.store(h);
      }
    }
    if (h->threads_ > 0) h->Push(task, std::min(times, h->threads_));
  }

 private:
  explicit Helpers(int threads) : threads_(std::max(0, threads)), pid_(getpid()) {
    for (int t = 0; t < threads_; ++t) std::thread([this] { Loop(); }).detach();
  }

  void Push(const std::function<void()>& task, int times) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int t = 0; t < times; ++t) tasks_.push_back(task);
    }
    ready_.notify_all();
  }

  void Loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [&] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  const int threads_;
  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
};

// The number of workers ParallelRanges may use for `ranges` ranges.
inline int Workers(ffi::ThreadPool& pool, int64_t ranges) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), ranges)));
}

inline void ParallelRanges(ffi::ThreadPool& pool, std::vector<int64_t> bounds,
                           std::function<void(int64_t, int64_t, int)> run) {
  if (bounds.size() < 2) return;
  auto chunks = std::make_shared<Chunks>();
  chunks->run = std::move(run);
  chunks->count = static_cast<int64_t>(bounds.size()) - 1;
  chunks->bounds = std::move(bounds);
  chunks->most = Workers(pool, chunks->count);
  for (int t = 1; t < chunks->most; ++t) pool.Schedule([chunks] { chunks->Work(); });
  if (chunks->most > 1) {
    Helpers::Offer([chunks] { chunks->Work(); }, chunks->most - 1, pool.num_threads());
  }
  chunks->Work();
  std::unique_lock<std::mutex> lock(chunks->mu);
  chunks->all_done.wait(lock, [&] { return chunks->done.load() == chunks->count; });
}

// Rows [0, rows) in chunks of about 64K values, at least 4 per thread where the
// rows allow.
inline void ParallelRows(ffi::ThreadPool& pool, int64_t rows, int64_t row_values,
                         std::function<void(int64_t, int64_t)> run) {
  if (rows == 0) return;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunk = std::clamp<int64_t>((1 << 16) / std::max<int64_t>(1, row_values), 1,
                                      std::max<int64_t>(1, rows / (4 * threads)));
  std::vector<int64_t> bounds;
  for (int64_t lo = 0; lo < rows; lo += chunk) bounds.push_back(lo);
  bounds.push_back(rows);
  ParallelRanges(pool, std::move(bounds), [run](int64_t lo, int64_t hi, int) { run(lo, hi); });
}

}  // namespace lpkernel

#endif  // LPKERNEL_OPS_PROCESSED_CPU_COMMON_H_
