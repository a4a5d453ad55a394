// Native CPU kernel of edgetune's exact path-based CH scores (predictors_paths.py), called through ctypes.
//
// out[a, :] += sum_{(a, i) in L} L[a, i] * R[i, :] for two CSR matrices L (rows x inner) and R (inner x cols),
// accumulated straight into a dense row-major output (leading dimension ld): a sparse-sparse product with a
// dense accumulator, so its cost is one multiply-add per (L entry, R entry) pair (one per length-3 path when L
// is the mask and R the weighted common-neighbour matrix), with no sparse temporary and no second pass.
// Rows of the output are independent: OpenMP threads take them in chunks (dynamic, rows differ in work).
// Indices are int32 (the caller falls back to scipy beyond), row pointers int64.
#include <cstdint>
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

}  // namespace

extern "C" {

int et_paths_version() { return 1; }

void et_paths_add_f32(int64_t n_rows, const int64_t* lp, const int32_t* li, const float* lv, const int64_t* rp,
                      const int32_t* ri, const float* rv, float* out, int64_t ld, int threads) {
  add_product<float>(n_rows, lp, li, lv, rp, ri, rv, out, ld, threads);
}

void et_paths_add_f64(int64_t n_rows, const int64_t* lp, const int32_t* li, const double* lv, const int64_t* rp,
                      const int32_t* ri, const double* rv, double* out, int64_t ld, int threads) {
  add_product<double>(n_rows, lp, li, lv, rp, ri, rv, out, ld, threads);
}

}  // extern "C"
