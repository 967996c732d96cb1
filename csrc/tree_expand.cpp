// tree_expand: for each frontier row, one pass over the vocabulary computing the running
// max, the rescaled sum of exponentials (online softmax) and the top-k together; then the
// K best of the R*K children of each sequence.
#include "eagle2.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace eagle2 {
namespace {

constexpr int64_t kChunk = 1024;  // vocabulary elements per chunk: 4 KiB of float32, in L1
constexpr int64_t kSub = 64;      // top-k candidates are searched in sub-blocks of a chunk

EAGLE2_SIMD_CLONES
float chunk_max(const float* __restrict x, int64_t n) { return detail::max_of(x, n); }

EAGLE2_SIMD_CLONES
float chunk_sum_exp(const float* __restrict x, int64_t n, float shift) {
  return detail::sum_exp_of(x, n, shift);
}

EAGLE2_SIMD_CLONES
void bf16_to_float(const uint16_t* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
    std::memcpy(y + i, &bits, sizeof(float));
  }
}

void half_to_float(const at::Half* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
}

// The k largest values seen so far, descending; equal values keep arrival (index) order, so
// scanning indices upward makes ties go to the lower index.
struct TopK {
  int64_t k;
  int64_t size = 0;
  std::vector<float> val;
  std::vector<int64_t> idx;
  explicit TopK(int64_t k_) : k(k_), val(k_), idx(k_) {}
  float threshold() const {
    return size < k ? -std::numeric_limits<float>::infinity() : val[k - 1];
  }
  void push(float v, int64_t i) {
    if (size == k) {
      if (!(v > val[k - 1])) return;  // an equal value with a higher index never enters
    } else {
      ++size;
    }
    int64_t pos = size - 1;
    while (pos > 0 && val[pos - 1] < v) {  // strictly smaller ones move down
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = i;
  }
};

template <typename scalar_t>
void expand_row(const scalar_t* row, int64_t V, TopK& top, float* buf, float& max_out,
                double& sum_out) {
  float m = -std::numeric_limits<float>::infinity();
  double s = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row + c0;
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      bf16_to_float(reinterpret_cast<const uint16_t*>(row + c0), buf, n);
      x = buf;
    } else {
      half_to_float(row + c0, buf, n);
      x = buf;
    }
    const float cm = chunk_max(x, n);
    if (cm > m) {  // online softmax: rescale the running sum to the new max
      if (s > 0.0) s *= std::exp(static_cast<double>(m) - static_cast<double>(cm));
      m = cm;
    }
    if (m > -std::numeric_limits<float>::infinity()) s += chunk_sum_exp(x, n, m);
    // Most chunks hold nothing above the current k-th value: skip them after one compare,
    // and within a chunk skip the sub-blocks whose max is not above it either.
    if (cm > top.threshold() || top.size < top.k) {
      for (int64_t s0 = 0; s0 < n; s0 += kSub) {
        const int64_t ns = std::min(kSub, n - s0);
        if (top.size == top.k && !(chunk_max(x + s0, ns) > top.threshold())) continue;
        for (int64_t i = s0; i < s0 + ns; ++i) {
          if (x[i] > top.threshold() || top.size < top.k) top.push(x[i], c0 + i);
        }
      }
    }
  }
  max_out = m;
  sum_out = s;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> tree_expand(
    const Tensor& logits_in, const Tensor& parent_scores_in, int64_t top_k,
    const std::optional<Tensor>& draft_to_target) {
  constexpr const char* op = "tree_expand";
  detail::check_cpu(op, "logits", logits_in);
  detail::check_dim(op, "logits", logits_in, 3, "[B, R, V]");
  const auto st = logits_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "eagle2.tree_expand: logits must be float32, float16 or bfloat16, got ", st);
  const int64_t B = logits_in.size(0), R = logits_in.size(1), V = logits_in.size(2);
  detail::check_cpu(op, "parent_scores", parent_scores_in);
  TORCH_CHECK_VALUE(parent_scores_in.dim() == 2 && parent_scores_in.size(0) == B &&
                        parent_scores_in.size(1) == R,
                    "eagle2.tree_expand: parent_scores must be [B=", B, ", R=", R, "], got ",
                    parent_scores_in.sizes());
  TORCH_CHECK_VALUE(R >= 1, "eagle2.tree_expand: logits needs at least one row (R >= 1)");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= V, "eagle2.tree_expand: top_k=", top_k,
                    " must be in [1, V=", V, "]");
  Tensor d2t;
  if (draft_to_target.has_value()) {
    d2t = *draft_to_target;
    detail::check_int(op, "draft_to_target", d2t);
    TORCH_CHECK_VALUE(d2t.dim() == 1 && d2t.size(0) == V, "eagle2.tree_expand: draft_to_target ",
                      "must be [V=", V, "], got ", d2t.sizes());
  }
  const Tensor logits = logits_in.contiguous();
  const Tensor parent_scores = parent_scores_in.to(at::kFloat).contiguous();
  const int64_t K = top_k;

  auto opts = logits.options();
  Tensor child_tokens = at::empty({B, R, K}, opts.dtype(at::kLong));
  Tensor child_scores = at::empty({B, R, K}, opts.dtype(at::kFloat));
  Tensor next_index = at::empty({B, K}, opts.dtype(at::kLong));
  Tensor next_scores = at::empty({B, K}, opts.dtype(at::kFloat));
  int64_t* ct = child_tokens.data_ptr<int64_t>();
  float* cs = child_scores.data_ptr<float>();
  const float* ps = parent_scores.data_ptr<float>();
  const detail::IntReader map = d2t.defined() ? detail::IntReader(d2t) : detail::IntReader();

  // Rows are independent: one row per task (each is a pass over V).
  at::parallel_for(0, B * R, 1, [&](int64_t begin, int64_t end) {
    TopK top(K);
    std::vector<float> buf(kChunk);
    for (int64_t row = begin; row < end; ++row) {
      top.size = 0;
      float m;
      double s;
      switch (st) {
        case at::kFloat:
          expand_row(logits.data_ptr<float>() + row * V, V, top, buf.data(), m, s);
          break;
        case at::kBFloat16:
          expand_row(logits.data_ptr<at::BFloat16>() + row * V, V, top, buf.data(), m, s);
          break;
        default:
          expand_row(logits.data_ptr<at::Half>() + row * V, V, top, buf.data(), m, s);
          break;
      }
      // log-softmax of a chosen logit: (x - max) - log(sum exp(x - max)).
      const float log_sum = static_cast<float>(std::log(s));
      for (int64_t j = 0; j < K; ++j) {
        const float logp = (top.val[j] - m) - log_sum;
        cs[row * K + j] = ps[row] + logp;
        ct[row * K + j] = d2t.defined() ? map(top.idx[j]) : top.idx[j];
      }
    }
  });

  // Next frontier: the K best of the R*K children, ties to the lower flat index.
  int64_t* ni = next_index.data_ptr<int64_t>();
  float* ns = next_scores.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(R * K);
    for (int64_t b = begin; b < end; ++b) {
      const float* sc = cs + b * R * K;
      for (int64_t i = 0; i < R * K; ++i) order[i] = i;
      std::partial_sort(order.begin(), order.begin() + K, order.end(),
                        [sc](int64_t a, int64_t c) {
                          return sc[a] > sc[c] || (sc[a] == sc[c] && a < c);
                        });
      for (int64_t j = 0; j < K; ++j) {
        ni[b * K + j] = order[j];
        ns[b * K + j] = sc[order[j]];
      }
    }
  });
  return {child_tokens, child_scores, next_index, next_scores};
}

}  // namespace eagle2
