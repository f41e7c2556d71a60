// Attention of a decode step: one query position per row, over the row's cached keys and
// values, grouped-query heads reading their shared key/value head once.
//
// torch's CPU flash attention is built for many query positions: on a decode step's 32 rows
// x 3 key/value heads it ran ~1.5 ms a layer at 370 cached positions (SmolLM2 under the
// prefix workload), 2.5x the time to read those keys and values once. Here each (row,
// key/value head) is one task: scores of its query heads against every unmasked key, a
// softmax, and the weighted sum of the values, each key and value read once, in place in
// the batch's buffers (any row and head strides). The same arithmetic as attention always
// does, in another order (as flash attention's is another than the math path's).
//
// The scores take KB keys a pass (G x KB independent FMA chains, reduced four at a time)
// and ask for each key's value row while they are computed: with one chain a query head,
// every FMA waited on the one before, and the values were read only after all the scores.
// On SmolLM2 decode steps (28 rows, 342 positions) that took a layer from 1.5-1.7x the time
// of merely reading its keys and values to 1.2-1.3x (bench/README.md, stop 34). Asking for
// the next task's keys as well made it slower (more requests in flight than lines to use).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <vector>
#include "common.h"

namespace {

using loramux::check_isa;
using loramux::parallel;

struct AttnArgs {
  const float* q;     // [B, H, D]
  const float* k;     // [B, Hkv, L, D], strides below
  const float* v;
  const bool* mask;   // [B, L] (stride mb), true where a row attends; null: every position
  float* out;         // [B, H, D]
  int64_t B, H, Hkv, L, D, kb, kh, kl, vb, vh, vl, mb;
  float scale;
};

constexpr int kMaxGroup = 4;  // query heads done together per pass over a key/value head

// The loops, for each ISA's primitives (common.h) and its own round_nearest(x), times_pow2(p,
// n) = p x 2^n, and kChunk (vectors of a value row held per pass).
#define LORAMUX_ATTENTION_BODY                                                                \
  /* e^x for x <= 0 as 2^n x p(r), r = x - n ln 2 in two parts, p Cephes' expf polynomial   \
     (about 1 ulp); x below -87.3 gives e^-87.3 (n >= -126: 2^n stays a normal float),       \
     which is 0 next to the softmax's largest term, 1. */                                     \
  inline Vec vexp(Vec x) {                                                                    \
    x = vmax(x, bcast(-87.3f));                                                               \
    const Vec n = round_nearest(mul(x, bcast(1.44269504088896341f)));                         \
    Vec r = fma(n, bcast(-0.693359375f), x);                                                  \
    r = fma(n, bcast(2.12194440e-4f), r);                                                     \
    Vec p = bcast(1.9875691500e-4f);                                                          \
    p = fma(p, r, bcast(1.3981999507e-3f));                                                   \
    p = fma(p, r, bcast(8.3334519073e-3f));                                                   \
    p = fma(p, r, bcast(4.1665795894e-2f));                                                   \
    p = fma(p, r, bcast(1.6666665459e-1f));                                                   \
    p = fma(p, r, bcast(5.0000001201e-1f));                                                   \
    return times_pow2(fma(p, mul(r, r), add(r, bcast(1.0f))), n);                             \
  }                                                                                           \
  /* Scores of KB keys (rows kr) against G scaled queries qs: G x KB independent chains    \
     (one chain a query would wait on each FMA's latency), reduced KB at a time into s. */  \
  template <int G, int KB>                                                                    \
  inline void scores(const float* const* kr, const float* qs, int64_t D, float* s, int64_t Lp) { \
    Vec acc[G][KB];                                                                           \
    for (int g = 0; g < G; ++g)                                                               \
      for (int j = 0; j < KB; ++j) acc[g][j] = zero();                                        \
    for (int64_t c = 0; c < D; c += kLanes) {                                                 \
      for (int j = 0; j < KB; ++j) {                                                          \
        const Vec kv = load(kr[j] + c);                                                       \
        for (int g = 0; g < G; ++g) acc[g][j] = fma(load(qs + g * D + c), kv, acc[g][j]);     \
      }                                                                                       \
    }                                                                                         \
    for (int g = 0; g < G; ++g) reduce<KB>(acc[g], s + g * Lp);                               \
  }                                                                                           \
  /* One (row, kv head) task, query heads g0 .. g0 + G - 1; s: scratch [G][Lp]. */            \
  template <int G>                                                                            \
  void task(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, const int32_t* idx, int64_t n, \
            int64_t Lp, float* s, float* qs) {                                                \
    constexpr int KB = G == 4 ? 2 : 4;  /* keys a pass: G x KB accumulators in registers */   \
    const int64_t D = a.D;                                                                    \
    for (int g = 0; g < G; ++g) {                                                             \
      const float* qr = a.q + (b * a.H + g0 + g) * D;                                         \
      for (int64_t c = 0; c < D; ++c) qs[g * D + c] = qr[c] * a.scale;                        \
    }                                                                                         \
    const float* kbase = a.k + b * a.kb + h * a.kh;                                           \
    const float* vbase = a.v + b * a.vb + h * a.vh;                                           \
    int64_t i = 0;                                                                            \
    for (; i + KB <= n; i += KB) {                                                            \
      const float* kr[KB];                                                                    \
      for (int j = 0; j < KB; ++j) {                                                          \
        kr[j] = kbase + idx[i + j] * a.kl;                                                    \
        /* the values' lines start coming while the scores are computed */                    \
        const char* vr = reinterpret_cast<const char*>(vbase + idx[i + j] * a.vl);            \
        for (int64_t off = 0; off < D * 4; off += 64) _mm_prefetch(vr + off, _MM_HINT_T0);   \
      }                                                                                       \
      scores<G, KB>(kr, qs, D, s + i, Lp);                                                    \
    }                                                                                         \
    for (; i < n; ++i) {                                                                      \
      const float* kr[1] = {kbase + idx[i] * a.kl};                                           \
      scores<G, 1>(kr, qs, D, s + i, Lp);                                                     \
    }                                                                                         \
    float inv[G];                                                                             \
    for (int g = 0; g < G; ++g) {                                                             \
      float* sg = s + g * Lp;                                                                 \
      /* padding to whole vectors: e^-87 is below a float's precision next to the max's 1 */  \
      for (int64_t j = n; j < Lp; ++j) sg[j] = -1e30f;                                        \
      Vec mv = bcast(-INFINITY);                                                              \
      for (int64_t j = 0; j < Lp; j += kLanes) mv = vmax(mv, load(sg + j));                   \
      const Vec m = bcast(hmax(mv));                                                          \
      Vec acc = zero();                                                                       \
      for (int64_t j = 0; j < Lp; j += kLanes) {                                              \
        const Vec e = vexp(sub(load(sg + j), m));                                             \
        store(sg + j, e);                                                                     \
        acc = add(acc, e);                                                                    \
      }                                                                                       \
      inv[g] = 1.0f / hsum(acc);                                                              \
    }                                                                                         \
    for (int64_t c = 0; c < D; c += kChunk * kLanes) {                                        \
      const int cn = static_cast<int>(std::min<int64_t>(kChunk, (D - c) / kLanes));           \
      Vec o[G][kChunk];                                                                       \
      for (int g = 0; g < G; ++g)                                                             \
        for (int j = 0; j < kChunk; ++j) o[g][j] = zero();                                    \
      for (int64_t i = 0; i < n; ++i) {                                                       \
        const float* vr = vbase + idx[i] * a.vl + c;                                          \
        Vec vv[kChunk];                                                                       \
        for (int j = 0; j < kChunk; ++j) vv[j] = j < cn ? load(vr + j * kLanes) : zero();     \
        for (int g = 0; g < G; ++g) {                                                         \
          const Vec p = bcast(s[g * Lp + i]);                                                 \
          for (int j = 0; j < kChunk; ++j) o[g][j] = fma(p, vv[j], o[g][j]);                  \
        }                                                                                     \
      }                                                                                       \
      for (int g = 0; g < G; ++g) {                                                           \
        float* orow = a.out + (b * a.H + g0 + g) * D + c;                                     \
        const Vec w = bcast(inv[g]);                                                          \
        for (int j = 0; j < cn; ++j) store(orow + j * kLanes, mul(o[g][j], w));               \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  void attention_run(const AttnArgs& a) {                                                     \
    const int64_t group = a.H / a.Hkv, Lp = (a.L + kLanes - 1) / kLanes * kLanes;             \
    parallel(a.B * a.Hkv, [&](int64_t t0, int64_t t1, int64_t) {                              \
      std::vector<float> s(kMaxGroup * Lp), qs(kMaxGroup * a.D);                              \
      std::vector<int32_t> idx(a.L);                                                          \
      for (int64_t t = t0; t < t1; ++t) {                                                     \
        const int64_t b = t / a.Hkv, h = t % a.Hkv;                                           \
        int64_t n = 0;                                                                        \
        for (int64_t j = 0; j < a.L; ++j)                                                     \
          if (!a.mask || a.mask[b * a.mb + j]) idx[n++] = static_cast<int32_t>(j);            \
        for (int64_t g0 = h * group; g0 < (h + 1) * group; g0 += kMaxGroup) {                 \
          const int64_t gn = std::min<int64_t>(kMaxGroup, (h + 1) * group - g0);              \
          float* out0 = a.out + (b * a.H + g0) * a.D;                                         \
          if (n == 0) { /* nothing to attend to: zeros, not NaN */                            \
            std::fill(out0, out0 + gn * a.D, 0.0f);                                           \
            continue;                                                                         \
          }                                                                                   \
          switch (gn) {                                                                       \
            case 1: task<1>(a, b, h, g0, idx.data(), n, Lp, s.data(), qs.data()); break;      \
            case 2: task<2>(a, b, h, g0, idx.data(), n, Lp, s.data(), qs.data()); break;      \
            case 3: task<3>(a, b, h, g0, idx.data(), n, Lp, s.data(), qs.data()); break;      \
            default: task<4>(a, b, h, g0, idx.data(), n, Lp, s.data(), qs.data()); break;     \
          }                                                                                   \
        }                                                                                     \
      }                                                                                       \
    });                                                                                       \
  }

namespace avx2 {
LORAMUX_AVX2_BEGIN
using namespace loramux::avx2;
constexpr int kChunk = 2;
inline Vec round_nearest(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec times_pow2(Vec p, Vec n) {  // n an integer in [-126, 127]: its exponent bits
  return mul(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
}
inline float hmax(Vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
// out[j] = the sum of a[j]'s lanes: four at once through pairwise adds.
template <int KB>
inline void reduce(const Vec* a, float* out) {
  if constexpr (KB == 4) {
    const Vec t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  } else {
    for (int j = 0; j < KB; ++j) out[j] = hsum(a[j]);
  }
}
LORAMUX_ATTENTION_BODY
LORAMUX_ISA_END
}  // namespace avx2

namespace avx512 {
LORAMUX_AVX512_BEGIN
using namespace loramux::avx512;
constexpr int kChunk = 4;
inline Vec round_nearest(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec times_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }
template <int KB>
inline void reduce(const Vec* a, float* out) {
  for (int j = 0; j < KB; ++j) out[j] = hsum(a[j]);
}
LORAMUX_ATTENTION_BODY
LORAMUX_ISA_END
}  // namespace avx512

// q [B, H, D] contiguous; k, v [B, Hkv, L, D] with contiguous rows; mask [B, L] bool or None.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale, bool wide) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.is_contiguous(), "q: contiguous float32 [B, H, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->size(0) == B && t->size(3) == D &&
                t->stride(3) == 1 && t->sizes() == k.sizes(), "k, v: float32 [B, Hkv, L, D], rows contiguous");
  const int64_t Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(D % (wide ? 16 : 8) == 0, "head size must be a multiple of the vector width");
  TORCH_CHECK(L < (int64_t{1} << 31), "too many positions");
  const bool* mp = nullptr;
  int64_t mb = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L &&
                mask->stride(1) == 1, "mask: bool [B, L], positions contiguous");
    mp = mask->data_ptr<bool>();
    mb = mask->stride(0);
  }
  auto out = at::empty({B, H, D}, q.options());
  const AttnArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), mp, out.data_ptr<float>(),
                   B, H, Hkv, L, D, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                   mb, static_cast<float>(scale)};
  check_isa(wide);
  if (wide) avx512::attention_run(a); else avx2::attention_run(a);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramux, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool wide) -> Tensor");
}
TORCH_LIBRARY_IMPL(loramux, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
