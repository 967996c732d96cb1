// The compiled decode forward's attention as one native operator: write the new keys and
// values of one layer into the static KV cache, then tree attention over prefix + new slots.
//
// The same contract as the Python operator torch.ops.eagle2.cache_tree_attention
// (eagle2_kernels/models/compiled.py), which a compiled CPU graph calls back into Python
// through the dispatcher: ~250 us a call, 30 calls a forward for SmolLM2-135M, a third of
// a one-token forward on a 2-core EPYC. This one is dispatched in C++ and calls the native
// tree_attention directly. Registered as torch.ops.eagle2.cache_tree_attention_cpu (and the
// draft head's one-layer variant, head_cache_attention_cpu); their fakes (shape functions) are
// registered in Python (models/compiled.py: native_op).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "eagle2.h"

namespace {

at::Tensor cache_tree_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    at::Tensor& kv, int64_t layer, const at::Tensor& prefix_len,
                                    const at::Tensor& tree_mask, double scale,
                                    std::optional<int64_t> window, std::optional<double> softcap,
                                    const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK_VALUE(kv.dim() == 5 && k.dim() == 4 && v.sizes() == k.sizes(),
                    "cache_tree_attention_cpu: kv must be [2L, B, Hkv, Lmax, Dh] and k/v [B, Hkv, n, Dh], got ",
                    kv.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(layer >= 0 && 2 * layer + 1 < kv.size(0), "cache_tree_attention_cpu: layer ", layer,
                    " is outside the cache's ", kv.size(0) / 2, " layers");
  TORCH_CHECK_VALUE(prefix_len.dim() == 1 && prefix_len.size(0) == k.size(0),
                    "cache_tree_attention_cpu: prefix_len must be [B=", k.size(0), "], got ", prefix_len.sizes());
  const int64_t B = k.size(0), n = k.size(2), Lmax = kv.size(3);
  at::Tensor keys = kv.select(0, 2 * layer), values = kv.select(0, 2 * layer + 1);
  const at::Tensor lengths = prefix_len.to(at::kLong).contiguous();
  const int64_t* s0 = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(s0[b] >= 0 && s0[b] + n <= Lmax, "cache_tree_attention_cpu: prefix_len[", b, "]=", s0[b],
                      " plus ", n, " new tokens does not fit the cache's ", Lmax, " slots");
    keys.select(0, b).narrow(1, s0[b], n).copy_(k.select(0, b));
    values.select(0, b).narrow(1, s0[b], n).copy_(v.select(0, b));
  }
  return eagle2::tree_attention(q, keys, values, prefix_len, tree_mask, n, scale, window, softcap, sinks);
}

// The draft head's step (eagle2_kernels/models/compiled_head.py, same contract as the Python
// eagle2::head_cache_attention): k/v [B, Hkv, n, Dh] into the one-layer cache kv [2, B, Hkv,
// Lmax, Dh] at slots slot[b] .., then tree attention over the prefix and tree_len tree slots.
at::Tensor head_cache_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    at::Tensor& kv, const at::Tensor& slot, const at::Tensor& prefix_len,
                                    const at::Tensor& tree_mask, const at::Tensor& tree_len, double scale) {
  TORCH_CHECK_VALUE(kv.dim() == 5 && kv.size(0) == 2 && k.dim() == 4 && v.sizes() == k.sizes(),
                    "head_cache_attention_cpu: kv must be [2, B, Hkv, Lmax, Dh] and k/v [B, Hkv, n, Dh], got ",
                    kv.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(slot.numel() == k.size(0), "head_cache_attention_cpu: slot must have B=", k.size(0),
                    " entries, got ", slot.numel());
  const int64_t B = k.size(0), n = k.size(2), Lmax = kv.size(3);
  at::Tensor keys = kv.select(0, 0), values = kv.select(0, 1);
  const at::Tensor slots = slot.to(at::kLong).contiguous();
  const int64_t* s0 = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(s0[b] >= 0 && s0[b] + n <= Lmax, "head_cache_attention_cpu: slot[", b, "]=", s0[b], " plus ",
                      n, " rows does not fit the cache's ", Lmax, " slots");
    keys.select(0, b).narrow(1, s0[b], n).copy_(k.select(0, b));
    values.select(0, b).narrow(1, s0[b], n).copy_(v.select(0, b));
  }
  return eagle2::tree_attention(q, keys, values, prefix_len, tree_mask, tree_len.item<int64_t>(), scale,
                                std::nullopt, std::nullopt, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eagle2, m) {
  m.def(
      "cache_tree_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, int layer, Tensor prefix_len, "
      "Tensor tree_mask, float scale, int? window=None, float? softcap=None, Tensor? sinks=None) -> Tensor");
  m.def(
      "head_cache_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, Tensor slot, Tensor prefix_len, "
      "Tensor tree_mask, Tensor tree_len, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(eagle2, CPU, m) {
  m.impl("cache_tree_attention_cpu", &cache_tree_attention_cpu);
  m.impl("head_cache_attention_cpu", &head_cache_attention_cpu);
}
