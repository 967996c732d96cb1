// y = x @ W^T + b with W in bfloat16 on x86 CPUs that have AVX2 + FMA but no bf16 dot
// instructions (no AVX-512-BF16, no AMX): torch's bf16 matmul there costs ~14 ms per extra
// row of x for a 135M-parameter model (2-core EPYC), so a 16-token verify costs ~10 forwards.
// Here each weight element is widened to fp32 (a 16-bit shift) and multiplied against every
// row of x while it sits in L1: the weights are read from memory once per call whatever the
// number of rows. Up to 4 rows the widening happens in registers as the weights stream by;
// beyond, each block of 3 weight rows is widened once into a buffer that every block of 4 rows
// of x then reads.
//
// Semantics: fp32 products and sums (8 lanes, then a horizontal sum), the bias added in fp32,
// one rounding to x's dtype at the end: what oneDNN's bf16 matmul computes, up to the order
// of the fp32 sum. Registered as torch.ops.eagle2.linear_bf16w (CPU); its fake lives in
// eagle2_kernels/models/matmul.py, which decides per machine, by measuring, whether a model's
// linears use it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define EAGLE2_LINEAR_AVX2 1
#endif

namespace {

#ifdef EAGLE2_LINEAR_AVX2
// Register tile: MR rows of x by NR rows of W (MR * NR accumulators + NR weights + one x
// vector: 16 ymm registers at 4 x 3).
constexpr int kMR = 4;
constexpr int kNR = 3;

__attribute__((target("avx2,fma"), always_inline)) inline __m256 widen(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"), always_inline)) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

__attribute__((target("avx2,fma"), always_inline)) inline __m256 widen(const float* p) {
  return _mm256_loadu_ps(p);  // a weight row widened beforehand
}

inline float bf16_to_float(float f) { return f; }

// out[i * ldo + j] = sum_k x[i * ldx + k] * w[j * ldw + k] for i < MR, j < NR; w in bf16 bits
// (widened here, in registers) or in fp32 (widened beforehand).
template <int MR, int NR, typename w_t>
__attribute__((target("avx2,fma"))) void tile(const float* x, int64_t ldx, const w_t* w,
                                              int64_t ldw, int64_t K, float* out, int64_t ldo) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = widen(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * bf16_to_float(w[j * ldw + kk]);
      out[i * ldo + j] = s;
    }
}

template <typename w_t>
using TileFn = void (*)(const float*, int64_t, const w_t*, int64_t, int64_t, float*, int64_t);

template <int MR, typename w_t>
constexpr TileFn<w_t> tile_for(int nr) {
  return nr == 1 ? tile<MR, 1, w_t> : nr == 2 ? tile<MR, 2, w_t> : tile<MR, 3, w_t>;
}

template <typename w_t>
TileFn<w_t> pick_tile(int mr, int nr) {
  switch (mr) {
    case 1: return tile_for<1, w_t>(nr);
    case 2: return tile_for<2, w_t>(nr);
    case 3: return tile_for<3, w_t>(nr);
    default: return tile_for<4, w_t>(nr);
  }
}

// One row of x (a decode step): 8 weight rows at a time, 8 independent sums in flight.
constexpr int kNR1 = 8;

TileFn<uint16_t> pick_row_tile(int nr) {
  switch (nr) {
    case 1: return tile<1, 1, uint16_t>;
    case 2: return tile<1, 2, uint16_t>;
    case 3: return tile<1, 3, uint16_t>;
    case 4: return tile<1, 4, uint16_t>;
    case 5: return tile<1, 5, uint16_t>;
    case 6: return tile<1, 6, uint16_t>;
    case 7: return tile<1, 7, uint16_t>;
    default: return tile<1, 8, uint16_t>;
  }
}

// Widen n rows of K bf16 weights into fp32 (once per weight block when x has several blocks of
// rows: each widened row is then used by every block from L1).
__attribute__((target("avx2,fma"))) void widen_rows(const uint16_t* w, int64_t ldw, int n, int64_t K,
                                                    float* out) {
  for (int j = 0; j < n; ++j) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + j * K + k, widen(w + j * ldw + k));
    for (; k < K; ++k) out[j * K + k] = bf16_to_float(w[j * ldw + k]);
  }
}

bool cpu_has_avx2_fma() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

// y [M, N] = x [M, K] (fp32, contiguous) @ w [N, K] (bf16 bits, contiguous)^T (+ bias [N]),
// written as fp32 or rounded to bf16 (nearest even). Threads split the weight rows; each
// thread takes NR weight rows at a time (they stay in L1) against every MR-row block of x
// (x stays in L2).
template <typename out_t>
void gemm(const float* x, const uint16_t* w, const float* bias, out_t* y, int64_t M, int64_t N,
          int64_t K) {
  if (M == 1) {
    const int64_t blocks1 = (N + kNR1 - 1) / kNR1;
    const int64_t grain1 = std::max<int64_t>(1, (32768 / std::max<int64_t>(K, 1)) / kNR1);
    at::parallel_for(0, blocks1, grain1, [&](int64_t begin, int64_t end) {
      float acc[kNR1];
      for (int64_t nb = begin; nb < end; ++nb) {
        const int64_t n0 = nb * kNR1;
        const int nr = static_cast<int>(std::min<int64_t>(kNR1, N - n0));
        pick_row_tile(nr)(x, K, w + n0 * K, K, K, acc, kNR1);
        for (int j = 0; j < nr; ++j) y[n0 + j] = static_cast<out_t>(acc[j] + (bias != nullptr ? bias[n0 + j] : 0.0f));
      }
    });
    return;
  }
  const int64_t blocks = (N + kNR - 1) / kNR;
  // Grain: at least ~64 KB of weights per task so that small layers do not pay for threads.
  const int64_t grain = std::max<int64_t>(1, (32768 / std::max<int64_t>(K, 1)) / kNR);
  // One block of rows: widen in registers as the weights stream by. More: widen each weight
  // block once into a per-task buffer that every block of rows then reads from L1.
  const bool buffered = M > kMR;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float acc[kMR * kNR];
    std::vector<float> wbuf(buffered ? kNR * K : 0);
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n0 = nb * kNR;
      const int nr = static_cast<int>(std::min<int64_t>(kNR, N - n0));
      if (buffered) widen_rows(w + n0 * K, K, nr, K, wbuf.data());
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        if (buffered)
          pick_tile<float>(mr, nr)(x + m0 * K, K, wbuf.data(), K, K, acc, kNR);
        else
          pick_tile<uint16_t>(mr, nr)(x + m0 * K, K, w + n0 * K, K, K, acc, kNR);
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < nr; ++j) {
            const float v = acc[i * kNR + j] + (bias != nullptr ? bias[n0 + j] : 0.0f);
            y[(m0 + i) * N + n0 + j] = static_cast<out_t>(v);
          }
      }
    }
  });
}
#endif  // EAGLE2_LINEAR_AVX2

// Rows of x above which the weights are widened to fp32 tensors and the product handed to
// torch's fp32 GEMM (long prefills only: up to 256 rows, the compiled graph's limit, the kernel
// measured faster, 2.3 ms a row against 3.1 for SmolLM2-135M's linears on a 2-core EPYC).
constexpr int64_t kWidenRows = 256;

at::Tensor linear_bf16w(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "linear_bf16w: weight must be 2-D [out, in], got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kBFloat16, "linear_bf16w: weight must be bfloat16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "linear_bf16w: x's last dimension (",
                    x.dim() >= 1 ? x.size(-1) : -1, ") must equal weight's in-features (", weight.size(1), ")");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
                   "linear_bf16w: x must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "linear_bf16w: CPU tensors only");
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
#ifdef EAGLE2_LINEAR_AVX2
  if (cpu_has_avx2_fma() && M <= kWidenRows) {
    TORCH_CHECK_VALUE(!b.has_value() || b->numel() == N, "linear_bf16w: bias must have ", N, " elements, got ",
                      b->numel());
    const at::Tensor w = weight.contiguous();
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
    at::Tensor y = at::empty({M, N}, x.options());
    if (x.scalar_type() == at::kFloat)
      gemm<float>(xf.data_ptr<float>(), wp, bp, y.data_ptr<float>(), M, N, K);
    else
      gemm<at::BFloat16>(xf.data_ptr<float>(), wp, bp, y.data_ptr<at::BFloat16>(), M, N, K);
    return y.view(out_sizes);
  }
#endif
  at::Tensor y = at::matmul(xf, weight.to(at::kFloat).t());
  if (b.has_value()) y.add_(*b);
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eagle2, m) {
  m.def("linear_bf16w(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle2, CPU, m) { m.impl("linear_bf16w", &linear_bf16w); }
