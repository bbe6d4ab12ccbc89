// srp-jax's native CPU kernels, called from XLA through its FFI (jax.ffi.ffi_call).
//
// XLA:CPU runs its top-k, gather and scatter-add loops on one thread; these kernels split the same
// work over the intra-op thread pool XLA hands to FFI calls, and give the same results:
//
//   srp_topk         x (..., n) f32 -> values, indices (..., k): the k largest of each row
//                    in the order jax.lax.top_k returns them (a total order on floats in which
//                    -0.0 < +0.0 and NaN with the sign bit clear is largest; equal values ->
//                    the lower index first). Bitwise equal to lax.top_k.
//   srp_combine_rows table (W, d) f32, coef (B, k) f32, indices (B, k) s32, prefixes [P]
//                    -> out (B, P, d): out[b, p] = sum over s < prefixes[p], in slot order, of
//                    coef[b, s] * table[indices[b, s]] (the sparse decode, at nested budgets).
//   srp_dot_rows     table (W, d) f32, probe (B, P, d) f32, indices (B, k) s32
//                    -> out (B, P, k): table[indices[b, s]] . probe[b, p], summed in a fixed
//                    order (32 partial sums folded to 8, then the lanes, then the tail).
//   srp_scatter_rows coef (B, k) f32, rows (B, d) f32, indices (B, k) s32
//                    -> out (W, d) f32 (or (d, W) with transpose=true):
//                    out[f] = sum over entries (b, s) with indices[b, s] == f, in ascending
//                    b * k + s order, of coef[b, s] * rows[b]. Each table row is summed by one
//                    thread in that fixed order, so results do not depend on the scheduling
//                    (deterministic; the grouped XLA scatter loop's order, whose rounding can
//                    still differ by an ulp where XLA fuses a product into an FMA). Every
//                    output element is written once (no zero-fill pass), on transparent huge
//                    pages where the kernel offers them (fresh memory faults in 2 MiB at a time).
//
// Built by srp_jax._native (g++ -O3 -ffp-contract=off: no fused multiply-adds, so the
// arithmetic is plain IEEE products and sums, the same bits on every x86-64 clone).

#include <algorithm>
#include <climits>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

// Loops compiled twice, for AVX2 and the baseline, picked at load time (x86-64 only).
#if defined(__x86_64__) && defined(__GNUC__)
#define SRP_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SRP_VECTOR_CLONES
#endif

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Work sharing over XLA's thread pool

struct Join {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::mutex mutex;
  std::condition_variable finished;
};

// Runs fn(c) for every chunk c in [0, total), on the calling thread and on helpers scheduled
// on the pool. Chunks are claimed from a shared counter, so the caller never waits for a helper
// that has not started (a helper that starts after every chunk is claimed returns at once):
// no deadlock when the pool's other threads are busy or blocked.
template <typename Fn>
void parallel_chunks(ffi::ThreadPool& pool, int64_t total, const Fn& fn) {
  if (total <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  if (helpers <= 0) {
    for (int64_t c = 0; c < total; ++c) fn(c);
    return;
  }
  auto join = std::make_shared<Join>();
  join->total = total;
  auto work = [join, fn]() {
    for (;;) {
      const int64_t c = join->next.fetch_add(1);
      if (c >= join->total) return;
      fn(c);
      if (join->done.fetch_add(1) + 1 == join->total) {
        std::lock_guard<std::mutex> lock(join->mutex);
        join->finished.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(join->mutex);
  join->finished.wait(lock, [&] { return join->done.load() == join->total; });
}

// ---------------------------------------------------------------------------------------------
// Top-k

// A signed key in XLA's total order on float32 (its CPU top-k compares the bits as int32,
// negatives' magnitude bits flipped): larger key = larger value.
inline int32_t order_key(int32_t bits) { return bits ^ ((bits >> 31) & 0x7fffffff); }

// (key descending, index ascending) as one ascending 64-bit word, and the key back from it.
inline uint64_t rank_word(int32_t key, int64_t i) {
  const uint32_t biased = static_cast<uint32_t>(key) ^ 0x80000000u;
  return (static_cast<uint64_t>(~biased) << 32) | static_cast<uint64_t>(i);
}
inline int32_t word_key(uint64_t w) {
  return static_cast<int32_t>(~static_cast<uint32_t>(w >> 32) ^ 0x80000000u);
}

// Per-thread scratch of the top-k.
struct TopKScratch {
  std::vector<int32_t> keys, maxima, counts;
  std::vector<uint64_t> words;
};

// keys[i] = order_key(x[i]); maxima[g] = the largest key among x[g], x[g + G], x[g + 2G], ...
// (G strided groups: every pass is a plain elementwise loop, vectorised per clone).
SRP_VECTOR_CLONES void keys_and_group_maxima(const float* __restrict x, int64_t n, int32_t* __restrict keys,
                                             int32_t* __restrict maxima, int64_t G) {
  for (int64_t i = 0; i < n; ++i) {
    int32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    keys[i] = order_key(bits);
  }
  for (int64_t g = 0; g < G; ++g) maxima[g] = keys[g];
  int64_t t = G;
  for (; t + G <= n; t += G) {
    const int32_t* row = keys + t;
    for (int64_t g = 0; g < G; ++g) maxima[g] = std::max(maxima[g], row[g]);
  }
  for (int64_t g = 0; t + g < n; ++g) maxima[g] = std::max(maxima[g], keys[t + g]);
}

// The k-th largest of m values by counting, for small m: counts[a] = #{j : v[j] >= v[a]};
// the answer is the largest v[a] with counts[a] >= k (branch-free, vectorised per clone).
SRP_VECTOR_CLONES int32_t kth_largest_by_count(const int32_t* __restrict v, int64_t m, int64_t k,
                                               int32_t* __restrict counts) {
  for (int64_t a = 0; a < m; ++a) counts[a] = 0;
  for (int64_t j = 0; j < m; ++j) {
    const int32_t vj = v[j];
    for (int64_t a = 0; a < m; ++a) counts[a] += vj >= v[a];
  }
  int32_t best = INT32_MIN;
  for (int64_t a = 0; a < m; ++a) best = std::max(best, counts[a] >= k ? v[a] : INT32_MIN);
  return best;
}

// out[rank] for the m candidate words (k <= m <= a few dozen): each word's rank is the number
// of smaller words (all distinct: their indices differ), counted branch-free.
SRP_VECTOR_CLONES void place_by_rank(const uint64_t* __restrict w, int64_t m, int64_t k, const float* x,
                                     float* out_v, int32_t* out_i, int32_t* __restrict ranks) {
  for (int64_t a = 0; a < m; ++a) ranks[a] = 0;
  for (int64_t j = 0; j < m; ++j) {
    const uint64_t wj = w[j];
    for (int64_t a = 0; a < m; ++a) ranks[a] += wj < w[a];
  }
  for (int64_t a = 0; a < m; ++a) {
    if (ranks[a] < k) {
      const int32_t i = static_cast<int32_t>(w[a] & 0xffffffffu);
      out_i[ranks[a]] = i;
      out_v[ranks[a]] = x[i];
    }
  }
}

// The words of the entries with key >= floor, in index order, into w (capacity cap > k). When
// it fills, nth_element keeps the k best and the floor rises past the k-th best key (a later
// entry equal to it has a higher index, so it ranks below). Returns how many words w holds
// (>= k whenever at least k keys are >= the first floor).
int64_t collect_candidates(const int32_t* keys, int64_t n, int64_t k, int32_t floor, uint64_t* w, int64_t cap) {
  int64_t m = 0;
  bool closed = false;  // the floor passed the largest key: nothing later can rank
  auto offer = [&](int64_t i) {
    if (keys[i] < floor) return;
    w[m++] = rank_word(keys[i], i);
    if (m == cap) {
      std::nth_element(w, w + (k - 1), w + m);
      m = k;
      const int32_t bar = word_key(w[k - 1]);
      if (bar == INT32_MAX) closed = true;
      else floor = bar + 1;
    }
  };
  int64_t i0 = 0;
#if defined(__SSE2__)
  // 16 keys per step: one compare-and-mask, then only the entries at or above the floor
  for (; i0 + 16 <= n && !closed; i0 += 16) {
    const __m128i f = _mm_set1_epi32(floor);
    const __m128i* p = reinterpret_cast<const __m128i*>(keys + i0);
    const __m128i b0 = _mm_cmpgt_epi32(f, _mm_loadu_si128(p)), b1 = _mm_cmpgt_epi32(f, _mm_loadu_si128(p + 1));
    const __m128i b2 = _mm_cmpgt_epi32(f, _mm_loadu_si128(p + 2)), b3 = _mm_cmpgt_epi32(f, _mm_loadu_si128(p + 3));
    const __m128i below = _mm_packs_epi16(_mm_packs_epi32(b0, b1), _mm_packs_epi32(b2, b3));
    uint32_t mask = ~static_cast<uint32_t>(_mm_movemask_epi8(below)) & 0xffffu;
    while (mask != 0 && !closed) {
      offer(i0 + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
#endif
  for (; i0 < n && !closed; ++i0) offer(i0);
  return m;
}

// The k best entries of one row. The row's keys are split into G = max(2k, 16) strided groups;
// the k-th largest group maximum is a floor at or below the row's k-th best key (k distinct
// entries reach it), and usually only a few more than k entries clear it, so one masked pass
// collects them and a small selection orders them. Rows too short for groups (n < 2G) take
// every entry as a candidate. Ties: the lower index ranks first (rank_word), as lax.top_k.
void topk_row(const float* x, int64_t n, int64_t k, float* out_v, int32_t* out_i, TopKScratch& s) {
  const int64_t G = std::min<int64_t>(n, std::max<int64_t>(2 * k, 16));
  const bool grouped = 2 * G <= n;
  const int64_t cap = std::max<int64_t>(4 * k, 128);
  s.keys.resize(n);
  s.maxima.resize(G);
  s.counts.resize(std::max<int64_t>(G, 64));
  s.words.resize(cap);
  int32_t floor = INT32_MIN;
  if (grouped) {
    keys_and_group_maxima(x, n, s.keys.data(), s.maxima.data(), G);
    if (G <= 128) {
      floor = kth_largest_by_count(s.maxima.data(), G, k, s.counts.data());
    } else {
      std::nth_element(s.maxima.begin(), s.maxima.begin() + (k - 1), s.maxima.end(), std::greater<int32_t>());
      floor = s.maxima[k - 1];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      int32_t bits;
      std::memcpy(&bits, x + i, sizeof(bits));
      s.keys[i] = order_key(bits);
    }
  }
  uint64_t* w = s.words.data();
  int64_t m = collect_candidates(s.keys.data(), n, k, floor, w, cap);
  if (m <= 64) {
    place_by_rank(w, m, k, x, out_v, out_i, s.counts.data());
    return;
  }
  if (m > k) std::nth_element(w, w + (k - 1), w + m);
  std::sort(w, w + k);
  for (int64_t r = 0; r < k; ++r) {
    const int32_t i = static_cast<int32_t>(w[r] & 0xffffffffu);
    out_i[r] = i;
    out_v[r] = x[i];
  }
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                ffi::ResultBuffer<ffi::S32> indices) {
  const auto dims = x.dimensions();
  const auto out_dims = values->dimensions();
  if (dims.size() < 1 || out_dims.size() != dims.size()) {
    return ffi::Error::InvalidArgument("srp_topk: values must have the input's rank (>= 1)");
  }
  const int64_t n = dims.back();
  const int64_t k = out_dims.back();
  if (k < 1 || k > n) {
    return ffi::Error::InvalidArgument("srp_topk: k = " + std::to_string(k) + " must lie in [1, " +
                                       std::to_string(n) + "]");
  }
  const int64_t rows = x.element_count() / n;
  const float* xp = x.typed_data();
  float* vp = values->typed_data();
  int32_t* ip = indices->typed_data();
  // chunks of about 64k inputs: enough to share, few enough to keep the counter cold
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t{1} << 16) / n);
  const int64_t chunks = (rows + per_chunk - 1) / per_chunk;
  parallel_chunks(pool, chunks, [=](int64_t c) {
    thread_local TopKScratch scratch;
    const int64_t end = std::min(rows, (c + 1) * per_chunk);
    for (int64_t r = c * per_chunk; r < end; ++r) {
      topk_row(xp + r * n, n, k, vp + r * k, ip + r * k, scratch);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Scatter-add of rows

// Asks the kernel for transparent huge pages under a large output that is about to be written
// in full. XLA hands each execution fresh memory, which the kernel otherwise zero-fills on first
// touch one 4 KiB page at a time (most of the cost of writing a (D, d) table on a virtual
// machine; see docs/performance.md). Advice only: ignored where THP is off or unsupported.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// acc[j] += c * r[j]: one IEEE product and one sum per element (no FMA), vectorised per clone.

SRP_VECTOR_CLONES void add_scaled(float* __restrict acc,
                                                                  const float* __restrict r,
                                                                  float c, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += c * r[j];
}

// table rows per tile: 16 floats = one cache line per row of the transposed output
constexpr int64_t kTile = 16;

// dst[u] = src[u * stride] for u < n (n <= kTile): one tile row of the transposed output. A
// full, 64-byte-aligned tile row is one cache line: written with streaming stores (no read of
// the line it replaces: the transposed output is written once, column tile by column tile).
inline void store_column_tile(float* dst, const float* src, int64_t stride, int64_t n) {
#if defined(__SSE2__)
  if (n == kTile && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    for (int64_t u = 0; u < kTile; u += 4) {
      _mm_stream_ps(dst + u, _mm_setr_ps(src[u * stride], src[(u + 1) * stride], src[(u + 2) * stride],
                                         src[(u + 3) * stride]));
    }
    return;
  }
#endif
  for (int64_t u = 0; u < n; ++u) dst[u] = src[u * stride];
}

ffi::Error ScatterRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> rows,
                       ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> out, bool transpose) {
  const auto cdims = coef.dimensions();
  const auto rdims = rows.dimensions();
  const auto idims = indices.dimensions();
  const auto odims = out->dimensions();
  if (cdims.size() != 2 || rdims.size() != 2 || idims.size() != 2 || odims.size() != 2 ||
      cdims[0] != idims[0] || cdims[1] != idims[1] || rdims[0] != cdims[0]) {
    return ffi::Error::InvalidArgument(
        "srp_scatter_rows: want coef (B, k), rows (B, d), indices (B, k) and a 2-d output");
  }
  const int64_t B = cdims[0], k = cdims[1], d = rdims[1];
  const int64_t W = transpose ? odims[1] : odims[0];
  if ((transpose ? odims[0] : odims[1]) != d) {
    return ffi::Error::InvalidArgument("srp_scatter_rows: the output's row width is not rows' d");
  }
  const float* cp = coef.typed_data();
  const float* rp = rows.typed_data();
  const int32_t* ip = indices.typed_data();
  float* op = out->typed_data();
  const int64_t entries = B * k;
  if (entries > INT32_MAX) {
    return ffi::Error::InvalidArgument("srp_scatter_rows: more than 2^31 - 1 entries (B * k)");
  }

  // entries grouped by table row, ascending position within a row (a counting sort)
  std::vector<int64_t> start(W + 1, 0);
  for (int64_t e = 0; e < entries; ++e) {
    const int32_t f = ip[e];
    if (f < 0 || f >= W) {
      return ffi::Error::InvalidArgument("srp_scatter_rows: index " + std::to_string(f) +
                                         " out of range [0, " + std::to_string(W) + ")");
    }
    ++start[f + 1];
  }
  for (int64_t f = 0; f < W; ++f) start[f + 1] += start[f];
  std::vector<int32_t> order(entries);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < entries; ++e) order[fill[ip[e]]++] = static_cast<int32_t>(e);
  }
  const int64_t* sp = start.data();
  const int32_t* opd = order.data();
  advise_huge_pages(op, sizeof(float) * static_cast<size_t>(W) * static_cast<size_t>(d));

  // table rows in tiles (each tile summed into a local block, then written out once, rows or
  // columns): every output element is written exactly once, no zero-fill pass
  const int64_t tiles = (W + kTile - 1) / kTile;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d));
  const int64_t chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  parallel_chunks(pool, chunks, [=](int64_t c) {
    thread_local std::vector<float> block;
    block.resize(kTile * d);
    const int64_t t_end = std::min(tiles, (c + 1) * tiles_per_chunk);
    for (int64_t t = c * tiles_per_chunk; t < t_end; ++t) {
      const int64_t f0 = t * kTile;
      const int64_t nf = std::min(kTile, W - f0);
      float* acc = block.data();
      std::fill(acc, acc + nf * d, 0.0f);
      for (int64_t u = 0; u < nf; ++u) {
        const int64_t f = f0 + u;
        for (int64_t q = sp[f]; q < sp[f + 1]; ++q) {
          const int32_t e = opd[q];
          add_scaled(acc + u * d, rp + (e / k) * d, cp[e], d);
        }
      }
      if (!transpose) {
        std::memcpy(op + f0 * d, acc, sizeof(float) * nf * d);
      } else {
        for (int64_t j = 0; j < d; ++j) store_column_tile(op + j * W + f0, acc + j, d, nf);
      }
    }
#if defined(__SSE2__)
    _mm_sfence();  // the chunk's streaming stores are visible before it counts as done
#endif
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Gathered rows: sums and dot products over the k table rows each example selects

// sum of a[j] * b[j] in a fixed order: 32 running partial sums (lane j % 32: four independent
// vector chains), combined in a fixed tree, then the tail: vectorised per clone, the same
// bits on every clone.
SRP_VECTOR_CLONES float dot_fixed(const float* __restrict a, const float* __restrict b, int64_t d) {
  float lane[32] = {};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    for (int u = 0; u < 32; ++u) lane[u] += a[j + u] * b[j + u];
  }
  for (int u = 0; u < 16; ++u) lane[u] += lane[u + 16];
  for (int u = 0; u < 8; ++u) lane[u] += lane[u + 8];
  for (; j + 8 <= d; j += 8) {
    for (int u = 0; u < 8; ++u) lane[u] += a[j + u] * b[j + u];
  }
  float total = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; j < d; ++j) total += a[j] * b[j];
  return total;
}

// Asks for a table row (d floats) ahead of its use: rows are gathered at random, so the
// hardware prefetcher cannot see the next one coming.
inline void prefetch_row(const float* row, int64_t d) {
  for (int64_t j = 0; j < d; j += 16) __builtin_prefetch(row + j);
}

// Rows per chunk of the gathered-row kernels: about 64k multiply-adds of work each.
inline int64_t rows_per_chunk(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_row));
}

// Success when all n indices lie in [0, W); else an error naming the kernel and the index.
ffi::Error check_indices(const char* kernel, const int32_t* ip, int64_t n, int64_t W) {
  for (int64_t e = 0; e < n; ++e) {
    if (ip[e] < 0 || ip[e] >= W) {
      return ffi::Error::InvalidArgument(std::string(kernel) + ": index " + std::to_string(ip[e]) +
                                         " out of range [0, " + std::to_string(W) + ")");
    }
  }
  return ffi::Error::Success();
}

// Prefetches the table row of entry e + 2 of the n gathered entries (two slots ahead).
inline void prefetch_ahead(const float* table, const int32_t* ip, int64_t e, int64_t n, int64_t d) {
  if (e + 2 < n) prefetch_row(table + static_cast<int64_t>(ip[e + 2]) * d, d);
}

ffi::Error CombineRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> coef,
                       ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> out,
                       ffi::Span<const int64_t> prefixes) {
  const auto tdims = table.dimensions();
  const auto cdims = coef.dimensions();
  const auto idims = indices.dimensions();
  const auto odims = out->dimensions();
  const int64_t P = static_cast<int64_t>(prefixes.size());
  if (tdims.size() != 2 || cdims.size() != 2 || idims.size() != 2 || cdims[0] != idims[0] ||
      cdims[1] != idims[1] || odims.size() != 3 || odims[0] != cdims[0] || odims[1] != P || odims[2] != tdims[1]) {
    return ffi::Error::InvalidArgument(
        "srp_combine_rows: want table (W, d), coef (B, k), indices (B, k) and an output (B, P, d)");
  }
  const int64_t W = tdims[0], d = tdims[1], B = cdims[0], k = cdims[1];
  if (P < 1) return ffi::Error::InvalidArgument("srp_combine_rows: prefixes must not be empty");
  for (int64_t p = 0; p < P; ++p) {
    if (prefixes[p] < 1 || prefixes[p] > k || (p > 0 && prefixes[p] < prefixes[p - 1])) {
      return ffi::Error::InvalidArgument("srp_combine_rows: prefixes must ascend within [1, k]");
    }
  }
  const int32_t* ip = indices.typed_data();
  if (ffi::Error bad = check_indices("srp_combine_rows", ip, B * k, W); bad.failure()) return bad;
  const float* tp = table.typed_data();
  const float* cp = coef.typed_data();
  float* op = out->typed_data();
  std::vector<int64_t> ends(prefixes.begin(), prefixes.end());
  const int64_t per_chunk = rows_per_chunk(k * d);
  parallel_chunks(pool, (B + per_chunk - 1) / per_chunk, [=, &ends](int64_t c) {
    const int64_t end = std::min(B, (c + 1) * per_chunk);
    for (int64_t b = c * per_chunk; b < end; ++b) {
      // slots in order into out[b, 0]; at each prefix the sum so far is carried to the next
      float* acc = op + b * P * d;
      std::fill(acc, acc + d, 0.0f);
      int64_t s = 0;
      for (int64_t p = 0; p < P; ++p) {
        for (; s < ends[p]; ++s) {
          prefetch_ahead(tp, ip, b * k + s, B * k, d);
          add_scaled(acc, tp + static_cast<int64_t>(ip[b * k + s]) * d, cp[b * k + s], d);
        }
        if (p + 1 < P) {
          std::memcpy(acc + d, acc, sizeof(float) * d);
          acc += d;
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error DotRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> probe,
                   ffi::Buffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> out) {
  const auto tdims = table.dimensions();
  const auto pdims = probe.dimensions();
  const auto idims = indices.dimensions();
  const auto odims = out->dimensions();
  if (tdims.size() != 2 || pdims.size() != 3 || idims.size() != 2 || pdims[0] != idims[0] || pdims[2] != tdims[1] ||
      odims.size() != 3 || odims[0] != idims[0] || odims[1] != pdims[1] || odims[2] != idims[1]) {
    return ffi::Error::InvalidArgument(
        "srp_dot_rows: want table (W, d), probe (B, P, d), indices (B, k) and an output (B, P, k)");
  }
  const int64_t W = tdims[0], d = tdims[1], B = idims[0], P = pdims[1], k = idims[1];
  const int32_t* ip = indices.typed_data();
  if (ffi::Error bad = check_indices("srp_dot_rows", ip, B * k, W); bad.failure()) return bad;
  const float* tp = table.typed_data();
  const float* pp = probe.typed_data();
  float* op = out->typed_data();
  const int64_t per_chunk = rows_per_chunk(k * d * P);
  parallel_chunks(pool, (B + per_chunk - 1) / per_chunk, [=](int64_t c) {
    const int64_t end = std::min(B, (c + 1) * per_chunk);
    for (int64_t b = c * per_chunk; b < end; ++b) {
      for (int64_t s = 0; s < k; ++s) {
        prefetch_ahead(tp, ip, b * k + s, B * k, d);
        const float* row = tp + static_cast<int64_t>(ip[b * k + s]) * d;
        for (int64_t p = 0; p < P; ++p) op[(b * P + p) * k + s] = dot_fixed(row, pp + (b * P + p) * d, d);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SrpTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SrpScatterRows, ScatterRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SrpCombineRows, CombineRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("prefixes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SrpDotRows, DotRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
