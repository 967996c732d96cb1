// tree_attention: attention of Tq query rows over the committed cache prefix (all visible)
// and a tree region (visible per the packed mask), with GQA. One task per (sequence, query
// head); keys are visited in blocks with an online softmax, first the prefix, then the tree.
#include "eagle2.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <limits>
#include <vector>

namespace eagle2 {
namespace {

constexpr int64_t kBlock = 64;  // keys per block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Online-softmax update of one query row with one block of kBlock keys.
//   q [Dh] (already scaled), kt [Dh, kBlock] (keys transposed), vb [kBlock, Dh],
//   visible [kBlock] (0 = masked; padding keys past the end are masked too),
//   m, l: running max and sum of exp; o [Dh]: running unnormalised output.
EAGLE2_SIMD_CLONES
void update_row(const float* __restrict q, const float* __restrict kt,
                const float* __restrict vb, const uint8_t* __restrict visible, int64_t Dh,
                float* __restrict m, float* __restrict l, float* __restrict o) {
  float s[kBlock];
  for (int64_t k = 0; k < kBlock; ++k) s[k] = 0.0f;
  for (int64_t d = 0; d < Dh; ++d) {
    const float qd = q[d];
    const float* krow = kt + d * kBlock;
    for (int64_t k = 0; k < kBlock; ++k) s[k] += qd * krow[k];
  }
  float mb = kNegInf;
  for (int64_t k = 0; k < kBlock; ++k) {
    s[k] = visible[k] ? s[k] : kNegInf;
    mb = s[k] > mb ? s[k] : mb;
  }
  if (mb == kNegInf) return;  // nothing visible in this block
  const float m_new = mb > *m ? mb : *m;
  const float corr = detail::exp_approx(*m - m_new);  // exp(-inf) = 0 on the first block
  float sum = 0.0f;
  for (int64_t k = 0; k < kBlock; ++k) {
    s[k] = detail::exp_approx(s[k] - m_new);
    sum += s[k];
  }
  *l = *l * corr + sum;
  *m = m_new;
  for (int64_t d = 0; d < Dh; ++d) o[d] *= corr;
  for (int64_t k = 0; k < kBlock; ++k) {
    const float p = s[k];
    const float* vrow = vb + k * Dh;
    for (int64_t d = 0; d < Dh; ++d) o[d] += p * vrow[d];
  }
}

template <typename scalar_t>
inline float to_float(scalar_t x) {
  return static_cast<float>(x);
}

template <typename scalar_t>
void attend(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& tree_mask,
            const Tensor& out, const std::vector<int64_t>& prefix, int64_t tree_len, float scale) {
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), Dh = q.size(3);
  const int64_t Hkv = kc.size(1), group = Hq / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = kc.data_ptr<scalar_t>();
  const scalar_t* vp = vc.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int32_t* mp = tree_mask.data_ptr<int32_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), qs3 = q.stride(3);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2),
                os3 = out.stride(3);
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2), ks3 = kc.stride(3);
  const int64_t vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2), vs3 = vc.stride(3);
  const int64_t ms0 = tree_mask.stride(0), ms1 = tree_mask.stride(1),
                ms2 = tree_mask.stride(2);

  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Tq * Dh), o(Tq * Dh), m(Tq), l(Tq);
    std::vector<float> kt(Dh * kBlock), vb(kBlock * Dh);
    std::vector<uint8_t> vis(Tq * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hq, h = task % Hq, hk = h / group;
      const int64_t P = prefix[b], total = P + tree_len;
      for (int64_t t = 0; t < Tq; ++t) {
        for (int64_t d = 0; d < Dh; ++d)
          qf[t * Dh + d] = to_float(qp[b * qs0 + h * qs1 + t * qs2 + d * qs3]) * scale;
        m[t] = kNegInf;
        l[t] = 0.0f;
      }
      std::fill(o.begin(), o.end(), 0.0f);
      const scalar_t* kbase = kp + b * ks0 + hk * ks1;
      const scalar_t* vbase = vp + b * vs0 + hk * vs1;
      for (int64_t k0 = 0; k0 < total; k0 += kBlock) {
        const int64_t n = std::min(kBlock, total - k0);
        // [Dh, kBlock] keys transposed and [kBlock, Dh] values, float32, zero-padded.
        for (int64_t k = 0; k < n; ++k) {
          const scalar_t* kr = kbase + (k0 + k) * ks2;
          const scalar_t* vr = vbase + (k0 + k) * vs2;
          for (int64_t d = 0; d < Dh; ++d) {
            kt[d * kBlock + k] = to_float(kr[d * ks3]);
            vb[k * Dh + d] = to_float(vr[d * vs3]);
          }
        }
        for (int64_t k = n; k < kBlock; ++k) {
          for (int64_t d = 0; d < Dh; ++d) {
            kt[d * kBlock + k] = 0.0f;
            vb[k * Dh + d] = 0.0f;
          }
        }
        // Visibility: prefix keys for every row; tree key j per bit j of the row's mask.
        for (int64_t t = 0; t < Tq; ++t) {
          uint8_t* vr = vis.data() + t * kBlock;
          const int32_t* mrow = mp + b * ms0 + t * ms1;
          for (int64_t k = 0; k < kBlock; ++k) {
            const int64_t s = k0 + k;
            if (k >= n) {
              vr[k] = 0;
            } else if (s < P) {
              vr[k] = 1;
            } else {
              const int64_t j = s - P;
              vr[k] = (static_cast<uint32_t>(mrow[(j / 32) * ms2]) >> (j % 32)) & 1u;
            }
          }
        }
        for (int64_t t = 0; t < Tq; ++t)
          update_row(qf.data() + t * Dh, kt.data(), vb.data(), vis.data() + t * kBlock, Dh,
                     &m[t], &l[t], o.data() + t * Dh);
      }
      // A row that saw no key at all is zeros (l == 0), not NaN.
      for (int64_t t = 0; t < Tq; ++t) {
        const float inv = l[t] > 0.0f ? 1.0f / l[t] : 0.0f;
        for (int64_t d = 0; d < Dh; ++d)
          op[b * os0 + h * os1 + t * os2 + d * os3] = static_cast<scalar_t>(o[t * Dh + d] * inv);
      }
    }
  });
}

}  // namespace

Tensor tree_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& prefix_len, const Tensor& tree_mask, int64_t tree_len,
                      std::optional<double> scale) {
  constexpr const char* op = "tree_attention";
  detail::check_cpu(op, "q", q);
  detail::check_cpu(op, "k_cache", k_cache);
  detail::check_cpu(op, "v_cache", v_cache);
  detail::check_int(op, "prefix_len", prefix_len);
  detail::check_cpu(op, "tree_mask", tree_mask);
  detail::check_dim(op, "q", q, 4, "[B, Hq, Tq, Dh]");
  detail::check_dim(op, "k_cache", k_cache, 4, "[B, Hkv, Lmax, Dh]");
  detail::check_dim(op, "tree_mask", tree_mask, 3, "[B, Tq, W]");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "eagle2.tree_attention: q must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(k_cache.scalar_type() == st && v_cache.scalar_type() == st,
              "eagle2.tree_attention: k_cache/v_cache dtypes ", k_cache.scalar_type(), "/",
              v_cache.scalar_type(), " must equal q's ", st);
  TORCH_CHECK(tree_mask.scalar_type() == at::kInt, "eagle2.tree_attention: tree_mask must be ",
              "int32, got ", tree_mask.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), Dh = q.size(3);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "eagle2.tree_attention: k_cache ",
                    k_cache.sizes(), " and v_cache ", v_cache.sizes(), " differ in shape");
  const int64_t Hkv = k_cache.size(1), Lmax = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) == B && k_cache.size(3) == Dh,
                    "eagle2.tree_attention: k_cache ", k_cache.sizes(), " does not match q ",
                    q.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "eagle2.tree_attention: Hq=", Hq,
                    " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK_VALUE(prefix_len.dim() == 1 && prefix_len.size(0) == B,
                    "eagle2.tree_attention: prefix_len must be [B=", B, "], got ",
                    prefix_len.sizes());
  TORCH_CHECK_VALUE(tree_len >= 0 && tree_len <= Lmax, "eagle2.tree_attention: tree_len=",
                    tree_len, " is not in [0, Lmax=", Lmax, "]");
  TORCH_CHECK_VALUE(tree_mask.size(0) == B && tree_mask.size(1) == Tq &&
                        tree_mask.size(2) >= (tree_len + 31) / 32,
                    "eagle2.tree_attention: tree_mask has shape ", tree_mask.sizes(),
                    "; expected [B=", B, ", Tq=", Tq, ", W>=", (tree_len + 31) / 32, "]");
  std::vector<int64_t> prefix(B);
  const detail::IntReader pre(prefix_len);
  for (int64_t b = 0; b < B; ++b) {
    prefix[b] = pre(b);
    TORCH_CHECK_VALUE(prefix[b] >= 0 && prefix[b] + tree_len <= Lmax, "prefix_len[", b, "]=",
                      prefix[b], " with tree_len=", tree_len, " needs slots 0..",
                      prefix[b] + tree_len - 1, ", but the cache holds Lmax=", Lmax, " slots");
  }
  const float sc = scale.has_value() ? static_cast<float>(*scale)
                                     : static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  Tensor out = at::empty_like(q);
  if (out.numel() == 0) return out;
  if (st == at::kFloat)
    attend<float>(q, k_cache, v_cache, tree_mask, out, prefix, tree_len, sc);
  else if (st == at::kHalf)
    attend<at::Half>(q, k_cache, v_cache, tree_mask, out, prefix, tree_len, sc);
  else
    attend<at::BFloat16>(q, k_cache, v_cache, tree_mask, out, prefix, tree_len, sc);
  return out;
}

}  // namespace eagle2
