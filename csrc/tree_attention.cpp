// tree_attention: attention of Tq query rows over the committed cache prefix (all visible)
// and a tree region (visible per the packed mask), with GQA. Keys are visited in blocks with
// an online softmax, first the prefix, then the tree region.
//
// Two kernels compute the same thing:
// - "lanes" (x86-64 with AVX2+FMA or AVX-512): one task per (sequence, kv head, chunk of L
//   query rows of the heads sharing that kv head); the L rows are the lanes of a vector, so
//   scores come out as [key][row] vectors from broadcast key elements (no key transpose),
//   the online softmax is elementwise over rows, and P.V accumulates register tiles.
// - "portable": one task per (sequence, query head), one row at a time, auto-vectorised.
//
// Local attention (optional): with a sliding window W, row i (n_i tree bits set) sees the
// prefix keys >= P + n_i - W and only its last W set tree bits (from the bit of rank n_i - W
// on): the key loops start at the smallest such bound, earlier keys are never read. A
// softcap maps the scores through cap * tanh(score / cap) before the mask; per-head sinks
// add exp(sink) to the softmax denominator when a row is written.
#include "eagle2.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace eagle2 {
namespace {

constexpr int64_t kBlock = 64;  // keys per block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename scalar_t>
inline float to_float(scalar_t x) {
  return static_cast<float>(x);
}

// Strided views of the inputs shared by both kernels.
template <typename scalar_t>
struct Args {
  const scalar_t *q, *k, *v;
  scalar_t* out;
  const int32_t* mask;
  int64_t B, Hq, Tq, Dh, Hkv, group, tree_len;
  int64_t qs[4], os[4], ks[4], vs[4], ms[3];
  const int64_t* prefix;
  float scale;
  int64_t window;        // 0: no sliding window
  float softcap;         // 0: no softcapping
  const float* sinks;    // [Hq] sink logits, or nullptr
  int64_t grain_work;  // multiply-adds per parallel chunk
};

// Writes one finished row: o / l, or zeros for a row that saw no key (l == 0), not NaN.
// With sinks, exp(sink[h]) joins the denominator first (m: the row's running max).
template <typename scalar_t>
inline void write_row(const Args<scalar_t>& a, int64_t b, int64_t h, int64_t t, const float* o,
                      int64_t o_stride, float l, float m) {
  float corr = 1.0f;
  if (a.sinks != nullptr) {
    const float sk = a.sinks[h], mf = m > sk ? m : sk;
    corr = std::exp(m - mf);  // 0 for a row that saw no key (m = -inf)
    l = l * corr + std::exp(sk - mf);
  }
  const float inv = l > 0.0f ? corr / l : 0.0f;
  scalar_t* dst = a.out + b * a.os[0] + h * a.os[1] + t * a.os[2];
  for (int64_t d = 0; d < a.Dh; ++d) dst[d * a.os[3]] = static_cast<scalar_t>(o[d * o_stride] * inv);
}

inline bool tree_bit(const int32_t* mrow, int64_t ms2, int64_t j) {
  return (static_cast<uint32_t>(mrow[(j / 32) * ms2]) >> (j % 32)) & 1u;
}

// The sliding window of one row (mask row mrow) of a sequence with prefix P: it sees the
// prefix keys s >= *prefix_from and the set tree bits j >= *tree_from. Without a window
// (W = 0) that is everything.
inline void window_bounds(const int32_t* mrow, int64_t ms2, int64_t tree_len, int64_t P,
                          int64_t W, int64_t* prefix_from, int64_t* tree_from) {
  *prefix_from = 0;
  *tree_from = 0;
  if (W <= 0) return;
  int64_t n = 0;
  for (int64_t j = 0; j < tree_len; ++j) n += tree_bit(mrow, ms2, j);
  *prefix_from = P + n - W;  // > P when the row's own tree path fills the window
  int64_t skip = n - W;      // set bits to drop from the front
  for (int64_t j = 0; j < tree_len && skip > 0; ++j) {
    if (tree_bit(mrow, ms2, j) && --skip == 0) *tree_from = j + 1;
  }
}

// cap * tanh(s / cap) over n scores in place (cap = 0: unchanged).
inline void soft_cap(float* s, int64_t n, float cap) {
  if (cap <= 0.0f) return;
  const float inv = 1.0f / cap;
  for (int64_t k = 0; k < n; ++k) s[k] = cap * std::tanh(s[k] * inv);
}

// Online-softmax update of one query row with one block of kBlock keys (portable path).
//   q [Dh] (already scaled), kt [Dh, kBlock] (keys transposed), vb [kBlock, Dh],
//   visible [kBlock] (0 = masked; padding keys past the end are masked too),
//   m, l: running max and sum of exp; o [Dh]: running unnormalised output.
EAGLE2_SIMD_CLONES
void update_row(const float* __restrict q, const float* __restrict kt,
                const float* __restrict vb, const uint8_t* __restrict visible, int64_t Dh,
                float softcap, float* __restrict m, float* __restrict l, float* __restrict o) {
  float s[kBlock];
  for (int64_t k = 0; k < kBlock; ++k) s[k] = 0.0f;
  for (int64_t d = 0; d < Dh; ++d) {
    const float qd = q[d];
    const float* krow = kt + d * kBlock;
    for (int64_t k = 0; k < kBlock; ++k) s[k] += qd * krow[k];
  }
  soft_cap(s, kBlock, softcap);
  for (int64_t k = 0; k < kBlock; ++k) s[k] = visible[k] ? s[k] : kNegInf;
  const float mb = detail::max_of(s, kBlock);
  if (mb == kNegInf) return;  // nothing visible in this block
  const float m_new = mb > *m ? mb : *m;
  const float corr = detail::exp_approx(*m - m_new);  // exp(-inf) = 0 on the first block
  const float sum = detail::sum_exp_of(s, kBlock, m_new);
  for (int64_t k = 0; k < kBlock; ++k) s[k] = detail::exp_approx(s[k] - m_new);
  *l = *l * corr + sum;
  *m = m_new;
  for (int64_t d = 0; d < Dh; ++d) o[d] *= corr;
  for (int64_t k = 0; k < kBlock; ++k) {
    const float p = s[k];
    const float* vrow = vb + k * Dh;
    for (int64_t d = 0; d < Dh; ++d) o[d] += p * vrow[d];
  }
}

// Portable kernel: one task per (sequence, query head).
template <typename scalar_t>
void attend_portable(const Args<scalar_t>& a) {
  const int64_t Tq = a.Tq, Dh = a.Dh;
  int64_t max_total = 0;
  for (int64_t b = 0; b < a.B; ++b) max_total = std::max(max_total, a.prefix[b] + a.tree_len);
  const int64_t grain = std::max<int64_t>(1, a.grain_work / std::max<int64_t>(1, 2 * Tq * max_total * Dh));
  at::parallel_for(0, a.B * a.Hq, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Tq * Dh), o(Tq * Dh), m(Tq), l(Tq);
    std::vector<float> kt(Dh * kBlock), vb(kBlock * Dh);
    std::vector<uint8_t> vis(Tq * kBlock);
    std::vector<int64_t> pfrom(Tq), tfrom(Tq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / a.Hq, h = task % a.Hq, hk = h / a.group;
      const int64_t P = a.prefix[b], total = P + a.tree_len;
      int64_t first = P;  // first key any row sees (a row with no tree bit sees the prefix)
      for (int64_t t = 0; t < Tq; ++t) {
        window_bounds(a.mask + b * a.ms[0] + t * a.ms[1], a.ms[2], a.tree_len, P, a.window,
                      &pfrom[t], &tfrom[t]);
        first = std::min(first, std::max<int64_t>(pfrom[t], 0));
      }
      for (int64_t t = 0; t < Tq; ++t)
        for (int64_t d = 0; d < Dh; ++d)
          qf[t * Dh + d] = to_float(a.q[b * a.qs[0] + h * a.qs[1] + t * a.qs[2] + d * a.qs[3]]) * a.scale;
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(o.begin(), o.end(), 0.0f);
      const scalar_t* kbase = a.k + b * a.ks[0] + hk * a.ks[1];
      const scalar_t* vbase = a.v + b * a.vs[0] + hk * a.vs[1];
      for (int64_t k0 = first; k0 < total; k0 += kBlock) {
        const int64_t n = std::min(kBlock, total - k0);
        // [Dh, kBlock] keys transposed and [kBlock, Dh] values, float32, zero-padded.
        for (int64_t k = 0; k < kBlock; ++k) {
          for (int64_t d = 0; d < Dh; ++d) {
            kt[d * kBlock + k] = k < n ? to_float(kbase[(k0 + k) * a.ks[2] + d * a.ks[3]]) : 0.0f;
            vb[k * Dh + d] = k < n ? to_float(vbase[(k0 + k) * a.vs[2] + d * a.vs[3]]) : 0.0f;
          }
        }
        // Visibility: prefix keys for every row; tree key j per bit j of the row's mask.
        for (int64_t t = 0; t < Tq; ++t) {
          const int32_t* mrow = a.mask + b * a.ms[0] + t * a.ms[1];
          for (int64_t k = 0; k < kBlock; ++k) {
            const int64_t s = k0 + k;
            vis[t * kBlock + k] =
                k < n && (s < P ? s >= pfrom[t]
                                : s - P >= tfrom[t] && tree_bit(mrow, a.ms[2], s - P));
          }
        }
        for (int64_t t = 0; t < Tq; ++t)
          update_row(qf.data() + t * Dh, kt.data(), vb.data(), vis.data() + t * kBlock, Dh,
                     a.softcap, &m[t], &l[t], o.data() + t * Dh);
      }
      for (int64_t t = 0; t < Tq; ++t) write_row(a, b, h, t, o.data() + t * Dh, 1, l[t], m[t]);
    }
  });
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EAGLE2_LANES_KERNEL 1

// Vectors of L floats (GCC/Clang vector extensions), lowered to the ISA of the function
// they are inlined into (always_inline helpers, called from the target-specific entries).
template <int L>
struct Vec {
  typedef float type __attribute__((vector_size(L * 4)));
};

template <typename V>
__attribute__((always_inline)) inline V vload(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void vstore(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Per-thread state of one task: L query rows as lanes.
//   qt [Dh, L] scaled queries, transposed; o [L, Dh]; m, l [L]; st [kBlock, L] scores;
//   bias [kBlock, L] 0 / -inf for the tree block being processed.
struct LaneState {
  float *qt, *o, *m, *l, *st, *bias;
};

// One block of nk <= kBlock keys: krow(k) = kb + k * kstride, vrow(k) = vb + k * vstride
// (rows contiguous over Dh, float32). With `masked`, bias [nk, L] is added to the scores.
template <typename V, int L, int NK, int R, int NV>
__attribute__((always_inline)) inline void lanes_block(const LaneState& s, int64_t Dh,
                                                       const float* kb, int64_t kstride,
                                                       const float* vb, int64_t vstride,
                                                       int64_t nk, bool masked, float softcap) {
  // Scores, transposed: st[k, :] = sum_d K[k, d] * qt[d, :]; NK keys per register tile.
  int64_t k0 = 0;
  for (; k0 + NK <= nk; k0 += NK) {
    V acc[NK];
    for (int j = 0; j < NK; ++j) acc[j] = V{};
    for (int64_t d = 0; d < Dh; ++d) {
      const V qv = vload<V>(s.qt + d * L);
      for (int j = 0; j < NK; ++j) acc[j] += kb[(k0 + j) * kstride + d] * qv;
    }
    for (int j = 0; j < NK; ++j) vstore(s.st + (k0 + j) * L, acc[j]);
  }
  for (; k0 < nk; ++k0) {
    V acc = V{};
    for (int64_t d = 0; d < Dh; ++d) acc += kb[k0 * kstride + d] * vload<V>(s.qt + d * L);
    vstore(s.st + k0 * L, acc);
  }
  soft_cap(s.st, nk * L, softcap);  // before the -inf bias
  if (masked) {
    for (int64_t k = 0; k < nk; ++k)
      for (int i = 0; i < L; ++i) s.st[k * L + i] += s.bias[k * L + i];
  }
  // Online softmax, elementwise over the L rows.
  float mb[L], base[L], corr[L], sum[L];
  for (int i = 0; i < L; ++i) mb[i] = kNegInf;
  for (int64_t k = 0; k < nk; ++k)
    for (int i = 0; i < L; ++i) mb[i] = s.st[k * L + i] > mb[i] ? s.st[k * L + i] : mb[i];
  for (int i = 0; i < L; ++i) {
    const float m_new = mb[i] > s.m[i] ? mb[i] : s.m[i];
    base[i] = m_new == kNegInf ? 0.0f : m_new;  // a row with nothing visible yet stays at 0
    corr[i] = detail::exp_approx(s.m[i] - base[i]);
    s.m[i] = m_new;
    sum[i] = 0.0f;
  }
  for (int64_t k = 0; k < nk; ++k)
    for (int i = 0; i < L; ++i) {
      const float p = detail::exp_approx(s.st[k * L + i] - base[i]);
      s.st[k * L + i] = p;
      sum[i] += p;
    }
  for (int i = 0; i < L; ++i) s.l[i] = s.l[i] * corr[i] + sum[i];
  // o[r, :] = o[r, :] * corr[r] + sum_k p[k, r] V[k, :]; R rows x NV vectors per tile.
  for (int r0 = 0; r0 < L; r0 += R) {
    int64_t d0 = 0;
    for (; d0 + NV * L <= Dh; d0 += NV * L) {
      V acc[R][NV];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) acc[r][j] = vload<V>(s.o + (r0 + r) * Dh + d0 + j * L) * corr[r0 + r];
      for (int64_t k = 0; k < nk; ++k) {
        V vv[NV];
        for (int j = 0; j < NV; ++j) vv[j] = vload<V>(vb + k * vstride + d0 + j * L);
        for (int r = 0; r < R; ++r) {
          const float p = s.st[k * L + r0 + r];
          for (int j = 0; j < NV; ++j) acc[r][j] += p * vv[j];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) vstore(s.o + (r0 + r) * Dh + d0 + j * L, acc[r][j]);
    }
    for (; d0 < Dh; ++d0) {  // Dh not a multiple of NV * L: scalar tail
      for (int r = r0; r < r0 + R; ++r) {
        float acc = s.o[r * Dh + d0] * corr[r];
        for (int64_t k = 0; k < nk; ++k) acc += s.st[k * L + r] * vb[k * vstride + d0];
        s.o[r * Dh + d0] = acc;
      }
    }
  }
}

// AVX-512: 16 rows per task; score tiles of 8 keys, output tiles of 4 rows x 64 floats.
__attribute__((target("arch=x86-64-v4"))) void lanes_block_avx512(
    const LaneState& s, int64_t Dh, const float* kb, int64_t kstride, const float* vb,
    int64_t vstride, int64_t nk, bool masked, float softcap) {
  lanes_block<Vec<16>::type, 16, 8, 4, 4>(s, Dh, kb, kstride, vb, vstride, nk, masked, softcap);
}

// AVX2 + FMA: 8 rows per task; score tiles of 8 keys, output tiles of 2 rows x 32 floats.
__attribute__((target("arch=x86-64-v3"))) void lanes_block_avx2(
    const LaneState& s, int64_t Dh, const float* kb, int64_t kstride, const float* vb,
    int64_t vstride, int64_t nk, bool masked, float softcap) {
  lanes_block<Vec<8>::type, 8, 8, 2, 4>(s, Dh, kb, kstride, vb, vstride, nk, masked, softcap);
}

using LanesFn = void (*)(const LaneState&, int64_t, const float*, int64_t, const float*,
                         int64_t, int64_t, bool, float);

// The lanes kernel to run (lanes = 0: none, use the portable kernel): the widest this CPU
// supports, or a narrower one named by EAGLE2_KERNELS_NATIVE_SIMD=portable|avx2|avx512 (read
// at each call, so tests can cover every kernel on one machine).
std::pair<LanesFn, int> pick_lanes() {
  static const bool has512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  static const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("EAGLE2_KERNELS_NATIVE_SIMD");
  const std::string want = env != nullptr ? env : "";
  if (want == "portable") return {nullptr, 0};
  if (has512 && want != "avx2") return {lanes_block_avx512, 16};
  if (has2) return {lanes_block_avx2, 8};
  return {nullptr, 0};
}

// Rows of kv head hk: row i is query head hk * group + i / Tq, position i % Tq.
template <typename scalar_t>
void attend_lanes(const Args<scalar_t>& a, LanesFn fn, int L) {
  const int64_t Tq = a.Tq, Dh = a.Dh, rows = a.group * Tq;
  const int64_t chunks = (rows + L - 1) / L;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  // float32 caches with contiguous rows are read in place; others are converted per block.
  const bool direct = kFloat && a.ks[3] == 1 && a.vs[3] == 1;
  int64_t max_total = 0;
  for (int64_t b = 0; b < a.B; ++b) max_total = std::max(max_total, a.prefix[b] + a.tree_len);
  const int64_t grain = std::max<int64_t>(1, a.grain_work / std::max<int64_t>(1, 2 * L * max_total * Dh));

  at::parallel_for(0, a.B * a.Hkv * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(Dh * L), o(L * Dh), m(L), l(L), st(kBlock * L), bias(kBlock * L);
    std::vector<float> kbuf(direct ? 0 : kBlock * Dh), vbuf(direct ? 0 : kBlock * Dh);
    const LaneState s{qt.data(), o.data(), m.data(), l.data(), st.data(), bias.data()};
    int64_t head[64], pos[64], pfrom[64], tfrom[64];  // L <= 64
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks, hk = (task / chunks) % a.Hkv, b = task / (chunks * a.Hkv);
      const int64_t r0 = c * L, nr = std::min<int64_t>(L, rows - r0);
      for (int i = 0; i < L; ++i) {
        head[i] = i < nr ? hk * a.group + (r0 + i) / Tq : -1;
        pos[i] = i < nr ? (r0 + i) % Tq : -1;
        for (int64_t d = 0; d < Dh; ++d)
          qt[d * L + i] = i < nr ? to_float(a.q[b * a.qs[0] + head[i] * a.qs[1] + pos[i] * a.qs[2] +
                                              d * a.qs[3]]) * a.scale
                                 : 0.0f;
        m[i] = kNegInf;
        l[i] = 0.0f;
      }
      std::fill(o.begin(), o.end(), 0.0f);
      const int64_t P = a.prefix[b];
      // Window bounds per lane; the prefix loop starts at the lowest, and blocks before the
      // highest are masked per lane.
      int64_t p_lo = P, p_hi = 0;
      for (int i = 0; i < L; ++i) {
        pfrom[i] = 0;
        tfrom[i] = 0;
        if (i >= nr) continue;  // padding lanes: never written
        window_bounds(a.mask + b * a.ms[0] + pos[i] * a.ms[1], a.ms[2], a.tree_len, P, a.window,
                      &pfrom[i], &tfrom[i]);
        p_lo = std::min(p_lo, std::max<int64_t>(pfrom[i], 0));
        p_hi = std::max(p_hi, pfrom[i]);
      }
      const scalar_t* kbase = a.k + b * a.ks[0] + hk * a.ks[1];
      const scalar_t* vbase = a.v + b * a.vs[0] + hk * a.vs[1];
      auto run_block = [&](int64_t k0, int64_t nk, bool masked) {
        if constexpr (kFloat) {
          if (direct) {
            fn(s, Dh, kbase + k0 * a.ks[2], a.ks[2], vbase + k0 * a.vs[2], a.vs[2], nk, masked,
               a.softcap);
            return;
          }
        }
        for (int64_t k = 0; k < nk; ++k)
          for (int64_t d = 0; d < Dh; ++d) {
            kbuf[k * Dh + d] = to_float(kbase[(k0 + k) * a.ks[2] + d * a.ks[3]]);
            vbuf[k * Dh + d] = to_float(vbase[(k0 + k) * a.vs[2] + d * a.vs[3]]);
          }
        fn(s, Dh, kbuf.data(), Dh, vbuf.data(), Dh, nk, masked, a.softcap);
      };
      // The prefix: every key visible to every row (with a window, keys >= pfrom[i]).
      for (int64_t k0 = p_lo; k0 < P; k0 += kBlock) {
        const int64_t nk = std::min(kBlock, P - k0);
        const bool masked = k0 < p_hi;
        if (masked)
          for (int64_t k = 0; k < nk; ++k)
            for (int i = 0; i < L; ++i) bias[k * L + i] = k0 + k >= pfrom[i] ? 0.0f : kNegInf;
        run_block(k0, nk, masked);
      }
      // The tree region: key j visible to row i iff bit j of its mask row is set.
      for (int64_t j0 = 0; j0 < a.tree_len; j0 += kBlock) {
        const int64_t nk = std::min(kBlock, a.tree_len - j0);
        bool any = false;
        for (int i = 0; i < L; ++i) {
          const int32_t* mrow = i < nr ? a.mask + b * a.ms[0] + pos[i] * a.ms[1] : nullptr;
          for (int64_t k = 0; k < nk; ++k) {
            const bool seen =
                mrow != nullptr && j0 + k >= tfrom[i] && tree_bit(mrow, a.ms[2], j0 + k);
            bias[k * L + i] = seen ? 0.0f : kNegInf;
            any |= seen;
          }
        }
        if (any) run_block(P + j0, nk, true);  // e.g. the upper triangle of a causal prefill
      }
      for (int i = 0; i < nr; ++i)
        write_row(a, b, head[i], pos[i], o.data() + i * Dh, 1, l[i], m[i]);
    }
  });
}
#endif

template <typename scalar_t>
void attend(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& tree_mask,
            const Tensor& out, const std::vector<int64_t>& prefix, int64_t tree_len, float scale,
            int64_t window, float softcap, const float* sinks) {
  Args<scalar_t> a;
  a.q = q.data_ptr<scalar_t>();
  a.k = kc.data_ptr<scalar_t>();
  a.v = vc.data_ptr<scalar_t>();
  a.out = out.data_ptr<scalar_t>();
  a.mask = tree_mask.data_ptr<int32_t>();
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Tq = q.size(2);
  a.Dh = q.size(3);
  a.Hkv = kc.size(1);
  a.group = a.Hq / a.Hkv;
  a.tree_len = tree_len;
  for (int i = 0; i < 4; ++i) {
    a.qs[i] = q.stride(i);
    a.os[i] = out.stride(i);
    a.ks[i] = kc.stride(i);
    a.vs[i] = vc.stride(i);
  }
  for (int i = 0; i < 3; ++i) a.ms[i] = tree_mask.stride(i);
  a.prefix = prefix.data();
  a.scale = scale;
  a.window = window;
  a.softcap = softcap;
  a.sinks = sinks;
  // Threads only pay off for enough work (a parallel region costs microseconds, and much
  // more on a loaded machine): about 256k multiply-adds per parallel chunk.
  a.grain_work = int64_t{1} << 18;
#ifdef EAGLE2_LANES_KERNEL
  const auto [fn, lanes] = pick_lanes();
  if (fn != nullptr) {
    attend_lanes(a, fn, lanes);
    return;
  }
#endif
  attend_portable(a);
}

}  // namespace

Tensor tree_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& prefix_len, const Tensor& tree_mask, int64_t tree_len,
                      std::optional<double> scale, std::optional<int64_t> window,
                      std::optional<double> softcap, const std::optional<Tensor>& sinks) {
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
  TORCH_CHECK_VALUE(!window.has_value() || *window >= 1, "eagle2.tree_attention: window=",
                    window.value_or(0), " must be >= 1 (or None for no window)");
  TORCH_CHECK_VALUE(!softcap.has_value() || *softcap > 0.0, "eagle2.tree_attention: softcap=",
                    softcap.value_or(0.0), " must be > 0 (or None)");
  std::vector<float> sink_values;
  if (sinks.has_value()) {
    detail::check_cpu(op, "sinks", *sinks);
    TORCH_CHECK_VALUE(sinks->dim() == 1 && sinks->size(0) == Hq, "eagle2.tree_attention: sinks ",
                      "must be [Hq=", Hq, "], got ", sinks->sizes());
    const Tensor sf = sinks->to(at::kFloat).contiguous();
    sink_values.assign(sf.data_ptr<float>(), sf.data_ptr<float>() + Hq);
  }
  const int64_t win = window.value_or(0);
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
  const float* sk = sinks.has_value() ? sink_values.data() : nullptr;
  Tensor out = at::empty_like(q);
  if (out.numel() == 0) return out;
  if (st == at::kFloat)
    attend<float>(q, k_cache, v_cache, tree_mask, out, prefix, tree_len, sc, win, cap, sk);
  else if (st == at::kHalf)
    attend<at::Half>(q, k_cache, v_cache, tree_mask, out, prefix, tree_len, sc, win, cap, sk);
  else
    attend<at::BFloat16>(q, k_cache, v_cache, tree_mask, out, prefix, tree_len, sc, win, cap, sk);
  return out;
}

}  // namespace eagle2
