// tree_build: keep the T-1 best candidates (ties to the lower candidate index), number them
// in candidate order after the root, and lay out tokens, parents, depth and the packed
// ancestor mask. Plain loops over a few hundred candidates per sequence.
#include "eagle2.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace eagle2 {

namespace {
constexpr int32_t kErrParentDropped = 1;  // a kept candidate's parent was not kept
constexpr int32_t kErrParentInvalid = 2;  // some candidate's parent is not in [-1, own index)
}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> tree_build(
    const Tensor& cand_tokens, const Tensor& cand_scores_in, const Tensor& cand_parents,
    const Tensor& root_tokens, int64_t total_tokens) {
  constexpr const char* op = "tree_build";
  detail::check_int(op, "cand_tokens", cand_tokens);
  detail::check_int(op, "cand_parents", cand_parents);
  detail::check_int(op, "root_tokens", root_tokens);
  detail::check_cpu(op, "cand_scores", cand_scores_in);
  detail::check_dim(op, "cand_scores", cand_scores_in, 2, "[B, C]");
  const int64_t B = cand_scores_in.size(0), C = cand_scores_in.size(1);
  TORCH_CHECK_VALUE(cand_tokens.sizes() == cand_scores_in.sizes() &&
                        cand_parents.sizes() == cand_scores_in.sizes(),
                    "eagle2.tree_build: cand_tokens ", cand_tokens.sizes(), " and cand_parents ",
                    cand_parents.sizes(), " must have the shape of cand_scores ",
                    cand_scores_in.sizes());
  TORCH_CHECK_VALUE(root_tokens.dim() == 1 && root_tokens.size(0) == B,
                    "eagle2.tree_build: root_tokens must be [B=", B, "], got ",
                    root_tokens.sizes());
  TORCH_CHECK_VALUE(total_tokens >= 2 && total_tokens <= C + 1, "eagle2.tree_build: total_tokens=",
                    total_tokens, " must be in [2, C + 1 = ", C + 1, "]");
  const int64_t T = total_tokens, W = (T + 31) / 32;
  const Tensor scores = cand_scores_in.to(at::kFloat).contiguous();  // exact for f16/bf16

  auto opts = scores.options();
  Tensor tokens = at::empty({B, T}, opts.dtype(at::kLong));
  Tensor parents = at::empty({B, T}, opts.dtype(at::kInt));
  Tensor depth = at::empty({B, T}, opts.dtype(at::kInt));
  Tensor mask = at::zeros({B, T, W}, opts.dtype(at::kInt));
  Tensor codes = at::empty({B}, opts.dtype(at::kInt));
  const detail::IntReader ctok(cand_tokens), cpar(cand_parents), rtok(root_tokens);
  const float* sc_all = scores.data_ptr<float>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  int32_t* par = parents.data_ptr<int32_t>();
  int32_t* dep = depth.data_ptr<int32_t>();
  uint32_t* msk = reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>());
  int32_t* code = codes.data_ptr<int32_t>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(C), node_of(C);
    for (int64_t b = begin; b < end; ++b) {
      const float* sc = sc_all + b * C;
      int32_t err = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = cpar(b, c);
        if (p < -1 || p >= c) err |= kErrParentInvalid;
      }
      // The T-1 best scores, ties to the lower index, then back in candidate order.
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + (T - 1), order.end(),
                        [sc](int64_t x, int64_t y) {
                          return sc[x] > sc[y] || (sc[x] == sc[y] && x < y);
                        });
      std::sort(order.begin(), order.begin() + (T - 1));
      std::fill(node_of.begin(), node_of.end(), -1);
      for (int64_t m = 0; m < T - 1; ++m) node_of[order[m]] = m + 1;

      int64_t* tk = tok + b * T;
      int32_t* pa = par + b * T;
      int32_t* de = dep + b * T;
      uint32_t* mk = msk + b * T * W;
      tk[0] = rtok(b);
      pa[0] = -1;
      de[0] = 0;
      mk[0] = 1u;
      for (int64_t i = 1; i < T; ++i) {
        const int64_t c = order[i - 1];
        int64_t p = cpar(b, c);
        if (p < -1 || p >= c) p = -1;  // reported as invalid; treated as the root
        const int64_t pn = p < 0 ? 0 : node_of[p];
        tk[i] = ctok(b, c);
        pa[i] = static_cast<int32_t>(pn);
        if (pn < 0) {  // the parent was dropped: no ancestors to inherit
          err |= kErrParentDropped;
          de[i] = 0;
        } else {
          // pn < i: kept candidates are in candidate order and a parent precedes its child.
          de[i] = de[pn] + 1;
          for (int64_t w = 0; w < W; ++w) mk[i * W + w] = mk[pn * W + w];
        }
        mk[i * W + i / 32] |= 1u << (i % 32);
      }
      code[b] = err;
    }
  });
  return {tokens, parents, depth, mask, codes};
}

}  // namespace eagle2
