// verify_sample: one step of the lossless multi-draft rejection walk at a node, given the
// processed target distribution there (eagle2_kernels.ops.sampling.process_logits, computed
// in torch so that plain sampling and verification share it bit for bit). The caller
// processes only the rows the walk visits.
#include "eagle2.h"

#include <vector>

namespace eagle2 {

namespace {

EAGLE2_SIMD_CLONES
double sum_double(const float* __restrict p, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]);
  return s;
}

}  // namespace

std::tuple<int64_t, int64_t> verify_sample_step(const Tensor& tokens, const Tensor& parents,
                                                const Tensor& probs_in, const Tensor& uniforms,
                                                int64_t cur) {
  constexpr const char* op = "verify_sample";
  detail::check_int(op, "tokens", tokens);
  detail::check_int(op, "parents", parents);
  detail::check_cpu(op, "probs", probs_in);
  detail::check_cpu(op, "uniforms", uniforms);
  const int64_t T = tokens.numel();
  TORCH_CHECK_VALUE(tokens.dim() == 1 && parents.dim() == 1 && parents.numel() == T &&
                        uniforms.dim() == 1 && uniforms.numel() == T,
                    "eagle2.verify_sample: tokens, parents and uniforms must be [T] rows");
  TORCH_CHECK_VALUE(probs_in.dim() == 1 && probs_in.scalar_type() == at::kFloat,
                    "eagle2.verify_sample: probs must be a [V] float32 row, got ",
                    probs_in.sizes(), " ", probs_in.scalar_type());
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat,
              "eagle2.verify_sample: uniforms must be float32, got ", uniforms.scalar_type());
  TORCH_CHECK_VALUE(cur >= 0 && cur < T, "eagle2.verify_sample: node ", cur, " not in [0, ", T, ")");
  const Tensor probs = probs_in.contiguous();
  const float* p0 = probs.data_ptr<float>();
  const int64_t V = probs.numel();
  const float* u = uniforms.data_ptr<float>();
  const int64_t su = uniforms.stride(0);
  const detail::IntReader tok(tokens), par(parents);

  // The residual distribution is p0 with the rejected tokens zeroed, times `scale`: the
  // reference renormalises p / p.sum() after each rejection, i.e. scale = 1 / (remaining mass).
  std::vector<int64_t> rejected;
  double scale = 1.0, total = -1.0;
  auto residual = [&](int64_t x) -> double {
    if (x < 0 || x >= V) return 0.0;  // a token outside the vocabulary has probability 0
    for (int64_t r : rejected)
      if (r == x) return 0.0;
    return static_cast<double>(p0[x]) * scale;
  };
  for (int64_t i = cur + 1; i < T; ++i) {
    if (par(i) != cur) continue;
    const int64_t x = tok(i);
    const double px = residual(x);
    if (static_cast<double>(u[i * su]) < px) return {i, -1};  // accepted: go one level deeper
    if (px > 0.0) {
      if (total < 0.0) total = sum_double(p0, V);
      rejected.push_back(x);
      double remaining = total;
      for (int64_t r : rejected) remaining -= static_cast<double>(p0[r]);
      scale = 1.0 / remaining;
    }
  }
  // Bonus: inverse CDF of the residual in token-id order, the smallest id whose cumulative
  // probability exceeds u[0]; if rounding leaves none, the last id with nonzero probability.
  const double u0 = static_cast<double>(u[0]);
  double cdf = 0.0;
  int64_t last_nonzero = 0;
  if (rejected.empty()) {
    for (int64_t t = 0; t < V; ++t) {
      const double pt = static_cast<double>(p0[t]);
      cdf += pt;
      if (cdf > u0) return {-1, t};
      if (pt > 0.0) last_nonzero = t;
    }
  } else {
    for (int64_t t = 0; t < V; ++t) {
      const double pt = residual(t);
      cdf += pt;
      if (cdf > u0) return {-1, t};
      if (pt > 0.0) last_nonzero = t;
    }
  }
  return {-1, last_nonzero};
}

}  // namespace eagle2
