// Replay kernels for XLA:CPU through JAX's typed FFI (lpkernel/ops/processed/
// cpu_library.py builds and registers them): the dot products of each token's
// hidden state with the table rows of its kept ids, and their gradients,
// reading the table in row order.
//
// A token's kept ids name K rows of a [V, D] table; gathered token by token
// (XLA's way) the table is read N * K / V times over (14 times at N 4096,
// K 512, V 151936) at random. Here a block of tokens' (token, slot) pairs is
// grouped by table row (a counting sort, the workers' shares at once), and
// each row is read once per block, its pairs' hidden states (a few MB, in
// cache) four at a time, the next row fetched a line per line read.
//
// LpkernelReplayDots: x[t, j] = h[t] . w[ids[t, j]], 0 where the id is outside
// [0, V). h [N, D] and w [V, D] float32 or bfloat16 (one type), x float32.
// With `columns`, w is stored [D, V] (an unembedding matrix): each range of
// rows is copied into a worker's buffer a tile at a time (1 KB of each
// column), so the table is still read once per block, in place, in passes
// over a range of D (`width` columns, PassWidth) whose hidden-state columns
// stay in a core's L2 cache; each pair's partial sums are added in pass order.
//
// LpkernelReplayRepeats: repeated[t] = 1 where ids[t] (int32 [N, K]) names an
// id in [0, V) twice, else 0: each token's ids marked in a V-bit set of its
// worker's, and unmarked after (no sort).
//
// LpkernelReplayGrads: given dx [N, K] float32, dh[t] = sum_j dx[t, j] w[ids[t, j]]
// and dw[r] = sum over (t, j) with ids[t, j] = r of dx[t, j] h[t], float32
// (dw [D, V] with `columns`, as w, in the forward's passes).
// Rows of w are shared among the workers, so dw takes no locks; each worker
// sums its share of dh into its own block-sized buffer, added up at the end
// of the block (of the pass). A [V, D] table's dw, table-sized and fresh, is
// asked to be backed by huge pages (AdviseHugePages).

#include <type_traits>

#include <sys/mman.h>

#include "cpu_common.h"

namespace {

using namespace lpkernel;  // NOLINT: the shared vectors, loads and thread split

// Asks for the cache line of `next` (may be null) at byte `offset` when
// `offset` starts a line.
inline void FetchLine(const char* next, int64_t offset) {
  if (next != nullptr && offset % 64 == 0) __builtin_prefetch(next + offset);
}

// out[m] = w . h[m] for M rows h of d values (float32 sums; d's tail past a
// multiple of 16 one by one). Sixteen sums per row, of the values j % 16,
// added as (lanes 0-3 + 8-11) + (4-7 + 12-15): two vectors of 8 lanes in the
// AVX2 build, rounding as the portable build's four of 4 (two chains of
// additions per row where one was: a row's chain waits on each addition's
// latency; the dot products from a table in cache 40 -> 37 ms at N 1024,
// D 2048, V 8192, K 512).
// `next`: the table's next row (or null), fetched a line per line of `w`
// read: the hardware's prefetcher left most of each 8 KB row to DRAM's
// latency (N 1024, D 2048, V 151936, K 512 on 2 cores: 135 -> 126 ms; the
// whole next row asked for at once, 128 lines, gained nothing).
template <int M, typename T>
inline void Dots(const T* w, const T* const* h, int64_t d, float* out, const T* next) {
  const char* ahead = reinterpret_cast<const char*>(next);
#if LPKERNEL_LANES == 8
  FV acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = FV{};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    FetchLine(ahead, j * int64_t{sizeof(T)});
    FV w0 = LoadV(w + j), w1 = LoadV(w + j + 8);
    for (int m = 0; m < M; ++m) {
      acc[m][0] += w0 * LoadV(h[m] + j);
      acc[m][1] += w1 * LoadV(h[m] + j + 8);
    }
  }
  for (int m = 0; m < M; ++m) {
    FV both = acc[m][0] + acc[m][1];
    F4 lo = __builtin_shufflevector(both, both, 0, 1, 2, 3);
    F4 hi = __builtin_shufflevector(both, both, 4, 5, 6, 7);
    float s = Sum(lo + hi);
    for (int64_t i = j; i < d; ++i) s += Widen(w[i]) * Widen(h[m][i]);
    out[m] = s;
  }
#else
  F4 acc[M][4];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = F4{0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    FetchLine(ahead, j * int64_t{sizeof(T)});
    F4 w0 = Load4(w + j), w1 = Load4(w + j + 4), w2 = Load4(w + j + 8), w3 = Load4(w + j + 12);
    for (int m = 0; m < M; ++m) {
      acc[m][0] += w0 * Load4(h[m] + j);
      acc[m][1] += w1 * Load4(h[m] + j + 4);
      acc[m][2] += w2 * Load4(h[m] + j + 8);
      acc[m][3] += w3 * Load4(h[m] + j + 12);
    }
  }
  for (int m = 0; m < M; ++m) {
    float s = Sum((acc[m][0] + acc[m][2]) + (acc[m][1] + acc[m][3]));
    for (int64_t i = j; i < d; ++i) s += Widen(w[i]) * Widen(h[m][i]);
    out[m] = s;
  }
#endif
}

// dw_row += sum_m g[m] h[m]; dh[m] += g[m] w (M rows of d values); `next`
// as Dots' (the backward at the shape there: 420 -> 375 ms).
template <int M, typename T>
inline void Axpys(const T* w, const T* const* h, const float* g, int64_t d, float* dw_row,
                  float* const* dh, const T* next) {
  const char* ahead = reinterpret_cast<const char*>(next);
  F4 gv[M];
  for (int m = 0; m < M; ++m) gv[m] = F4{g[m], g[m], g[m], g[m]};
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    FetchLine(ahead, j * int64_t{sizeof(T)});
    F4 wv = Load4(w + j), acc = Load4(dw_row + j);
    for (int m = 0; m < M; ++m) {
      acc += gv[m] * Load4(h[m] + j);
      F4 dhv = Load4(dh[m] + j) + gv[m] * wv;
      std::memcpy(dh[m] + j, &dhv, sizeof dhv);
    }
    std::memcpy(dw_row + j, &acc, sizeof acc);
  }
  for (; j < d; ++j) {
    for (int m = 0; m < M; ++m) {
      dw_row[j] += g[m] * Widen(h[m][j]);
      dh[m][j] += g[m] * Widen(w[j]);
    }
  }
}

// f(m, p) for the pairs p[0, size) in groups of m = 4, then one group of 1 to 3
// (m a compile-time constant: std::integral_constant).
template <typename F>
inline void ForGroups(const int32_t* p, int64_t size, F f) {
  int64_t i = 0;
  for (; i + 4 <= size; i += 4) f(std::integral_constant<int, 4>(), p + i);
  switch (size - i) {
    case 3: f(std::integral_constant<int, 3>(), p + i); break;
    case 2: f(std::integral_constant<int, 2>(), p + i); break;
    case 1: f(std::integral_constant<int, 1>(), p + i); break;
  }
}

// A block of tokens' (token, slot) pairs grouped by table row: pairs[start[r],
// start[r + 1]) hold t * K + j (t from the block's first token) for ids[t, j] = r.
class PairsByRow {
 public:
  explicit PairsByRow(int64_t v) : v_(v), start_(v + 1) {}

  // A counting sort in two passes over the pairs, each worker's share at once
  // (a serial one was 5% of the forward at N 1024, K 512, V 151936): the
  // shares' counts of each row, then their places, a row's pairs in
  // ascending order as one worker would place them.
  void Group(ffi::ThreadPool& pool, const int32_t* ids, int64_t count) {
    int shares = Workers(pool, count / 4096 + 1);
    std::vector<int64_t> bounds(shares + 1);
    for (int q = 0; q <= shares; ++q) bounds[q] = count * q / shares;
    counts_.resize(shares);
    auto counts = [&](int64_t lo) -> std::vector<int32_t>& {  // of the share from pair lo
      return counts_[std::lower_bound(bounds.begin(), bounds.end(), lo) - bounds.begin()];
    };
    ParallelRanges(pool, bounds, [&](int64_t lo, int64_t hi, int) {
      std::vector<int32_t>& c = counts(lo);
      c.assign(v_, 0);
      for (int64_t p = lo; p < hi; ++p) {
        if (ids[p] >= 0 && ids[p] < v_) ++c[ids[p]];
      }
    });
    start_[0] = 0;
    for (int64_t r = 0; r < v_; ++r) {  // each share's first place in row r
      int64_t at = start_[r];
      for (auto& c : counts_) {
        int32_t here = c[r];
        c[r] = static_cast<int32_t>(at);
        at += here;
      }
      start_[r + 1] = at;
    }
    pairs_.resize(start_[v_]);
    ParallelRanges(pool, bounds, [&](int64_t lo, int64_t hi, int) {
      std::vector<int32_t>& place = counts(lo);
      for (int64_t p = lo; p < hi; ++p) {
        if (ids[p] >= 0 && ids[p] < v_) pairs_[place[ids[p]]++] = static_cast<int32_t>(p);
      }
    });
  }

  // Row ranges of about equal work (a row read, and D values per pair), at
  // least 4 per thread where the rows allow.
  std::vector<int64_t> Ranges(ffi::ThreadPool& pool) const {
    int64_t work = start_[v_] + v_ / 4;
    int64_t per = std::max<int64_t>(1, work / (4 * std::max<int64_t>(1, pool.num_threads())));
    std::vector<int64_t> bounds = {0};
    int64_t acc = 0;
    for (int64_t r = 0; r < v_; ++r) {
      acc += start_[r + 1] - start_[r] + (r % 4 == 0);
      if (acc >= per) {
        bounds.push_back(r + 1);
        acc = 0;
      }
    }
    if (bounds.back() != v_) bounds.push_back(v_);
    return bounds;
  }

  const int32_t* begin(int64_t r) const { return pairs_.data() + start_[r]; }
  int64_t start(int64_t r) const { return start_[r]; }
  int64_t size(int64_t r) const { return start_[r + 1] - start_[r]; }

 private:
  int64_t v_;
  std::vector<int64_t> start_;
  std::vector<std::vector<int32_t>> counts_;  // per share: its rows' counts, then places
  std::vector<int32_t> pairs_;
};

// Rows [r0, r0 + width) of a [D, V] matrix m copied to rows of d values
// `stride` apart (16 columns at a time, the next ones' pieces prefetched).
template <typename T>
void ColumnsToRows(const T* m, int64_t v, int64_t d, int64_t r0, int64_t width, T* rows,
                   int64_t stride) {
  constexpr int64_t kAhead = 32;  // columns
  for (int64_t j0 = 0; j0 < d; j0 += 16) {
    int64_t jn = std::min<int64_t>(16, d - j0);
    const T* block = m + j0 * v + r0;
    for (int64_t j = kAhead; j < kAhead + jn && j0 + j < d; ++j) {
      const char* next = reinterpret_cast<const char*>(block + j * v);
      for (int64_t b = 0; b < width * int64_t{sizeof(T)}; b += 64) __builtin_prefetch(next + b);
    }
    for (int64_t r = 0; r < width; ++r) {
      T* row = rows + r * stride + j0;
      for (int64_t j = 0; j < jn; ++j) row[j] = block[j * v + r];
    }
  }
}

// The inverse of ColumnsToRows: rows of d values `stride` apart written to
// rows [r0, r0 + width) of a [D, V] matrix m.
inline void RowsToColumns(const float* rows, int64_t stride, float* m, int64_t v, int64_t d,
                          int64_t r0, int64_t width) {
  for (int64_t j0 = 0; j0 < d; j0 += 16) {
    int64_t jn = std::min<int64_t>(16, d - j0);
    float* block = m + j0 * v + r0;
    for (int64_t r = 0; r < width; ++r) {
      const float* row = rows + r * stride + j0;
      for (int64_t j = 0; j < jn; ++j) block[j * v + r] = row[j];
    }
  }
}

// Columns [j0, j0 + width) of the table's rows [r0, r1) as contiguous rows of
// `width` values, Stride() apart: in place for a [V, D] table; for a [D, V]
// one (`columns`), copied into a worker's buffer a tile of kTile rows at a
// time (1 KB of each column, read once), the buffer's rows padded by a cache
// line (rows 2^k bytes apart would share L1 sets). 1 KB: each tile touches
// `width` pages (TLB misses), 256 bytes took 1.4x as long at D 2048 on 2 cores.
template <typename T>
class TableRows {
 public:
  static constexpr int64_t kTile = 1024 / sizeof(T);

  TableRows(const T* w, int64_t v, int64_t d, bool columns, int64_t j0 = 0, int64_t width = -1)
      : w_(columns ? w + j0 * v : w + j0),
        v_(v),
        d_(d),
        width_(width < 0 ? d : width),
        columns_(columns),
        stride_(columns ? width_ + 64 / int64_t{sizeof(T)} : d) {}

  int64_t Stride() const { return stride_; }

  // Row r of a tile of rows [r0, r1) at `tile` (Tile's), and the row after it
  // there, or null at the tile's end (Dots' and Axpys' `next`).
  const T* Row(const T* tile, int64_t r0, int64_t r) const { return tile + (r - r0) * stride_; }
  const T* After(const T* tile, int64_t r0, int64_t r, int64_t r1) const {
    return r + 1 < r1 ? Row(tile, r0, r + 1) : nullptr;
  }

  // Rows [r0, r1) (r1 - r0 <= kTile where `columns`), row r at the result +
  // (r - r0) * Stride().
  const T* Tile(int64_t r0, int64_t r1, std::vector<T>& buffer) const {
    if (!columns_) return w_ + r0 * d_;
    buffer.resize(kTile * stride_);
    ColumnsToRows(w_, v_, width_, r0, r1 - r0, buffer.data(), stride_);
    return buffer.data();
  }

  // Tiles of rows [lo, hi): f(r0, r1) for each (kTile rows at most where
  // `columns`; a [V, D] table takes the range whole).
  template <typename F>
  void ForTiles(int64_t lo, int64_t hi, F f) const {
    int64_t step = columns_ ? kTile : std::max<int64_t>(1, hi - lo);
    for (int64_t r0 = lo; r0 < hi; r0 += step) f(r0, std::min(hi, r0 + step));
  }

 private:
  const T* w_;
  int64_t v_, d_, width_;
  bool columns_;
  int64_t stride_;
};

// Tokens per block: `block` where positive (tests), else as many as keep the
// pairs indexed by int32 and (for the gradients) each worker's dh buffer of
// the block within `buffer_bytes`.
int64_t BlockTokens(int64_t block, int64_t n, int64_t k, int64_t d, int workers, int64_t buffer_bytes) {
  if (block > 0) return std::min(block, std::max<int64_t>(1, (int64_t{1} << 30) / std::max<int64_t>(1, k)));
  int64_t by_pairs = std::max<int64_t>(1, (int64_t{1} << 30) / std::max<int64_t>(1, k));
  int64_t by_buffers = std::max<int64_t>(1, buffer_bytes / (workers * std::max<int64_t>(1, d) * 4));
  return std::max<int64_t>(1, std::min({n, by_pairs, by_buffers}));
}

// Hidden-state columns per pass (forward and backward): `width` where
// positive (tests), all of D for a [V, D] table (its rows read whole, in
// order: in pieces 8 KB apart they were read at a third of the speed), and for
// a [D, V] one as many as keep the block's hidden states' piece (tokens *
// width values, packed; in the backward also each worker's d hidden piece)
// within kPieceBytes, in a core's L2 cache beside the table's stream, a
// multiple of 16; one pass where fewer than kMinWidth columns fit. Float32,
// D 2048, V 151936, K 512 on 2 cores, the forward: N 1024, 270 ms in one
// pass, 155 ms in passes of 128 columns (64: 178 ms, 256: 172 ms); N 4096,
// 525 ms in one pass, 510 ms in passes of 128 (32: 566 ms). The backward at
// N 1024: 850 ms in one pass, 660 ms in passes of 128 (64: 816 ms, 256:
// 790 ms); at N 4096, D 512, V 32000 passes of 128 (2 MB pieces) took 20%
// longer than one.
constexpr int64_t kPieceBytes = int64_t{512} << 10;
constexpr int64_t kMinWidth = 128;
int64_t PassWidth(int64_t width, int64_t tokens, int64_t d, bool columns, int64_t value_bytes) {
  if (width > 0) return std::min(width, d);
  if (!columns) return d;
  int64_t fits = kPieceBytes / std::max<int64_t>(1, tokens * value_bytes);
  return fits < kMinWidth ? d : std::min(d, fits / 16 * 16);
}

// Columns [j0, j0 + piece) of `tokens` rows of d values h, as rows of `piece`
// values: h itself where the piece is all of them, else packed into `packed`
// (pieces 2^k bytes apart would share a fraction of the cache's sets).
template <typename T>
const T* Piece(ffi::ThreadPool& pool, const T* h, int64_t tokens, int64_t d, int64_t j0,
               int64_t piece, std::vector<T>& packed) {
  if (piece == d) return h;
  packed.resize(tokens * piece);
  ParallelRows(pool, tokens, piece, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) std::copy_n(h + t * d + j0, piece, &packed[t * piece]);
  });
  return packed.data();
}

template <typename T>
void ReplayDots(ffi::ThreadPool& pool, const T* h, const T* w, const int32_t* ids, int64_t n,
                int64_t d, int64_t v, int64_t k, int64_t block, int64_t width, bool columns,
                float* x) {
  std::fill(x, x + n * k, 0.0f);
  PairsByRow by_row(v);
  block = BlockTokens(block, n, k, d, 1, int64_t{1} << 62);
  std::vector<std::vector<T>> tiles(Workers(pool, int64_t{1} << 30));
  std::vector<float> sums;  // per pair, in row order: its dot product summed over the passes
  std::vector<T> packed;    // a pass's columns of the block's hidden states
  for (int64_t t0 = 0; t0 < n; t0 += block) {
    int64_t tokens = std::min(block, n - t0);
    by_row.Group(pool, ids + t0 * k, tokens * k);
    sums.assign(by_row.start(v), 0.0f);
    std::vector<int64_t> ranges = by_row.Ranges(pool);
    const T* hb = h + t0 * d;
    int64_t pass = PassWidth(width, tokens, d, columns, sizeof(T));
    // Each pass reads columns [j0, j0 + piece) of the table's rows once.
    for (int64_t j0 = 0; j0 < d; j0 += pass) {
      int64_t piece = std::min(pass, d - j0);
      TableRows<T> table(w, v, d, columns, j0, piece);
      const T* hp = Piece(pool, hb, tokens, d, j0, piece, packed);
      ParallelRanges(pool, ranges, [&](int64_t lo, int64_t hi, int worker) {
        table.ForTiles(lo, hi, [&](int64_t r0, int64_t r1) {
          if (by_row.start(r1) == by_row.start(r0)) return;  // no pairs
          const T* tile = table.Tile(r0, r1, tiles[worker]);
          for (int64_t r = r0; r < r1; ++r) {
            const int32_t* first = by_row.begin(r);
            float* out = sums.data() + by_row.start(r);
            const T* row = table.Row(tile, r0, r);
            const T* next = table.After(tile, r0, r, r1);  // fetched by the row's first group
            ForGroups(first, by_row.size(r), [&](auto group, const int32_t* p) {
              constexpr int m = decltype(group)::value;
              const T* rows[4];
              float part[4];
              for (int q = 0; q < m; ++q) rows[q] = hp + (p[q] / k) * piece;
              Dots<m>(row, rows, piece, part, p == first ? next : nullptr);
              for (int q = 0; q < m; ++q) out[p - first + q] += part[q];
            });
          }
        });
      });
    }
    float* xb = x + t0 * k;
    const int32_t* pairs = by_row.begin(0);
    ParallelRows(pool, by_row.start(v), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) xb[pairs[i]] = sums[i];
    });
  }
}

// Asks Linux to back the 2 MB pages inside [p, p + bytes) with huge pages
// where it may (transparent huge pages in "madvise" mode): a fresh
// table-sized output is otherwise written through one page fault per 4 KB.
// The replay's backward from a [V, D] table at N 1024, D 2048, V 151936,
// K 512 on 2 cores: 630 -> 400 ms (forward and backward 710-750 -> 490-540
// ms over three runs each). Not for a [D, V] table's d unembed, written a
// pass of rows at a time: 1000 ms with 4 KB pages, 790-1300 ms with huge
// ones.
inline void AdviseHugePages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

template <typename T>
void ReplayGrads(ffi::ThreadPool& pool, const T* h, const T* w, const int32_t* ids,
                 const float* dx, int64_t n, int64_t d, int64_t v, int64_t k, int64_t block,
                 int64_t width, bool columns, float* dh, float* dw) {
  if (!columns) AdviseHugePages(dw, v * d * sizeof(float));
  if (n == 0) std::fill(dw, dw + v * d, 0.0f);  // else the first block writes every row
  PairsByRow by_row(v);
  int workers = Workers(pool, int64_t{1} << 30);
  block = BlockTokens(block, n, k, d, workers, int64_t{256} << 20);
  std::vector<std::vector<float>> buffers(workers), dw_tiles(workers);
  std::vector<std::vector<T>> tiles(workers);
  std::vector<T> packed;
  for (int64_t t0 = 0; t0 < n; t0 += block) {
    int64_t tokens = std::min(block, n - t0);
    by_row.Group(pool, ids + t0 * k, tokens * k);
    std::vector<int64_t> ranges = by_row.Ranges(pool);
    const T* hb = h + t0 * d;
    const float* gb = dx + t0 * k;
    int64_t pass = PassWidth(width, tokens, d, columns, sizeof(T));
    // Each pass: columns [j0, j0 + piece) of the table's rows, of d w and of the
    // block's d hidden.
    for (int64_t j0 = 0; j0 < d; j0 += pass) {
      int64_t piece = std::min(pass, d - j0);
      TableRows<T> table(w, v, d, columns, j0, piece);
      const T* hp = Piece(pool, hb, tokens, d, j0, piece, packed);
      for (auto& b : buffers) b.clear();
      // Rows [r0, r1) of the table (`tile`) and of d w (`dw_rows`), `stride` apart.
      auto rows = [&](int64_t r0, int64_t r1, const T* tile, float* dw_rows, int64_t stride,
                      int worker, bool fresh) {
        std::vector<float>& buffer = buffers[worker];
        if (buffer.empty()) buffer.assign(tokens * piece, 0.0f);
        for (int64_t r = r0; r < r1; ++r) {
          float* dw_row = dw_rows + (r - r0) * stride;
          if (fresh) std::fill_n(dw_row, piece, 0.0f);  // in cache for its sums
          const int32_t* first = by_row.begin(r);
          const T* row = table.Row(tile, r0, r);
          const T* next = table.After(tile, r0, r, r1);  // fetched by the row's first group
          ForGroups(first, by_row.size(r), [&](auto group, const int32_t* p) {
            constexpr int m = decltype(group)::value;
            const T* hs[4];
            float* dh_rows[4];
            float g[4];
            for (int q = 0; q < m; ++q) {
              hs[q] = hp + (p[q] / k) * piece;
              dh_rows[q] = buffer.data() + (p[q] / k) * piece;
              g[q] = gb[p[q]];
            }
            Axpys<m>(row, hs, g, piece, dw_row, dh_rows, p == first ? next : nullptr);
          });
        }
      };
      ParallelRanges(pool, ranges, [&](int64_t lo, int64_t hi, int worker) {
        if (!columns) {
          // The first block writes every row, each zeroed as it is reached (all
          // of the range's zeroed first, then read back from DRAM: 410 ms, 390).
          rows(lo, hi, table.Tile(lo, hi, tiles[worker]), dw + lo * d + j0, d, worker, t0 == 0);
          return;
        }
        // d w's rows in a tile of the table's shape (the first block writes every row).
        std::vector<float>& dw_tile = dw_tiles[worker];
        int64_t stride = table.Stride();
        dw_tile.resize(TableRows<T>::kTile * stride);
        float* dw_piece = dw + j0 * v;
        table.ForTiles(lo, hi, [&](int64_t r0, int64_t r1) {
          bool pairs = by_row.start(r1) > by_row.start(r0);
          if (!pairs && t0 > 0) return;
          if (t0 == 0) {
            std::fill(dw_tile.begin(), dw_tile.end(), 0.0f);
          } else {
            ColumnsToRows(static_cast<const float*>(dw_piece), v, piece, r0, r1 - r0, dw_tile.data(),
                          stride);
          }
          if (pairs) rows(r0, r1, table.Tile(r0, r1, tiles[worker]), dw_tile.data(), stride, worker, false);
          RowsToColumns(dw_tile.data(), stride, dw_piece, v, piece, r0, r1 - r0);
        });
      });
      ParallelRows(pool, tokens, piece * workers, [&](int64_t lo, int64_t hi) {
        for (int64_t t = lo; t < hi; ++t) {
          float* out = dh + (t0 + t) * d + j0;
          std::fill_n(out, piece, 0.0f);
          for (const auto& b : buffers) {
            if (b.empty()) continue;
            for (int64_t i = 0; i < piece; ++i) out[i] += b[t * piece + i];
          }
        }
      });
    }
  }
}

void Repeats(ffi::ThreadPool& pool, const int32_t* ids, int64_t n, int64_t k, int64_t v, int32_t* repeated) {
  ParallelRows(pool, n, k, [&](int64_t lo, int64_t hi) {
    std::vector<uint64_t> seen((v + 63) / 64, 0);
    for (int64_t t = lo; t < hi; ++t) {
      const int32_t* row = ids + t * k;
      int32_t twice = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (row[j] < 0 || row[j] >= v) continue;
        uint64_t bit = uint64_t{1} << (row[j] & 63);
        twice |= (seen[row[j] >> 6] & bit) != 0;
        seen[row[j] >> 6] |= bit;
      }
      for (int64_t j = 0; j < k; ++j) {
        if (row[j] >= 0 && row[j] < v) seen[row[j] >> 6] = 0;
      }
      repeated[t] = twice;
    }
  });
}

// h [N, D], w [V, D] (or [D, V] with `columns`; float32 or bfloat16, one
// type), ids int32 [N, K].
ffi::Error Shapes(const ffi::AnyBuffer& h, const ffi::AnyBuffer& w, const ffi::Buffer<ffi::S32>& ids,
                  bool columns, int64_t* n, int64_t* d, int64_t* v, int64_t* k) {
  auto hd = h.dimensions(), wd = w.dimensions(), id = ids.dimensions();
  if (hd.size() != 2 || wd.size() != 2 || id.size() != 2 || hd[1] != wd[columns ? 0 : 1] ||
      hd[0] != id[0]) {
    return ffi::Error::InvalidArgument("replay: h [N, D], w [V, D] (or [D, V]), ids [N, K]");
  }
  if (h.element_type() != w.element_type() ||
      (h.element_type() != ffi::DataType::F32 && h.element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("replay: h and w both float32 or both bfloat16");
  }
  *n = hd[0], *d = hd[1], *v = wd[columns ? 1 : 0], *k = id[1];
  return ffi::Error::Success();
}

ffi::Error KeptDots(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> ids,
                ffi::ResultBuffer<ffi::F32> x, int64_t block, int64_t width, int64_t columns) {
  int64_t n, d, v, k;
  if (auto e = Shapes(h, w, ids, columns, &n, &d, &v, &k); e.failure()) return e;
  if (n * k == 0) return ffi::Error::Success();
  if (h.element_type() == ffi::DataType::F32) {
    ReplayDots(pool, static_cast<const float*>(h.untyped_data()), static_cast<const float*>(w.untyped_data()),
               ids.typed_data(), n, d, v, k, block, width, columns, x->typed_data());
  } else {
    ReplayDots(pool, static_cast<const uint16_t*>(h.untyped_data()),
               static_cast<const uint16_t*>(w.untyped_data()), ids.typed_data(), n, d, v, k, block, width,
               columns, x->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error KeptGrads(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> ids,
                 ffi::Buffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> dw, int64_t block,
                 int64_t width, int64_t columns) {
  int64_t n, d, v, k;
  if (auto e = Shapes(h, w, ids, columns, &n, &d, &v, &k); e.failure()) return e;
  if (dx.element_count() != static_cast<size_t>(n * k)) return ffi::Error::InvalidArgument("replay: dx [N, K]");
  if (h.element_type() == ffi::DataType::F32) {
    ReplayGrads(pool, static_cast<const float*>(h.untyped_data()), static_cast<const float*>(w.untyped_data()),
                ids.typed_data(), dx.typed_data(), n, d, v, k, block, width, columns, dh->typed_data(),
                dw->typed_data());
  } else {
    ReplayGrads(pool, static_cast<const uint16_t*>(h.untyped_data()),
                static_cast<const uint16_t*>(w.untyped_data()), ids.typed_data(), dx.typed_data(), n, d, v,
                k, block, width, columns, dh->typed_data(), dw->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error KeptRepeats(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::S32> repeated,
                       int64_t v) {
  auto id = ids.dimensions();
  if (id.size() != 2 || repeated->element_count() != static_cast<size_t>(id[0])) {
    return ffi::Error::InvalidArgument("replay: ids [N, K], repeated [N]");
  }
  Repeats(pool, ids.typed_data(), id[0], id[1], v, repeated->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelReplayRepeats, KeptRepeats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("v"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelReplayDots, KeptDots,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("columns"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LpkernelReplayGrads, KeptGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("columns"));
