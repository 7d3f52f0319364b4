// Binary (sign) products of packed MoBiE experts on CPU, without dequantizing: the fallback the CPU-deployment
// issue allows when inductor cannot reach the target. Without AVX-512 the loops run scalar (correct, not fast;
// the Python side then prefers inductor's path).
//
// Signs along the reduction dim (the main planes) use lookup tables, T-MAC style: for each activation row and
// each group of 4 inputs, the 16 signed sums +-x0 +-x1 +-x2 +-x3 form one 16-float table, and a nibble of sign
// bits picks one entry. A 16x16 block of sign words (16 output rows) is transposed in registers so that each
// vector lane holds one output row's word; vpermps then looks up 16 rows' nibbles in one table at once: 64
// weights per lookup and add, about 3x the rate of one masked add per 16 weights (measured on Zen 4, where
// merge-masked adds issue at half the rate of plain ones). The sums are exact sums of +-x in fp32.
//
// Signs along the output dim (the salient plane): each 16-bit half of a sign word is loaded straight into a mask
// register and selects the lanes of one masked add: sum_t s_t v_t = 2 * sum_{s_t = +1} v_t - sum_t v_t.
//
// Rows are pairs (token, expert) with expert ids[i]; sorted by expert, consecutive rows of one expert share each
// loaded sign word. Work items are (run of <= 4 rows of one expert, block of output rows), spread over threads
// (torch's runtime: the same libgomp.so.1), so experts that get no rows cost nothing.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define MOBIE_AVX512 1
#else
#define MOBIE_AVX512 0
#endif
#if MOBIE_AVX512 && defined(__AVX512BW__) && defined(__GFNI__)
#define MOBIE_GFNI 1  // the salient plane's bits are transposed by gf2p8affine, then looked up like the main planes
#else
#define MOBIE_GFNI 0
#endif

namespace {

constexpr int64_t kMaxP = 4;    // activation rows per chunk, salient plane (accumulators per output tile)
constexpr int64_t kLutP = 8;    // activation rows per chunk, main planes (tables per chunk)
constexpr int64_t kBlock = 256;  // output rows per work item, main planes

struct Item {
  int64_t expert, row0, rows, out0, outs;  // activation rows [row0, row0+rows), outputs [out0, out0+outs)
};

// Runs of equal expert ids (sorted ids give one run per expert), cut into chunks of <= kMaxP rows and blocks of
// outputs.
std::vector<Item> make_items(const at::Tensor& ids, int64_t E, int64_t m, int64_t block, int64_t max_rows) {
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t S = ids.numel();
  std::vector<Item> items;
  for (int64_t r = 0; r < S;) {
    TORCH_CHECK(id[r] >= 0 && id[r] < E, "mobie_cpu: expert id ", id[r], " out of range [0, ", E, ")");
    int64_t rows = 1;
    while (rows < max_rows && r + rows < S && id[r + rows] == id[r]) ++rows;
    for (int64_t o = 0; o < m; o += block) items.push_back({id[r], r, rows, o, std::min(block, m - o)});
    r += rows;
  }
  return items;
}

#if MOBIE_AVX512
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// The 16 x 16 int32 block r[i] = row i, words 0..15 becomes r[j] = word j of rows 0..15 (lane i = row i).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// Tables of P activation rows: T[p][g][n] = sum_b (bit b of n ? x : -x)[p, 4g + b] for groups g < K / 4.
template <int P>
void build_tables(const float* x, int64_t K, float* T) {
  const __m512 s0 = _mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
  const __m512 s1 = _mm512_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1);
  const __m512 s2 = _mm512_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1);
  const __m512 s3 = _mm512_setr_ps(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1);
  const int64_t G = K / 4;
  for (int p = 0; p < P; ++p)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + p * K + 4 * g;
      __m512 t = _mm512_mul_ps(_mm512_set1_ps(xg[0]), s0);
      t = _mm512_fmadd_ps(_mm512_set1_ps(xg[1]), s1, t);
      t = _mm512_fmadd_ps(_mm512_set1_ps(xg[2]), s2, t);
      t = _mm512_fmadd_ps(_mm512_set1_ps(xg[3]), s3, t);
      _mm512_storeu_ps(T + (p * G + g) * 16, t);
    }
}

// One 16-row block of layout A over words [w0, w0 + cnt): acc[p] += sum over those words (lanes = rows).
template <int P>
inline void lut_block(const int32_t* words, int64_t nw, const float* T, int64_t G, int64_t r, int nr, int64_t w0,
                      int cnt, __m512 acc[P]) {
  const __mmask16 lm = static_cast<__mmask16>((1u << cnt) - 1u);
  __m512i v[16];
  for (int i = 0; i < 16; ++i)
    v[i] = i < nr ? _mm512_maskz_loadu_epi32(lm, words + (r + i) * nw + w0) : _mm512_setzero_si512();
  transpose16(v);
  for (int j = 0; j < cnt; ++j) {
    __m512i idx = v[j];
    const float* t = T + (w0 + j) * 8 * 16;
    for (int k = 0; k < 8; ++k) {
      for (int p = 0; p < P; ++p)
        acc[p] = _mm512_add_ps(acc[p], _mm512_permutexvar_ps(idx, _mm512_loadu_ps(t + p * G * 16 + k * 16)));
      idx = _mm512_srli_epi32(idx, 4);
    }
  }
}

// Layout A (signs along the reduction dim): out[p, r] = sum_j s[r, j] x[p, j] for the P rows of one chunk and
// outputs [r0, r1); words: [m, nw] int32 of one expert; T: the chunk's tables (K = 32 * nw).
// Decode (P <= 2) is bound by reading the words: each 16-row block is read whole and in order (the next block is
// prefetched), with the sums in registers. Larger chunks are bound by the table reads: blocks of 16 words
// (512 inputs) are then the outer loop, so their slice of the tables (P x 8 KB) stays in L1 while every 16-row
// block of the item reads it, and the partial sums wait in out.
template <int P>
void sign_rows_a(const int32_t* words, int64_t nw, const float* T, int64_t r0, int64_t r1, float* out, int64_t ldo) {
  const int64_t G = 8 * nw;
  if constexpr (P <= 2) {
    for (int64_t r = r0; r < r1; r += 16) {
      const int nr = static_cast<int>(std::min<int64_t>(16, r1 - r));
      const char* next = reinterpret_cast<const char*>(words + std::min(r + 16, r1) * nw);
      const char* end = reinterpret_cast<const char*>(words + std::min(r + 32, r1) * nw);
      for (const char* q = next; q < end; q += 64) _mm_prefetch(q, _MM_HINT_T0);
      __m512 acc[P];
      for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_ps();
      for (int64_t w0 = 0; w0 < nw; w0 += 16)
        lut_block<P>(words, nw, T, G, r, nr, w0, static_cast<int>(std::min<int64_t>(16, nw - w0)), acc);
      const __mmask16 sm = static_cast<__mmask16>((1u << nr) - 1u);
      for (int p = 0; p < P; ++p) _mm512_mask_storeu_ps(out + p * ldo + r, sm, acc[p]);
    }
  } else {
    for (int64_t w0 = 0; w0 < nw; w0 += 16) {
      const int cnt = static_cast<int>(std::min<int64_t>(16, nw - w0));
      for (int64_t r = r0; r < r1; r += 16) {
        const int nr = static_cast<int>(std::min<int64_t>(16, r1 - r));
        const __mmask16 sm = static_cast<__mmask16>((1u << nr) - 1u);
        __m512 acc[P];
        for (int p = 0; p < P; ++p) acc[p] = w0 ? _mm512_maskz_loadu_ps(sm, out + p * ldo + r) : _mm512_setzero_ps();
        lut_block<P>(words, nw, T, G, r, nr, w0, cnt, acc);
        for (int p = 0; p < P; ++p) _mm512_mask_storeu_ps(out + p * ldo + r, sm, acc[p]);
      }
    }
  }
}

// Layout B (signs along the output dim, the salient plane): out[i, r] = sum_t s[t, r] v[i, t] for outputs
// [o0, o0 + 16 * nv) of one expert; words: [s, mw] int32.
template <int P>
void sign_rows_b(const int32_t* words, int64_t s, int64_t mw, const float* v, int64_t ldv, const float* vsum,
                 int64_t o0, int64_t o1, float* out, int64_t ldo) {
  // 16 / P tiles of 16 outputs: at decode one pass over the slots covers 256 outputs (32 bytes of each slot's
  // words), so the words are read once, in order; the slot 8 ahead is prefetched
  constexpr int kV = 16 / P;
  for (int64_t o = o0; o < o1; o += 16 * kV) {
    const int nv = static_cast<int>(std::min<int64_t>(kV, (o1 - o + 15) / 16));
    __m512 acc[kV][P];
    for (int a = 0; a < kV; ++a)
      for (int p = 0; p < P; ++p) acc[a][p] = _mm512_setzero_ps();
    for (int64_t t = 0; t < s; ++t) {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(words + t * mw) + o / 16;
      if (t + 8 < s) _mm_prefetch(reinterpret_cast<const char*>(w + 8 * 2 * mw), _MM_HINT_T0);
      __m512 vb[P];
      for (int p = 0; p < P; ++p) vb[p] = _mm512_set1_ps(v[p * ldv + t]);
      for (int a = 0; a < nv; ++a) {
        __mmask16 mk = _load_mask16(const_cast<__mmask16*>(reinterpret_cast<const __mmask16*>(w + a)));
        for (int p = 0; p < P; ++p) acc[a][p] = _mm512_mask_add_ps(acc[a][p], mk, acc[a][p], vb[p]);
      }
    }
    for (int a = 0; a < nv; ++a)
      for (int p = 0; p < P; ++p) {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, _mm512_sub_ps(_mm512_add_ps(acc[a][p], acc[a][p]), _mm512_set1_ps(vsum[p])));
        const int64_t base = o + 16 * a;
        const int64_t cnt = std::min<int64_t>(16, o1 - base);
        std::memcpy(out + p * ldo + base, tmp, cnt * sizeof(float));
      }
  }
}
#if MOBIE_GFNI
// Tables of P activation rows for the salient plane, 8 slots per group g: T[p][g][0] indexed by the low nibble
// (bit k = slot 8g + 7 - k), T[p][g][1] by the high nibble (bit k = slot 8g + 3 - k); slots past s count 0.
template <int P>
void build_tables_b(const float* v, int64_t ldv, int64_t s, float* T) {
  const __m512 s0 = _mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
  const __m512 s1 = _mm512_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1);
  const __m512 s2 = _mm512_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1);
  const __m512 s3 = _mm512_setr_ps(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1);
  const int64_t NG = (s + 7) / 8;
  for (int p = 0; p < P; ++p)
    for (int64_t g = 0; g < NG; ++g) {
      float x[8];
      for (int i = 0; i < 8; ++i) x[i] = 8 * g + i < s ? v[p * ldv + 8 * g + i] : 0.f;
      for (int h = 0; h < 2; ++h) {
        const float* y = x + (h ? 0 : 4);  // low nibble: slots 7..4, high nibble: slots 3..0
        __m512 t = _mm512_mul_ps(_mm512_set1_ps(y[3]), s0);
        t = _mm512_fmadd_ps(_mm512_set1_ps(y[2]), s1, t);
        t = _mm512_fmadd_ps(_mm512_set1_ps(y[1]), s2, t);
        t = _mm512_fmadd_ps(_mm512_set1_ps(y[0]), s3, t);
        _mm512_storeu_ps(T + ((p * NG + g) * 2 + h) * 16, t);
      }
    }
}

// 8 rows of 64 bytes (512 outputs of 8 slots) -> G[j]: byte i of 128-bit quarter q holds output 128 q + 16 j + i,
// with slot t at bit 7 - t (three unpack stages, then gf2p8affine transposes each 8 x 8 bit block).
inline void transpose_bits(const __m512i R[8], __m512i G[8]) {
  __m512i a[8], b[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm512_unpacklo_epi8(R[2 * i], R[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi8(R[2 * i], R[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) {
      b[4 * i + 2 * h] = _mm512_unpacklo_epi16(a[4 * i + h], a[4 * i + 2 + h]);
      b[4 * i + 2 * h + 1] = _mm512_unpackhi_epi16(a[4 * i + h], a[4 * i + 2 + h]);
    }
  for (int k = 0; k < 4; ++k) {
    a[2 * k] = _mm512_unpacklo_epi32(b[k], b[4 + k]);
    a[2 * k + 1] = _mm512_unpackhi_epi32(b[k], b[4 + k]);
  }
  const __m512i eye = _mm512_set1_epi64(static_cast<long long>(0x8040201008040201ULL));
  for (int j = 0; j < 8; ++j) G[j] = _mm512_gf2p8affine_epi64_epi8(eye, a[j], 0);
}

// Layout B by lookup: out[p, r] = sum_t s[t, r] v[p, t] for outputs [o0, o1) (o0 a multiple of 512, o1 - o0 <=
// 512), words [s, mw] of one expert, T from build_tables_b. Sums wait in acc (P x 512 floats).
template <int P>
void sign_rows_b_lut(const int32_t* words, int64_t s, int64_t mw, const float* T, int64_t o0, int64_t o1, float* out,
                     int64_t ldo) {
  const int64_t NG = (s + 7) / 8, wo = o0 / 32;
  const int cnt = static_cast<int>(std::min<int64_t>(16, mw - wo));
  const __mmask16 lm = static_cast<__mmask16>((1u << cnt) - 1u);
  const int nu = static_cast<int>((o1 - o0 + 15) / 16);  // 16-output vectors in use
  alignas(64) float acc[P][512];
  for (int p = 0; p < P; ++p) std::memset(acc[p], 0, sizeof(acc[p]));
  for (int64_t g = 0; g < NG; ++g) {
    __m512i R[8], G[8];
    for (int i = 0; i < 8; ++i) {
      const int64_t t = 8 * g + i;
      R[i] = t < s ? _mm512_maskz_loadu_epi32(lm, words + t * mw + wo) : _mm512_setzero_si512();
      if (t + 16 < s) _mm_prefetch(reinterpret_cast<const char*>(words + (t + 16) * mw + wo), _MM_HINT_T0);
    }
    transpose_bits(R, G);
    __m512 tl[P], th[P];
    for (int p = 0; p < P; ++p) {
      tl[p] = _mm512_loadu_ps(T + ((p * NG + g) * 2) * 16);
      th[p] = _mm512_loadu_ps(T + ((p * NG + g) * 2 + 1) * 16);
    }
    for (int q = 0; q < 4; ++q)
      for (int j = 0; j < 8; ++j) {
        const int u = 8 * q + j;
        if (u >= nu) continue;
        __m128i bytes;
        switch (q) {
          case 0: bytes = _mm512_extracti32x4_epi32(G[j], 0); break;
          case 1: bytes = _mm512_extracti32x4_epi32(G[j], 1); break;
          case 2: bytes = _mm512_extracti32x4_epi32(G[j], 2); break;
          default: bytes = _mm512_extracti32x4_epi32(G[j], 3); break;
        }
        const __m512i lo = _mm512_cvtepu8_epi32(bytes);
        const __m512i hi = _mm512_srli_epi32(lo, 4);
        for (int p = 0; p < P; ++p) {
          __m512 a = _mm512_load_ps(acc[p] + 16 * u);
          a = _mm512_add_ps(a, _mm512_permutexvar_ps(lo, tl[p]));
          a = _mm512_add_ps(a, _mm512_permutexvar_ps(hi, th[p]));
          _mm512_store_ps(acc[p] + 16 * u, a);
        }
      }
  }
  // acc vector u = 8 q + j holds outputs o0 + 128 q + 16 j .. + 15
  for (int u = 0; u < nu; ++u) {
    const int64_t base = o0 + 16 * u;
    const int n = static_cast<int>(std::min<int64_t>(16, o1 - base));
    const __mmask16 sm = static_cast<__mmask16>((1u << n) - 1u);
    for (int p = 0; p < P; ++p) _mm512_mask_storeu_ps(out + p * ldo + base, sm, _mm512_load_ps(acc[p] + 16 * u));
  }
}
#endif

#else
template <int P>
void build_tables(const float* x, int64_t K, float* T) {
  const int64_t G = K / 4;
  for (int p = 0; p < P; ++p)
    for (int64_t g = 0; g < G; ++g)
      for (int n = 0; n < 16; ++n) {
        float t = 0.f;
        for (int b = 0; b < 4; ++b) t += ((n >> b) & 1) ? x[p * K + 4 * g + b] : -x[p * K + 4 * g + b];
        T[(p * G + g) * 16 + n] = t;
      }
}

template <int P>
void sign_rows_a(const int32_t* words, int64_t nw, const float* T, int64_t r0, int64_t r1, float* out, int64_t ldo) {
  const int64_t G = 8 * nw;
  for (int64_t r = r0; r < r1; ++r)
    for (int p = 0; p < P; ++p) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g)
        acc += T[(p * G + g) * 16 + ((static_cast<uint32_t>(words[r * nw + g / 8]) >> (4 * (g % 8))) & 15u)];
      out[p * ldo + r] = acc;
    }
}

template <int P>
void sign_rows_b(const int32_t* words, int64_t s, int64_t mw, const float* v, int64_t ldv, const float* vsum,
                 int64_t o0, int64_t o1, float* out, int64_t ldo) {
  for (int64_t o = o0; o < o1; ++o)
    for (int p = 0; p < P; ++p) {
      float acc = 0.f;
      for (int64_t t = 0; t < s; ++t)
        if ((static_cast<uint32_t>(words[t * mw + o / 32]) >> (o % 32)) & 1u) acc += v[p * ldv + t];
      out[p * ldo + o] = 2.0f * acc - vsum[p];
    }
}
#endif

// run(item, P) with the item's row count (1..MaxP) as a compile-time constant.
template <int MaxP, typename F>
void with_rows(const Item& it, F&& run) {
  switch (it.rows) {
    case 1: run(it, std::integral_constant<int, 1>()); break;
    case 2: run(it, std::integral_constant<int, 2>()); break;
    case 3: run(it, std::integral_constant<int, 3>()); break;
    case 4: run(it, std::integral_constant<int, 4>()); break;
    default:
      if constexpr (MaxP > 4) {
        switch (it.rows) {
          case 5: run(it, std::integral_constant<int, 5>()); break;
          case 6: run(it, std::integral_constant<int, 6>()); break;
          case 7: run(it, std::integral_constant<int, 7>()); break;
          default: run(it, std::integral_constant<int, 8>()); break;
        }
      }
  }
}

// Runs the items over torch's threads: each thread takes one contiguous range, so the items of one chunk
// (its output blocks) mostly meet in one thread; begin(chunk row) runs when the chunk changes.
template <int MaxP, typename B, typename F>
void for_items(const std::vector<Item>& items, B&& begin, F&& run) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    int64_t current = -1;
    auto state = begin();
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      with_rows<MaxP>(it, [&](const Item& i, auto P) { run(state, i, P, i.row0 != current); });
      current = it.row0;
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& words, const at::Tensor& ids, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(words.dim() == 3 && words.scalar_type() == at::kInt && words.is_contiguous(), op,
              ": words must be a contiguous [E, rows, words] int32 tensor");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() == x.size(0),
              op, ": ids must be a contiguous int64 [S] tensor (one expert id per row of x)");
  TORCH_CHECK(x.device().is_cpu() && words.device().is_cpu(), op, ": CPU tensors expected");
}

// out [S, m]: out[i, r] = sum_j s[ids[i], r, j] x[i, j], x [S, 32 * nw] (zero padded past the input dim).
at::Tensor sign_mm(const at::Tensor& x, const at::Tensor& words, const at::Tensor& ids) {
  check(x, words, ids, "mobie_cpu::sign_mm");
  const int64_t S = x.size(0), K = x.size(1), m = words.size(1), nw = words.size(2);
  TORCH_CHECK(K == 32 * nw, "mobie_cpu::sign_mm: x has ", K, " columns, expected ", 32 * nw, " (32 per sign word, zero padded)");
  at::Tensor out = at::empty({S, m}, x.options());
  auto items = make_items(ids, words.size(0), m, kBlock, kLutP);
  const float* xp = x.data_ptr<float>();
  const int32_t* wp = words.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  for_items<kLutP>(
      items, [&] { return std::vector<float>(kLutP * 8 * nw * 16); },
      [&](std::vector<float>& T, const Item& it, auto P, bool new_chunk) {
        if (new_chunk) build_tables<P()>(xp + it.row0 * K, K, T.data());
        sign_rows_a<P()>(wp + it.expert * m * nw, nw, T.data(), it.out0, it.out0 + it.outs, op + it.row0 * m, m);
      });
  return out;
}

// out [S, m]: out[i, r] = sum_t s[ids[i], t, r] v[i, t], words [E, s, mw] with the output dim packed (m <= 32 mw).
at::Tensor sign_mm_t(const at::Tensor& v, const at::Tensor& words, const at::Tensor& ids, int64_t m) {
  check(v, words, ids, "mobie_cpu::sign_mm_t");
  const int64_t S = v.size(0), s = v.size(1), mw = words.size(2);
  TORCH_CHECK(words.size(1) == s && m <= 32 * mw, "mobie_cpu::sign_mm_t: v [S, ", words.size(1),
              "] and m <= ", 32 * mw, " expected, got v with ", s, " columns and m = ", m);
  at::Tensor out = at::empty({S, m}, v.options());
  const float* vp = v.data_ptr<float>();
  const int32_t* wp = words.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
#if MOBIE_GFNI
  const int64_t NG = (s + 7) / 8;
  auto items = make_items(ids, words.size(0), m, 512, kLutP);
  for_items<kLutP>(
      items, [&] { return std::vector<float>(kLutP * NG * 2 * 16); },
      [&](std::vector<float>& T, const Item& it, auto P, bool new_chunk) {
        if (new_chunk) build_tables_b<P()>(vp + it.row0 * s, s, s, T.data());
        sign_rows_b_lut<P()>(wp + it.expert * s * mw, s, mw, T.data(), it.out0, it.out0 + it.outs, op + it.row0 * m, m);
      });
#else
  at::Tensor vsum = v.sum(1);
  const float* vs = vsum.data_ptr<float>();
  auto items = make_items(ids, words.size(0), m, 256, kMaxP);
  for_items<kMaxP>(items, [] { return 0; }, [&](int, const Item& it, auto P, bool) {
    sign_rows_b<P()>(wp + it.expert * s * mw, s, mw, vp + it.row0 * s, s, vs + it.row0, it.out0, it.out0 + it.outs,
                     op + it.row0 * m, m);
  });
#endif
  return out;
}

bool has_avx512() { return MOBIE_AVX512 != 0; }

}  // namespace

TORCH_LIBRARY(mobie_cpu, lib) {
  lib.def("sign_mm(Tensor x, Tensor words, Tensor ids) -> Tensor");
  lib.def("sign_mm_t(Tensor v, Tensor words, Tensor ids, int m) -> Tensor");
  lib.def("has_avx512() -> bool", &has_avx512);
}

TORCH_LIBRARY_IMPL(mobie_cpu, CPU, lib) {
  lib.impl("sign_mm", &sign_mm);
  lib.impl("sign_mm_t", &sign_mm_t);
}
