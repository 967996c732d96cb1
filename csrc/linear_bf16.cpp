// y = x @ W^T + b with W in bfloat16 on x86 CPUs that have AVX2 + FMA but no bf16 dot
// instructions (no AVX-512-BF16, no AMX): torch's bf16 matmul there costs ~14 ms per extra
// row of x for a 135M-parameter model (2-core EPYC), so a 16-token verify costs ~10 forwards.
// Here each weight element is widened to fp32 in registers (a 16-bit shift) and multiplied
// against every row of x while it sits in L1: the weights are read from memory once per call
// whatever the number of rows, the way llama.cpp's AVX2 path does it.
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

// out[i * ldo + j] = sum_k x[i * ldx + k] * w[j * ldw + k] for i < MR, j < NR.
template <int MR, int NR>
__attribute__((target("avx2,fma"))) void tile(const float* x, int64_t ldx, const uint16_t* w,
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

using TileFn = void (*)(const float*, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t);

template <int MR>
constexpr TileFn tile_for(int nr) {
  return nr == 1 ? tile<MR, 1> : nr == 2 ? tile<MR, 2> : tile<MR, 3>;
}

TileFn pick_tile(int mr, int nr) {
  switch (mr) {
    case 1: return tile_for<1>(nr);
    case 2: return tile_for<2>(nr);
    case 3: return tile_for<3>(nr);
    default: return tile_for<4>(nr);
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
  const int64_t blocks = (N + kNR - 1) / kNR;
  // Grain: at least ~64 KB of weights per task so that small layers do not pay for threads.
  const int64_t grain = std::max<int64_t>(1, (32768 / std::max<int64_t>(K, 1)) / kNR);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float acc[kMR * kNR];
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n0 = nb * kNR;
      const int nr = static_cast<int>(std::min<int64_t>(kNR, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        pick_tile(mr, nr)(x + m0 * K, K, w + n0 * K, K, K, acc, kNR);
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

// Rows of x above which the weights are widened once to fp32 and the product handed to
// torch's fp32 GEMM (prefill: compute-bound, where a tuned GEMM beats the streaming kernel).
constexpr int64_t kWidenRows = 128;

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
