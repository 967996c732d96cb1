// Native CPU backend of the eagle2_kernels ops: declarations shared by the op files and
// the bindings. Every function has the semantics of eagle2_kernels/ops/<op>/reference.py
// (the specification); shapes use the package's letters (B batch, T tree nodes, ...).
//
// Only light ATen headers here: each op file compiles on its own, and build time counts.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

namespace eagle2 {

using at::Tensor;

// logits [B,R,V] f16/bf16/f32, parent_scores [B,R] f32, draft_to_target [V] int64 or none ->
// child_tokens [B,R,K] i64, child_scores [B,R,K] f32, next_index [B,K] i64, next_scores [B,K] f32.
std::tuple<Tensor, Tensor, Tensor, Tensor> tree_expand(
    const Tensor& logits, const Tensor& parent_scores, int64_t top_k,
    const std::optional<Tensor>& draft_to_target);

// cand_* [B,C], root_tokens [B] -> tokens [B,T] i64, parents [B,T] i32, depth [B,T] i32,
// mask [B,T,W] i32, error codes [B] i32 (1: a kept candidate's parent was dropped, 2: some
// parent index is not in [-1, own index); the caller raises).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tree_build(
    const Tensor& cand_tokens, const Tensor& cand_scores, const Tensor& cand_parents,
    const Tensor& root_tokens, int64_t total_tokens);

// q [B,Hq,Tq,Dh], caches [B,Hkv,Lmax,Dh], prefix_len [B], tree_mask [B,Tq,W] -> out like q;
// optional sliding window, logit softcap and per-head sinks [Hq].
Tensor tree_attention(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& prefix_len,
    const Tensor& tree_mask, int64_t tree_len, std::optional<double> scale,
    std::optional<int64_t> window, std::optional<double> softcap,
    const std::optional<Tensor>& sinks);

// tokens [B,T], parents [B,T], target_logits [B,T,V] -> path [B,T] i64, accept_len [B] i64,
// bonus [B] i64.
std::tuple<Tensor, Tensor, Tensor> verify_greedy(
    const Tensor& tokens, const Tensor& parents, const Tensor& target_logits);

// One step of the sampling walk of one sequence at node `cur`: tokens, parents, uniforms
// [T] rows, probs [V] f32 the processed target distribution at `cur`. Returns
// (accepted child, -1) or (-1, bonus token drawn from the residual distribution).
std::tuple<int64_t, int64_t> verify_sample_step(
    const Tensor& tokens, const Tensor& parents, const Tensor& probs, const Tensor& uniforms,
    int64_t cur);

// cache [N,B,Hkv,Lmax,Dh] (in place), prefix_len [B], path [B,T], accept_len [B].
void kv_compact(
    const Tensor& cache, const Tensor& prefix_len, const Tensor& path, const Tensor& accept_len);

// Hot loops are compiled for AVX-512 and AVX2+FMA as well as the baseline, and the best one
// the CPU supports is picked at load time (GCC/Clang function multiversioning on x86-64
// Linux); elsewhere the baseline build only.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define EAGLE2_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EAGLE2_SIMD_CLONES
#endif

namespace detail {

// exp(x) for float32, branch-free so that loops over it vectorise (std::exp does not).
// Range reduction x = n*ln2 + r, |r| <= ln2/2, then a degree-6 polynomial (Cephes expf):
// relative error about 2e-7. Returns exactly 0 below -87.3 (so exp(-inf) = 0) and +inf above 88.7.
inline float exp_approx(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.7f ? 88.7f : xc;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (vectorises without SSE4.1).
  const float n = (xc * kLog2e + 12582912.0f) - 12582912.0f;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n through the exponent bits; n is in [-126, 128] after the clamp.
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.7f ? INFINITY : y;
  return y;
}

// Reductions written lane-wise (kLanes independent partial results, combined at the end)
// so that they vectorise without -ffast-math; inline them into EAGLE2_SIMD_CLONES functions.
constexpr int kLanes = 16;

__attribute__((always_inline)) inline float max_of(const float* __restrict x, int64_t n) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = -INFINITY;
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
  for (int64_t i = whole; i < n; ++i) acc[0] = x[i] > acc[0] ? x[i] : acc[0];
  float m = acc[0];
  for (int j = 1; j < kLanes; ++j) m = acc[j] > m ? acc[j] : m;
  return m;
}

// sum_i exp(x[i] - shift), float32 partial sums per lane.
__attribute__((always_inline)) inline float sum_exp_of(const float* __restrict x, int64_t n,
                                                       float shift) {
  float acc[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += exp_approx(x[i + j] - shift);
  for (int64_t i = whole; i < n; ++i) acc[0] += exp_approx(x[i] - shift);
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Reads element i of a 1-D/flattened int32 or int64 CPU tensor as int64 (the ops accept both).
struct IntReader {
  const void* ptr = nullptr;
  bool is64 = true;
  int64_t s0 = 1, s1 = 0;
  IntReader() = default;
  explicit IntReader(const Tensor& t) : ptr(t.data_ptr()), is64(t.scalar_type() == at::kLong) {
    s0 = t.dim() > 0 ? t.stride(0) : 0;
    s1 = t.dim() > 1 ? t.stride(1) : 0;
  }
  int64_t operator()(int64_t i) const {
    return is64 ? static_cast<const int64_t*>(ptr)[i * s0]
                : static_cast<const int32_t*>(ptr)[i * s0];
  }
  int64_t operator()(int64_t i, int64_t j) const {
    return is64 ? static_cast<const int64_t*>(ptr)[i * s0 + j * s1]
                : static_cast<const int32_t*>(ptr)[i * s0 + j * s1];
  }
};

// Common input checks with messages that name the op and the bad value.
inline void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "eagle2.", op, ": ", name,
              " must be a CPU tensor for the native backend, got device ", t.device());
}

inline void check_int(const char* op, const char* name, const Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "eagle2.", op, ": ",
              name, " must be int32 or int64, got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, "eagle2.", op, ": ", name, " must be ", layout, ", got shape ",
              t.sizes());
}

}  // namespace detail
}  // namespace eagle2
