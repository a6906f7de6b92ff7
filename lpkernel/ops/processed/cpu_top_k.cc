// Top-k kernels for XLA:CPU through JAX's typed FFI (lpkernel/ops/processed/
// cpu_library.py builds and registers them); rows are shared among XLA's
// intra-op threads.
//
// LpkernelTopK: each row's k largest float32 values and their indices, in
// lax.top_k's order on the CPU: the floats' total order (-NaN < -inf < ... <
// -0 < 0 < ... < inf < NaN), equal values by their index, lowest first; values
// descending. Per row, a buffer of at most 4k candidates: every value at least the k-th
// largest kept so far enters it (ForEachAtLeast: a bit per value from one
// comparison of kLanes, only the set bits visited); a full buffer is cut back to its
// k largest (nth_element), which raises the bar. The k kept are sorted once at
// the end.
//
// LpkernelGroupsTopK: each row's k largest values (float32 or bfloat16),
// descending, as LpkernelTopK orders them, from the row and its groups' maxima
// (float32 or bfloat16, in the order of the row's values, or of any increasing
// function of them: capped logits): only the groups whose maximum is at least
// the k-th largest maximum can hold one; the least of those groups' own maxima
// is the first bar, so few values enter (RowGroupsTopK).
//
// LpkernelMaximaTopK: as LpkernelGroupsTopK for float32 rows, the row's
// groups' maxima first (an output too, as jnp.max gives them, unless it is
// given no columns), from the row itself while it is in cache: one read of
// the row from memory for both.
//
// LpkernelBlockStats: a block of rows' statistics for the fused sweeps' partials
// (the maximum, its first column, the target's value), in one read of the
// block where XLA makes three passes over it. LpkernelBlockStatsTopK: the
// same, and each row's running candidates for its k largest values (a buffer
// and its bar, updated in place) given the block (the sweep from hidden
// states keeps them across the unembedding's blocks): one read for both.
// LpkernelRunningValues: the k largest values those candidates saw, in
// place of XLA's top-k over a copy of their buffer.

#include <cmath>
#include <limits>

#include "cpu_common.h"

namespace {

using namespace lpkernel;  // NOLINT: the shared vectors, loads and thread split

template <typename V>
inline V Max(V a, V b) {
  return a > b ? a : b;
}

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

// OrderKey as a signed int (the floats' total order as int32 order), 4 at a
// time or one, and the float of one.
template <typename I, typename F>
inline I SignedKeysOf(F v) {
  I b;
  std::memcpy(&b, &v, sizeof b);
  return b ^ ((b >> 31) & 0x7fffffff);
}
inline I4 SignedKeys(F4 v) { return SignedKeysOf<I4>(v); }
inline int32_t SignedKey(float v) { return static_cast<int32_t>(OrderKey(v) ^ 0x80000000u); }
inline float SignedKeyValue(int32_t key) { return KeyValue(static_cast<uint32_t>(key) ^ 0x80000000u); }

inline I4 LoadI4(const int32_t* x) { return Lanes<I4>(x); }

// How many of keys[0, nv) are at least `least` (nv a multiple of kLanes).
inline int64_t CountAtLeast(const int32_t* keys, int64_t nv, int32_t least) {
  IV bar = SplatV(least), a = SplatV(0), b = SplatV(0);
  int64_t j = 0;
  for (; j + 2 * kLanes <= nv; j += 2 * kLanes) {
    a -= LoadIV(keys + j) >= bar;
    b -= LoadIV(keys + j + kLanes) >= bar;
  }
  if (j < nv) a -= LoadIV(keys + j) >= bar;
  return SumOf(a + b);
}

// The largest b * 2^shift (b from lo >> shift to hi >> shift) that at least k
// of keys[0, nv) reach, where k of them reach lo (nv a multiple of kLanes, the
// padding at most lo): a bisection, each step a count (CountAtLeast). shift 0
// gives the k-th largest key; 16 keeps its float's sign, exponent and 7 high
// mantissa bits.
inline int32_t KthAtLeast(const int32_t* keys, int64_t nv, int32_t lo, int32_t hi, int64_t k,
                          int shift) {
  int64_t unit = int64_t{1} << shift, bottom = int64_t{lo} >> shift, top = int64_t{hi} >> shift;
  while (bottom < top) {
    int64_t mid = bottom + (top - bottom + 1) / 2;
    if (CountAtLeast(keys, nv, static_cast<int32_t>(mid * unit)) >= k) {
      bottom = mid;
    } else {
      top = mid - 1;
    }
  }
  return static_cast<int32_t>(bottom * unit);
}

// The k-th largest signed key of x[0, n) (n > k; float32, or bfloat16
// widened) with its low `shift` bits cleared (KthAtLeast), the keys left in
// keys[0, n) (padded with INT32_MIN to a multiple of 2 * kLanes).
template <typename T>
inline int32_t KthKeyOf(const T* x, int64_t n, int64_t k, int shift, std::vector<int32_t>& keys) {
  int64_t padded = (n + 2 * kLanes - 1) / (2 * kLanes) * (2 * kLanes), i = 0;
  keys.resize(padded);
  IV low = SplatV(INT32_MAX), high = SplatV(INT32_MIN);
  for (; i + kLanes <= n; i += kLanes) {
    IV key = SignedKeysOf<IV>(LoadV(x + i));
    Store(keys.data() + i, key);
    low = key < low ? key : low;
    high = key > high ? key : high;
  }
  int32_t lo = MinOf(low), hi = MaxOf(high);
  for (; i < n; ++i) {
    keys[i] = SignedKey(Widen(x[i]));
    lo = std::min(lo, keys[i]), hi = std::max(hi, keys[i]);
  }
  std::fill(keys.begin() + n, keys.end(), INT32_MIN);  // at most lo: never counted above it
  return KthAtLeast(keys.data(), padded, lo, hi, k, shift);  // all n > k reach lo
}

// offer(i) for each i of [0, width) where x[i] may reach the bar (not under
// bar() as a float: NaN and -0 as 0 included; offer decides): 64 values at a
// time, a bit each (kLanes compared at once), bar() read once per 64 (an offer
// may raise it); each value past the last multiple of kLanes.
template <typename T, typename Bar, typename Offer>
inline void ForEachAtLeast(const T* x, int64_t width, Bar bar, Offer offer) {
  int64_t whole = width / kLanes * kLanes, i = 0;
  while (i < whole) {
    FV bars = SplatV(bar());
    int64_t end = std::min(whole, i + 64);
    uint64_t bits = 0;
    for (int64_t c = i; c < end; c += kLanes) {
      bits |= static_cast<uint64_t>(Mask(~(LoadV(x + c) < bars))) << (c - i);
    }
    for (; bits != 0; bits &= bits - 1) offer(i + __builtin_ctzll(bits));
    i = end;
  }
  for (; i < width; ++i) offer(i);
}

// Key above, inverted index below: a larger rank is a larger value, or the same
// value at a lower index.
inline uint64_t Rank(uint32_t key, int64_t i) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
}

class RowTopK {
 public:
  explicit RowTopK(int64_t k)
      : k_(k), capacity_(4 * k), buffer_(4 * k + 1), maxima_(4 * k) {}

  void Run(const float* x, int64_t n, float* values, int32_t* ids) {
    size_ = 0;
    bar_ = SeedBar(x, n);
    ForEachAtLeast(
        x, n, [&] { return KeyValue(bar_); }, [&](int64_t i) { Offer(x[i], i); });
    Finish(values, ids, x);
  }

 private:
  // Sorts the buffer's k largest and writes their values and indices.
  void Finish(float* values, int32_t* ids, const float* x) {
    if (size_ > k_) Cut();
    std::sort(buffer_.begin(), buffer_.begin() + size_, std::greater<uint64_t>());
    for (int64_t j = 0; j < size_; ++j) {
      int64_t at = static_cast<uint32_t>(~static_cast<uint32_t>(buffer_[j]));
      ids[j] = static_cast<int32_t>(at);
      values[j] = x[at];
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

// Lane q: the maximum of v[q]'s lanes (ordered values), for kLanes vectors:
// pairs of lanes, then of pairs (and of fours), interleaved by shuffles,
// where each vector's lanes one by one took kLanes - 1 dependent steps.
inline FV LaneMaxima(const FV* v) {
#if LPKERNEL_LANES == 8
  FV pairs[4], fours[2];
  for (int q = 0; q < 4; ++q) {
    pairs[q] = Max(__builtin_shufflevector(v[2 * q], v[2 * q + 1], 0, 8, 2, 10, 4, 12, 6, 14),
                   __builtin_shufflevector(v[2 * q], v[2 * q + 1], 1, 9, 3, 11, 5, 13, 7, 15));
  }
  for (int q = 0; q < 2; ++q) {
    fours[q] = Max(__builtin_shufflevector(pairs[2 * q], pairs[2 * q + 1], 0, 1, 8, 9, 4, 5, 12, 13),
                   __builtin_shufflevector(pairs[2 * q], pairs[2 * q + 1], 2, 3, 10, 11, 6, 7, 14, 15));
  }
  return Max(__builtin_shufflevector(fours[0], fours[1], 0, 1, 2, 3, 8, 9, 10, 11),
             __builtin_shufflevector(fours[0], fours[1], 4, 5, 6, 7, 12, 13, 14, 15));
#else
  FV pairs[2];
  for (int q = 0; q < 2; ++q) {
    pairs[q] = Max(__builtin_shufflevector(v[2 * q], v[2 * q + 1], 0, 4, 2, 6),
                   __builtin_shufflevector(v[2 * q], v[2 * q + 1], 1, 5, 3, 7));
  }
  return Max(__builtin_shufflevector(pairs[0], pairs[1], 0, 1, 4, 5),
             __builtin_shufflevector(pairs[0], pairs[1], 2, 3, 6, 7));
#endif
}

// A row's k largest values (LpkernelGroupsTopK) from the groups of `group`
// columns whose maxima mx[0, g) (g = ceil(n / group); or an increasing function
// of them: capped logits) are at least the k-th largest maximum: the k largest
// maxima are k values of the row. Values only (equal values are the same
// output), so the candidates are signed keys and branches are few: every step
// is a count or a bit mask over kLanes (4, or 8 in the AVX2 build) at a time.
class RowGroupsTopK {
 public:
  explicit RowGroupsTopK(int64_t k)
      : k_(k),
        capacity_(4 * k),
        keys_(4 * k + kLanes),
        ranks_(4 * k + kLanes),
        sorted_(k + 5) {}

  // The row's k largest values, descending, into values[0, k). `held`: the
  // maxima are the groups' own (Scan).
  template <typename T, typename M>
  void Run(const T* x, int64_t n, const M* mx, int64_t g, int64_t group, float* values,
           bool held) {
    Choose(mx, g);
    Scan(x, n, group, held);
    Finish(values);
  }

  // As Run, the maxima of the row's g = ceil(n / group) groups written first
  // into mx[0, g) (GroupMaxima) and taken from there.
  void RunWithMaxima(const float* x, int64_t n, int64_t group, float* mx, float* values) {
    GroupMaxima(x, n, group, mx);
    Run(x, n, mx, (n + group - 1) / group, group, values, true);
  }

 private:
  // The maxima of x's groups of `group` columns (the last one shorter where
  // group does not divide n) into mx[0, ceil(n / group)), as jnp.max reduces
  // them: NaN where a group holds one, else one of the group's values (the
  // float comparisons' maximum: a flushed subnormal may stand for a larger
  // zero). The row is read from memory once, in order; Scan reads it
  // again from the cache.
  static void GroupMaxima(const float* x, int64_t n, int64_t group, float* mx) {
    int64_t lo = 0;
    // kLanes whole groups at a time, their maxima in one vector (the float32
    // processed forward at B32 T128 V8192, groups of 32: 33 -> 31 ms); a NaN
    // among them sends them to EachGroupMaximum.
    if (group % kLanes == 0) {
      for (; lo + kLanes * group <= n; lo += kLanes * group) {
        FV m[kLanes];
        IV unordered = SplatV(0);
        for (int q = 0; q < kLanes; ++q) {
          const float* xq = x + lo + q * group;
          m[q] = LoadV(xq);
          unordered |= m[q] != m[q];
          for (int64_t i = kLanes; i < group; i += kLanes) {
            FV v = LoadV(xq + i);
            unordered |= v != v;
            m[q] = Max(m[q], v);
          }
        }
        if (Mask(unordered) != 0) {
          EachGroupMaximum(x, lo, lo + kLanes * group, group, mx);
        } else {
          Store(mx + lo / group, LaneMaxima(m));
        }
      }
    }
    EachGroupMaximum(x, lo, n, group, mx);
  }

  // GroupMaxima of the groups from column lo (a multiple of group) to n, one
  // at a time.
  static void EachGroupMaximum(const float* x, int64_t lo, int64_t n, int64_t group, float* mx) {
    const float ninf = -std::numeric_limits<float>::infinity();
    for (; lo < n; lo += group) {
      int64_t hi = std::min(n, lo + group), i = lo;
      float top = ninf;
      bool nan = false;
      if (hi - lo >= kLanes) {
        FV m = LoadV(x + lo);
        IV unordered = m != m;
        for (i = lo + kLanes; i + kLanes <= hi; i += kLanes) {
          FV v = LoadV(x + i);
          unordered |= v != v;
          m = Max(m, v);
        }
        nan = Mask(unordered) != 0;
        top = MaxOf(m);
      }
      for (; i < hi; ++i) {
        float v = x[i];
        nan |= v != v;
        top = std::max(top, v);
      }
      mx[lo / group] = nan ? std::numeric_limits<float>::quiet_NaN() : top;
    }
  }

  // Puts the groups whose maxima are at least the k-th largest (rounded down:
  // KthFloor) in chosen_, in order.
  template <typename M>
  void Choose(const M* mx, int64_t g) {
    int64_t gv = (g + kLanes - 1) / kLanes * kLanes, j = 0;
    maxima_.resize(gv);
    chosen_.resize(gv);
    for (; j + 4 <= g; j += 4) Store(maxima_.data() + j, SignedKeys(Load4(mx + j)));
    for (; j < gv; ++j) maxima_[j] = j < g ? SignedKey(Widen(mx[j])) : INT32_MIN;
    int32_t least = INT32_MIN;
    if (g > k_) {
      least = KthFloor(g);
      // XLA:CPU flushes subnormals, so a maximum that is a zero or subnormal may
      // be off by one (BlockMaxKey): every group is read then.
      if (std::fabs(SignedKeyValue(least)) < std::numeric_limits<float>::min()) least = INT32_MIN;
    }
    count_ = 0;
    for (int64_t lo = 0; lo < gv; lo += 64) {  // 64 groups' bits at a time
      uint64_t bits = 0;
      for (int64_t c = lo; c < std::min(gv, lo + 64); c += kLanes) {
        bits |= static_cast<uint64_t>(Mask(LoadIV(maxima_.data() + c) >= SplatV(least)))
                << (c - lo);
      }
      for (; bits != 0; bits &= bits - 1) chosen_[count_++] = lo + __builtin_ctzll(bits);
    }
    while (count_ > 0 && chosen_[count_ - 1] >= g) --count_;  // the padding's
  }

  // Asks for the columns of chosen group c of x, where there is one (scattered
  // over the row: from memory their reads are latency-bound).
  template <typename T>
  void Prefetch(const T* x, int64_t n, int64_t group, int64_t c) const {
    if (c >= count_) return;
    int64_t lo = chosen_[c] * group, hi = std::min(n, lo + group);
    for (int64_t i = lo; i < hi; i += 64 / sizeof(T)) __builtin_prefetch(x + i);
  }

  // The k-th largest of maxima_[0, g) (g > k) with its low 16 bits cleared (at
  // most it; in its float's sign, exponent and 7 high mantissa bits): a
  // bisection on those 16 bits, each step a count of the maxima at least the
  // midpoint (the keys' histograms took twice as long, their sort 4 times).
  // INT32_MIN (every group) where a maximum is NaN.
  int32_t KthFloor(int64_t g) {
    IV low = SplatV(INT32_MAX), high = SplatV(INT32_MIN);
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) {
      IV key = LoadIV(maxima_.data() + j);
      low = key < low ? key : low;
      high = key > high ? key : high;
    }
    int32_t lo = MinOf(low), hi = MaxOf(high);
    for (; j < g; ++j) lo = std::min(lo, maxima_[j]), hi = std::max(hi, maxima_[j]);
    // A NaN maximum (past an infinity) says nothing of its group's other values.
    float inf = std::numeric_limits<float>::infinity();
    if (hi > SignedKey(inf) || lo < SignedKey(-inf)) return INT32_MIN;
    return KthAtLeast(maxima_.data(), maxima_.size(), lo, hi, k_, 16);  // all g >= k reach lo
  }

  // The chosen groups' values at least the first bar into keys_: with k or more
  // groups, the least of their own maxima (each holds a value at least it).
  // The groups' own maxima (`held`: GroupMaxima's, or jnp.max's of the row)
  // give it as they are where they are normal numbers; others are taken again
  // from the groups (a NaN, which jnp.max gives for a group holding any; a
  // zero or subnormal, which XLA's flushed comparisons may not take from the
  // row; an increasing function of the maxima, e.g. capped ones).
  // Each chosen group is asked for `ahead` groups before it is read (about 16
  // cache lines in flight): at N4096 V8192 in bfloat16 the kernel took 3.9-4.2
  // ms so, 6.5-7.5 ms with every chosen group asked for at once (64 lines or
  // more), 4.7-5.0 ms with 8 or 32 groups ahead.
  template <typename T>
  void Scan(const T* x, int64_t n, int64_t group, bool held) {
    int64_t ahead = std::max<int64_t>(1, 16 * 64 / (group * static_cast<int64_t>(sizeof(T))));
    for (int64_t c = 0; c < ahead; ++c) Prefetch(x, n, group, c);
    size_ = 0;
    bar_ = count_ >= k_ ? GroupsFloor(x, n, group, held, ahead) : RowFloor(x, n);
    for (int64_t c = 0; c < count_; ++c) {
      Prefetch(x, n, group, c + ahead);
      int64_t lo = chosen_[c] * group;
      ForEachAtLeast(
          x + lo, std::min(n, lo + group) - lo, [&] { return SignedKeyValue(bar_); },
          [&](int64_t i) { Offer(SignedKey(Widen(x[lo + i]))); });
    }
  }

  // The first bar where k or more groups are chosen: the least of their own
  // maxima (Scan; INT32_MIN, all, once one is NaN).
  template <typename T>
  int32_t GroupsFloor(const T* x, int64_t n, int64_t group, bool held, int64_t ahead) {
    int32_t bar = INT32_MAX;
    for (int64_t c = 0; c < count_ && bar != INT32_MIN; ++c) {
      float held_max = SignedKeyValue(maxima_[chosen_[c]]);
      if (held && std::fabs(held_max) >= std::numeric_limits<float>::min()) {  // not NaN
        bar = std::min(bar, maxima_[chosen_[c]]);
        continue;
      }
      Prefetch(x, n, group, c + ahead);
      int64_t lo = chosen_[c] * group, hi = std::min(n, lo + group), i = lo;
      uint32_t top = 0;
      if (hi - lo >= 4) {
        top = BlockMaxKey(x + lo, (hi - lo) / 4 * 4);
        i = lo + (hi - lo) / 4 * 4;
      }
      for (; i < hi; ++i) top = std::max(top, OrderKey(Widen(x[i])));
      bar = std::min(bar, static_cast<int32_t>(top ^ 0x80000000u));
    }
    return bar;
  }

  // A first bar where there are fewer groups than k (every one is read: their
  // maxima give none): the k-th largest of the row's n values (n > k; else
  // INT32_MIN, all) with its low 16 bits cleared (KthAtLeast), so about k
  // values enter instead of all of them. At V 256 with K 64 (8 groups of 32)
  // every value entered, cut and counted: 6 ns a value.
  template <typename T>
  int32_t RowFloor(const T* x, int64_t n) {
    return n > k_ ? KthKeyOf(x, n, k_, 16, row_) : INT32_MIN;
  }

  // Written past the end and counted only when at the bar: no branch to mispredict.
  void Offer(int32_t key) {
    keys_[size_] = key;
    size_ += key >= bar_;
    if (size_ == capacity_) Cut();
  }

  // Keeps the k largest keys; a value under the k-th, or equal to it (the same
  // output), is not needed after them.
  void Cut() {
    std::nth_element(keys_.begin(), keys_.begin() + (k_ - 1), keys_.begin() + size_,
                     std::greater<int32_t>());
    size_ = k_;
    bar_ = keys_[k_ - 1] == INT32_MAX ? INT32_MAX : keys_[k_ - 1] + 1;
  }

  // The k largest keys' values, descending, into values[0, k) (-inf past the
  // keys held: fewer than k only from NaN maxima). Up to 256 keys by counting:
  // a key's position is how many keys exceed it (sorting, its branches cost
  // twice as much); equal keys share the first position of their run, which
  // the positions after it copy (a running minimum).
  void Finish(float* values) {
    if (size_ > 2 * k_) Cut();
    int64_t m = size_, k4 = (k_ + 3) / 4 * 4;
    if (m <= 256) {
      int64_t mv = (m + kLanes - 1) / kLanes * kLanes;
      std::fill(keys_.begin() + m, keys_.begin() + mv, INT32_MIN);
      for (int64_t i = 0; i < mv; i += kLanes) {
        IV key = LoadIV(keys_.data() + i), above = SplatV(0);
        for (int64_t j = 0; j < m; ++j) above -= SplatV(keys_[j]) > key;
        Store(ranks_.data() + i, above);
      }
      std::fill(sorted_.begin(), sorted_.end(), INT32_MAX);
      for (int64_t i = 0; i < m; ++i) sorted_[std::min<int64_t>(ranks_[i], k_)] = keys_[i];
      I4 carry = Splat(INT32_MAX);
      for (int64_t j = 0; j < k4; j += 4) {
        I4 run = LoadI4(sorted_.data() + j);  // lanes by index: GCC before 12 has no shufflevector
        I4 one = {INT32_MAX, run[0], run[1], run[2]};
        run = one < run ? one : run;
        I4 two = {INT32_MAX, INT32_MAX, run[0], run[1]};
        run = two < run ? two : run;
        run = carry < run ? carry : run;
        carry = Splat(run[3]);
        Store(sorted_.data() + j, run);
      }
    } else {
      std::sort(keys_.begin(), keys_.begin() + m, std::greater<int32_t>());
      std::copy(keys_.begin(), keys_.begin() + std::min(m, k_), sorted_.begin());
    }
    float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < k_; ++j) values[j] = j < m ? SignedKeyValue(sorted_[j]) : ninf;
  }

  int64_t k_, capacity_;
  std::vector<int32_t> keys_;    // capacity_ signed keys and one written past them
  std::vector<int32_t> ranks_;   // Finish's positions of keys_
  std::vector<int32_t> sorted_;  // the k largest keys, descending (and a slot for the rest)
  std::vector<int32_t> maxima_;  // the maxima's signed keys
  std::vector<int64_t> chosen_;  // the chosen groups, count_ of them
  std::vector<int32_t> row_;     // RowFloor's keys of the row
  int64_t count_ = 0, size_ = 0;
  int32_t bar_ = 0;
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
                    int64_t g, int64_t group, int64_t k, bool held, float* values) {
  ParallelRows(pool, rows, g + 2 * k * group, [=](int64_t lo, int64_t hi) {
    RowGroupsTopK top(k);
    for (int64_t r = lo; r < hi; ++r) {
      top.Run(x + r * n, n, mx + r * g, g, group, values + r * k, held);
    }
  });
}

template <typename T>
ffi::Error GroupsTopKOf(ffi::ThreadPool& pool, const T* x, int64_t rows, int64_t n,
                        ffi::AnyBuffer mx, int64_t g, int64_t group, int64_t k, bool held,
                        float* values) {
  switch (mx.element_type()) {
    case ffi::DataType::F32:
      RowsGroupsTopK(pool, x, rows, n, static_cast<const float*>(mx.untyped_data()), g, group, k,
                     held, values);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      RowsGroupsTopK(pool, x, rows, n, static_cast<const uint16_t*>(mx.untyped_data()), g, group, k,
                     held, values);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("groups_top_k: maxima float32 or bfloat16");
  }
}

// x [..., n] float32 or bfloat16; maxima [..., ceil(n / group)] float32 or
// bfloat16 (held: 1 where they are the groups' own, as jnp.max gives them, 0
// for an increasing function of them); values [..., k], k at most n.
ffi::Error GroupsTopK(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer maxima,
                      ffi::ResultBuffer<ffi::F32> values, int64_t group, int64_t held) {
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
                          group, k, held != 0, v);
    case ffi::DataType::BF16:
      return GroupsTopKOf(pool, static_cast<const uint16_t*>(x.untyped_data()), rows, n, maxima,
                          g, group, k, held != 0, v);
    default:
      return ffi::Error::InvalidArgument("groups_top_k: float32 or bfloat16");
  }
}

// x [..., n] float32 -> maxima [..., ceil(n / group)] float32, values [..., k]
// float32, k at most n.
ffi::Error MaximaTopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::F32> maxima, ffi::ResultBuffer<ffi::F32> values,
                      int64_t group) {
  auto dims = x.dimensions();
  if (dims.size() == 0 || group < 1) {
    return ffi::Error::InvalidArgument("maxima_top_k: x [..., n], group >= 1");
  }
  int64_t n = dims.back(), k = values->dimensions().back();
  if (n == 0) return ffi::Error::Success();
  int64_t rows = x.element_count() / n, g = (n + group - 1) / group;
  int64_t given = static_cast<int64_t>(maxima->element_count());
  if (k < 1 || k > n || (given != rows * g && given != 0)) {
    return ffi::Error::InvalidArgument(
        "maxima_top_k: maxima [..., ceil(n / group)] or [..., 0], 1 <= k <= n");
  }
  const float* in = x.typed_data();
  float* mx = given ? maxima->typed_data() : nullptr;  // none: each row's in a scratch
  float* v = values->typed_data();
  ParallelRows(pool, rows, n, [=](int64_t lo, int64_t hi) {
    RowGroupsTopK top(k);
    std::vector<float> scratch(mx ? 0 : g);
    for (int64_t r = lo; r < hi; ++r) {
      top.RunWithMaxima(in + r * n, n, group, mx ? mx + r * g : scratch.data(), v + r * k);
    }
  });
  return ffi::Error::Success();
}

// Keeps the k largest of buf[0, size) (size > k) in buf[0, k), values only, in
// any order, and returns the next bar (an OrderKey): one past the k-th
// largest's, whose equals are not needed after it. The k-th largest is found
// by a bisection on the values' signed keys (keys: scratch), each step a count
// of kLanes at once; then one branchless pass keeps the larger values and the
// k-th fills the rest. At N 4096, V 32000, K 64 (blocks of 256, 4 cuts per
// row) std::nth_element's comparisons, a mispredicted branch each, took a third
// of the kernel's time.
uint32_t CutBuffer(float* buf, int64_t size, int64_t k, std::vector<int32_t>& keys) {
  int32_t kth = KthKeyOf(buf, size, k, 0, keys);
  int64_t kept = 0;  // fewer than k keys exceed the k-th
  for (int64_t i = 0; i < size; ++i) {
    buf[kept] = buf[i];
    kept += keys[i] > kth;
  }
  std::fill(buf + kept, buf + k, SignedKeyValue(kth));
  uint32_t key = static_cast<uint32_t>(kth) ^ 0x80000000u;
  return key == UINT32_MAX ? key : key + 1;
}

// A block's statistics of one row, as jnp's reductions give them (XLA's block
// partials): the maximum (NaN where the row holds one), the first index holding
// it (n where none: NaN) and the value at `target` (-inf outside [0, n)).
struct RowStats {
  float max, target;
  int32_t arg;
};

// The first index of x[0, n) (float32, or bfloat16 widened) holding `top`
// (float equality, -0 == 0), n where none.
template <typename T>
inline int32_t FirstAt(const T* x, int64_t n, float top) {
  int64_t i = 0;
  FV tops = SplatV(top);
  for (; i + kLanes <= n; i += kLanes) {
    uint32_t at = Mask(LoadV(x + i) == tops);
    if (at != 0) return static_cast<int32_t>(i + __builtin_ctz(at));
  }
  for (; i < n; ++i) {
    if (Widen(x[i]) == top) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(n);
}

// The RowStats of x[0, n) from its lanes' maxima `most` and NaN flags `nan`
// and the tail's maximum `tail` (NaN where the tail holds one).
template <typename T>
inline RowStats StatsOf(const T* x, int64_t n, int64_t target, FV most, IV nan, float tail) {
  float top = std::max(MaxOf(most), tail);
  bool any_nan = Mask(nan) != 0 || tail != tail;
  RowStats out;
  out.max = any_nan ? std::numeric_limits<float>::quiet_NaN() : top;
  out.arg = any_nan ? static_cast<int32_t>(n) : FirstAt(x, n, top);
  out.target = target >= 0 && target < n ? Widen(x[target]) : -std::numeric_limits<float>::infinity();
  return out;
}

// One row's block x[0, n): its statistics (RowStats), and with a buffer (buf
// non-null) the block offered to the row's running buffer buf[0, cap) of
// candidates for its k largest values (meta: the count held and the bar, an
// OrderKey: only values at least the bar enter); a buffer without room is cut
// back to its k largest (CutBuffer), which raises the bar. Read once for both:
// 4 * kLanes values at a time into 2 lanes' maxima (2 chains, each fed by a
// maximum of two vectors) and NaN flags, and each such group listed where its
// maximum reaches the bar as a float (or it holds a NaN) without a branch; then
// the listed groups' vectors offered (Offer), each value against the bar by its
// key. With a branch per group taken a third of the time (N 4096, V 32000,
// K 64) and one per vector offered, the candidates cost 0.75x the statistics'
// read; listed, 0.4x. Each value past the last multiple of kLanes, and every
// value where the buffer has no room for a vector (cap < k + kLanes), one at
// a time.
class BlockRow {
 public:
  BlockRow(float* buf, int32_t* meta, int64_t k, int64_t cap, std::vector<int32_t>& keys,
           std::vector<int64_t>& groups)
      : buf_(buf), meta_(meta), k_(k), cap_(cap), keys_(keys), groups_(groups) {
    if (buf == nullptr) return;
    size_ = meta[0];
    SetBar(static_cast<uint32_t>(meta[1]));
  }

  template <bool kOffers, typename T>
  RowStats Run(const T* x, int64_t n, int64_t target) {
    const float ninf = -std::numeric_limits<float>::infinity();
    FV m0 = SplatV(ninf), m1 = m0;
    IV nan = SplatV(0);
    int64_t i = 0, listed = 0;
    bool vectors = !kOffers || cap_ >= k_ + kLanes;
    if (kOffers && vectors) groups_.resize(n / (4 * kLanes));
    for (; vectors && i + 4 * kLanes <= n; i += 4 * kLanes) {
      FV a = LoadV(x + i), b = LoadV(x + i + kLanes), c = LoadV(x + i + 2 * kLanes),
         d = LoadV(x + i + 3 * kLanes);
      IV nans = (a != a) | (b != b) | (c != c) | (d != d);
      nan |= nans;
      FV ab = Max(a, b), cd = Max(c, d);
      m0 = Max(ab, m0), m1 = Max(cd, m1);
      if constexpr (kOffers) {
        groups_[listed] = i;
        listed += Mask((Max(ab, cd) >= floor_) | nans) != 0;
      }
    }
    if constexpr (kOffers) {
      for (int64_t g = 0; g < listed; ++g) {
        for (int64_t j = groups_[g]; j < groups_[g] + 4 * kLanes; j += kLanes) Offer(LoadV(x + j));
      }
    }
    for (; vectors && i + kLanes <= n; i += kLanes) {
      FV a = LoadV(x + i);
      nan |= a != a;
      m0 = Max(a, m0);
      if constexpr (kOffers) Offer(a);
    }
    float tail = ninf;
    for (; i < n; ++i) {
      float v = Widen(x[i]);
      tail = v > tail || v != v ? v : tail;
      if (!kOffers || OrderKey(v) < bar_) continue;
      if (size_ == cap_) {
        Cut();
        if (OrderKey(v) < bar_) continue;
      }
      buf_[size_++] = v;
    }
    if constexpr (kOffers) {
      meta_[0] = static_cast<int32_t>(size_);
      meta_[1] = static_cast<int32_t>(bar_);
    }
    return StatsOf(x, n, target, Max(m0, m1), nan, tail);
  }

 private:
  IV Passes(FV v) const { return SignedKeysOf<IV>(v) >= bars_; }

  // The bar as an OrderKey, as a vector of signed keys, and as the least float
  // that may pass it (-inf below -inf's key, NaN past +inf's: NaN is tested
  // apart), for a test of a maximum against it before any key is taken.
  void SetBar(uint32_t bar) {
    const float inf = std::numeric_limits<float>::infinity();
    bar_ = bar;
    bars_ = SplatV(static_cast<int32_t>(bar ^ 0x80000000u));
    floor_ = SplatV(bar <= OrderKey(-inf) ? -inf : KeyValue(bar));
  }

  void Cut() {
    SetBar(CutBuffer(buf_, size_, k_, keys_));
    size_ = k_;
  }

  // v's lanes at least the bar, packed at the end of the buffer (cut first
  // where any passes and it has no room for kLanes): no branch on which pass.
  void Offer(FV v) {
    uint32_t passed = Mask(Passes(v));
    if (size_ + kLanes > cap_) {
      if (passed == 0) return;
      Cut();
      passed = Mask(Passes(v));
    }
    size_ += Pack(buf_ + size_, v, passed);
  }

  float* buf_;
  int32_t* meta_;
  int64_t k_, cap_, size_ = 0;
  std::vector<int32_t>& keys_;
  uint32_t bar_ = UINT32_MAX;
  IV bars_ = SplatV(0);
  FV floor_ = SplatV(0.0f);
  std::vector<int64_t>& groups_;
};

// Each row of x [rows, n] through BlockRow (with buf: rows of cap values and
// meta [rows, 2], x float32; without: statistics only, x float32 or bfloat16),
// its RowStats into m, t, arg.
template <typename T>
void BlockRows(ffi::ThreadPool& pool, const T* x, int64_t rows, int64_t n,
               const int32_t* targets, float* buf, int32_t* meta, int64_t k, int64_t cap, float* m,
               float* t, int32_t* arg) {
  ParallelRows(pool, rows, n + 64, [=](int64_t lo, int64_t hi) {
    std::vector<int32_t> keys;
    std::vector<int64_t> groups;
    for (int64_t r = lo; r < hi; ++r) {
      float* row_buf = buf ? buf + r * cap : nullptr;
      int32_t* row_meta = meta ? meta + 2 * r : nullptr;
      BlockRow row(row_buf, row_meta, k, cap, keys, groups);
      RowStats st = buf ? row.Run<true>(x + r * n, n, targets[r])
                        : row.Run<false>(x + r * n, n, targets[r]);
      m[r] = st.max, t[r] = st.target, arg[r] = st.arg;
    }
  });
}

// x float32 or bfloat16 [..., n], targets int32 [...] (the block's columns:
// outside [0, n) where the target is in another block); each row's RowStats
// into m, t, arg.
ffi::Error BlockStats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> targets,
                      ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> t,
                      ffi::ResultBuffer<ffi::S32> arg) {
  auto dims = x.dimensions();
  int64_t n = dims.size() == 0 ? 0 : dims.back();
  int64_t rows = n > 0 ? static_cast<int64_t>(x.element_count()) / n : 0;
  if (dims.size() == 0 || targets.element_count() != static_cast<size_t>(rows)) {
    return ffi::Error::InvalidArgument("block_stats: x [..., n], targets [...]");
  }
  const int32_t* ts = targets.typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      BlockRows(pool, static_cast<const float*>(x.untyped_data()), rows, n, ts, nullptr, nullptr, 0,
                0, m->typed_data(), t->typed_data(), arg->typed_data());
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      BlockRows(pool, static_cast<const uint16_t*>(x.untyped_data()), rows, n, ts, nullptr,
                nullptr, 0, 0, m->typed_data(), t->typed_data(), arg->typed_data());
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("block_stats: float32 or bfloat16");
  }
}

// As BlockStats, each row's block also offered to its running buffer: buf
// float32 [..., cap] and meta int32 [..., 2] (updated in place: the results
// alias them), cap > k.
ffi::Error BlockStatsTopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> targets,
                          ffi::Buffer<ffi::F32> buf, ffi::Buffer<ffi::S32> meta,
                          ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> t,
                          ffi::ResultBuffer<ffi::S32> arg, ffi::ResultBuffer<ffi::F32> buf_out,
                          ffi::ResultBuffer<ffi::S32> meta_out, int64_t k) {
  auto dims = x.dimensions();
  if (dims.size() == 0 || buf.dimensions().size() == 0) {
    return ffi::Error::InvalidArgument("block_stats: x [..., n], buf [..., cap]");
  }
  int64_t n = dims.back(), cap = buf.dimensions().back();
  if (k < 1 || cap <= k) return ffi::Error::InvalidArgument("block_stats: 1 <= k < cap");
  int64_t rows = static_cast<int64_t>(buf.element_count()) / cap;
  if (targets.element_count() != static_cast<size_t>(rows) ||
      meta.element_count() != static_cast<size_t>(2 * rows) ||
      x.element_count() != static_cast<size_t>(rows * n)) {
    return ffi::Error::InvalidArgument("block_stats: x [..., n], targets [...], buf [..., cap], meta [..., 2]");
  }
  float* b = buf_out->typed_data();
  int32_t* mt = meta_out->typed_data();
  if (b != buf.typed_data()) std::copy(buf.typed_data(), buf.typed_data() + rows * cap, b);
  if (mt != meta.typed_data()) std::copy(meta.typed_data(), meta.typed_data() + 2 * rows, mt);
  BlockRows(pool, x.typed_data(), rows, n, targets.typed_data(), b, mt, k, cap, m->typed_data(),
            t->typed_data(), arg->typed_data());
  return ffi::Error::Success();
}

// The k largest values the running candidates saw (buf float32 [..., cap],
// meta int32 [..., 2] as LpkernelBlockStatsTopK leaves them), descending, as
// lax.top_k gives them of the values seen and k copies of -inf: a row holding
// fewer than k, or a negative NaN (below -inf in the floats' order), ends in
// -inf. Each row's held values copied, cut back to k (CutBuffer) and sorted by
// key: no [..., cap + k] copy for XLA's top-k (28% of the float32 logits at
// V 32000 with top-k 1000).
ffi::Error RunningValues(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> buf, ffi::Buffer<ffi::S32> meta,
                         ffi::ResultBuffer<ffi::F32> values, int64_t k) {
  auto dims = buf.dimensions();
  if (dims.size() == 0 || k < 1) return ffi::Error::InvalidArgument("running_values: buf [..., cap], k >= 1");
  int64_t cap = dims.back();
  int64_t rows = cap > 0 ? static_cast<int64_t>(buf.element_count()) / cap : 0;
  if (meta.element_count() != static_cast<size_t>(2 * rows) ||
      values->element_count() != static_cast<size_t>(rows * k)) {
    return ffi::Error::InvalidArgument("running_values: buf [..., cap], meta [..., 2], values [..., k]");
  }
  const float* b = buf.typed_data();
  const int32_t* mt = meta.typed_data();
  float* out = values->typed_data();
  ParallelRows(pool, rows, cap, [=](int64_t lo, int64_t hi) {
    const float ninf = -std::numeric_limits<float>::infinity();
    const int32_t floor = SignedKey(ninf);
    std::vector<float> held;
    std::vector<int32_t> keys;
    for (int64_t r = lo; r < hi; ++r) {
      int64_t size = std::clamp<int64_t>(mt[2 * r], 0, cap);
      held.assign(b + r * cap, b + r * cap + size);
      if (size > k) CutBuffer(held.data(), size, k, keys), size = k;
      keys.resize(size);  // sorted as keys: a comparison of floats' keys cost twice as much
      for (int64_t j = 0; j < size; ++j) keys[j] = SignedKey(held[j]);
      std::sort(keys.begin(), keys.end(), std::greater<int32_t>());
      float* row = out + r * k;
      int64_t j = 0;
      for (; j < size && keys[j] >= floor; ++j) row[j] = SignedKeyValue(keys[j]);
      std::fill(row + j, row + k, ninf);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelRunningValues, RunningValues,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k"));

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
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("held"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelMaximaTopK, MaximaTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelBlockStats, BlockStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelBlockStatsTopK, BlockStatsTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));

// 1 where this CPU runs the AVX2 build (cpu_library.py: its wide vector loops 8
// lanes), else 0.
extern "C" int LpkernelCpuRunsAvx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return 0;
#endif
}
