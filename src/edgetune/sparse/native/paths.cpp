// Native CPU kernel of edgetune's exact path-based CH scores (predictors_paths.py), called through ctypes.
//
// out[a, :] += sum_{(a, i) in L} L[a, i] * R[i, :] for two CSR matrices L (rows x inner) and R (inner x cols),
// accumulated straight into a dense row-major output (leading dimension ld): a sparse-sparse product with a
// dense accumulator, so its cost is one multiply-add per (L entry, R entry) pair (one per length-3 path when L
// is the mask and R the weighted common-neighbour matrix), with no sparse temporary and no second pass.
// Rows of the output are independent: OpenMP threads take them in chunks (dynamic, rows differ in work).
// Indices are int32 (the caller falls back to scipy beyond), row pointers int64. et_paths_double_*: the doubly
// corrected path terms of the scores in one pass (see add_double).
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

template <typename T>
void add_product(int64_t n_rows, const int64_t* lp, const int32_t* li, const T* lv, const int64_t* rp,
                 const int32_t* ri, const T* rv, T* out, int64_t ld, int threads) {
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads > 0 ? threads : 1)
  for (int64_t a = 0; a < n_rows; ++a) {
    T* o = out + a * ld;
    for (int64_t p = lp[a]; p < lp[a + 1]; ++p) {
      const int32_t i = li[p];
      const T w = lv[p];
      const int64_t end = rp[i + 1];
      for (int64_t q = rp[i]; q < end; ++q) o[ri[q]] += w * rv[q];
    }
  }
}

// out[a, k] += sum over the paths a - i - b - k (links (a, i), (b, i), (b, k) of the mask M, rows = outputs)
// of dU[i, k] * dV[a, b]: the doubly corrected path terms. Per output row a (one thread each): dV's row a in a
// dense scratch over the outputs; for each input i of a, z = sum_{b in N(i), dV[a, b] != 0} dV[a, b] M[b, :]
// in a dense scratch over the inputs, then out[a, k] += dU[i, k] z[k] over dU's row i, and z cleared by
// the same rows. Cost: per (a, i, b) with dV[a, b] != 0 twice deg(b), plus dU's row i per link (a, i).
template <typename T>
void add_double(int64_t n_out, int64_t n_in, const int64_t* sp, const int32_t* si, const int64_t* tp,
                const int32_t* ti, const int64_t* vp, const int32_t* vi, const T* vv, const int64_t* up,
                const int32_t* ui, const T* uv, T* out, int64_t ld, int threads) {
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    std::vector<T> dv(n_out, T(0)), z(n_in, T(0));
#pragma omp for schedule(dynamic, 8)
    for (int64_t a = 0; a < n_out; ++a) {
      if (vp[a] == vp[a + 1]) continue;
      for (int64_t p = vp[a]; p < vp[a + 1]; ++p) dv[vi[p]] = vv[p];
      T* o = out + a * ld;
      for (int64_t p = sp[a]; p < sp[a + 1]; ++p) {
        const int32_t i = si[p];
        bool any = false;
        for (int64_t q = tp[i]; q < tp[i + 1]; ++q) {
          const int32_t b = ti[q];
          const T w = dv[b];
          if (w == T(0)) continue;
          any = true;
          for (int64_t r = sp[b]; r < sp[b + 1]; ++r) z[si[r]] += w;
        }
        if (!any) continue;
        for (int64_t r = up[i]; r < up[i + 1]; ++r) o[ui[r]] += uv[r] * z[ui[r]];
        for (int64_t q = tp[i]; q < tp[i + 1]; ++q) {
          const int32_t b = ti[q];
          if (dv[b] == T(0)) continue;
          for (int64_t r = sp[b]; r < sp[b + 1]; ++r) z[si[r]] = T(0);
        }
      }
      for (int64_t p = vp[a]; p < vp[a + 1]; ++p) dv[vi[p]] = T(0);
    }
  }
}

}  // namespace

extern "C" {

int et_paths_version() { return 2; }

void et_paths_double_f32(int64_t n_out, int64_t n_in, const int64_t* sp, const int32_t* si, const int64_t* tp,
                         const int32_t* ti, const int64_t* vp, const int32_t* vi, const float* vv, const int64_t* up,
                         const int32_t* ui, const float* uv, float* out, int64_t ld, int threads) {
  add_double<float>(n_out, n_in, sp, si, tp, ti, vp, vi, vv, up, ui, uv, out, ld, threads);
}

void et_paths_double_f64(int64_t n_out, int64_t n_in, const int64_t* sp, const int32_t* si, const int64_t* tp,
                         const int32_t* ti, const int64_t* vp, const int32_t* vi, const double* vv,
                         const int64_t* up, const int32_t* ui, const double* uv, double* out, int64_t ld,
                         int threads) {
  add_double<double>(n_out, n_in, sp, si, tp, ti, vp, vi, vv, up, ui, uv, out, ld, threads);
}

void et_paths_add_f32(int64_t n_rows, const int64_t* lp, const int32_t* li, const float* lv, const int64_t* rp,
                      const int32_t* ri, const float* rv, float* out, int64_t ld, int threads) {
  add_product<float>(n_rows, lp, li, lv, rp, ri, rv, out, ld, threads);
}

void et_paths_add_f64(int64_t n_rows, const int64_t* lp, const int32_t* li, const double* lv, const int64_t* rp,
                      const int32_t* ri, const double* rv, double* out, int64_t ld, int threads) {
  add_product<double>(n_rows, lp, li, lv, rp, ri, rv, out, ld, threads);
}

}  // extern "C"
