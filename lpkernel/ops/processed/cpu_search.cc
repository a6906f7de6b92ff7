// A kept set's search on XLA:CPU (select.py's kept_within, row by row, through
// JAX's typed FFI): top-k by count or top-p by weight within A, the values
// whose weight e (the caller's exp, so A and the masses are XLA's) passes
// min-p and whose key is at least a floor.
//
// XLA's search reads a chunk of rows once per halving of their brackets (about
// 26 times for a nucleus of thousands of tokens), and twice more for A's mass
// and the kept set's. Here one row at a time, in cache: a pass for A's mass,
// a pass that lists only the values between two pivots sampled around the
// threshold (about a sixth of them), passes over that shrinking list, halvings
// of its last values, and a pass for the kept set's mass and size. From the
// capped logits themselves (min-p off), one pass lists the values at or above
// a sampled pivot and only those are weighed (RowSearch::RunOnLogits).

#include <cmath>
#include <limits>

#include "cpu_common.h"

namespace lpkernel {
namespace {

// select.order_key: OrderKey with -0.0 as 0.0.
inline uint32_t ZeroKey(float z) { return OrderKey(z == 0 ? 0.0f : z); }

// An OrderKey as a signed integer in every lane (SSE2 compares no unsigned ones).
inline I4 SignedSplat(uint32_t key) { return Splat(static_cast<int32_t>(key ^ 0x80000000u)); }

// What a row's search is given: A is {e >= min_p, key >= floor}, and ceiling
// is past its largest key; `share` is top-p's p (A's least likely columns
// weighing at most 1 - p of its mass are dropped) or, by count, top-k's k (A's
// columns past its k largest are dropped, ties kept).
struct Bounds {
  uint32_t floor, ceiling;
  float share, min_p;
};

// The kept set's threshold key, mass (sum of e) and size.
struct Kept {
  uint32_t kappa;
  float mass;
  int32_t count;
};

// The pairs of the source [j, j + 4) (fewer at its end): keys, weights, and
// which lanes are members. A row's members are A; a list's, all its pairs.
struct RowSource {
  const uint32_t* key;
  const float* e;
  int64_t n;
  uint32_t floor;
  float min_p;
  bool ones;

  int64_t size() const { return n; }
  void Load(int64_t j, U4* k, F4* w, I4* member) const {
    F4 ev;
    if (j + 4 <= n) {
      std::memcpy(k, key + j, sizeof *k);
      ev = Load4(e + j);
    } else {  // the tail: lanes past the row are not in A (e NaN)
      const float nan = std::numeric_limits<float>::quiet_NaN();
      *k = U4{0, 0, 0, 0};
      ev = F4{nan, nan, nan, nan};
      for (int64_t l = 0; j + l < n; ++l) (*k)[l] = key[j + l], ev[l] = e[j + l];
    }
    const F4 min_p4 = {min_p, min_p, min_p, min_p}, one = {1, 1, 1, 1};
    *member = (ev >= min_p4) & ((reinterpret_cast<I4>(*k) ^ Splat(INT32_MIN)) >= SignedSplat(floor));
    *w = ones ? one : ev;
  }
  void Get(int64_t i, uint32_t* k, float* w) const {
    *k = key[i];
    *w = ones ? 1.0f : e[i];
  }
};

struct ListSource {
  const uint32_t* keys;
  const float* weights;
  int64_t n;

  int64_t size() const { return n; }
  void Load(int64_t j, U4* key, F4* w, I4* member) const {
    std::memcpy(key, keys + j, sizeof *key);
    *w = Load4(weights + j);
    *member = I4{0, 1, 2, 3} < static_cast<int32_t>(n - j);
  }
  void Get(int64_t i, uint32_t* key, float* w) const {
    *key = keys[i];
    *w = weights[i];
  }
};

// What one pass over a source's members gives for pivots p1 <= p2.
struct Passed {
  double below_p1 = 0, inside = 0;  // the weight of those below p1, of those in [p1, p2)
  uint32_t top_below = 0;           // the largest key below p1 (0: none)
  int64_t count = 0;                // how many are in [p1, p2), listed
};

// One pass: the members in [p1, p2) listed in (keys, weights) in order, and
// their weights and those below p1 summed. 4 at a time (keys compared as
// signed integers: SSE2 compares no unsigned ones), a bit per value for 64 of
// them, then the listed ones read again (about a sixth, except in the last
// halvings); float sums flushed to float64 every 256 values.
template <typename Source>
Passed Pass(const Source& src, uint32_t p1, uint32_t p2, uint32_t* keys, float* weights) {
  const I4 flip = Splat(INT32_MIN), p1s = SignedSplat(p1), p2s = SignedSplat(p2);
  I4 top = flip;
  Passed out;
  int64_t m = 0, n = src.size();
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    F4 below = {0, 0, 0, 0}, inside = {0, 0, 0, 0};
    for (int64_t j1 = j0; j1 < std::min(n, j0 + 256); j1 += 64) {
      uint64_t bits = 0;
      for (int64_t j = j1; j < std::min(n, j1 + 64); j += 4) {
        U4 key;
        F4 w;
        I4 member;
        src.Load(j, &key, &w, &member);
        I4 ks = reinterpret_cast<I4>(key) ^ flip;
        I4 is_below = member & (ks < p1s);
        I4 is_inside = member & ~is_below & (ks < p2s);
        below += reinterpret_cast<F4>(reinterpret_cast<I4>(w) & is_below);
        inside += reinterpret_cast<F4>(reinterpret_cast<I4>(w) & is_inside);
        I4 under = (ks & is_below) | (flip & ~is_below);
        top = top > under ? top : under;
        bits |= static_cast<uint64_t>(Mask(is_inside)) << (j - j1);
      }
      for (; bits != 0; bits &= bits - 1, ++m) {
        src.Get(j1 + __builtin_ctzll(bits), keys + m, weights + m);
      }
    }
    out.below_p1 += Sum(below);
    out.inside += Sum(inside);
  }
  int32_t most = std::max(std::max(top[0], top[1]), std::max(top[2], top[3]));
  out.top_below = static_cast<uint32_t>(most) ^ 0x80000000u;  // 0 where none
  out.count = m;
  return out;
}

// The mass (sum of e) and size of A's values with keys at least `least`: 4 at a
// time, keys compared as signed integers, float sums flushed to float64 every 256.
inline std::pair<double, int64_t> Sums(const RowSource& row, uint32_t least) {
  const I4 flip = Splat(INT32_MIN);
  const I4 bar = SignedSplat(std::max(least, row.floor));
  const F4 min_p = {row.min_p, row.min_p, row.min_p, row.min_p};
  double mass = 0;
  I4 count = {0, 0, 0, 0};
  int64_t whole = row.n / 4 * 4, j = 0;
  while (j < whole) {
    F4 acc = {0, 0, 0, 0};
    for (int64_t end = std::min(whole, j + 256); j < end; j += 4) {
      I4 key;
      std::memcpy(&key, row.key + j, sizeof key);
      F4 ev = Load4(row.e + j);
      I4 in = (ev >= min_p) & ((key ^ flip) >= bar);
      acc += reinterpret_cast<F4>(reinterpret_cast<I4>(ev) & in);
      count -= in;
    }
    mass += Sum(acc);
  }
  int64_t total = int64_t{count[0]} + count[1] + count[2] + count[3];
  for (; j < row.n; ++j) {
    bool in = row.e[j] >= row.min_p && row.key[j] >= std::max(least, row.floor);
    mass += in ? row.e[j] : 0.0f;
    total += in;
  }
  return {mass, total};
}

// The weight of a capped logit z from the row's shift and temperature, as
// select.Params.e: exp((z - shift) / tau) (within an ulp or two of XLA's), or 1
// by count.
struct Weigher {
  float shift, tau;
  bool ones;
  float operator()(float z) const { return ones ? 1.0f : std::exp((z - shift) / tau); }
};

inline F4 SplatF(float v) { return F4{v, v, v, v}; }
inline F4 Select(I4 mask, F4 a, F4 b) {
  return reinterpret_cast<F4>((reinterpret_cast<I4>(a) & mask) | (reinterpret_cast<I4>(b) & ~mask));
}

// exp(x) of 4 floats: x = n ln 2 + r, |r| <= ln 2 / 2, exp(r) by Cephes' expf
// polynomial (about an ulp), times 2^n; 0 below -87.3 (a weight beside the
// row's largest, 1, that no sum of them can tell from 0), NaN kept.
inline F4 Exp4(F4 x) {
  const F4 low = SplatF(-87.3f), high = SplatF(88.3f);
  F4 c = Select(x < low, low, Select(x > high, high, x));
  F4 t = c * SplatF(1.44269504088896341f);
  I4 n = __builtin_convertvector(t + Select(t < SplatF(0), SplatF(-0.5f), SplatF(0.5f)), I4);
  F4 fn = __builtin_convertvector(n, F4);
  F4 r = (c - fn * SplatF(0.693359375f)) - fn * SplatF(-2.12194440e-4f);
  F4 y = SplatF(1.9875691500e-4f);
  y = y * r + SplatF(1.3981999507e-3f);
  y = y * r + SplatF(8.3334519073e-3f);
  y = y * r + SplatF(4.1665795894e-2f);
  y = y * r + SplatF(1.6666665459e-1f);
  y = y * r + SplatF(5.0000001201e-1f);
  y = y * (r * r) + r + SplatF(1.0f);
  F4 scale = reinterpret_cast<F4>((n + Splat(127)) << 23);
  F4 out = Select(x < low, SplatF(0), y * scale);
  return Select(x != x, x, out);
}

// The float bound of keys: key >= lo is z >= LowerBound(lo) for every z but NaN
// (ZeroKey's -0.0 is 0.0).
inline float LowerBound(uint32_t lo) {
  const uint32_t minus_inf = OrderKey(-std::numeric_limits<float>::infinity());
  return lo <= minus_inf ? -std::numeric_limits<float>::infinity() : KeyValue(lo);
}

// What ListOf lists of a row.
struct Listed {
  double weight = 0;  // the listed values' weight, summed in float64
  int64_t m = 0;      // how many are listed
  uint32_t top = 0;   // their largest key
};

// The values of the row z [0, n) with keys at least lo (NaN none), listed as (key,
// weight) pairs in order: 4 at a time compared as floats (the keys' bounds), a
// bit per value for 64 of them (`dense`: one at a time, without a branch);
// then their weights, 4 at a time.
Listed ListOf(const float* z, int64_t n, uint32_t lo, const Weigher& weigh, bool dense,
              uint32_t* keys, float* weights) {
  const F4 lo4 = SplatF(LowerBound(lo));
  Listed out;
  const int64_t whole = dense ? 0 : n / 4 * 4;
  if (dense) {  // most values listed: each written, the list's end moved past the listed ones
    for (int64_t j = 0; j < n; ++j) {
      weights[out.m] = z[j];
      out.m += z[j] >= lo4[0];
    }
  }
  for (int64_t j1 = 0; j1 < whole; j1 += 64) {
    uint64_t bits = 0;
    for (int64_t j = j1; j < std::min(whole, j1 + 64); j += 4) {
      F4 v = Load4(z + j);
      bits |= static_cast<uint64_t>(Mask(v >= lo4)) << (j - j1);
    }
    for (; bits != 0; bits &= bits - 1) weights[out.m++] = z[j1 + __builtin_ctzll(bits)];
  }
  for (int64_t j = dense ? n : whole; j < n; ++j) {
    uint32_t key = ZeroKey(z[j]);
    if (key >= lo && z[j] == z[j]) weights[out.m++] = z[j];
  }
  // keys, then weights in place of the values (float sums flushed to float64 every 256)
  for (int64_t i = 0; i < out.m; ++i) {
    keys[i] = ZeroKey(weights[i]);
    out.top = std::max(out.top, keys[i]);
  }
  const int64_t quads = out.m / 4 * 4;
  const F4 shift = SplatF(weigh.shift), tau = SplatF(weigh.tau);
  for (int64_t i0 = 0; i0 < quads; i0 += 256) {
    F4 acc = SplatF(0);
    for (int64_t i = i0; i < std::min(quads, i0 + 256); i += 4) {
      F4 w = weigh.ones ? SplatF(1) : Exp4((Load4(weights + i) - shift) / tau);
      std::memcpy(weights + i, &w, sizeof w);
      acc += w;
    }
    out.weight += Sum(acc);
  }
  for (int64_t i = quads; i < out.m; ++i) {
    weights[i] = weigh(weights[i]);
    out.weight += weights[i];
  }
  return out;
}

// The largest key in [floor, lo) of the row z [0, n) (0: none).
uint32_t LargestBelow(const float* z, int64_t n, uint32_t floor, uint32_t lo) {
  uint32_t most = 0;
  if (lo <= floor) return most;
  const F4 floor4 = SplatF(LowerBound(floor)), lo4 = SplatF(LowerBound(lo));
  const F4 none = SplatF(-std::numeric_limits<float>::infinity());
  F4 below = none;
  I4 any = Splat(0);
  const int64_t whole = n / 4 * 4;
  for (int64_t j = 0; j < whole; j += 4) {
    F4 v = Load4(z + j);
    I4 is_below = (v >= floor4) & ~(v >= lo4);
    below = Select(is_below & (v > below), v, below);
    any |= is_below;
  }
  for (int l = 0; l < 4; ++l) {
    if (any[l]) most = std::max(most, ZeroKey(below[l]));
  }
  for (int64_t j = whole; j < n; ++j) {
    uint32_t key = ZeroKey(z[j]);
    if (key >= floor && key < lo) most = std::max(most, key);
  }
  return most;
}

// A row's values of A inside the bracket as (key, weight) pairs, narrowed with it.
class RowSearch {
 public:
  // A thread's searcher for rows of n values: its buffers kept from call to
  // call (made for every few rows, their zeroing had cost more than the search
  // at V 128256: 3 MB a row).
  static RowSearch& ForRows(int64_t n) {
    thread_local RowSearch search;
    if (static_cast<int64_t>(search.keys_.size()) < n + 4) {
      for (auto* b : {&search.keys_, &search.under_keys_, &search.list_keys_}) b->resize(n + 4);
      for (auto* b : {&search.weights_, &search.under_weights_, &search.list_weights_}) {
        b->resize(n + 4);
      }
    }
    return search;
  }

  // A's kept set: A whole where not `active`; else by the largest key kappa
  // whose columns of A below it weigh at most the budget, moved halfway down to
  // the next smaller column of A (select.py's largest_key_within).
  //
  // A pass over the row for A's mass and size (the budget), then passes that
  // cut the bracket at two pivots around the threshold as estimated from a
  // sample of 64 values (the row's, then the list's): a pass keeps about a
  // sixth; where the sample misjudged, the same values are passed again with
  // the bracket's side that holds it. Then halvings of the short list, and a
  // pass over the row for the kept set's mass and size: the row is read three
  // times while it is in cache.
  Kept Run(const uint32_t* key, const float* e, int64_t n, const Bounds& b, bool ones,
           bool active) {
    const RowSource row{key, e, n, b.floor, b.min_p, ones};
    uint32_t kappa = b.floor;
    if (active) {
      auto [mass, count] = Sums(row, b.floor);
      budget_ = ones ? count - b.share : (1.0 - b.share) * mass;
      kappa = Search(row, b);
    }
    auto [mass, count] = Sums(row, kappa);
    return Kept{kappa, static_cast<float>(mass), static_cast<int32_t>(count)};
  }

  // A's kept set from the row's capped logits z itself, min-p off (A is {key >=
  // floor}), its weights exp((z - shift) / tau) formed only where listed. `total`:
  // the row's sum of them (A's mass where floor is 0). A pass lists A's values at
  // or above a pivot sampled so that they likely weigh more than the kept set's
  // share T (p of A's mass, or by count k): the kept set is then among them, and
  // the largest kappa whose values at or above it weigh at least T is the same
  // kappa as Run's (A's values below it weigh at most the budget). Where the
  // sample misjudged, a lower pivot and the pass again. The list is then
  // narrowed as Run's, and the kept set's mass and size summed over it: the
  // row is read about once, and exp taken for the list alone.
  Kept RunOnLogits(const float* z, int64_t n, const Bounds& b, const Weigher& weigh, double total,
                   bool ones, bool active) {
    const uint32_t hi = std::max(b.ceiling, b.floor + 1u);
    if (!active && b.floor == 0) {  // A whole, its mass known
      return Kept{0, static_cast<float>(ones ? n : total), static_cast<int32_t>(n)};
    }
    // A sampled pivot where A is the whole row and, by weight, the budget is no
    // sliver of its float32 total (the list's is that share of it less the
    // weight below the pivot, unsummed); else A is listed whole.
    const bool pivot = active && b.floor == 0 && (ones || 1.0 - b.share >= kLeastDropped);
    const Sample sample = pivot ? SampleOf(z, n, weigh) : Sample{};
    for (int retry = 0;; ++retry) {
      double target = ones ? b.share : b.share * total;
      uint32_t lo = b.floor;
      if (pivot) lo = std::max(lo, sample.Pivot((ones ? n : total) - target, n, retry));
      // over a quarter of the row listed, likely (A whole from the floor 0)
      bool dense = pivot ? sample.Above(lo) * 4 > sample.count : b.floor == 0;
      // By weight, a row to weigh mostly or whole is declined (count -1): the
      // caller's exp, 16 lanes wide in XLA, and Run are faster there.
      if (!ones && active && dense && retry == 0) return Kept{b.floor, 0.0f, -1};
      Listed got = ListOf(z, n, lo, weigh, dense, list_keys_.data(), list_weights_.data());
      if (lo == b.floor) target = ones ? b.share : b.share * got.weight;  // A's own mass
      if (!active) return Kept{b.floor, static_cast<float>(got.weight), static_cast<int32_t>(got.m)};
      if (got.weight < target && lo != b.floor) continue;  // the kept set reaches below lo
      std::copy_n(list_keys_.data(), got.m, keys_.data());
      std::copy_n(list_weights_.data(), got.m, weights_.data());
      lo_ = lo;
      hi_ = std::max(hi, got.top + 1u);  // a recomputed z may round past the ceiling
      base_ = 0;
      below_ = 0;  // A's largest key below lo: read from the row only if needed, below
      size_ = got.m;
      budget_ = std::max(got.weight - target, 0.0);  // what the list may drop
      Narrowed();
      if (below_ < lo) below_ = LargestBelow(z, n, b.floor, lo);
      uint32_t kappa = Placed(b.floor);
      auto [mass, count] = ListSums(got.m, kappa);
      return Kept{kappa, static_cast<float>(mass), static_cast<int32_t>(count)};
    }
  }

 private:
  uint32_t Search(const RowSource& row, const Bounds& b) {
    lo_ = b.floor;
    hi_ = std::max(b.ceiling, lo_ + 1u);
    base_ = 0;
    below_ = 0;
    size_ = 0;
    Narrow(row, true);
    Narrowed();
    return Placed(b.floor);
  }

  // The list narrowed by passes and halvings to the threshold.
  void Narrowed() {
    for (int pass = 0; pass < kPasses && size_ > kShort; ++pass) {
      if (!Narrow(ListSource{keys_.data(), weights_.data(), size_}, false)) break;
    }
    Halve();
  }

  // The narrowed bracket's threshold moved halfway down to the next smaller
  // column of A (at least `floor`).
  uint32_t Placed(uint32_t floor) const {
    uint32_t top = size_ == 1 ? keys_[0] : lo_;  // one column in the bracket, or ties at lo
    if (top <= below_) return lo_;
    return std::max(below_ + (top - below_ + 1u) / 2u, floor);
  }

  static constexpr int kSample = 64, kMargin = 5, kPasses = 8, kShort = 64, kUpperMargin = 2;
  static constexpr double kLeastDropped = 1.0 / 32;

  // What a row's sample of kSample values says: their keys, ascending, and weights.
  struct Sample {
    std::pair<uint32_t, float> at[kSample];
    int count = 0;

    // A pivot below which A likely weighs at most `budget`: the sample value
    // kMargin << retry before the one where the sample's weight from the bottom
    // (scaled to n values) passes it; 0 (A whole) before the sample's start.
    uint32_t Pivot(double budget, int64_t n, int retry) const {
      double scale = static_cast<double>(n) / count, cum = 0;
      int q = count;
      for (int i = 0; i < count; ++i) {
        cum += scale * at[i].second;
        if (cum > budget) {
          q = i;
          break;
        }
      }
      int64_t i = int64_t{q} - (int64_t{kUpperMargin} << std::min(retry, 20));
      return i >= 0 ? at[i].first : 0u;
    }

    // How many of the sample's values have keys at least `lo`.
    int Above(uint32_t lo) const {
      return static_cast<int>(at + count - std::lower_bound(at, at + count, std::make_pair(lo, -1.0f)));
    }
  };

  static Sample SampleOf(const float* z, int64_t n, const Weigher& weigh) {
    Sample s;
    for (int t = 0; t < kSample && n > 0; ++t) {
      float v = z[t * n / kSample];
      s.at[s.count++] = {ZeroKey(v), weigh(v)};
    }
    std::sort(s.at, s.at + s.count);
    return s;
  }

  // The mass and size of the saved list's values with keys at least kappa.
  std::pair<double, int64_t> ListSums(int64_t m, uint32_t kappa) const {
    double mass = 0;
    int64_t count = 0;
    for (int64_t i0 = 0; i0 < m; i0 += 256) {
      float acc = 0;
      for (int64_t i = i0; i < std::min(m, i0 + 256); ++i) {
        bool in = list_keys_[i] >= kappa;
        acc += in ? list_weights_[i] : 0.0f;
        count += in;
      }
      mass += acc;
    }
    return {mass, count};
  }

  // One narrowing pass (two where the sample misjudged) over src: the list's
  // pairs, or the row's A (`row`: its pass lists the bracket's values even
  // where the sample cannot cut the bracket); false when it cannot, and nothing done.
  template <typename Source>
  bool Narrow(const Source& src, bool row) {
    uint32_t p1 = lo_, p2 = hi_;
    if (!Pivots(src, row, &p1, &p2) && !row) return false;
    double base = row ? 0.0 : base_;  // a row's pass weighs A below lo too
    Passed r = Pass(src, p1, p2, under_keys_.data(), under_weights_.data());
    double w1 = base + r.below_p1, w2 = w1 + r.inside;
    bool fits1 = p1 == lo_ || w1 <= budget_, fits2 = p2 < hi_ && w2 <= budget_;
    if (fits1 && !fits2) {
      Take(r, w1, p1, p2);
    } else {  // the side that holds the threshold, taken as known (not summed again)
      uint32_t q1 = fits1 ? p2 : lo_, q2 = fits1 ? hi_ : p1;
      Passed again = Pass(src, q1, q2, under_keys_.data(), under_weights_.data());
      Take(again, base + again.below_p1, q1, q2);
    }
    return true;
  }

  // Two pivots in [lo, hi] kMargin sample values either side of the one where the
  // sample's ascending weight (scaled to the source's size) passes the budget;
  // false where the sample holds too few members or cannot cut the bracket.
  template <typename Source>
  bool Pivots(const Source& src, bool row, uint32_t* p1, uint32_t* p2) {
    int64_t n = src.size();
    std::pair<uint32_t, float> sample[kSample];
    int count = 0;
    for (int t = 0; t < kSample; ++t) {
      U4 key;
      F4 w;
      I4 member;
      src.Load(t * n / kSample, &key, &w, &member);
      if (member[0]) sample[count++] = {uint32_t{key[0]}, float{w[0]}};
    }
    if (count < kSample / 4) return false;
    std::sort(sample, sample + count);
    double scale = static_cast<double>(n) / kSample, cum = row ? 0.0 : base_;
    int q = count;
    for (int i = 0; i < count; ++i) {
      cum += scale * sample[i].second;
      if (cum > budget_) {
        q = i;
        break;
      }
    }
    uint32_t a = q >= kMargin ? sample[q - kMargin].first : lo_;
    uint32_t c = q + kMargin < count ? sample[q + kMargin].first : hi_;
    a = a < lo_ || a >= hi_ ? lo_ : a;
    c = std::min(std::max(c, a + 1u), hi_);
    if (a == lo_ && c == hi_) return false;
    *p1 = a;
    *p2 = c;
    return true;
  }

  // The bracket [p1, p2), the weight of A below p1, the pairs passed as the list.
  void Take(const Passed& r, double w1, uint32_t p1, uint32_t p2) {
    lo_ = p1;
    hi_ = p2;
    base_ = w1;
    below_ = std::max(below_, r.top_below);
    size_ = r.count;
    std::swap(keys_, under_keys_);
    std::swap(weights_, under_weights_);
  }

  // Halvings of the short list (select.py's bisection) until at most one pair,
  // or ties at lo, is left: below mid first, then (where it fits) from mid up.
  void Halve() {
    while (hi_ - lo_ > 1 && size_ > 1) {
      uint32_t mid = Mid(lo_, hi_);
      ListSource list{keys_.data(), weights_.data(), size_};
      Passed r = Pass(list, lo_, mid, under_keys_.data(), under_weights_.data());
      if (base_ + r.inside > budget_) {
        Take(r, base_, lo_, mid);
      } else {
        Passed up = Pass(list, mid, hi_, under_keys_.data(), under_weights_.data());
        Take(up, base_ + up.below_p1, mid, hi_);
      }
    }
  }

  // Halfway between lo and hi by value while both are finite, else by key.
  static uint32_t Mid(uint32_t lo, uint32_t hi) {
    float v_lo = KeyValue(lo), v_hi = KeyValue(hi);
    const float inf = std::numeric_limits<float>::infinity();
    bool finite = std::fabs(v_lo) < inf && std::fabs(v_hi) < inf;
    uint32_t mid = finite ? ZeroKey(v_lo / 2 + v_hi / 2) : lo + (hi - lo) / 2u;
    return std::clamp(mid, lo + 1u, hi - 1u);
  }

  std::vector<uint32_t> keys_, under_keys_;  // the list, and the next one
  std::vector<float> weights_, under_weights_;
  std::vector<uint32_t> list_keys_;  // RunOnLogits' first list, kept for the sums
  std::vector<float> list_weights_;
  int64_t size_ = 0;              // the list's length
  uint32_t lo_ = 0, hi_ = 0;      // the bracket [lo, hi) of keys
  uint32_t below_ = 0;            // the largest key of A below lo (0: none)
  double base_ = 0, budget_ = 0;  // the weight of A below lo; the budget
};

// Each row's kept set, kept_of(search, row), written to (kappa, mass, count):
// rows of n values (row_values read per row) shared among the threads, each
// with its searcher.
template <typename KeptOf>
void SearchRows(ffi::ThreadPool& pool, int64_t rows, int64_t n, int64_t row_values,
                ffi::ResultBuffer<ffi::U32>& kappa, ffi::ResultBuffer<ffi::F32>& mass,
                ffi::ResultBuffer<ffi::S32>& count, KeptOf kept_of) {
  uint32_t* kp = kappa->typed_data();
  float* ms = mass->typed_data();
  int32_t* ct = count->typed_data();
  ParallelRows(pool, rows, row_values, [=](int64_t lo, int64_t hi) {
    RowSearch& search = RowSearch::ForRows(n);
    for (int64_t r = lo; r < hi; ++r) {
      Kept k = kept_of(search, r);
      kp[r] = k.kappa;
      ms[r] = k.mass;
      ct[r] = k.count;
    }
  });
}

// key [rows, n] uint32 (select.order_key of the capped logits), e [rows, n]
// float32 (their exp weights); floor, ceiling uint32 [rows]; share (top-p's p,
// or top-k's k with `ones`), min_p float32 [rows]; active int32 [rows]. The
// kept set's kappa uint32, mass float32 and count int32 [rows].
ffi::Error KeptSet(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> key, ffi::Buffer<ffi::F32> e,
                   ffi::Buffer<ffi::U32> floor, ffi::Buffer<ffi::U32> ceiling,
                   ffi::Buffer<ffi::F32> share, ffi::Buffer<ffi::F32> min_p,
                   ffi::Buffer<ffi::S32> active, ffi::ResultBuffer<ffi::U32> kappa,
                   ffi::ResultBuffer<ffi::F32> mass, ffi::ResultBuffer<ffi::S32> count,
                   int64_t ones) {
  auto dims = key.dimensions();
  if (dims.size() != 2 || e.dimensions().size() != 2 || e.element_count() != key.element_count()) {
    return ffi::Error::InvalidArgument("kept_set: key and e [rows, n]");
  }
  int64_t rows = dims[0], n = dims[1];
  for (int64_t c : {floor.element_count(), ceiling.element_count(), share.element_count(),
                    min_p.element_count(), active.element_count()}) {
    if (c != rows) return ffi::Error::InvalidArgument("kept_set: one value per row");
  }
  const uint32_t* ks = key.typed_data();
  const float* es = e.typed_data();
  const uint32_t *fl = floor.typed_data(), *ce = ceiling.typed_data();
  const float *sh = share.typed_data(), *mp = min_p.typed_data();
  const int32_t* ac = active.typed_data();
  SearchRows(pool, rows, n, 2 * n, kappa, mass, count, [=](RowSearch& search, int64_t r) {
    Bounds b{fl[r], ce[r], sh[r], mp[r]};
    return search.Run(ks + r * n, es + r * n, n, b, ones, ac[r] != 0);
  });
  return ffi::Error::Success();
}

// z [R, n] float32 (capped logits), at int32 [rows] (the row of z each row
// reads, clamped to [0, R): a chunk's rows read in place), shift, tau, total
// float32 [rows] (each row's shift, temperature and sum of weights), floor,
// ceiling uint32, share float32 (top-p's p, or top-k's k with `ones`), active
// int32 [rows]; min-p off. The kept set's kappa uint32, mass float32 and count
// int32 [rows].
ffi::Error KeptSetOfLogits(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::S32> at,
                           ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> tau,
                           ffi::Buffer<ffi::F32> total, ffi::Buffer<ffi::U32> floor,
                           ffi::Buffer<ffi::U32> ceiling, ffi::Buffer<ffi::F32> share,
                           ffi::Buffer<ffi::S32> active, ffi::ResultBuffer<ffi::U32> kappa,
                           ffi::ResultBuffer<ffi::F32> mass, ffi::ResultBuffer<ffi::S32> count,
                           int64_t ones) {
  auto dims = z.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("kept_set_of_logits: z [R, n]");
  int64_t stored = dims[0], rows = at.element_count(), n = dims[1];
  for (int64_t c : {shift.element_count(), tau.element_count(), total.element_count(),
                    floor.element_count(), ceiling.element_count(), share.element_count(),
                    active.element_count()}) {
    if (c != rows) return ffi::Error::InvalidArgument("kept_set_of_logits: one value per row");
  }
  const float* zs = z.typed_data();
  const int32_t* row_of = at.typed_data();
  const float *sf = shift.typed_data(), *ta = tau.typed_data(), *to = total.typed_data();
  const uint32_t *fl = floor.typed_data(), *ce = ceiling.typed_data();
  const float* sh = share.typed_data();
  const int32_t* ac = active.typed_data();
  SearchRows(pool, rows, n, n, kappa, mass, count, [=](RowSearch& search, int64_t r) {
    Bounds b{fl[r], ce[r], sh[r], 0.0f};
    Weigher weigh{sf[r], ta[r], ones != 0};
    const int64_t row = std::clamp<int64_t>(row_of[r], 0, std::max<int64_t>(stored - 1, 0));
    return search.RunOnLogits(zs + row * n, n, b, weigh, to[r], ones != 0, ac[r] != 0);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelKeptSet, KeptSet,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("ones"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelKeptSetOfLogits, KeptSetOfLogits,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("ones"));

}  // namespace lpkernel
