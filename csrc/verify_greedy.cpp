// verify_greedy: walk the tree from the root, accepting the child whose token is the target
// argmax at the current node. The argmax is computed only at the nodes the walk visits.
#include "eagle2.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <limits>
#include <vector>

namespace eagle2 {
namespace {

constexpr int64_t kChunk = 512;

// Max of x[0:n] and whether a NaN occurs (torch.argmax treats NaN as the maximum).
EAGLE2_SIMD_CLONES
float chunk_max_nan(const float* __restrict x, int64_t n, bool* has_nan) {
  int nan[detail::kLanes] = {};
  const int64_t whole = n - n % detail::kLanes;
  for (int64_t i = 0; i < whole; i += detail::kLanes)
    for (int j = 0; j < detail::kLanes; ++j) nan[j] |= x[i + j] != x[i + j];
  for (int64_t i = whole; i < n; ++i) nan[0] |= x[i] != x[i];
  int any = 0;
  for (int j = 0; j < detail::kLanes; ++j) any |= nan[j];
  *has_nan = any != 0;
  return detail::max_of(x, n);
}

// First index of the maximum (the first NaN if any), like torch.argmax.
template <typename scalar_t>
int64_t argmax_first(const scalar_t* row, int64_t V, float* buf) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_i = 0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row + c0;
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[c0 + i]);
      x = buf;
    }
    bool nan;
    const float cm = chunk_max_nan(x, n, &nan);
    if (nan) {
      for (int64_t i = 0; i < n; ++i)
        if (x[i] != x[i]) return c0 + i;
    }
    if (cm > best) {  // strictly greater: an equal max in a later chunk loses
      for (int64_t i = 0; i < n; ++i) {
        if (x[i] == cm) {
          best_i = c0 + i;
          break;
        }
      }
      best = cm;
    }
  }
  return best_i;
}

template <typename scalar_t>
void walk(const detail::IntReader& tok, const detail::IntReader& par, const Tensor& logits,
          int64_t b, int64_t T, int64_t* path, int64_t* accept_len, int64_t* bonus,
          std::vector<float>& buf) {
  const int64_t V = logits.size(2);
  const scalar_t* base = logits.data_ptr<scalar_t>() + b * logits.stride(0);
  const int64_t srow = logits.stride(1);
  for (int64_t i = 0; i < T; ++i) path[i] = -1;
  path[0] = 0;
  int64_t cur = 0, len = 1;
  int64_t best = argmax_first(base, V, buf.data());
  // Children come after their parent, so one pass in index order visits them all.
  for (int64_t i = 1; i < T; ++i) {
    if (par(b, i) == cur && tok(b, i) == best) {
      path[len++] = i;
      cur = i;
      best = argmax_first(base + i * srow, V, buf.data());
    }
  }
  *accept_len = len;
  *bonus = best;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> verify_greedy(const Tensor& tokens, const Tensor& parents,
                                                 const Tensor& target_logits) {
  constexpr const char* op = "verify_greedy";
  detail::check_int(op, "tokens", tokens);
  detail::check_int(op, "parents", parents);
  detail::check_dim(op, "tokens", tokens, 2, "[B, T]");
  detail::check_cpu(op, "target_logits", target_logits);
  detail::check_dim(op, "target_logits", target_logits, 3, "[B, T, V]");
  const int64_t B = tokens.size(0), T = tokens.size(1);
  TORCH_CHECK_VALUE(parents.sizes() == tokens.sizes(), "eagle2.verify_greedy: parents ",
                    parents.sizes(), " must have the shape of tokens ", tokens.sizes());
  TORCH_CHECK_VALUE(target_logits.size(0) == B && target_logits.size(1) == T &&
                        target_logits.size(2) >= 1,
                    "eagle2.verify_greedy: target_logits must be [B=", B, ", T=", T,
                    ", V>=1], got ", target_logits.sizes());
  const auto st = target_logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "eagle2.verify_greedy: target_logits must be float32, float16 or bfloat16, got ", st);
  // Rows are read through their strides; only the vocabulary dim must be contiguous.
  const Tensor logits = target_logits.stride(2) == 1 ? target_logits : target_logits.contiguous();
  auto opts = tokens.options().dtype(at::kLong);
  Tensor path = at::empty({B, T}, opts), accept_len = at::empty({B}, opts),
         bonus = at::empty({B}, opts);
  const detail::IntReader tok(tokens), par(parents);
  int64_t* pa = path.data_ptr<int64_t>();
  int64_t* al = accept_len.data_ptr<int64_t>();
  int64_t* bo = bonus.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kChunk);
    for (int64_t b = begin; b < end; ++b) {
      if (st == at::kFloat)
        walk<float>(tok, par, logits, b, T, pa + b * T, al + b, bo + b, buf);
      else if (st == at::kHalf)
        walk<at::Half>(tok, par, logits, b, T, pa + b * T, al + b, bo + b, buf);
      else
        walk<at::BFloat16>(tok, par, logits, b, T, pa + b * T, al + b, bo + b, buf);
    }
  });
  return {path, accept_len, bonus};
}

}  // namespace eagle2
