// RMSNorm of rows of float32 (Llama's: w * (x * 1 / sqrt(mean(x^2) + eps))), one call for what
// transformers' forward does in seven tensor ops (61 norms a SmolLM2 step, each op a few us of
// dispatch). The same float32 products as that forward; only the mean's sum runs in another
// order, as it does between any two reductions.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <cmath>
#include "common.h"

namespace {

using loramux::parallel;

namespace avx2 {
LORAMUX_AVX2_BEGIN
using namespace loramux::avx2;
// out[r] = w * (x[r] * (1 / sqrt(sum(x[r]^2) / n + eps))) for rows [r0, r1) of n floats.
void rows(const float* x, const float* w, float* out, int64_t n, float eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    float* o = out + r * n;
    Vec acc = zero();
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) acc = fma(load(xr + i), load(xr + i), acc);
    float sum = hsum(acc);
    for (; i < n; ++i) sum += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
    const Vec s = bcast(scale);
    for (i = 0; i + kLanes <= n; i += kLanes) store(o + i, mul(load(w + i), mul(load(xr + i), s)));
    for (; i < n; ++i) o[i] = w[i] * (xr[i] * scale);
  }
}
LORAMUX_ISA_END
}  // namespace avx2

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1, "x: contiguous float32");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == n, "w: float32 [hidden]");
  loramux::check_isa(false);
  auto out = at::empty_like(x);
  const int64_t rows = n ? x.numel() / n : 0;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // A decode step's few dozen rows cost less than a parallel region's fork and join.
  if (rows < 256) {
    avx2::rows(xp, wp, op, n, static_cast<float>(eps), 0, rows);
  } else {
    parallel(rows, [&](int64_t r0, int64_t r1, int64_t) { avx2::rows(xp, wp, op, n, static_cast<float>(eps), r0, r1); });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramux, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(loramux, CPU, m) {
  m.impl("rms_norm", &rms_norm);
}
