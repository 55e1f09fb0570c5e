// Paged attention on CPU that reads the KV blocks where they lie (no gather copy).
//
// Registered as torch.ops.caldera_cpu.paged_attention_rows; built on first use by
// caldera/kernels/cpu_attention.py. Layouts are those of caldera/kernels/metadata.py:
//
//   query, out:               [T, H, D]
//   key_cache, value_cache:   [N, B, Hkv, D]   (token at position p of request r lives in
//                                               block block_tables[r, p / B], row p % B)
//   block_tables:             [R, W] int32
//
// The op computes the rows listed in `rows` (int64 [M], rows of query/out); row m belongs to
// request row_req[m] and sees positions [max(0, row_ctx[m] - window), row_ctx[m]) of it
// (window <= 0: no sliding window). A decode row has row_ctx = seq_len; a prefill row at
// position p has row_ctx = p + 1, which makes it causal.
//
// Work items are (row, range of KV heads); each walks the row's blocks in order, reading for
// every token the contiguous K (then V) vectors of its heads. Two passes per item: scores for
// all positions (then max, exp, sum per head), then the probability-weighted sum of V.
// Accumulation is in float32 whatever the cache dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// kD > 0: the head size known at compile time (unrolled loops); 0: read from `n`.
template <int kD, typename scalar_t>
inline float dot(const float* q, const scalar_t* k, int64_t n) {
  if constexpr (kD > 0) n = kD;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) {
    sum += q[d] * static_cast<float>(k[d]);
  }
  return sum;
}

template <int kD, typename scalar_t>
inline void axpy(float a, const scalar_t* x, float* y, int64_t n) {
  if constexpr (kD > 0) n = kD;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    y[d] += a * static_cast<float>(x[d]);
  }
}

struct Shape {
  int64_t num_heads, num_kv_heads, head_size, block_size, table_stride;
  int64_t group;  // query heads per KV head
};

// Calls fn(row, i) for the visible positions first <= pos < ctx in order, where row points at
// the item's first KV head of that position in `cache` and i = pos - first.
template <typename scalar_t, typename Fn>
inline void for_each_position(const Shape& s, const scalar_t* cache, const int32_t* table,
                              int64_t first, int64_t ctx, int64_t kv_lo, Fn&& fn) {
  const int64_t B = s.block_size;
  for (int64_t pos = first; pos < ctx;) {
    const scalar_t* block = cache + static_cast<int64_t>(table[pos / B]) * B * s.num_kv_heads *
                                        s.head_size;
    for (const int64_t end = std::min(ctx, (pos / B + 1) * B); pos < end; ++pos) {
      fn(block + ((pos % B) * s.num_kv_heads + kv_lo) * s.head_size, pos - first);
    }
  }
}

template <int kD, typename scalar_t>
void attend_item(const Shape& s, scalar_t* out, const scalar_t* query, const scalar_t* key_cache,
                 const scalar_t* value_cache, const int32_t* table, int64_t row, int64_t first,
                 int64_t ctx, int64_t kv_lo, int64_t kv_hi, float scale,
                 std::vector<float>& buffer) {
  const int64_t D = s.head_size;
  const int64_t heads = (kv_hi - kv_lo) * s.group;  // query heads of this item
  const int64_t len = ctx - first;
  buffer.resize(static_cast<size_t>(heads * D * 2 + heads * len + heads));
  float* q = buffer.data();      // [heads, D], pre-scaled
  float* acc = q + heads * D;    // [heads, D]
  float* scores = acc + heads * D;  // [heads, len]
  const int64_t h0 = kv_lo * s.group;
  for (int64_t h = 0; h < heads; ++h) {
    const scalar_t* src = query + (row * s.num_heads + h0 + h) * D;
    for (int64_t d = 0; d < D; ++d) q[h * D + d] = static_cast<float>(src[d]) * scale;
  }
  std::fill(acc, acc + heads * D, 0.f);

  // Pass 1: scores of every visible position, block by block.
  for_each_position(s, key_cache, table, first, ctx, kv_lo, [&](const scalar_t* k, int64_t i) {
    for (int64_t h = 0; h < heads; ++h) {
      scores[h * len + i] = dot<kD>(q + h * D, k + (h / s.group) * D, D);
    }
  });
  // Softmax per head (kept unnormalised; divided at the end).
  float* norm = scores + heads * len;  // [heads]
  for (int64_t h = 0; h < heads; ++h) {
    float* row_scores = scores + h * len;
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < len; ++i) max = std::max(max, row_scores[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < len; ++i) {
      row_scores[i] = std::exp(row_scores[i] - max);
      sum += row_scores[i];
    }
    norm[h] = 1.f / sum;
  }
  // Pass 2: probability-weighted values.
  for_each_position(s, value_cache, table, first, ctx, kv_lo, [&](const scalar_t* v, int64_t i) {
    for (int64_t h = 0; h < heads; ++h) {
      axpy<kD>(scores[h * len + i], v + (h / s.group) * D, acc + h * D, D);
    }
  });
  for (int64_t h = 0; h < heads; ++h) {
    scalar_t* dst = out + (row * s.num_heads + h0 + h) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[h * D + d] * norm[h]);
  }
}

void paged_attention_rows(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_tables,
                          const at::Tensor& rows, const at::Tensor& row_req,
                          const at::Tensor& row_ctx, double scale, int64_t window) {
  TORCH_CHECK(query.device().is_cpu(), "paged_attention_rows runs on CPU tensors");
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "query [T, H, D], cache [N, B, Hkv, D]");
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous() && block_tables.is_contiguous(),
              "paged_attention_rows needs contiguous tensors");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() &&
                  key_cache.scalar_type() == value_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, caches and out must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && row_req.scalar_type() == at::kInt &&
                  row_ctx.scalar_type() == at::kInt && rows.scalar_type() == at::kLong,
              "block_tables, row_req, row_ctx int32; rows int64");
  Shape s;
  s.num_heads = query.size(1);
  s.head_size = query.size(2);
  s.block_size = key_cache.size(1);
  s.num_kv_heads = key_cache.size(2);
  s.table_stride = block_tables.size(1);
  TORCH_CHECK(key_cache.size(3) == s.head_size, "head size of query and cache differ");
  TORCH_CHECK(s.num_heads % s.num_kv_heads == 0, "query heads must be a multiple of KV heads");
  s.group = s.num_heads / s.num_kv_heads;
  const int64_t num_rows = rows.numel();
  if (num_rows == 0) return;
  // Split the KV heads of a row only when there are too few rows to keep every thread busy.
  const int64_t threads = at::get_num_threads();
  int64_t splits = std::min<int64_t>(s.num_kv_heads, (4 * threads + num_rows - 1) / num_rows);
  splits = std::max<int64_t>(splits, 1);
  const int64_t per_split = (s.num_kv_heads + splits - 1) / splits;
  const int64_t* rows_p = rows.data_ptr<int64_t>();
  const int32_t* req_p = row_req.data_ptr<int32_t>();
  const int32_t* ctx_p = row_ctx.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_rows", [&] {
        scalar_t* out_p = out.data_ptr<scalar_t>();
        const scalar_t* q_p = query.data_ptr<scalar_t>();
        const scalar_t* k_p = key_cache.data_ptr<scalar_t>();
        const scalar_t* v_p = value_cache.data_ptr<scalar_t>();
        at::parallel_for(0, num_rows * splits, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> buffer;
          for (int64_t item = begin; item < end; ++item) {
            const int64_t m = item / splits;
            const int64_t kv_lo = (item % splits) * per_split;
            const int64_t kv_hi = std::min(s.num_kv_heads, kv_lo + per_split);
            if (kv_lo >= kv_hi) continue;
            const int64_t ctx = ctx_p[m];
            const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
            const int32_t* table = tables + req_p[m] * s.table_stride;
            const float sc = static_cast<float>(scale);
            switch (s.head_size) {
              case 64:
                attend_item<64, scalar_t>(s, out_p, q_p, k_p, v_p, table, rows_p[m], first,
                                          ctx, kv_lo, kv_hi, sc, buffer);
                break;
              case 128:
                attend_item<128, scalar_t>(s, out_p, q_p, k_p, v_p, table, rows_p[m], first,
                                           ctx, kv_lo, kv_hi, sc, buffer);
                break;
              default:
                attend_item<0, scalar_t>(s, out_p, q_p, k_p, v_p, table, rows_p[m], first,
                                         ctx, kv_lo, kv_hi, sc, buffer);
            }
          }
        });
      });
}

}  // namespace

TORCH_LIBRARY(caldera_cpu, m) {
  m.def(
      "paged_attention_rows(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor rows, Tensor row_req, Tensor row_ctx, float scale, "
      "int window) -> ()");
}

TORCH_LIBRARY_IMPL(caldera_cpu, CPU, m) {
  m.impl("paged_attention_rows", &paged_attention_rows);
}
