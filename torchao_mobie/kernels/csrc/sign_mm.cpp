// Binary (sign) products of packed MoBiE experts on CPU, without dequantizing: the fallback the CPU-deployment
// issue allows when inductor cannot reach the target. With AVX-512 each 16-bit half of a packed int32 sign word
// is loaded straight into a mask register and selects the lanes of one masked add, so 16 weights cost one
// instruction per activation row: sum_j s_j x_j = 2 * sum_{s_j = +1} x_j - sum_j x_j. Without AVX-512 the same
// loops run scalar (correct, not fast; the Python side then prefers inductor's path).
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

namespace {

constexpr int64_t kMaxP = 4;    // activation rows per chunk (accumulators per output row)
constexpr int64_t kRows = 4;    // output rows per register tile (layout A)
constexpr int64_t kBlock = 64;  // output rows per work item

struct Item {
  int64_t expert, row0, rows, out0, outs;  // activation rows [row0, row0+rows), outputs [out0, out0+outs)
};

// Runs of equal expert ids (sorted ids give one run per expert), cut into chunks of <= kMaxP rows and blocks of
// outputs.
std::vector<Item> make_items(const at::Tensor& ids, int64_t E, int64_t m, int64_t block) {
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t S = ids.numel();
  std::vector<Item> items;
  for (int64_t r = 0; r < S;) {
    TORCH_CHECK(id[r] >= 0 && id[r] < E, "mobie_cpu: expert id ", id[r], " out of range [0, ", E, ")");
    int64_t rows = 1;
    while (rows < kMaxP && r + rows < S && id[r + rows] == id[r]) ++rows;
    for (int64_t o = 0; o < m; o += block) items.push_back({id[r], r, rows, o, std::min(block, m - o)});
    r += rows;
  }
  return items;
}

#if MOBIE_AVX512
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// Layout A (signs along the reduction dim): out[i, r] = sum_j s[r, j] x[i, j] for rows i of one chunk.
// words: [m, nw] int32 of one expert; x: rows of K = 32 * nw floats (zero padded).
template <int P>
void sign_rows_a(const int32_t* words, int64_t nw, const float* x, int64_t K, const float* xsum, int64_t r0,
                 int64_t r1, float* out, int64_t ldo) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    __m512 acc[kRows][P];
    for (int a = 0; a < kRows; ++a)
      for (int p = 0; p < P; ++p) acc[a][p] = _mm512_setzero_ps();
    const uint16_t* w[kRows];
    for (int a = 0; a < kRows; ++a) w[a] = reinterpret_cast<const uint16_t*>(words + (r + a) * nw);
    for (int64_t h = 0; h < 2 * nw; ++h) {  // 16 columns per half word
      __m512 xv[P];
      for (int p = 0; p < P; ++p) xv[p] = _mm512_loadu_ps(x + p * K + 16 * h);
      for (int a = 0; a < kRows; ++a) {
        __mmask16 mk = _load_mask16(const_cast<__mmask16*>(reinterpret_cast<const __mmask16*>(w[a] + h)));
        for (int p = 0; p < P; ++p) acc[a][p] = _mm512_mask_add_ps(acc[a][p], mk, acc[a][p], xv[p]);
      }
    }
    for (int a = 0; a < kRows; ++a)
      for (int p = 0; p < P; ++p) out[p * ldo + r + a] = 2.0f * hsum(acc[a][p]) - xsum[p];
  }
  for (; r < r1; ++r) {
    __m512 acc[P];
    for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_ps();
    const uint16_t* w = reinterpret_cast<const uint16_t*>(words + r * nw);
    for (int64_t h = 0; h < 2 * nw; ++h) {
      __mmask16 mk = _load_mask16(const_cast<__mmask16*>(reinterpret_cast<const __mmask16*>(w + h)));
      for (int p = 0; p < P; ++p) acc[p] = _mm512_mask_add_ps(acc[p], mk, acc[p], _mm512_loadu_ps(x + p * K + 16 * h));
    }
    for (int p = 0; p < P; ++p) out[p * ldo + r] = 2.0f * hsum(acc[p]) - xsum[p];
  }
}

// Layout B (signs along the output dim, the salient plane): out[i, r] = sum_t s[t, r] v[i, t] for outputs
// [o0, o0 + 16 * nv) of one expert; words: [s, mw] int32.
template <int P>
void sign_rows_b(const int32_t* words, int64_t s, int64_t mw, const float* v, int64_t ldv, const float* vsum,
                 int64_t o0, int64_t o1, float* out, int64_t ldo) {
  constexpr int kV = 4;  // 64 outputs per tile
  for (int64_t o = o0; o < o1; o += 16 * kV) {
    const int nv = static_cast<int>(std::min<int64_t>(kV, (o1 - o + 15) / 16));
    __m512 acc[kV][P];
    for (int a = 0; a < kV; ++a)
      for (int p = 0; p < P; ++p) acc[a][p] = _mm512_setzero_ps();
    for (int64_t t = 0; t < s; ++t) {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(words + t * mw) + o / 16;
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
#else
template <int P>
void sign_rows_a(const int32_t* words, int64_t nw, const float* x, int64_t K, const float* xsum, int64_t r0,
                 int64_t r1, float* out, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r)
    for (int p = 0; p < P; ++p) {
      float acc = 0.f;
      for (int64_t j = 0; j < 32 * nw; ++j)
        if ((static_cast<uint32_t>(words[r * nw + j / 32]) >> (j % 32)) & 1u) acc += x[p * K + j];
      out[p * ldo + r] = 2.0f * acc - xsum[p];
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

// Runs the items over torch's threads; run(item, P) with the item's row count as a compile-time constant.
template <typename F>
void for_items(const std::vector<Item>& items, F&& run) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      switch (it.rows) {
        case 1: run(it, std::integral_constant<int, 1>()); break;
        case 2: run(it, std::integral_constant<int, 2>()); break;
        case 3: run(it, std::integral_constant<int, 3>()); break;
        default: run(it, std::integral_constant<int, 4>()); break;
      }
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
  at::Tensor xsum = x.sum(1);
  auto items = make_items(ids, words.size(0), m, kBlock);
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const int32_t* wp = words.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  for_items(items, [&](const Item& it, auto P) {
    sign_rows_a<P()>(wp + it.expert * m * nw, nw, xp + it.row0 * K, K, xs + it.row0, it.out0, it.out0 + it.outs,
                     op + it.row0 * m, m);
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
  at::Tensor vsum = v.sum(1);
  auto items = make_items(ids, words.size(0), m, 256);
  const float* vp = v.data_ptr<float>();
  const float* vs = vsum.data_ptr<float>();
  const int32_t* wp = words.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  for_items(items, [&](const Item& it, auto P) {
    sign_rows_b<P()>(wp + it.expert * s * mw, s, mw, vp + it.row0 * s, s, vs + it.row0, it.out0, it.out0 + it.outs,
                     op + it.row0 * m, m);
  });
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
