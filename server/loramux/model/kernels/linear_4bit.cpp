// y = x @ dequant(W)^T for bitsandbytes' 4-bit layout (two codes per byte, high nibble
// first; one float32 scale per block of the flat weight), without materializing W.
//
// bitsandbytes' CPU path writes the whole float32 weight to memory and reads it back for
// the matmul: at decode sizes that traffic, not the arithmetic, is the step. Here a few
// rows of W at a time are dequantized into a buffer that stays in cache while every row of
// x uses it. Each weight is the same float32 product (code value x block scale) as
// bitsandbytes' dequantize; only the order of the sums differs, as it does between batch
// sizes in any GEMM. AVX2 and AVX-512 builds of the same loops; the caller picks one.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

struct Args {
  const float* x;
  const uint8_t* packed;
  const float* absmax;
  const float* code;
  float* out;
  int64_t M, N, K, blocksize;
};

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

// Output rows dequantized together: a tile of W stays in L1/L2 while every row of x uses it.
inline int64_t tile_rows(int64_t K) { return std::max<int64_t>(4, (8192 / K) / 4 * 4); }

// Weights [start, start + count) of the flat array as float32 (start, count and blocksize
// are multiples of 16, so 16 weights never straddle two blocks); the ISA's `put16` looks up
// 16 codes and scales them.
#define LORAMUX_KERNEL_BODY                                                                   \
  inline void dequant(const Args& a, int64_t start, int64_t count, float* dst) {              \
    const __m128i mask = _mm_set1_epi8(0x0F);                                                 \
    const Lut lut = make_lut(a.code);                                                         \
    /* the block is counted, not divided: a division per 16 weights costs more than the lookup */ \
    int64_t block = start / a.blocksize, left = a.blocksize - start % a.blocksize;           \
    float scale = a.absmax[block];                                                            \
    const uint8_t* src = a.packed + start / 2;                                                \
    for (int64_t i = 0; i < count; i += 16, src += 8, left -= 16) {                           \
      if (left == 0) {                                                                        \
        scale = a.absmax[++block];                                                            \
        left = a.blocksize;                                                                   \
      }                                                                                       \
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));              \
      put16(_mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask)), \
            lut, scale, dst + i);                                                             \
    }                                                                                         \
  }                                                                                           \
  template <int MR, int NR>                                                                   \
  inline void micro(const float* x, int64_t K, const float* w, float* out, int64_t ldo) {     \
    Vec acc[MR][NR];                                                                          \
    for (int i = 0; i < MR; ++i)                                                              \
      for (int j = 0; j < NR; ++j) acc[i][j] = zero();                                        \
    for (int64_t k = 0; k < K; k += kLanes) {                                                 \
      Vec wv[NR];                                                                             \
      for (int j = 0; j < NR; ++j) wv[j] = load(w + j * K + k);                               \
      for (int i = 0; i < MR; ++i) {                                                          \
        const Vec xv = load(x + i * K + k);                                                   \
        for (int j = 0; j < NR; ++j) acc[i][j] = fma(xv, wv[j], acc[i][j]);                   \
      }                                                                                       \
    }                                                                                         \
    for (int i = 0; i < MR; ++i)                                                              \
      for (int j = 0; j < NR; ++j) out[i * ldo + j] = hsum(acc[i][j]);                        \
  }                                                                                           \
  template <int MR>                                                                           \
  inline void rows(const float* x, int64_t K, const float* w, int64_t nr, float* out, int64_t ldo) { \
    int64_t j = 0;                                                                            \
    for (; j + kNR <= nr; j += kNR) micro<MR, kNR>(x, K, w + j * K, out + j, ldo);            \
    for (; j < nr; ++j) micro<MR, 1>(x, K, w + j * K, out + j, ldo);                          \
  }                                                                                           \
  void run(const Args& a) {                                                                   \
    const int64_t K = a.K, N = a.N, M = a.M, tile = tile_rows(K);                             \
    /* each thread's tile buffer, made before the parallel region (nothing in it may throw) */ \
    std::vector<float> bufs(omp_get_max_threads() * tile * K);                                \
    parallel((N + tile - 1) / tile, [&](int64_t t0, int64_t t1, int64_t id) {                 \
      float* buf = bufs.data() + id * tile * K;                                               \
      for (int64_t t = t0; t < t1; ++t) {                                                     \
        const int64_t n0 = t * tile, nr = std::min(tile, N - n0);                             \
        dequant(a, n0 * K, nr * K, buf);                                                      \
        int64_t m = 0;                                                                        \
        for (; m + kMR <= M; m += kMR) rows<kMR>(a.x + m * K, K, buf, nr, a.out + m * N + n0, N); \
        for (; m < M; ++m) rows<1>(a.x + m * K, K, buf, nr, a.out + m * N + n0, N);            \
      }                                                                                       \
    });                                                                                       \
  }

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
using Vec = __m256;
constexpr int kLanes = 8, kMR = 4, kNR = 3;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline Vec lookup(__m256i c, Vec lo, Vec hi) {
  // Codes 0-7 from lo, 8-15 from hi: bit 3 moved to the sign bit picks the half.
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c),
                          _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}
struct Lut {
  Vec lo, hi;
};
inline Lut make_lut(const float* code) { return {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)}; }
// 16 codes (one per byte) -> their values x scale, into dst.
inline void put16(__m128i codes, const Lut& lut, float scale, float* dst) {
  const Vec s = _mm256_set1_ps(scale);
  _mm256_storeu_ps(dst, _mm256_mul_ps(lookup(_mm256_cvtepu8_epi32(codes), lut.lo, lut.hi), s));
  _mm256_storeu_ps(dst + 8, _mm256_mul_ps(lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)), lut.lo, lut.hi), s));
}
LORAMUX_KERNEL_BODY
#pragma GCC pop_options
}  // namespace avx2

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
using Vec = __m512;
constexpr int kLanes = 16, kMR = 4, kNR = 4;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
using Lut = Vec;  // all 16 values in one register
inline Lut make_lut(const float* code) { return _mm512_loadu_ps(code); }
inline void put16(__m128i codes, const Lut& lut, float scale, float* dst) {
  _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lut), _mm512_set1_ps(scale)));
}
LORAMUX_KERNEL_BODY
#pragma GCC pop_options
}  // namespace avx512

at::Tensor linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const at::Tensor& code, int64_t blocksize, int64_t N, bool wide) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "absmax: contiguous float32");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16, "code: 16 float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 16 == 0 && blocksize % 16 == 0, "K and the block size must be multiples of 16");
  TORCH_CHECK(packed.numel() * 2 == N * K && absmax.numel() * blocksize >= N * K, "W is N x K");
  auto out = at::empty({M, N}, x.options());
  const Args a{x.data_ptr<float>(), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
               code.data_ptr<float>(), out.data_ptr<float>(), M, N, K, blocksize};
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(wide ? has_avx512 : has_avx2, wide ? "this CPU has no AVX-512" : "this CPU has no AVX2/FMA");
  if (wide) avx512::run(a); else avx2::run(a);
  return out;
}

}  // namespace

TORCH_LIBRARY(loramux, m) {
  m.def("linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int N, bool wide) -> Tensor");
}
TORCH_LIBRARY_IMPL(loramux, CPU, m) { m.impl("linear_4bit", &linear_4bit); }
