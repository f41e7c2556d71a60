// y = x @ dequant(W)^T for bitsandbytes' 4-bit layout (two codes per byte, high nibble
// first; one float32 scale per block of the flat weight), without materializing W.
//
// bitsandbytes' CPU path writes the whole float32 weight to memory and reads it back for
// the matmul: at decode sizes that traffic, not the arithmetic, is the step. Here a few
// rows of W at a time are dequantized into a buffer that stays in cache while every row of
// x uses it. Each weight is the same float32 product (code value x block scale) as
// bitsandbytes' dequantize; only the order of the sums differs, as it does between batch
// sizes in any GEMM. AVX2 and AVX-512 builds of the same loops; the caller picks one.
//
// Also `lora_rows`: a decode step's LoRA term for every row and adapter in one call (below),
// and `linear_4bit_lora`: both in one parallel region (one fork and join, the term's h
// computed beside the product). On AVX2 the weight is first rewritten into
// the panels' layout (`panels_4bit`, below; the same bytes reordered), whose outer-product
// kernel (`linear_4bit_panels`, `linear_4bit_panels_lora`) replaces the row tiles' dot products.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <immintrin.h>
#include <omp.h>
#include "common.h"
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

using loramux::check_isa;
using loramux::parallel;

// Output rows dequantized together: a tile of W stays in L1/L2 while every row of x uses it.
inline int64_t tile_rows(int64_t K) { return std::max<int64_t>(4, (8192 / K) / 4 * 4); }

// Weights [start, start + count) of the flat array as float32 (start, count and blocksize
// are multiples of 16, so 16 weights never straddle two blocks); the ISA's `put16` looks up
// 16 codes in a table already multiplied by the block's scale (the same float32 products as
// scaling each value after the lookup: one multiply per block instead of one per 16 weights).
#define LORAMUX_KERNEL_BODY                                                                   \
  inline void dequant(const Args& a, int64_t start, int64_t count, float* dst) {              \
    const __m128i mask = _mm_set1_epi8(0x0F);                                                 \
    const Lut code = make_lut(a.code);                                                        \
    /* the block is counted, not divided: a division per 16 weights costs more than the lookup */ \
    int64_t block = start / a.blocksize, left = a.blocksize - start % a.blocksize;           \
    Lut lut = scaled(code, a.absmax[block]);                                                  \
    const uint8_t* src = a.packed + start / 2;                                                \
    for (int64_t i = 0; i < count; i += 16, src += 8, left -= 16) {                           \
      if (left == 0) {                                                                        \
        lut = scaled(code, a.absmax[++block]);                                                \
        left = a.blocksize;                                                                   \
      }                                                                                       \
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));              \
      put16(_mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask)), \
            lut, dst + i);                                                                    \
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
  /* output tiles [t0, t1) of tile_rows(K) columns each, through one thread's tile buffer */  \
  void tiles(const Args& a, int64_t t0, int64_t t1, float* buf) {                             \
    const int64_t K = a.K, N = a.N, M = a.M, tile = tile_rows(K);                             \
    for (int64_t t = t0; t < t1; ++t) {                                                       \
      const int64_t n0 = t * tile, nr = std::min(tile, N - n0);                               \
      dequant(a, n0 * K, nr * K, buf);                                                        \
      int64_t m = 0;                                                                          \
      for (; m + kMR <= M; m += kMR) rows<kMR>(a.x + m * K, K, buf, nr, a.out + m * N + n0, N); \
      for (; m < M; ++m) rows<1>(a.x + m * K, K, buf, nr, a.out + m * N + n0, N);              \
    }                                                                                         \
  }                                                                                           \
  /* out = x @ w^T for a float32 w [N, K], w's rows read in place tile by tile (no buffer) */ \
  void plain_run(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K) { \
    const int64_t tile = tile_rows(K);                                                        \
    parallel((N + tile - 1) / tile, [&](int64_t t0, int64_t t1, int64_t) {                    \
      for (int64_t t = t0; t < t1; ++t) {                                                     \
        const int64_t n0 = t * tile, nr = std::min(tile, N - n0);                             \
        int64_t m = 0;                                                                        \
        for (; m + kMR <= M; m += kMR) rows<kMR>(x + m * K, K, w + n0 * K, nr, out + m * N + n0, N); \
        for (; m < M; ++m) rows<1>(x + m * K, K, w + n0 * K, nr, out + m * N + n0, N);        \
      }                                                                                       \
    });                                                                                       \
  }                                                                                           \
  void run(const Args& a) {                                                                   \
    const int64_t tile = tile_rows(a.K);                                                      \
    /* each thread's tile buffer, made before the parallel region (nothing in it may throw) */ \
    std::vector<float> bufs(omp_get_max_threads() * tile * a.K);                              \
    parallel((a.N + tile - 1) / tile, [&](int64_t t0, int64_t t1, int64_t id) {               \
      tiles(a, t0, t1, bufs.data() + id * tile * a.K);                                        \
    });                                                                                       \
  }

// y[m] += scaling[s] * (x[m] A[s]^T) B[s]^T for each row m of slot s = slots[m] >= 0, with A's
// and B^T's first ranks[s] rows: the LoRA term of a decode step, every adapter in one call.
// Rows of one slot go through in groups of up to kGroup, so that a slot's weights are read
// from memory once per group, not once per row; each row meets only its own slot's weights
// (an overflowing adapter's inf stays in its rows).
struct LoraArgs {
  const float* x;
  float* y;
  const float* a;
  const float* bt;
  const float* scaling;
  int64_t M, K, N, R;  // M: rows of x; R: rank rows per slot in a and bt
};

struct Group {
  int64_t slot, rank, first, count;  // rows order[first, first + count)
};

constexpr int kGroup = 4;

#define LORAMUX_LORA_BODY                                                                     \
  /* h[i][jj] = scale * x[i] . w[jj] for G rows and J rank rows at once: G x J independent */ \
  /* accumulators, so the FMAs' latency overlaps (one dot at a time waited on each FMA) */    \
  template <int G, int J>                                                                     \
  inline void dots(const float* const* x, const float* w, int64_t K, float scale, float* h, int64_t ldh) {\
    Vec acc[G][J];                                                                            \
    for (int i = 0; i < G; ++i)                                                               \
      for (int jj = 0; jj < J; ++jj) acc[i][jj] = zero();                                     \
    int64_t k = 0;                                                                            \
    for (; k + kLanes <= K; k += kLanes)                                                      \
      for (int i = 0; i < G; ++i) {                                                           \
        const Vec xv = load(x[i] + k);                                                        \
        for (int jj = 0; jj < J; ++jj) acc[i][jj] = fma(xv, load(w + jj * K + k), acc[i][jj]);\
      }                                                                                       \
    for (int i = 0; i < G; ++i)                                                               \
      for (int jj = 0; jj < J; ++jj) {                                                        \
        float sum = hsum(acc[i][jj]);                                                         \
        for (int64_t kk = k; kk < K; ++kk) sum += x[i][kk] * w[jj * K + kk];                  \
        h[i * ldh + jj] = scale * sum;                                                        \
      }                                                                                       \
  }                                                                                           \
  /* h[i][j] = scale * x[row i] . A[j] for the group's G rows and the slot's ranks */         \
  template <int G>                                                                            \
  inline void lora_down(const LoraArgs& a, const Group& g, const int64_t* rows, float* h) {   \
    constexpr int J = G >= 3 ? 2 : 8 / G;                                                     \
    const float* w = a.a + g.slot * a.R * a.K;                                                \
    const float* x[G];                                                                        \
    for (int i = 0; i < G; ++i) x[i] = a.x + rows[i] * a.K;                                   \
    int64_t j = 0;                                                                            \
    for (; j + J <= g.rank; j += J) dots<G, J>(x, w + j * a.K, a.K, a.scaling[g.slot], h + j, g.rank);\
    for (; j < g.rank; ++j) dots<G, 1>(x, w + j * a.K, a.K, a.scaling[g.slot], h + j, g.rank);\
  }                                                                                           \
  /* y[row i][n0, n1) += h[i] B^T for the group's G rows, one rank row of B^T after another: */ \
  /* the slot's rank rows are adjacent, so over a whole row of outputs they are read as one */ \
  /* stream (column blocks across the rank rows read it as rank short streams: ~20 GB/s against */ \
  /* ~30 on this VM); each output still takes its terms in rank order, into y in L1 */        \
  template <int G>                                                                            \
  inline void lora_up(const LoraArgs& a, const Group& g, const int64_t* rows, const float* h, \
                      int64_t n0, int64_t n1) {                                               \
    float* y[G];                                                                              \
    for (int i = 0; i < G; ++i) y[i] = a.y + rows[i] * a.N;                                   \
    for (int64_t j = 0; j < g.rank; ++j) {                                                    \
      const float* b = a.bt + (g.slot * a.R + j) * a.N;                                       \
      Vec hv[G];                                                                              \
      for (int i = 0; i < G; ++i) hv[i] = bcast(h[i * g.rank + j]);                           \
      int64_t n = n0;                                                                         \
      for (; n + kLanes <= n1; n += kLanes) {                                                 \
        const Vec bv = load(b + n);                                                           \
        for (int i = 0; i < G; ++i) store(y[i] + n, fma(hv[i], bv, load(y[i] + n)));          \
      }                                                                                       \
      for (; n < n1; ++n)                                                                     \
        for (int i = 0; i < G; ++i) y[i][n] += h[i * g.rank + j] * b[n];                      \
    }                                                                                         \
  }                                                                                           \
  /* the down (`up` false) or up products of one group, [n0, n1) of the outputs for up */      \
  inline void lora_part(const LoraArgs& a, const Group& g, const int64_t* order, float* h, bool up, \
                        int64_t n0, int64_t n1) {                                             \
    const int64_t* rows = order + g.first;                                                    \
    switch (g.count) {                                                                        \
      case 1: up ? lora_up<1>(a, g, rows, h, n0, n1) : lora_down<1>(a, g, rows, h); break;    \
      case 2: up ? lora_up<2>(a, g, rows, h, n0, n1) : lora_down<2>(a, g, rows, h); break;    \
      case 3: up ? lora_up<3>(a, g, rows, h, n0, n1) : lora_down<3>(a, g, rows, h); break;    \
      default: up ? lora_up<kGroup>(a, g, rows, h, n0, n1) : lora_down<kGroup>(a, g, rows, h); \
    }                                                                                         \
  }                                                                                           \
  void lora_run(const LoraArgs& a, const std::vector<Group>& groups, const int64_t* order) {  \
    /* each thread's h, made before the parallel region (nothing in it may throw) */          \
    std::vector<float> hs(omp_get_max_threads() * kGroup * a.R);                              \
    parallel(static_cast<int64_t>(groups.size()), [&](int64_t g0, int64_t g1, int64_t id) {   \
      float* h = hs.data() + id * kGroup * a.R;                                               \
      for (int64_t t = g0; t < g1; ++t) {                                                     \
        lora_part(a, groups[t], order, h, false, 0, 0);                                       \
        lora_part(a, groups[t], order, h, true, 0, a.N);                                      \
      }                                                                                       \
    });                                                                                       \
  }                                                                                           \
  /* a product over `nt` output tiles (`tiles(t0, t1, buf)`, a buffer of `bufsize` floats */ \
  /* per thread) and lora_run's term in one parallel region: each thread's tiles and the h of */ \
  /* its share of the groups; once every tile is there, the term of those groups over every */ \
  /* column (a slot's B^T read as one stream, as in lora_run; split by columns, each thread */  \
  /* read every slot's rank rows in short pieces, ~1.3x slower on SmolLM2's shapes) */         \
  template <class Tiles>                                                                      \
  void fused_tiles(int64_t nt, int64_t bufsize, const LoraArgs& l, const std::vector<Group>& groups, \
                   const int64_t* order, const Tiles& tiles) {                                \
    const int64_t ng = static_cast<int64_t>(groups.size());                                   \
    std::vector<float> bufs(omp_get_max_threads() * bufsize), hs(std::max<int64_t>(1, l.M * l.R)); \
    auto term = [&](int64_t g0, int64_t g1, bool up) {                                        \
      for (int64_t t = g0; t < g1; ++t)                                                       \
        lora_part(l, groups[t], order, hs.data() + groups[t].first * l.R, up, 0, l.N);        \
    };                                                                                        \
    if (omp_in_parallel() || omp_get_max_threads() == 1) {                                    \
      tiles(0, nt, bufs.data());                                                              \
      term(0, ng, false);                                                                     \
      return term(0, ng, true);                                                               \
    }                                                                                         \
    _Pragma("omp parallel")                                                                   \
    {                                                                                         \
      const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();                  \
      const int64_t gc = (ng + team - 1) / team, g0 = std::min(ng, id * gc), g1 = std::min(ng, g0 + gc); \
      const int64_t tc = (nt + team - 1) / team, t0 = std::min(nt, id * tc);                  \
      tiles(t0, std::min(nt, t0 + tc), bufs.data() + id * bufsize);                           \
      term(g0, g1, false);                                                                    \
      _Pragma("omp barrier")                                                                  \
      term(g0, g1, true);                                                                     \
    }                                                                                         \
  }                                                                                           \
  void fused_run(const Args& a, const LoraArgs& l, const std::vector<Group>& groups, const int64_t* order) { \
    const int64_t tile = tile_rows(a.K);                                                      \
    fused_tiles((a.N + tile - 1) / tile, tile * a.K, l, groups, order,                        \
                [&](int64_t t0, int64_t t1, float* buf) { tiles(a, t0, t1, buf); });          \
  }

namespace avx2 {
LORAMUX_AVX2_BEGIN
using namespace loramux::avx2;
constexpr int kMR = 4, kNR = 3;
inline Vec lookup(__m256i c, Vec lo, Vec hi) {
  // Codes 0-7 from lo, 8-15 from hi: bit 3 moved to the sign bit picks the half.
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c),
                          _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}
struct Lut {
  Vec lo, hi;
};
inline Lut make_lut(const float* code) { return {_mm256_loadu_ps(code), _mm256_loadu_ps(code + 8)}; }
inline Lut scaled(const Lut& lut, float scale) {
  const Vec s = _mm256_set1_ps(scale);
  return {_mm256_mul_ps(lut.lo, s), _mm256_mul_ps(lut.hi, s)};
}
// 16 codes (one per byte) -> their values in `lut` (already x scale), into dst.
inline void put16(__m128i codes, const Lut& lut, float* dst) {
  _mm256_storeu_ps(dst, lookup(_mm256_cvtepu8_epi32(codes), lut.lo, lut.hi));
  _mm256_storeu_ps(dst + 8, lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)), lut.lo, lut.hi));
}
LORAMUX_KERNEL_BODY
LORAMUX_LORA_BODY

// Panels (AVX2): W's rows in groups of kPanel, each group stored k-major (`panels_4bit`), so
// that one k of a panel is 8 bytes of codes and its dequantized values are two vectors of
// output columns. The product then broadcasts x[m][k] against them (an outer product: the
// accumulators are outputs, no horizontal sums) and a panel's values, dequantized once into a
// buffer, serve every row of x. Each weight is still bitsandbytes' product code x scale.
constexpr int64_t kPanel = 16;
constexpr int kPanelMR = 6;  // rows of x a micro-step: 12 accumulators, 2 weight vectors, 1 broadcast

struct PanelArgs {
  const float* x;
  const uint8_t* packed;  // [N / kPanel][K][8]: byte i = row i's code | row (i + 8)'s code << 4
  const float* absmax;    // [N / kPanel][K / blocksize][kPanel]
  const float* code;
  float* out;
  int64_t M, N, K, blocksize;
};

// Panel p's weights as float32, [K][kPanel].
inline void panel_dequant(const PanelArgs& a, int64_t p, float* dst) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const Vec lo = load(a.code), hi = load(a.code + 8);
  const int64_t blocks = a.K / a.blocksize;
  const uint8_t* src = a.packed + p * a.K * 8;
  const float* scales = a.absmax + p * blocks * kPanel;
  for (int64_t b = 0; b < blocks; ++b, scales += kPanel) {
    const Vec s0 = load(scales), s1 = load(scales + 8);
    for (int64_t k = 0; k < a.blocksize; ++k, src += 8, dst += kPanel) {
      const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      const __m256i c0 = _mm256_cvtepu8_epi32(_mm_and_si128(c, mask));
      const __m256i c1 = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(c, 4), mask));
      store(dst, mul(lookup(c0, lo, hi), s0));
      store(dst + 8, mul(lookup(c1, lo, hi), s1));
    }
  }
}

// out[i][0, kPanel) = x[i] . w[:, j] for MR rows of x against one dequantized panel.
template <int MR>
inline void panel_rows(const float* x, int64_t K, const float* w, float* out, int64_t ldo) {
  Vec acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = zero();
  for (int64_t k = 0; k < K; ++k, w += kPanel) {
    const Vec w0 = load(w), w1 = load(w + 8);
    for (int i = 0; i < MR; ++i) {
      const Vec xv = bcast(x[i * K + k]);
      acc[i][0] = fma(xv, w0, acc[i][0]);
      acc[i][1] = fma(xv, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    store(out + i * ldo, acc[i][0]);
    store(out + i * ldo + 8, acc[i][1]);
  }
}

// out[m0, m1) x panel's columns for rows of x in near-equal micro-steps (28 rows: 6, 6, 6, 5,
// 5): fewer than 5 rows leave the FMAs' latency bare.
inline void panel_block(const PanelArgs& a, const float* w, int64_t p, int64_t m0, int64_t m1) {
  const int64_t K = a.K, N = a.N, steps = (m1 - m0 + kPanelMR - 1) / kPanelMR;
  for (int64_t s = 0, m = m0; s < steps; ++s) {
    const int64_t rows = (m1 - m) / (steps - s);  // the rest, spread over the steps left
    const float* x = a.x + m * K;
    float* out = a.out + m * N + p * kPanel;
    switch (rows) {
      case 1: panel_rows<1>(x, K, w, out, N); break;
      case 2: panel_rows<2>(x, K, w, out, N); break;
      case 3: panel_rows<3>(x, K, w, out, N); break;
      case 4: panel_rows<4>(x, K, w, out, N); break;
      case 5: panel_rows<5>(x, K, w, out, N); break;
      default: panel_rows<kPanelMR>(x, K, w, out, N);
    }
    m += rows;
  }
}

// Rows of x a panel's values serve before the next panel: x's chunk stays in L2 while every
// panel of the thread passes over it (a panel is dequantized again for each chunk).
constexpr int64_t kPanelChunk = 256;

// Panels [p0, p1) of the output, through one thread's [K][kPanel] buffer.
void panels(const PanelArgs& a, int64_t p0, int64_t p1, float* buf) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kPanelChunk)
    for (int64_t p = p0; p < p1; ++p) {
      panel_dequant(a, p, buf);
      panel_block(a, buf, p, m0, std::min(a.M, m0 + kPanelChunk));
    }
}

// W (N x K, float32) from the panels' layout: each panel dequantized, then its columns written
// out as rows of W.
void panel_weight(const PanelArgs& a, float* w) {
  std::vector<float> bufs(omp_get_max_threads() * a.K * kPanel);
  parallel(a.N / kPanel, [&](int64_t p0, int64_t p1, int64_t id) {
    float* buf = bufs.data() + id * a.K * kPanel;
    for (int64_t p = p0; p < p1; ++p) {
      panel_dequant(a, p, buf);
      for (int64_t j = 0; j < kPanel; ++j)
        for (int64_t k = 0; k < a.K; ++k) w[(p * kPanel + j) * a.K + k] = buf[k * kPanel + j];
    }
  });
}

void panel_run(const PanelArgs& a) {
  std::vector<float> bufs(omp_get_max_threads() * a.K * kPanel);
  parallel(a.N / kPanel, [&](int64_t p0, int64_t p1, int64_t id) { panels(a, p0, p1, bufs.data() + id * a.K * kPanel); });
}

void panel_fused_run(const PanelArgs& a, const LoraArgs& l, const std::vector<Group>& groups, const int64_t* order) {
  fused_tiles(a.N / kPanel, a.K * kPanel, l, groups, order,
              [&](int64_t p0, int64_t p1, float* buf) { panels(a, p0, p1, buf); });
}
LORAMUX_ISA_END
}  // namespace avx2

namespace avx512 {
LORAMUX_AVX512_BEGIN
using namespace loramux::avx512;
constexpr int kMR = 4, kNR = 4;
using Lut = Vec;  // all 16 values in one register
inline Lut make_lut(const float* code) { return _mm512_loadu_ps(code); }
inline Lut scaled(const Lut& lut, float scale) { return _mm512_mul_ps(lut, _mm512_set1_ps(scale)); }
inline void put16(__m128i codes, const Lut& lut, float* dst) {
  _mm512_storeu_ps(dst, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lut));
}
LORAMUX_KERNEL_BODY
LORAMUX_LORA_BODY
LORAMUX_ISA_END
}  // namespace avx512

// The 4-bit product's arguments, checked; `out` still to be set.
Args base_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
               int64_t blocksize, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "absmax: contiguous float32");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16, "code: 16 float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 16 == 0 && blocksize % 16 == 0, "K and the block size must be multiples of 16");
  TORCH_CHECK(packed.numel() * 2 == N * K && absmax.numel() * blocksize >= N * K, "W is N x K");
  return Args{x.data_ptr<float>(), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(),
              nullptr, M, N, K, blocksize};
}

at::Tensor linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const at::Tensor& code, int64_t blocksize, int64_t N, bool wide) {
  Args a = base_args(x, packed, absmax, code, blocksize, N);
  auto out = at::empty({a.M, N}, x.options());
  a.out = out.data_ptr<float>();
  check_isa(wide);
  if (wide) avx512::run(a); else avx2::run(a);
  return out;
}

// bitsandbytes' 4-bit weight (N x K, flat, high nibble first; a float32 scale per block of
// the flat array) in the panels' layout: (packed, absmax) for `linear_4bit_panels`. Needs
// N % 16 == 0 and K % blocksize == 0 (a block never spans two rows of W).
std::vector<at::Tensor> panels_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t N) {
  using avx2::kPanel;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "absmax: contiguous float32");
  TORCH_CHECK(N > 0 && N % kPanel == 0 && (packed.numel() * 2) % N == 0, "N must divide the weight, in 16s");
  const int64_t K = packed.numel() * 2 / N;
  TORCH_CHECK(blocksize > 0 && K % blocksize == 0 && absmax.numel() == N * K / blocksize,
              "K must be whole blocks of the scales");
  const int64_t blocks = K / blocksize;
  auto out = at::empty({packed.numel()}, packed.options());
  auto scales = at::empty({absmax.numel()}, absmax.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* am = absmax.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  float* sc = scales.data_ptr<float>();
  auto code = [&](int64_t row, int64_t k) {
    const int64_t e = row * K + k;
    return e % 2 == 0 ? src[e / 2] >> 4 : src[e / 2] & 0x0F;
  };
  parallel(N / kPanel, [&](int64_t p0, int64_t p1, int64_t) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < 8; ++i)
          dst[(p * K + k) * 8 + i] = static_cast<uint8_t>(code(p * kPanel + i, k) | code(p * kPanel + i + 8, k) << 4);
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t j = 0; j < kPanel; ++j) sc[(p * blocks + b) * kPanel + j] = am[(p * kPanel + j) * blocks + b];
    }
  });
  return {out, scales};
}

avx2::PanelArgs panel_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& code, int64_t blocksize, int64_t N) {
  const Args a = base_args(x, packed, absmax, code, blocksize, N);
  TORCH_CHECK(N % avx2::kPanel == 0 && a.K % blocksize == 0, "panels need N % 16 == 0 and whole blocks per row");
  TORCH_CHECK(absmax.numel() * blocksize == N * a.K, "absmax: one scale per block");
  check_isa(false);
  return {a.x, a.packed, a.absmax, a.code, nullptr, a.M, N, a.K, blocksize};
}

// out = the float32 weight [N, K] of a weight in the panels' layout: bitsandbytes' dequantize.
void dequantize_panels(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                       int64_t blocksize, int64_t N, const at::Tensor& out) {
  TORCH_CHECK(N > 0 && (packed.numel() * 2) % N == 0, "N must divide the weight");
  const int64_t K = packed.numel() * 2 / N;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == N * K, "out: float32 N x K");
  avx2::PanelArgs a = panel_args(at::empty({0, K}, absmax.options()), packed, absmax, code, blocksize, N);
  avx2::panel_weight(a, out.data_ptr<float>());
}

// linear_4bit for a weight in the panels' layout (`panels_4bit`; AVX2).
at::Tensor linear_4bit_panels(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, int64_t N) {
  avx2::PanelArgs a = panel_args(x, packed, absmax, code, blocksize, N);
  auto out = at::empty({a.M, N}, x.options());
  a.out = out.data_ptr<float>();
  avx2::panel_run(a);
  return out;
}

// x @ w^T for a float32 weight w [N, K] (an output head), K a multiple of 16.
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, bool wide) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "w: contiguous float32 [N, K]");
  TORCH_CHECK(x.size(1) % 16 == 0, "K must be a multiple of 16");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  auto out = at::empty({M, N}, x.options());
  check_isa(wide);
  if (wide) avx512::plain_run(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), M, N, K);
  else avx2::plain_run(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), M, N, K);
  return out;
}

// The groups of up to kGroup rows of one slot, rows sorted by slot (bare rows, slot < 0, left out).
std::vector<Group> lora_groups(const int64_t* slots, const int64_t* ranks, int64_t M, int64_t S,
                               std::vector<int64_t>& order) {
  order.resize(M);
  for (int64_t m = 0; m < M; ++m) order[m] = m;
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return slots[i] < slots[j]; });
  std::vector<Group> groups;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t s = slots[order[i]];
    TORCH_CHECK(s < S, "slot ", s, " out of range");
    if (s < 0 || ranks[s] == 0) continue;
    if (groups.empty() || groups.back().slot != s || groups.back().count == kGroup)
      groups.push_back({s, ranks[s], i, 0});
    ++groups.back().count;
  }
  return groups;
}

// The LoRA term's arguments for x [M, K] into y [M, N], checked; its row groups into `groups`.
LoraArgs lora_args(const at::Tensor& x, float* y, int64_t N, const at::Tensor& a, const at::Tensor& bt,
                   const at::Tensor& scaling, const at::Tensor& slots, const at::Tensor& ranks,
                   std::vector<Group>& groups, std::vector<int64_t>& order) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.dim() == 3 && a.size(2) == x.size(1),
              "a: contiguous float32 [S, R, K]");
  TORCH_CHECK(bt.scalar_type() == at::kFloat && bt.is_contiguous() && bt.dim() == 3 && bt.size(2) == N &&
              bt.size(0) == a.size(0) && bt.size(1) == a.size(1), "bt: contiguous float32 [S, R, N]");
  TORCH_CHECK(scaling.scalar_type() == at::kFloat && scaling.is_contiguous() && scaling.numel() == a.size(0),
              "scaling: float32 [S]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots: int64 [M]");
  TORCH_CHECK(ranks.scalar_type() == at::kLong && ranks.is_contiguous() && ranks.numel() == a.size(0),
              "ranks: int64 [S]");
  const int64_t S = a.size(0), R = a.size(1);
  const int64_t* rk = ranks.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(rk[s] >= 0 && rk[s] <= R, "rank of slot ", s, " out of range");
  groups = lora_groups(slots.data_ptr<int64_t>(), rk, x.size(0), S, order);
  return LoraArgs{x.data_ptr<float>(), y, a.data_ptr<float>(), bt.data_ptr<float>(), scaling.data_ptr<float>(),
                  x.size(0), x.size(1), N, R};
}

void lora_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const at::Tensor& bt,
               const at::Tensor& scaling, const at::Tensor& slots, const at::Tensor& ranks, bool wide) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0),
              "y: contiguous float32 [M, N]");
  std::vector<Group> groups;
  std::vector<int64_t> order;
  const LoraArgs args = lora_args(x, y.data_ptr<float>(), y.size(1), a, bt, scaling, slots, ranks, groups, order);
  check_isa(wide);
  if (wide) avx512::lora_run(args, groups, order.data()); else avx2::lora_run(args, groups, order.data());
}

// linear_4bit(x, ...) + the LoRA term lora_rows adds, in one parallel region (the same sums
// in the same order: the same numbers as the two calls).
at::Tensor linear_4bit_lora(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, int64_t blocksize, int64_t N, bool wide, const at::Tensor& a,
                            const at::Tensor& bt, const at::Tensor& scaling, const at::Tensor& slots,
                            const at::Tensor& ranks) {
  Args base = base_args(x, packed, absmax, code, blocksize, N);
  auto out = at::empty({base.M, N}, x.options());
  base.out = out.data_ptr<float>();
  std::vector<Group> groups;
  std::vector<int64_t> order;
  const LoraArgs lora = lora_args(x, base.out, N, a, bt, scaling, slots, ranks, groups, order);
  check_isa(wide);
  if (wide) avx512::fused_run(base, lora, groups, order.data()); else avx2::fused_run(base, lora, groups, order.data());
  return out;
}

// linear_4bit_panels + lora_rows' term in one parallel region, as linear_4bit_lora.
at::Tensor linear_4bit_panels_lora(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                   const at::Tensor& code, int64_t blocksize, int64_t N, const at::Tensor& a,
                                   const at::Tensor& bt, const at::Tensor& scaling, const at::Tensor& slots,
                                   const at::Tensor& ranks) {
  avx2::PanelArgs base = panel_args(x, packed, absmax, code, blocksize, N);
  auto out = at::empty({base.M, N}, x.options());
  base.out = out.data_ptr<float>();
  std::vector<Group> groups;
  std::vector<int64_t> order;
  const LoraArgs lora = lora_args(x, base.out, N, a, bt, scaling, slots, ranks, groups, order);
  avx2::panel_fused_run(base, lora, groups, order.data());
  return out;
}

}  // namespace

TORCH_LIBRARY(loramux, m) {
  m.def("linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int N, bool wide) -> Tensor");
  m.def("lora_rows(Tensor x, Tensor(a!) y, Tensor a, Tensor bt, Tensor scaling, Tensor slots, Tensor ranks, "
        "bool wide) -> ()");
  m.def("linear_4bit_lora(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int N, bool wide, "
        "Tensor a, Tensor bt, Tensor scaling, Tensor slots, Tensor ranks) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor w, bool wide) -> Tensor");
  m.def("panels_4bit(Tensor packed, Tensor absmax, int blocksize, int N) -> Tensor[]");
  m.def("dequantize_panels(Tensor packed, Tensor absmax, Tensor code, int blocksize, int N, Tensor(a!) out) -> ()");
  m.def("linear_4bit_panels(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int N) -> Tensor");
  m.def("linear_4bit_panels_lora(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int N, "
        "Tensor a, Tensor bt, Tensor scaling, Tensor slots, Tensor ranks) -> Tensor");
}
TORCH_LIBRARY_IMPL(loramux, CPU, m) {
  m.impl("linear_4bit", &linear_4bit);
  m.impl("lora_rows", &lora_rows);
  m.impl("linear_4bit_lora", &linear_4bit_lora);
  m.impl("linear_f32", &linear_f32);
  m.impl("panels_4bit", &panels_4bit);
  m.impl("dequantize_panels", &dequantize_panels);
  m.impl("linear_4bit_panels", &linear_4bit_panels);
  m.impl("linear_4bit_panels_lora", &linear_4bit_panels_lora);
}
