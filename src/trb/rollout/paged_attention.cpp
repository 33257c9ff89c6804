// Decode attention over the paged KV pool of trb.rollout.backends.PagedDecoder, on the CPU: each row's keys and
// values are read in place through its page table, so no slot is gathered into a copy first.
//
// q (b, H, w, D): the step's queries (any strides, D contiguous); pool (2 H_kv, S, D): keys of KV head h at [h],
// values at [H_kv + h], slot p * page_slots + i is slot i of page p; table (b, pages per row) int64 page ids;
// lengths (b,) int64 the row's filled slots, the step's w tokens included. Query i of row r attends the row's first
// lengths[r] - (w - 1 - i) slots (causal within the window). Returns (b, w, H * D), heads concatenated, in q's
// dtype. Scores, softmax and the weighted sum accumulate in fp32 (fp64 for double). One task per (row, KV head):
// the task reads its keys once for its g = H / H_kv queries per token, then its values once.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// x[0:n] as the accumulation type: the pointer itself when it already is, else converted into buffer
template <typename T>
inline const acc_t<T>* widen(const T* x, acc_t<T>* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t<T>>(x[i]);
    return buffer;
  }
}

struct Shape {
  int64_t kv_heads, group, width, dim, page_slots;
};

// Slot s of a row: its offset in a head's (S, D) plane.
inline int64_t slot_offset(const int64_t* pages, int64_t s, int64_t page_slots, int64_t dim) {
  return (pages[s / page_slots] * page_slots + s % page_slots) * dim;
}

// One (row, KV head): q (n = w * g queries, D) in the accumulation type, query k = i * g + j attending limit[i]
// slots; scores (n, longest) and out (n, D) are scratch and result. Dim > 0 fixes D at compile time.
template <typename T, int64_t Dim>
void attend_one(const acc_t<T>* q, const T* keys, const T* values, const int64_t* pages, const int64_t* limit,
                const Shape& shape, acc_t<T> scale, acc_t<T>* scores, acc_t<T>* out, acc_t<T>* buffer) {
  using A = acc_t<T>;
  const int64_t dim = Dim > 0 ? Dim : shape.dim, group = shape.group, n = shape.width * group;
  const int64_t length = limit[shape.width - 1];
  for (int64_t s = 0; s < length; ++s) {
    const A* k = widen(keys + slot_offset(pages, s, shape.page_slots, dim), buffer, dim);
    for (int64_t query = 0; query < n; ++query) {
      const A* qk = q + query * dim;
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qk[d] * k[d];
      scores[query * length + s] = dot * scale;
    }
  }
  for (int64_t query = 0; query < n; ++query) {  // softmax over the query's own slots
    A* row = scores + query * length;
    const int64_t seen = limit[query / group];
    A top = -std::numeric_limits<A>::infinity(), total = 0;
    for (int64_t s = 0; s < seen; ++s) top = std::max(top, row[s]);
    for (int64_t s = 0; s < seen; ++s) {
      row[s] = std::exp(row[s] - top);
      total += row[s];
    }
    for (int64_t s = 0; s < seen; ++s) row[s] /= total;
  }
  std::fill(out, out + n * dim, A(0));
  for (int64_t s = 0; s < length; ++s) {
    const A* v = widen(values + slot_offset(pages, s, shape.page_slots, dim), buffer, dim);
    for (int64_t query = 0; query < n; ++query) {
      if (s >= limit[query / group]) continue;
      const A weight = scores[query * length + s];
      A* o = out + query * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] += weight * v[d];
    }
  }
}

template <typename T>
using AttendFn = void (*)(const acc_t<T>*, const T*, const T*, const int64_t*, const int64_t*, const Shape&, acc_t<T>,
                          acc_t<T>*, acc_t<T>*, acc_t<T>*);

template <typename T>
AttendFn<T> attend_for(int64_t dim) {
  switch (dim) {
    case 32: return &attend_one<T, 32>;
    case 64: return &attend_one<T, 64>;
    case 128: return &attend_one<T, 128>;
    case 256: return &attend_one<T, 256>;
    default: return &attend_one<T, 0>;
  }
}

template <typename T>
void attend_all(const at::Tensor& q, const at::Tensor& pool, const at::Tensor& table, const at::Tensor& lengths,
                at::Tensor& out, const Shape& shape, int64_t longest, double scaling) {
  using A = acc_t<T>;
  const int64_t batch = q.size(0), heads = q.size(1), dim = shape.dim, width = shape.width, group = shape.group;
  const int64_t qb = q.stride(0), qh = q.stride(1), qw = q.stride(2), plane = pool.size(1) * dim;
  const int64_t pages_per_row = table.size(1);
  const T* q_data = q.data_ptr<T>();
  const T* pool_data = pool.data_ptr<T>();
  const int64_t* table_data = table.data_ptr<int64_t>();
  const int64_t* length_data = lengths.data_ptr<int64_t>();
  T* out_data = out.data_ptr<T>();
  const AttendFn<T> attend = attend_for<T>(dim);
  at::parallel_for(0, batch * shape.kv_heads, 4, [&](int64_t begin, int64_t end) {
    const int64_t n = width * group;
    std::vector<A> queries(n * dim), result(n * dim), scores(n * longest), buffer(dim);
    std::vector<int64_t> limit(width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / shape.kv_heads, h = task % shape.kv_heads;
      for (int64_t i = 0; i < width; ++i) limit[i] = length_data[row] - (width - 1 - i);
      for (int64_t i = 0; i < width; ++i)
        for (int64_t j = 0; j < group; ++j) {
          const T* source = q_data + row * qb + (h * group + j) * qh + i * qw;
          for (int64_t d = 0; d < dim; ++d) queries[(i * group + j) * dim + d] = static_cast<A>(source[d]);
        }
      attend(queries.data(), pool_data + h * plane, pool_data + (shape.kv_heads + h) * plane,
             table_data + row * pages_per_row, limit.data(), shape, static_cast<A>(scaling), scores.data(),
             result.data(), buffer.data());
      for (int64_t i = 0; i < width; ++i)
        for (int64_t j = 0; j < group; ++j) {
          T* target = out_data + (row * width + i) * heads * dim + (h * group + j) * dim;
          for (int64_t d = 0; d < dim; ++d) target[d] = static_cast<T>(result[(i * group + j) * dim + d]);
        }
    }
  });
}

// The longest row, after checking that every row holds its w tokens within its pages and reads pages of the pool.
int64_t checked_longest(const at::Tensor& table, const at::Tensor& lengths, int64_t width, int64_t page_slots,
                        int64_t pool_pages) {
  const int64_t* pages = table.data_ptr<int64_t>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  const int64_t per_row = table.size(1);
  int64_t longest = 0;
  for (int64_t row = 0; row < lengths.size(0); ++row) {
    TORCH_CHECK(length[row] >= width && length[row] <= per_row * page_slots,
                "paged_decode_attention: row ", row, " holds ", length[row], " slots, outside [w, its pages' slots]");
    for (int64_t i = 0; i < (length[row] + page_slots - 1) / page_slots; ++i) {
      const int64_t page = pages[row * per_row + i];
      TORCH_CHECK(page >= 0 && page < pool_pages, "paged_decode_attention: page ", page, " outside the pool");
    }
    longest = std::max(longest, length[row]);
  }
  return longest;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& pool, const at::Tensor& table,
                                  const at::Tensor& lengths, int64_t page_slots, double scaling) {
  TORCH_CHECK(q.dim() == 4 && pool.dim() == 3 && table.dim() == 2 && lengths.dim() == 1,
              "paged_decode_attention: q (b, H, w, D), pool (2 H_kv, S, D), table (b, P), lengths (b,)");
  TORCH_CHECK(q.device().is_cpu() && pool.device().is_cpu(), "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == pool.scalar_type(), "paged_decode_attention: q and pool dtypes differ");
  TORCH_CHECK(pool.is_contiguous() && q.stride(3) == 1, "paged_decode_attention: pool contiguous, q's D contiguous");
  TORCH_CHECK(table.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "paged_decode_attention: int64");
  const int64_t batch = q.size(0), heads = q.size(1), width = q.size(2), dim = q.size(3), kv_heads = pool.size(0) / 2;
  TORCH_CHECK(pool.size(0) == 2 * kv_heads && kv_heads > 0 && heads % kv_heads == 0 && pool.size(2) == dim,
              "paged_decode_attention: pool (2 H_kv, S, D) with H a multiple of H_kv");
  TORCH_CHECK(table.size(0) == batch && lengths.size(0) == batch && page_slots > 0,
              "paged_decode_attention: one table row and one length per row");
  auto table_c = table.contiguous();
  auto lengths_c = lengths.contiguous();
  const int64_t longest = checked_longest(table_c, lengths_c, width, page_slots, pool.size(1) / page_slots);
  auto out = at::empty({batch, width, heads * dim}, q.options());
  const Shape shape{kv_heads, heads / kv_heads, width, dim, page_slots};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    attend_all<scalar_t>(q, pool, table_c, lengths_c, out, shape, longest, scaling);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(trb, m) {
  m.def("paged_decode_attention(Tensor q, Tensor pool, Tensor table, Tensor lengths, int page_slots, float scaling)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(trb, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
