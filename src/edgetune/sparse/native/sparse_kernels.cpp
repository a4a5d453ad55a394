// Native CPU kernels of edgetune's SparseLinear (float32 values, int32 CSR indices), called through ctypes.
//
// A layer computes y = act(x W^T + b) for a batch of N rows, W (rows, cols) sparse in CSR (crow, idx, val,
// sorted row-major). Activations come in one of two layouts: kT ("transposed", the batch contiguous: the
// matrix is stored as (features, N)) or kRows (the usual (N, features) contiguous). Two entry points:
//   et_forward:  y^T (rows, N) = W x^T + b, then ReLU when asked.
//   et_backward: from the output gradient g: g' = g * (y > 0) under ReLU (bits the forward wrote),
//                gv[l] = dot(g'^T[r_l, :], x^T[c_l, :]) (value gradient), gb = sum_n g' (bias gradient),
//                gx^T (cols, N) = W^T g'^T through the transposed CSR (crow_t, idx_t, perm_t: link
//                idx... of column c are perm_t[crow_t[c]:crow_t[c + 1]]) (input gradient).
// The batch is cut in tiles of up to 128 columns. For each tile, the operands read at random rows (x^T
// for the forward and the value gradient, g'^T for the input gradient) are first copied into contiguous
// buffers: the tile's rows then stay in L2 whatever the layout or the leading dimension (a power of two
// such as 1024 floats would map the rows of one tile onto a few cache sets). Accumulation is float32, in
// link order within a row, the value gradient summed over the tiles in order. Threads (OpenMP, the
// runtime torch uses; the caller passes torch's thread count) fill each tile's buffers together and then
// split its rows.
#include <algorithm>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int VL = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));  // unaligned access

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf splat(float a) { return vf{} + a; }

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v4fu __attribute__((vector_size(16), aligned(4)));

inline float hsum(vf v) {
  v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The four sums of a, b, c, d.
inline v4f hsum4(vf a, vf b, vf c, vf d) {
  const vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf q = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const v8f h = __builtin_shufflevector(q, q, 0, 1, 4, 5, 8, 9, 12, 13) +
                __builtin_shufflevector(q, q, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(h, h, 0, 2, 4, 6) + __builtin_shufflevector(h, h, 1, 3, 5, 7);
}

// ReLU masks are bits: word q of row r (uint16) holds y^T[r, 16q + i] > 0 in bit i.
inline uint16_t positive_bits(vf v) {
#ifdef __AVX512F__
  return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_setzero_ps(), _CMP_GT_OQ);
#else
  uint16_t b = 0;
  for (int i = 0; i < VL; ++i) b |= static_cast<uint16_t>(v[i] > 0.0f) << i;
  return b;
#endif
}

inline vf keep_bits(vf v, uint16_t bits) {
#ifdef __AVX512F__
  return reinterpret_cast<vf>(_mm512_maskz_mov_ps(bits, reinterpret_cast<__m512>(v)));
#else
  for (int i = 0; i < VL; ++i) v[i] = (bits >> i) & 1 ? v[i] : 0.0f;
  return v;
#endif
}

enum Layout { kT = 0, kRows = 1 };

// One tile of the batch: columns [n0, n0 + width) with width = NV * VL, or a scalar tail (width < VL).
struct Tile {
  int64_t n0;
  int width;
};

// The batch cut in tiles: full tiles of `wide` (128 or 64) columns, then at most one each of 64, 32, 16
// and a tail < 16.
struct Tiling {
  int64_t full;
  int wide, rest;
  Tile rem[4];
  Tiling(int64_t n, int wide_) : full(n / wide_), wide(wide_), rest(0) {
    int64_t n0 = full * wide;
    for (int w = wide / 2; w >= VL; w /= 2)
      if (n0 + w <= n) {
        rem[rest++] = {n0, w};
        n0 += w;
      }
    if (n0 < n) rem[rest++] = {n0, static_cast<int>(n - n0)};
  }
  int64_t count() const { return full + rest; }
  Tile operator[](int64_t k) const { return k < full ? Tile{k * wide, wide} : rem[k - full]; }
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Below this many (link, batch column) products a call runs on one thread: starting and joining the team
// would cost more than it saves.
constexpr int64_t kParallelFrom = 1 << 16;

// Tile buffers of the calling thread, kept between calls (no allocation, page faults or zero fill per call).
float* scratch(int slot, size_t count) {
  thread_local std::vector<float> bufs[3];
  std::vector<float>& b = bufs[slot];
  if (b.size() < count) b.resize(count);
  return b.data();
}

inline float value_at(const float* val, const int32_t* perm, int64_t l) { return perm ? val[perm[l]] : val[l]; }

// Rows [r0, r1) of one tile: x and y point at the tile's first column, with leading dimensions ldx, ldy.
template <int NV>
void spmm_rows(int64_t r0, int64_t r1, const int32_t* crow, const int32_t* idx, const float* val,
               const int32_t* perm, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy,
               bool relu, uint16_t* bits, int64_t ldb) {
  for (int64_t r = r0; r < r1; ++r) {
    vf acc[NV];
    const vf b = splat(bias ? bias[r] : 0.0f);
    for (int j = 0; j < NV; ++j) acc[j] = b;
    for (int64_t l = crow[r], e = crow[r + 1]; l < e; ++l) {
      const vf v = splat(value_at(val, perm, l));
      const float* xr = x + static_cast<int64_t>(idx[l]) * ldx;
      for (int j = 0; j < NV; ++j) acc[j] += v * load(xr + j * VL);
    }
    float* yr = y + r * ldy;
    if (relu)
      for (int j = 0; j < NV; ++j) acc[j] = acc[j] > 0.0f ? acc[j] : vf{};
    if (bits)
      for (int j = 0; j < NV; ++j) bits[r * ldb + j] = positive_bits(acc[j]);
    for (int j = 0; j < NV; ++j) store(yr + j * VL, acc[j]);
  }
}

void spmm_rows_tail(int64_t r0, int64_t r1, int width, const int32_t* crow, const int32_t* idx, const float* val,
                    const int32_t* perm, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy,
                    bool relu, uint16_t* bits, int64_t ldb) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[VL];
    const float b = bias ? bias[r] : 0.0f;
    for (int k = 0; k < width; ++k) acc[k] = b;
    for (int64_t l = crow[r], e = crow[r + 1]; l < e; ++l) {
      const float v = value_at(val, perm, l);
      const float* xr = x + static_cast<int64_t>(idx[l]) * ldx;
      for (int k = 0; k < width; ++k) acc[k] += v * xr[k];
    }
    float* yr = y + r * ldy;
    uint16_t word = 0;
    for (int k = 0; k < width; ++k) {
      yr[k] = relu && !(acc[k] > 0.0f) ? 0.0f : acc[k];
      word |= static_cast<uint16_t>(acc[k] > 0.0f) << k;
    }
    if (bits) bits[r * ldb] = word;
  }
}

void spmm_tile(const Tile& t, int64_t r0, int64_t r1, const int32_t* crow, const int32_t* idx, const float* val,
               const int32_t* perm, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy,
               bool relu = false, uint16_t* bits = nullptr, int64_t ldb = 0) {
  // bits (when not null) points at the tile's first word of row 0
  switch (t.width) {
    case 128: spmm_rows<8>(r0, r1, crow, idx, val, perm, bias, x, ldx, y, ldy, relu, bits, ldb); break;
    case 64: spmm_rows<4>(r0, r1, crow, idx, val, perm, bias, x, ldx, y, ldy, relu, bits, ldb); break;
    case 32: spmm_rows<2>(r0, r1, crow, idx, val, perm, bias, x, ldx, y, ldy, relu, bits, ldb); break;
    case 16: spmm_rows<1>(r0, r1, crow, idx, val, perm, bias, x, ldx, y, ldy, relu, bits, ldb); break;
    default: spmm_rows_tail(r0, r1, t.width, crow, idx, val, perm, bias, x, ldx, y, ldy, relu, bits, ldb);
  }
}

template <int NV>
void sddmm_rows(int64_t r0, int64_t r1, bool first, const int32_t* crow, const int32_t* idx, const float* g,
                int64_t ldg, const float* x, int64_t ldx, float* gv, float* gb) {
  for (int64_t r = r0; r < r1; ++r) {
    vf gr[NV];
    const float* grow = g + r * ldg;
    for (int j = 0; j < NV; ++j) gr[j] = load(grow + j * VL);
    if (gb) {
      vf s = gr[0];
      for (int j = 1; j < NV; ++j) s += gr[j];
      gb[r] = (first ? 0.0f : gb[r]) + hsum(s);
    }
    if (!gv) continue;
    int64_t l = crow[r];
    const int64_t e = crow[r + 1];
    for (; l + 4 <= e; l += 4) {  // four links at a time: one reduction for the four dot products
      vf p[4];
      for (int u = 0; u < 4; ++u) {
        const float* xr = x + static_cast<int64_t>(idx[l + u]) * ldx;
        vf a0 = gr[0] * load(xr);
        for (int j = 1; j < NV; ++j) a0 += gr[j] * load(xr + j * VL);
        p[u] = a0;
      }
      const v4f d = hsum4(p[0], p[1], p[2], p[3]);
      v4fu* out = reinterpret_cast<v4fu*>(gv + l);
      *out = first ? d : *out + d;
    }
    for (; l < e; ++l) {
      const float* xr = x + static_cast<int64_t>(idx[l]) * ldx;
      vf a0 = gr[0] * load(xr), a1 = vf{};
      for (int j = 1; j < NV; j += 2) {
        a1 += gr[j] * load(xr + j * VL);
        if (j + 1 < NV) a0 += gr[j + 1] * load(xr + (j + 1) * VL);
      }
      const float d = hsum(a0 + a1);
      gv[l] = first ? d : gv[l] + d;
    }
  }
}

void sddmm_rows_tail(int64_t r0, int64_t r1, int width, bool first, const int32_t* crow, const int32_t* idx,
                     const float* g, int64_t ldg, const float* x, int64_t ldx, float* gv, float* gb) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* grow = g + r * ldg;
    if (gb) {
      float s = 0.0f;
      for (int k = 0; k < width; ++k) s += grow[k];
      gb[r] = (first ? 0.0f : gb[r]) + s;
    }
    if (!gv) continue;
    for (int64_t l = crow[r], e = crow[r + 1]; l < e; ++l) {
      const float* xr = x + static_cast<int64_t>(idx[l]) * ldx;
      float d = 0.0f;
      for (int k = 0; k < width; ++k) d += grow[k] * xr[k];
      gv[l] = first ? d : gv[l] + d;
    }
  }
}

void sddmm_tile(const Tile& t, int64_t r0, int64_t r1, bool first, const int32_t* crow, const int32_t* idx,
                const float* g, int64_t ldg, const float* x, int64_t ldx, float* gv, float* gb) {
  switch (t.width) {
    case 128: sddmm_rows<8>(r0, r1, first, crow, idx, g, ldg, x, ldx, gv, gb); break;
    case 64: sddmm_rows<4>(r0, r1, first, crow, idx, g, ldg, x, ldx, gv, gb); break;
    case 32: sddmm_rows<2>(r0, r1, first, crow, idx, g, ldg, x, ldx, gv, gb); break;
    case 16: sddmm_rows<1>(r0, r1, first, crow, idx, g, ldg, x, ldx, gv, gb); break;
    default: sddmm_rows_tail(r0, r1, t.width, first, crow, idx, g, ldg, x, ldx, gv, gb);
  }
}

// Rows [c0, c1) of the tile's columns of a matrix of `count` rows, logical (count, N), stored in `layout`
// with leading dimension ld, into buf (count, width); with mask (ReLU bits, ldm words a row), the entries
// whose bit is 0 become 0 (ReLU's gradient).
void pack(const float* src, Layout layout, int64_t ld, const Tile& t, int64_t c0, int64_t c1, const uint16_t* mask,
          int64_t ldm, float* buf) {
  const int w = t.width;
  if (layout == kT) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* s = src + c * ld + t.n0;
      float* d = buf + c * w;
      for (int k = 0; k < w; ++k) d[k] = s[k];
    }
  } else {  // a (width, count) panel of the (N, count) matrix, transposed in blocks of 16 rows
    for (int64_t cb = c0; cb < c1; cb += VL) {
      const int64_t ce = std::min(c1, cb + VL);
      for (int k = 0; k < w; ++k) {
        const float* s = src + (t.n0 + k) * ld;
        for (int64_t c = cb; c < ce; ++c) buf[c * w + k] = s[c];
      }
    }
  }
  if (mask)
    for (int64_t c = c0; c < c1; ++c) {
      const uint16_t* m = mask + c * ldm + t.n0 / VL;  // tiles start at multiples of 16
      float* d = buf + c * w;
      int k = 0;
      for (; k + VL <= w; k += VL) store(d + k, keep_bits(load(d + k), m[k / VL]));
      for (; k < w; ++k) d[k] = (m[k / VL] >> (k % VL)) & 1 ? d[k] : 0.0f;
    }
}

// Whether the rows of a kT operand can be read in place: with N of 512 or more, a leading dimension of a
// multiple of 256 floats (1 KiB) maps the rows of one tile onto a few cache sets, and the tile stops
// fitting in L2; such operands are packed. (The Python side pads the leading dimension of the outputs
// it allocates to avoid that.)
bool direct(Layout layout, int64_t n, int64_t ld) { return layout == kT && (n < 512 || ld % 256 != 0); }

// Static share [lo, hi) of `total` items for thread `tid` of `nth`, in blocks of `align`.
void share(int64_t total, int tid, int nth, int64_t align, int64_t* lo, int64_t* hi) {
  const int64_t blocks = ceil_div(total, align), per = ceil_div(blocks, nth);
  *lo = std::min(total, tid * per * align);
  *hi = std::min(total, (tid + 1) * per * align);
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

}  // namespace

extern "C" {

int et_version() { return 5; }

// y^T (rows, N) = W x^T + b (bias may be null), ReLU'd when relu != 0. x: (cols, N) as kT, or (N, cols) as
// kRows, leading dimension ldx. y^T has leading dimension ldy. With bits (rows, ldb) uint16, the ReLU
// mask (see positive_bits) is written too.
void et_forward(int64_t rows, int64_t cols, int64_t n, const int32_t* crow, const int32_t* idx, const float* val,
                const float* bias, const float* x, int x_layout, int64_t ldx, float* y, int64_t ldy, int relu,
                uint16_t* bits, int64_t ldb, int threads) {
  if (rows <= 0 || n <= 0) return;
  if (static_cast<int64_t>(crow[rows]) * n < kParallelFrom) threads = 1;
  const Layout xl = static_cast<Layout>(x_layout);
  const Tiling tiles(n, 128);
  const int64_t nt = tiles.count();
  if (direct(xl, n, ldx)) {  // (tile, block of rows) items straight from x^T
    const int64_t want = threads > 1 ? 8LL * threads : 1;
    const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(want, nt), ceil_div(rows, 16)));
    const int64_t bsize = ceil_div(rows, blocks), items = nt * blocks;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t it = 0; it < items; ++it) {
      const Tile t = tiles[it / blocks];
      const int64_t r0 = (it % blocks) * bsize, r1 = std::min(rows, r0 + bsize);
      if (r0 < r1)
        spmm_tile(t, r0, r1, crow, idx, val, nullptr, bias, x + t.n0, ldx, y + t.n0, ldy, relu != 0,
                  bits ? bits + t.n0 / VL : nullptr, ldb);
    }
    return;
  }
  if (threads > 1 && nt >= 2 * threads) {  // whole tiles per thread, each packed into the thread's own buffer
#pragma omp parallel num_threads(threads)
    {
      float* const own = scratch(0, static_cast<size_t>(cols) * 128);
#pragma omp for schedule(static)
      for (int64_t k = 0; k < nt; ++k) {
        const Tile t = tiles[k];
        pack(x, xl, ldx, t, 0, cols, nullptr, 0, own);
        spmm_tile(t, 0, rows, crow, idx, val, nullptr, bias, own, t.width, y + t.n0, ldy, relu != 0,
                  bits ? bits + t.n0 / VL : nullptr, ldb);
      }
    }
    return;
  }
  // few tiles: the threads fill each tile's buffer together, then split its rows
  float* const buf = scratch(0, static_cast<size_t>(cols) * std::min<int64_t>(n, 128));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int tid = thread_id(), nth = team_size();
    int64_t c0, c1, r0, r1;
    share(cols, tid, nth, VL, &c0, &c1);
    share(rows, tid, nth, 16, &r0, &r1);
    for (int64_t k = 0; k < nt; ++k) {
      const Tile t = tiles[k];
      pack(x, xl, ldx, t, c0, c1, nullptr, 0, buf);
#pragma omp barrier
      spmm_tile(t, r0, r1, crow, idx, val, nullptr, bias, buf, t.width, y + t.n0, ldy, relu != 0,
                bits ? bits + t.n0 / VL : nullptr, ldb);
#pragma omp barrier
    }
  }
}

// Gradients of et_forward from g (logical (rows, N) in g_layout, leading dimension ldg): with mask (the
// forward's ReLU bits, ldm words a row), g is first masked. gv (nnz) and gb (rows) when
// not null; gx^T (cols, N), leading dimension ldgx, when not null (needs crow_t, idx_t, perm_t). x as in
// et_forward.
void et_backward(int64_t rows, int64_t cols, int64_t n, const int32_t* crow, const int32_t* idx,
                 const int32_t* crow_t, const int32_t* idx_t, const int32_t* perm_t, const float* val,
                 const float* g, int g_layout, int64_t ldg, const uint16_t* mask, int64_t ldm, const float* x,
                 int x_layout, int64_t ldx, float* gx, int64_t ldgx, float* gv, float* gb, int threads) {
  if (rows <= 0 || cols <= 0) return;
  if (n <= 0) {
    if (gv)
      for (int64_t l = 0; l < crow[rows]; ++l) gv[l] = 0.0f;
    if (gb)
      for (int64_t r = 0; r < rows; ++r) gb[r] = 0.0f;
    return;
  }
  if (static_cast<int64_t>(crow[rows]) * n < kParallelFrom) threads = 1;
  const Layout gl = static_cast<Layout>(g_layout), xl = static_cast<Layout>(x_layout);
  const bool pack_x = gv != nullptr && !direct(xl, n, ldx);
  // the tile's buffers within about 1 MiB of L2
  const int wide = (rows + (pack_x ? cols : 0)) * 128 * 4 <= (1 << 20) ? 128 : 64;
  const Tiling tiles(n, wide);
  const int64_t nt = tiles.count(), w_max = std::min<int64_t>(n, wide);
  if (threads > 1 && nt >= 2 * threads) {
    // Whole tiles per thread with buffers of its own (no barriers, each tile in one core's L2); the value
    // and bias gradients are summed per thread, then over the threads.
    const int64_t nnz = gv ? crow[rows] : 0, part = nnz + (gb ? rows : 0);
    float* const partial = scratch(2, static_cast<size_t>(part) * threads);
#pragma omp parallel num_threads(threads)
    {
      const int tid = thread_id(), nth = team_size();
      float* const own_g = scratch(0, static_cast<size_t>(rows) * w_max);
      float* const own_x = pack_x ? scratch(1, static_cast<size_t>(cols) * w_max) : nullptr;
      float* const pv = gv ? partial + tid * part : nullptr;
      float* const pb = gb ? partial + tid * part + nnz : nullptr;
      bool first = true;
#pragma omp for schedule(static)
      for (int64_t k = 0; k < nt; ++k) {
        const Tile t = tiles[k];
        pack(g, gl, ldg, t, 0, rows, mask, ldm, own_g);
        if (pack_x) pack(x, xl, ldx, t, 0, cols, nullptr, 0, own_x);
        if (gv || gb)
          sddmm_tile(t, 0, rows, first, crow, idx, own_g, t.width, pack_x ? own_x : x + t.n0,
                     pack_x ? t.width : ldx, pv, pb);
        if (gx) spmm_tile(t, 0, cols, crow_t, idx_t, val, perm_t, nullptr, own_g, t.width, gx + t.n0, ldgx);
        first = false;
      }
      if (first)  // no tile for this thread (cannot happen with 2 tiles a thread; kept for safety)
        for (int64_t i = 0; i < part; ++i) partial[tid * part + i] = 0.0f;
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i = 0; i < part; ++i) {
        float sum = 0.0f;
        for (int u = 0; u < nth; ++u) sum += partial[u * part + i];
        if (i < nnz)
          gv[i] = sum;
        else
          gb[i - nnz] = sum;
      }
    }
    return;
  }
  // few tiles: the threads fill each tile's buffer together, then split its rows and columns
  float* const gbuf = scratch(0, static_cast<size_t>(rows) * w_max);
  float* const xbuf = pack_x ? scratch(1, static_cast<size_t>(cols) * w_max) : nullptr;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int tid = thread_id(), nth = team_size();
    int64_t r0, r1, c0, c1;
    share(rows, tid, nth, 16, &r0, &r1);
    share(cols, tid, nth, 16, &c0, &c1);
    for (int64_t k = 0; k < nt; ++k) {
      const Tile t = tiles[k];
      pack(g, gl, ldg, t, r0, r1, mask, ldm, gbuf);
      if (pack_x) pack(x, xl, ldx, t, c0, c1, nullptr, 0, xbuf);
#pragma omp barrier
      if (gv || gb)
        sddmm_tile(t, r0, r1, k == 0, crow, idx, gbuf, t.width, pack_x ? xbuf : x + t.n0, pack_x ? t.width : ldx,
                   gv, gb);
      if (gx) spmm_tile(t, c0, c1, crow_t, idx_t, val, perm_t, nullptr, gbuf, t.width, gx + t.n0, ldgx);
#pragma omp barrier
    }
  }
}

}  // extern "C"
