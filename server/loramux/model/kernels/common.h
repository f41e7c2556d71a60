// What loramux's CPU kernels share: the thread split, the ISA check and each ISA's vector ops.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>

namespace loramux {

// f(begin, end, thread) over [0, n) split among the calling thread's OpenMP team (torch's
// own: the library links the runtime torch loads). Not at::parallel_for: its per-thread lazy
// init, compiled into this library, would reset the caller's team size to the count last set
// on any thread (1, on a server whose other threads run single-threaded). f must not throw.
template <class F>
inline void parallel(int64_t n, const F& f) {
  if (n <= 1 || omp_in_parallel() || omp_get_max_threads() == 1) return f(0, n, 0);
#pragma omp parallel
  {
    const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t chunk = (n + team - 1) / team, begin = std::min(n, id * chunk);
    f(begin, std::min(n, begin + chunk), id);
  }
}

inline void check_isa(bool wide) {
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(wide ? has_avx512 : has_avx2, wide ? "this CPU has no AVX-512" : "this CPU has no AVX2/FMA");
}

// Code between LORAMUX_AVX2_BEGIN / LORAMUX_AVX512_BEGIN and LORAMUX_ISA_END is compiled for
// that ISA (each kernel's loops once per ISA; the caller checks the CPU first: check_isa).
#define LORAMUX_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define LORAMUX_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma\")")
#define LORAMUX_ISA_END _Pragma("GCC pop_options")

// Each ISA's vector of floats and the operations every kernel uses.
namespace avx2 {
LORAMUX_AVX2_BEGIN
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec bcast(float v) { return _mm256_set1_ps(v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline float hsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
LORAMUX_ISA_END
}  // namespace avx2

namespace avx512 {
LORAMUX_AVX512_BEGIN
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec bcast(float v) { return _mm512_set1_ps(v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
LORAMUX_ISA_END
}  // namespace avx512

}  // namespace loramux
