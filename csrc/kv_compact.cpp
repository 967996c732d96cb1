// kv_compact: move the accepted path's tree slots right behind the prefix, in place, for
// every K and V tensor of the model (cache [N, B, Hkv, Lmax, Dh]) in one parallel pass.
#include "eagle2.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace eagle2 {

void kv_compact(const Tensor& cache, const Tensor& prefix_len, const Tensor& path,
                const Tensor& accept_len) {
  constexpr const char* op = "kv_compact";
  detail::check_cpu(op, "cache", cache);
  detail::check_dim(op, "cache", cache, 5, "[N, B, Hkv, Lmax, Dh]");
  detail::check_int(op, "prefix_len", prefix_len);
  detail::check_int(op, "path", path);
  detail::check_int(op, "accept_len", accept_len);
  const int64_t N = cache.size(0), B = cache.size(1), H = cache.size(2), Lmax = cache.size(3),
                Dh = cache.size(4);
  detail::check_dim(op, "path", path, 2, "[B, T]");
  TORCH_CHECK_VALUE(path.size(0) == B && prefix_len.dim() == 1 && prefix_len.size(0) == B &&
                        accept_len.dim() == 1 && accept_len.size(0) == B,
                    "eagle2.kv_compact: path ", path.sizes(), ", prefix_len ", prefix_len.sizes(),
                    " and accept_len ", accept_len.sizes(), " do not match the cache batch B=", B);
  const int64_t T = path.size(1);
  const detail::IntReader pre(prefix_len), acc(accept_len), pth(path);

  // Validate every sequence before moving anything (the same checks as the reference).
  for (int64_t b = 0; b < B; ++b) {
    const int64_t a = acc(b), p = pre(b);
    TORCH_CHECK_VALUE(a >= 0 && a <= T, "accept_len[", b, "]=", a, " is not in [0, T=", T, "]");
    if (a == 0) continue;
    int64_t lo = pth(b, 0), hi = lo;
    for (int64_t j = 1; j < a; ++j) {
      lo = std::min(lo, pth(b, j));
      hi = std::max(hi, pth(b, j));
    }
    TORCH_CHECK_VALUE(lo >= 0 && p >= 0 && p + std::max(hi, a - 1) < Lmax, "sequence ", b,
                      ": prefix_len=", p, ", path[:", a, "] (min ", lo, ", max ", hi,
                      ") reaches outside the cache slots 0..", Lmax - 1,
                      " (or contains -1 padding)");
  }

  // Bytes are moved as they are: any dtype, bit-exact. One task per (n, b, head) row block;
  // each task reads all its source rows into a buffer before writing a destination, so a
  // slot that is both a source and a destination (path [0, 2, 3]) is read first.
  char* base = static_cast<char*>(cache.data_ptr());
  const int64_t es = cache.element_size();
  const int64_t sn = cache.stride(0) * es, sb = cache.stride(1) * es, sh = cache.stride(2) * es,
                sl = cache.stride(3) * es, sd = cache.stride(4) * es;
  const bool rows_contiguous = cache.stride(4) == 1 || Dh == 1;
  const int64_t row_bytes = Dh * es;
  // A round moves a few rows per head: waking threads costs more than the copy unless the
  // move is large, so each task block moves at least ~4 MiB (a typical round runs serially).
  int64_t max_a = 1;
  for (int64_t b = 0; b < B; ++b) max_a = std::max(max_a, acc(b));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, max_a * row_bytes));

  at::parallel_for(0, N * B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<char> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % H, b = (task / H) % B, n = task / (H * B);
      const int64_t a = acc(b);
      if (a == 0) continue;
      const int64_t p = pre(b);
      char* seq = base + n * sn + b * sb + h * sh + p * sl;  // slot prefix_len[b]
      buf.resize(static_cast<size_t>(a * row_bytes));
      for (int64_t j = 0; j < a; ++j) {
        const char* src = seq + pth(b, j) * sl;
        char* dst = buf.data() + j * row_bytes;
        if (rows_contiguous) {
          std::memcpy(dst, src, row_bytes);
        } else {
          for (int64_t d = 0; d < Dh; ++d) std::memcpy(dst + d * es, src + d * sd, es);
        }
      }
      for (int64_t j = 0; j < a; ++j) {
        if (pth(b, j) == j) continue;  // already in place
        const char* src = buf.data() + j * row_bytes;
        char* dst = seq + j * sl;
        if (rows_contiguous) {
          std::memcpy(dst, src, row_bytes);
        } else {
          for (int64_t d = 0; d < Dh; ++d) std::memcpy(dst + d * sd, src + d * es, es);
        }
      }
    }
  });
}

}  // namespace eagle2
