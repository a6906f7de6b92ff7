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
// of its last values, and a pass for the kept set's mass and size.

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

// A row's values of A inside the bracket as (key, weight) pairs, narrowed with it.
class RowSearch {
 public:
  explicit RowSearch(int64_t n)
      : keys_(n + 4), under_keys_(n + 4), weights_(n + 4), under_weights_(n + 4) {}

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

 private:
  uint32_t Search(const RowSource& row, const Bounds& b) {
    lo_ = b.floor;
    hi_ = std::max(b.ceiling, lo_ + 1u);
    base_ = 0;
    below_ = 0;
    size_ = 0;
    Narrow(row, true);
    for (int pass = 0; pass < kPasses && size_ > kShort; ++pass) {
      if (!Narrow(ListSource{keys_.data(), weights_.data(), size_}, false)) break;
    }
    Halve();
    uint32_t top = size_ == 1 ? keys_[0] : lo_;  // one column in the bracket, or ties at lo
    if (top <= below_) return lo_;
    return std::max(below_ + (top - below_ + 1u) / 2u, b.floor);
  }

  static constexpr int kSample = 64, kMargin = 5, kPasses = 8, kShort = 64;

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
  int64_t size_ = 0;              // the list's length
  uint32_t lo_ = 0, hi_ = 0;      // the bracket [lo, hi) of keys
  uint32_t below_ = 0;            // the largest key of A below lo (0: none)
  double base_ = 0, budget_ = 0;  // the weight of A below lo; the budget
};

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
  uint32_t* kp = kappa->typed_data();
  float* ms = mass->typed_data();
  int32_t* ct = count->typed_data();
  ParallelRows(pool, rows, 2 * n, [=](int64_t lo, int64_t hi) {
    RowSearch search(n);
    for (int64_t r = lo; r < hi; ++r) {
      Bounds b{fl[r], ce[r], sh[r], mp[r]};
      Kept k = search.Run(ks + r * n, es + r * n, n, b, ones, ac[r] != 0);
      kp[r] = k.kappa;
      ms[r] = k.mass;
      ct[r] = k.count;
    }
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

}  // namespace lpkernel
