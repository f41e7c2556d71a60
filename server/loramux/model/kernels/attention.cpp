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
//
// Rows may come in teams (`lead`, `shared`): rows whose first positions hold the same keys
// and values, copied from the same prefix cache blocks (an adapter's system prompt under
// every request to it). A team's task scores a block of those keys for every row while the
// block is in L1, from the first row's copy, then each row's own positions after them; the
// arithmetic of each score and each weighted sum is the one a row alone gets. 28 rows in 8
// teams sharing 300 of 342 positions: 0.72 -> 0.42 ms a layer (bench/README.md, stop 35).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>
#include "common.h"

namespace {

using loramux::check_isa;

struct AttnArgs {
  const float* q;     // [B, H, D]
  const float* k;     // [B, Hkv, L, D], strides below
  const float* v;
  const bool* mask;   // [B, L] (stride mb), true where a row attends; null: every position
  const int32_t* shared;  // [B]: attended positions a row shares with its team's first row
  float* out;         // [B, H, D]
  int64_t B, H, Hkv, L, D, kb, kh, kl, vb, vh, vl, mb;
  float scale;
};

constexpr int kMaxGroup = 4;  // query heads done together per pass over a key/value head
constexpr int kMaxRows = 8;   // rows of a team: a longer run of rows sharing a prefix makes several

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
  /* KB-key passes of scores over positions [i0, i1) of `idx` in the key rows at kbase,    \
     for R rows' queries (qs [R][G][D]) into their scores (s [R][G][Lp]): each key block    \
     stays in L1 while every row uses it. Values at vbase are asked for meanwhile. */        \
  template <int G>                                                                            \
  inline void score_span(const AttnArgs& a, const float* kbase, const float* vbase, const int32_t* idx, \
                         int64_t i0, int64_t i1, int R, const float* qs, float* s, int64_t Lp) { \
    constexpr int KB = G == 4 ? 2 : 4;  /* keys a pass: G x KB accumulators in registers */   \
    const int64_t D = a.D;                                                                    \
    int64_t i = i0;                                                                           \
    for (; i + KB <= i1; i += KB) {                                                           \
      const float* kr[KB];                                                                    \
      for (int j = 0; j < KB; ++j) {                                                          \
        kr[j] = kbase + idx[i + j] * a.kl;                                                    \
        /* the values' lines start coming while the scores are computed */                    \
        const char* vr = reinterpret_cast<const char*>(vbase + idx[i + j] * a.vl);            \
        for (int64_t off = 0; off < D * 4; off += 64) _mm_prefetch(vr + off, _MM_HINT_T0);   \
      }                                                                                       \
      for (int r = 0; r < R; ++r) scores<G, KB>(kr, qs + r * G * D, D, s + r * G * Lp + i, Lp); \
    }                                                                                         \
    for (; i < i1; ++i) {                                                                     \
      const float* kr[1] = {kbase + idx[i] * a.kl};                                           \
      for (int r = 0; r < R; ++r) scores<G, 1>(kr, qs + r * G * D, D, s + r * G * Lp + i, Lp); \
    }                                                                                         \
  }                                                                                           \
  /* Scores -> softmax weights in place over a row's n positions (padded to Lp); 1 / sum. */  \
  inline float softmax(float* sg, int64_t n, int64_t Lp) {                                    \
    /* padding to whole vectors: e^-87 is below a float's precision next to the max's 1 */    \
    for (int64_t j = n; j < Lp; ++j) sg[j] = -1e30f;                                          \
    Vec mv = bcast(-INFINITY);                                                                \
    for (int64_t j = 0; j < Lp; j += kLanes) mv = vmax(mv, load(sg + j));                     \
    const Vec m = bcast(hmax(mv));                                                            \
    Vec acc = zero();                                                                         \
    for (int64_t j = 0; j < Lp; j += kLanes) {                                                \
      const Vec e = vexp(sub(load(sg + j), m));                                               \
      store(sg + j, e);                                                                       \
      acc = add(acc, e);                                                                      \
    }                                                                                         \
    return 1.0f / hsum(acc);                                                                  \
  }                                                                                           \
  /* o[G][kChunk] += weights x value columns [c, c + cn x kLanes) over positions [i0, i1). */ \
  template <int G>                                                                            \
  inline void weigh(const AttnArgs& a, const float* vbase, const int32_t* idx, int64_t i0, int64_t i1, \
                    const float* s, int64_t Lp, int64_t c, int cn, Vec (*o)[kChunk]) {        \
    for (int64_t i = i0; i < i1; ++i) {                                                       \
      const float* vr = vbase + idx[i] * a.vl + c;                                            \
      Vec vv[kChunk];                                                                         \
      for (int j = 0; j < kChunk; ++j) vv[j] = j < cn ? load(vr + j * kLanes) : zero();       \
      for (int g = 0; g < G; ++g) {                                                           \
        const Vec p = bcast(s[g * Lp + i]);                                                   \
        for (int j = 0; j < kChunk; ++j) o[g][j] = fma(p, vv[j], o[g][j]);                    \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  /* One task: key/value head h, query heads g0 .. g0 + G - 1, of R rows (`rows`, the first  \
     leading) whose first P attended positions hold the same keys and values: read from the \
     leader's for all of them, each row's own positions after. idx[r], n[r]: row r's attended \
     positions; s: scratch [R][G][Lp]; qs: [R][G][D]. Alone (R = 1, P = 0): one row's task. */ \
  template <int G>                                                                            \
  void task(const AttnArgs& a, const int64_t* rows, int R, int64_t h, int64_t g0, int32_t* const* idx, \
            const int64_t* n, int64_t P, int64_t Lp, float* s, float* qs) {                   \
    const int64_t D = a.D;                                                                    \
    for (int r = 0; r < R; ++r)                                                               \
      for (int g = 0; g < G; ++g) {                                                           \
        const float* qr = a.q + (rows[r] * a.H + g0 + g) * D;                                 \
        for (int64_t c = 0; c < D; ++c) qs[(r * G + g) * D + c] = qr[c] * a.scale;            \
      }                                                                                       \
    auto kbase = [&](int r) { return a.k + rows[r] * a.kb + h * a.kh; };                      \
    auto vbase = [&](int r) { return a.v + rows[r] * a.vb + h * a.vh; };                      \
    score_span<G>(a, kbase(0), vbase(0), idx[0], 0, P, R, qs, s, Lp);                         \
    for (int r = 0; r < R; ++r)                                                               \
      score_span<G>(a, kbase(r), vbase(r), idx[r], P, n[r], 1, qs + r * G * D, s + r * G * Lp, Lp); \
    float inv[kMaxRows][kMaxGroup];                                                           \
    for (int r = 0; r < R; ++r)                                                               \
      for (int g = 0; g < G; ++g) inv[r][g] = softmax(s + (r * G + g) * Lp, n[r], Lp);       \
    for (int64_t c = 0; c < D; c += kChunk * kLanes) {                                        \
      const int cn = static_cast<int>(std::min<int64_t>(kChunk, (D - c) / kLanes));           \
      for (int r = 0; r < R; ++r) {                                                           \
        Vec o[G][kChunk];                                                                     \
        for (int g = 0; g < G; ++g)                                                           \
          for (int j = 0; j < kChunk; ++j) o[g][j] = zero();                                  \
        const float* sr = s + r * G * Lp;                                                     \
        weigh<G>(a, vbase(0), idx[0], 0, P, sr, Lp, c, cn, o);                                \
        weigh<G>(a, vbase(r), idx[r], P, n[r], sr, Lp, c, cn, o);                             \
        for (int g = 0; g < G; ++g) {                                                         \
          float* orow = a.out + (rows[r] * a.H + g0 + g) * D + c;                             \
          const Vec w = bcast(inv[r][g]);                                                     \
          for (int j = 0; j < cn; ++j) store(orow + j * kLanes, mul(o[g][j], w));             \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  /* Every query head of one (rows, key/value head) task, in passes of up to kMaxGroup. */    \
  void head_task(const AttnArgs& a, const int64_t* rows, int R, int64_t h, int32_t* const* idx, const int64_t* n, \
                 int64_t P, int64_t Lp, float* s, float* qs) {                                \
    const int64_t group = a.H / a.Hkv;                                                        \
    for (int64_t g0 = h * group; g0 < (h + 1) * group; g0 += kMaxGroup) {                     \
      switch (std::min<int64_t>(kMaxGroup, (h + 1) * group - g0)) {                           \
        case 1: task<1>(a, rows, R, h, g0, idx, n, P, Lp, s, qs); break;                      \
        case 2: task<2>(a, rows, R, h, g0, idx, n, P, Lp, s, qs); break;                      \
        case 3: task<3>(a, rows, R, h, g0, idx, n, P, Lp, s, qs); break;                      \
        default: task<4>(a, rows, R, h, g0, idx, n, P, Lp, s, qs); break;                     \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  /* Tasks (team, key/value head), largest teams first, each thread claiming the next: teams \
     differ in size, and a fixed split of them left one thread waiting for the other. */    \
  void attention_run(const AttnArgs& a, const std::vector<std::vector<int64_t>>& teams) {     \
    const int64_t Lp = (a.L + kLanes - 1) / kLanes * kLanes, nt = static_cast<int64_t>(teams.size()) * a.Hkv; \
    std::atomic<int64_t> next{0};                                                             \
    _Pragma("omp parallel if(nt > 1 && !omp_in_parallel())")                                  \
    {                                                                                         \
      std::vector<float> s(kMaxRows * kMaxGroup * Lp), qs(kMaxRows * kMaxGroup * a.D);        \
      std::vector<int32_t> idx(kMaxRows * a.L);                                               \
      int32_t* idxs[kMaxRows];                                                                \
      int64_t n[kMaxRows];                                                                    \
      for (int64_t t = next++; t < nt; t = next++) {                                          \
        const std::vector<int64_t>& team = teams[t / a.Hkv];                                  \
        const int R = static_cast<int>(team.size());                                          \
        int64_t P = R > 1 ? a.shared[team[0]] : 0;                                            \
        for (int r = 0; r < R; ++r) {                                                         \
          const int64_t b = team[r];                                                          \
          idxs[r] = idx.data() + r * a.L;                                                     \
          n[r] = 0;                                                                           \
          for (int64_t j = 0; j < a.L; ++j)                                                   \
            if (!a.mask || a.mask[b * a.mb + j]) idxs[r][n[r]++] = static_cast<int32_t>(j);   \
          P = std::min(P, n[r]);                                                              \
        }                                                                                     \
        const int64_t h = t % a.Hkv, group = a.H / a.Hkv;                                     \
        /* P = 0 (nothing shared after all) is each row alone, a row with nothing to attend */ \
        /* to a softmax over padding and no values: its zeros are written below */              \
        head_task(a, team.data(), R, h, idxs, n, P, Lp, s.data(), qs.data());                 \
        for (int r = 0; r < R; ++r) /* nothing to attend to: zeros, not NaN */               \
          if (n[r] == 0) std::fill_n(a.out + (team[r] * a.H + h * group) * a.D, group * a.D, 0.0f); \
      }                                                                                       \
    }                                                                                         \
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

// Rows in teams of up to kMaxRows, largest first: row b joins the team of lead[b] (a row
// with lead[b] == b leads its own), whose first shared[b] attended positions are the same
// keys and values as b's. Without `lead`, every row alone.
std::vector<std::vector<int64_t>> teams_of(int64_t B, const c10::optional<at::Tensor>& lead,
                                           const c10::optional<at::Tensor>& shared) {
  std::vector<std::vector<int64_t>> teams;
  if (!lead.has_value()) {
    for (int64_t b = 0; b < B; ++b) teams.push_back({b});
    return teams;
  }
  TORCH_CHECK(shared.has_value(), "lead needs shared");
  for (const at::Tensor* t : {&*lead, &*shared})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) == B && t->is_contiguous(),
                "lead, shared: contiguous int32 [B]");
  const int32_t* lp = lead->data_ptr<int32_t>();
  const int32_t* sp = shared->data_ptr<int32_t>();
  std::vector<int64_t> at(B, -1);  // the team row b leads, while it has room
  for (int64_t b = 0; b < B; ++b) {
    const int64_t l = lp[b];
    TORCH_CHECK(l >= 0 && l <= b && lp[l] == l && sp[b] == sp[l] && sp[b] >= 0,
                "lead[b] must be a row at or before b that leads itself, with the same shared count");
    if (at[l] < 0 || teams[at[l]].size() == static_cast<size_t>(kMaxRows)) {
      at[l] = static_cast<int64_t>(teams.size());
      teams.push_back({});
    }
    teams[at[l]].push_back(b);
  }
  std::stable_sort(teams.begin(), teams.end(), [](const auto& x, const auto& y) { return x.size() > y.size(); });
  return teams;
}

// q [B, H, D] contiguous; k, v [B, Hkv, L, D] with contiguous rows; mask [B, L] bool or None;
// lead, shared [B] int32 or None (`teams_of`).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale, bool wide,
                            const c10::optional<at::Tensor>& lead, const c10::optional<at::Tensor>& shared) {
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
  const std::vector<std::vector<int64_t>> teams = teams_of(B, lead, shared);
  auto out = at::empty({B, H, D}, q.options());
  const AttnArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), mp,
                   lead.has_value() ? shared->data_ptr<int32_t>() : nullptr, out.data_ptr<float>(),
                   B, H, Hkv, L, D, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                   mb, static_cast<float>(scale)};
  check_isa(wide);
  if (wide) avx512::attention_run(a, teams); else avx2::attention_run(a, teams);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramux, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool wide, Tensor? lead=None, "
        "Tensor? shared=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(loramux, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
