// Native CPU implementation of the three segmented multi-LoRA primitives (see
// monkey_kernels/backends.py, class NativePrimitives, and triton_kernels/multi_lora.py for the math):
//
//   multi_lora_shrink      H[i, :rank_a]  = drop(X)[i] @ W[a][:rank_a]^T                     (fp32 / fp64)
//   multi_lora_fused_gemm  OUT[i]         = X[i] @ Wb^T + bias + drop(s[a] * H[i, :R] @ E[a]^T) + RES[i]
//   multi_lora_outer       OUT[a]         = s[a] * sum_{rows i of a} drop(X)[i]^T @ Y[i, :R]
//
// with a = adapter of the segment that owns row i (-1: no LoRA term). Rows are cut into one chunk per
// thread, run in parallel (at::parallel_for); a chunk does its base GEMM (bias included) in one call, then
// walks its rows in cache-sized blocks adding the LoRA term of every segment piece in the block and the
// residual. ATen GEMMs run inside the chunks: inside a parallel region they are single-threaded, so the
// chunks are the only parallelism. The grouped outer product splits (adapter, column block) work items.
// Half types (fp16 / bf16) accumulate in fp32 and round once into the output, like the Triton kernels;
// fp64 accumulates in fp64. Dropout masks are counter-based (csrc/dropout_hash.h): a function of (seed, row,
// column) computed where an element is read, so the backward recomputes the forward's mask without storing it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "dropout_hash.h"
#include "outputs.h"

namespace monkey_kernels_native {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using monkey_kernels::DropoutMask;
using monkey_kernels::dropout_mask;

// ---------------------------------------------------------------------------------------------------
// Segments and row chunks
// ---------------------------------------------------------------------------------------------------
struct Segments {
  std::vector<int64_t> indptr;   // [G + 1]
  std::vector<int64_t> adapter;  // [G], -1 = base only
  int64_t num_rows() const { return indptr.back(); }
};

std::vector<int64_t> host_int64(const Tensor& t) {
  Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

Segments read_segments(const Tensor& seg_indptr, const Tensor& adapter_ids, int64_t num_rows,
                       int64_t num_adapters) {
  TORCH_CHECK(seg_indptr.device().is_cpu() && adapter_ids.device().is_cpu(),
              "seg_indptr and adapter_ids must be CPU tensors for the native CPU backend");
  TORCH_CHECK(!at::isFloatingType(seg_indptr.scalar_type()) && seg_indptr.dim() == 1 && seg_indptr.numel() >= 1,
              "seg_indptr must be a 1-D integer tensor [G + 1], got ", seg_indptr.scalar_type(), " ",
              seg_indptr.sizes());
  TORCH_CHECK(!at::isFloatingType(adapter_ids.scalar_type()) && adapter_ids.dim() == 1 &&
                  adapter_ids.numel() == seg_indptr.numel() - 1,
              "adapter_ids must be a 1-D integer tensor [G] with G = seg_indptr.numel() - 1 = ",
              seg_indptr.numel() - 1, ", got ", adapter_ids.sizes());
  Segments s{host_int64(seg_indptr), host_int64(adapter_ids)};
  TORCH_CHECK(s.indptr.front() == 0, "seg_indptr must start at 0, got ", s.indptr.front());
  for (size_t g = 0; g + 1 < s.indptr.size(); ++g) {
    TORCH_CHECK(s.indptr[g] <= s.indptr[g + 1], "seg_indptr must be non-decreasing (segment ", g, ")");
    TORCH_CHECK(s.adapter[g] >= -1 && s.adapter[g] < num_adapters, "adapter_ids[", g, "] = ", s.adapter[g],
                " is out of range for num_adapters = ", num_adapters);
  }
  TORCH_CHECK(s.num_rows() == num_rows, "seg_indptr ends at ", s.num_rows(), " but the op has ", num_rows,
              " rows");
  return s;
}

// Row chunks: one per thread (fewer when there are few rows). Measured on CPU (MKL, fp32, 5120 x 1024 x
// 1024, one thread): the same GEMM in 256-row calls is 12% slower than in 1024-row calls (MKL packs the
// weight again on every call), while one extra pass over the output costs ~4%. So each chunk runs ONE
// base GEMM, then the LoRA terms and the residual in row blocks of kEpilogueRows that stay in cache.
constexpr int64_t kMinChunkRows = 32;
constexpr int64_t kEpilogueRows = 256;

int64_t chunk_rows(int64_t num_rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::clamp<int64_t>((num_rows + kMinChunkRows - 1) / kMinChunkRows, 1, threads);
  return (num_rows + chunks - 1) / chunks;
}

// Calls fn(piece_begin, piece_end, adapter) for every non-empty piece of a segment inside rows [begin, end).
template <typename F>
void for_each_piece(const Segments& s, int64_t begin, int64_t end, const F& fn) {
  // first segment whose end is past `begin`
  auto it = std::upper_bound(s.indptr.begin(), s.indptr.end(), begin);
  int64_t g = std::max<int64_t>(0, (it - s.indptr.begin()) - 1);
  const int64_t num_segments = static_cast<int64_t>(s.adapter.size());
  for (; g < num_segments && s.indptr[g] < end; ++g) {
    const int64_t p0 = std::max(begin, s.indptr[g]);
    const int64_t p1 = std::min(end, s.indptr[g + 1]);
    if (p1 > p0) fn(p0, p1, s.adapter[g]);
  }
}

// Segments this long (on average) are cut no further: one BLAS call per segment at the top level uses every
// thread and packs the weight once, where row chunks would pack it once per thread.
constexpr int64_t kLongSegmentRows = 256;

bool long_segments(const Segments& s) {
  const int64_t count = static_cast<int64_t>(s.adapter.size());
  return count > 0 && s.num_rows() >= kLongSegmentRows * count;
}

// Runs body(row_begin, row_end) for every row chunk, chunks in parallel. The caller's thread-local state
// (grad mode, dispatch-key exclusions of a kernel running below autograd) is copied into the workers,
// which otherwise start from defaults and would record autograd history for the ATen ops they run.
template <typename F>
void parallel_row_chunks(int64_t num_rows, const F& body) {
  if (num_rows == 0) return;
  const int64_t rows = chunk_rows(num_rows);
  const int64_t chunks = (num_rows + rows - 1) / rows;
  const at::ThreadLocalState state;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t c = c0; c < c1; ++c) body(c * rows, std::min(num_rows, (c + 1) * rows));
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(supported_float(t.scalar_type()), name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
}

// out_dtype, and the optional epilogue operands bias [N] and residual [M, N] of the two GEMM ops.
void check_epilogue(at::ScalarType out_dtype, const OptTensor& bias, const OptTensor& residual, int64_t M,
                    int64_t N) {
  TORCH_CHECK(supported_float(out_dtype), "out_dtype must be float32, float64, float16 or bfloat16, got ",
              out_dtype);
  if (bias.has_value()) {
    check_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [out_features = ", N, "], got ",
                bias->sizes());
  }
  if (residual.has_value()) {
    check_float(*residual, "residual");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N,
                "residual must be [num_rows = ", M, ", out_features = ", N, "], got ", residual->sizes());
  }
}

std::vector<int64_t> read_ranks(const Tensor& ranks, int64_t num_adapters, int64_t r_max) {
  TORCH_CHECK(ranks.device().is_cpu() && !at::isFloatingType(ranks.scalar_type()) && ranks.dim() == 1 &&
                  ranks.numel() == num_adapters,
              "ranks must be a 1-D integer CPU tensor [num_adapters = ", num_adapters, "], got ",
              ranks.scalar_type(), " ", ranks.sizes());
  std::vector<int64_t> r = host_int64(ranks);
  for (size_t a = 0; a < r.size(); ++a)
    TORCH_CHECK(r[a] >= 0 && r[a] <= r_max, "ranks[", a, "] = ", r[a], " must be in [0, ", r_max, "]");
  return r;
}

std::vector<double> read_scale(const OptTensor& scale, int64_t num_adapters) {
  if (!scale.has_value()) return std::vector<double>(num_adapters, 1.0);
  check_float(*scale, "scale");
  TORCH_CHECK(scale->dim() == 1 && scale->numel() == num_adapters, "scale must be [num_adapters = ",
              num_adapters, "], got ", scale->sizes());
  Tensor c = scale->to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + num_adapters);
}

// Inverted dropout of the block x[r0:r1, c0:c1] into a fresh contiguous tensor of the accumulation dtype:
// kept elements are x / (1 - p) rounded to the input dtype (as the torch backend and the kernels round),
// dropped ones exactly 0 (selected, so a NaN or inf there is dropped too). Without dropout: the block itself,
// converted (a view when x already has the accumulation dtype).
Tensor dropped(const Tensor& x, const DropoutMask& mask, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
               at::ScalarType acc) {
  Tensor block = x.slice(0, r0, r1).slice(1, c0, c1);
  if (!mask.active) return block.to(acc);
  if (block.stride(1) != 1) block = block.contiguous();
  Tensor out = at::empty({r1 - r0, c1 - c0}, x.options().dtype(acc));
  const int64_t rows = r1 - r0, cols = c1 - c0, ld = block.stride(0);
  std::vector<uint8_t> keep(cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_dropped", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_keep = static_cast<acc_t>(1.0 - mask.p);
    const scalar_t* src = block.const_data_ptr<scalar_t>();
    acc_t* dst = out.data_ptr<acc_t>();
    for (int64_t i = 0; i < rows; ++i) {
      monkey_kernels::mask_row_bytes(mask.row(r0 + i), c0, cols, keep.data());
      const scalar_t* s = src + i * ld;
      acc_t* d = dst + i * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t scaled = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(s[j]) / inv_keep));
        d[j] = keep[j] ? scaled : acc_t(0);
      }
    }
  });
  return out;
}

// term[i, j] = 0 where element (r0 + i, c0 + j) of the mask is dropped (selected, never multiplied);
// `term` is a contiguous tensor of the accumulation dtype.
void apply_mask_(Tensor& term, const DropoutMask& mask, int64_t r0, int64_t c0) {
  if (!mask.active) return;
  TORCH_INTERNAL_ASSERT(term.is_contiguous() && term.dim() == 2);
  const int64_t rows = term.size(0), cols = term.size(1);
  std::vector<uint8_t> keep(cols);
  AT_DISPATCH_FLOATING_TYPES(term.scalar_type(), "multi_lora_apply_mask", [&] {
    scalar_t* data = term.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) {
      monkey_kernels::mask_row_bytes(mask.row(r0 + i), c0, cols, keep.data());
      scalar_t* d = data + i * cols;
      for (int64_t j = 0; j < cols; ++j) d[j] = keep[j] ? d[j] : scalar_t(0);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// shrink
// ---------------------------------------------------------------------------------------------------
Tensor multi_lora_shrink(const Tensor& x, const Tensor& weight, const Tensor& seg_indptr, const Tensor& adapter_ids,
                         const Tensor& ranks, int64_t r_block, int64_t seed, double dropout_p) {
  check_float(x, "x");
  check_float(weight, "weight");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == x.size(1), "weight must be [num_adapters, R, K = ",
              x.size(1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight has dtype ", weight.scalar_type(),
              ", expected ", x.scalar_type(), " (the dtype of x)");
  const int64_t M = x.size(0), K = x.size(1), A = weight.size(0), R = weight.size(1);
  TORCH_CHECK(r_block >= R, "r_block = ", r_block, " must be >= R = ", R);
  const Segments segs = read_segments(seg_indptr, adapter_ids, M, A);
  const std::vector<int64_t> rank = read_ranks(ranks, A, R);
  const DropoutMask mask = dropout_mask(seed, dropout_p);
  const at::ScalarType acc = acc_type(x.scalar_type());
  // Columns past a row's rank, and every column of base-only rows, stay zero.
  Tensor out = at::zeros({M, r_block}, x.options().dtype(acc));
  if (M == 0 || K == 0 || R == 0) return out;
  const Tensor w = weight.to(acc);  // one conversion for all chunks (a copy only for half inputs)

  auto piece = [&](int64_t p0, int64_t p1, int64_t a) {
    if (a < 0 || rank[a] == 0) return;
    Tensor dst = out.slice(0, p0, p1).slice(1, 0, rank[a]);  // row stride r_block: a valid BLAS output
    at::mm_out(dst, dropped(x, mask, p0, p1, 0, K, acc), w[a].slice(0, 0, rank[a]).t());
  };
  if (long_segments(segs)) {
    for_each_piece(segs, 0, M, piece);  // one BLAS call per segment, every thread inside it
  } else {
    parallel_row_chunks(M, [&](int64_t r0, int64_t r1) { for_each_piece(segs, r0, r1, piece); });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// fused GEMM
// ---------------------------------------------------------------------------------------------------
Tensor multi_lora_fused_gemm(const OptTensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& h,
                             const OptTensor& expand, const OptTensor& scale, const OptTensor& residual,
                             const Tensor& seg_indptr, const Tensor& adapter_ids, const Tensor& ranks,
                             int64_t num_rows, int64_t out_features, at::ScalarType out_dtype,
                             int64_t seed, double dropout_p) {
  const int64_t M = num_rows, N = out_features;
  TORCH_CHECK(M >= 0 && N >= 0, "num_rows and out_features must be >= 0, got ", M, " and ", N);
  check_epilogue(out_dtype, bias, residual, M, N);
  const at::ScalarType acc = acc_type(out_dtype);
  const bool has_base = x.has_value() && x->size(1) > 0;
  if (x.has_value()) {
    check_float(*x, "x");
    TORCH_CHECK(weight.has_value(), "weight is required when x is given");
    check_float(*weight, "weight");
    TORCH_CHECK(x->dim() == 2 && x->size(0) == M, "x must be [num_rows = ", M, ", K], got ", x->sizes());
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == N && weight->size(1) == x->size(1),
                "weight must be [out_features = ", N, ", K = ", x->size(1), "], got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == x->scalar_type(), "weight has dtype ", weight->scalar_type(),
                ", expected ", x->scalar_type(), " (the dtype of x)");
  }
  const bool has_lora = h.has_value();
  int64_t A = 0, R = 0;
  if (has_lora) {
    check_float(*h, "h");
    TORCH_CHECK(expand.has_value(), "expand is required when h is given");
    check_float(*expand, "expand");
    TORCH_CHECK(expand->dim() == 3 && expand->size(1) == N, "expand must be [num_adapters, out_features = ", N,
                ", R], got ", expand->sizes());
    A = expand->size(0);
    R = expand->size(2);
    TORCH_CHECK(h->dim() == 2 && h->size(0) == M && h->size(1) >= R, "h must be [num_rows = ", M,
                ", >= R = ", R, "], got ", h->sizes());
  }
  const std::vector<int64_t> rank = has_lora ? read_ranks(ranks, A, R) : std::vector<int64_t>();
  const std::vector<double> scales = has_lora ? read_scale(scale, A) : std::vector<double>();
  const Segments segs = read_segments(seg_indptr, adapter_ids, M, has_lora ? A : INT64_MAX);
  // Dropout of the LoRA term (the input gradient of a dropped LoRA input): a mask over [M, N].
  const DropoutMask mask = dropout_mask(seed, has_lora ? dropout_p : 0.0);

  const at::TensorOptions opts = at::TensorOptions().device(at::kCPU);
  Tensor out = monkey_kernels::fresh_output({M, N}, opts.dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  // Operands converted once, outside the chunks (copies only when a dtype differs from `acc`).
  const Tensor w_t = has_base ? weight->to(acc).t() : Tensor();  // [K, N]; W.t() views stay views
  const Tensor b = bias.has_value() ? bias->to(acc) : Tensor();
  const Tensor e = has_lora ? expand->to(acc) : Tensor();
  const Tensor h_acc = has_lora ? h->slice(1, 0, R).to(acc) : Tensor();
  std::vector<Tensor> expand_t(A);  // each adapter's [rank, N] slice, built once for all pieces
  for (int64_t a = 0; a < A; ++a) expand_t[a] = e[a].slice(1, 0, rank[a]).t();
  const bool direct = out_dtype == acc;  // fp32 / fp64 accumulate in the output itself

  parallel_row_chunks(M, [&](int64_t r0, int64_t r1) {
    const int64_t n = r1 - r0;
    Tensor acc_c = direct ? out.slice(0, r0, r1) : at::empty({n, N}, opts.dtype(acc));
    if (has_base) {
      Tensor xc = x->slice(0, r0, r1).to(acc);
      if (b.defined()) {
        at::addmm_out(acc_c, b, xc, w_t);
      } else {
        at::mm_out(acc_c, xc, w_t);
      }
    } else if (b.defined()) {
      acc_c.copy_(b.expand({n, N}));
    } else {
      acc_c.zero_();
    }
    // Epilogue in row blocks: LoRA terms, residual and (half outputs) the rounding while a block is in cache.
    for (int64_t b0 = r0; b0 < r1; b0 += kEpilogueRows) {
      const int64_t b1 = std::min(r1, b0 + kEpilogueRows);
      if (has_lora) {
        for_each_piece(segs, b0, b1, [&](int64_t p0, int64_t p1, int64_t a) {
          if (a < 0 || rank[a] == 0) return;
          Tensor hp = h_acc.slice(0, p0, p1).slice(1, 0, rank[a]);
          const Tensor& ep = expand_t[a];  // [rank, N]
          Tensor dst = acc_c.slice(0, p0 - r0, p1 - r0);
          if (mask.active) {
            Tensor term = at::mm(hp, ep);
            apply_mask_(term, mask, p0, 0);
            dst.add_(term, scales[a] / (1.0 - mask.p));
          } else {
            dst.addmm_(hp, ep, /*beta=*/1.0, /*alpha=*/scales[a]);
          }
        });
      }
      Tensor block = acc_c.slice(0, b0 - r0, b1 - r0);
      if (residual.has_value()) block.add_(residual->slice(0, b0, b1));
      if (!direct) out.slice(0, b0, b1).copy_(block);  // the one rounding of half outputs
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// grouped outer product (dA, dB)
// ---------------------------------------------------------------------------------------------------
// Fixed column-block width: the work split (and so every summation order) does not depend on the thread
// count, so results are bitwise reproducible across runs and thread settings.
constexpr int64_t kOuterColumns = 128;

//
// With `ranks` given, adapter a's columns r >= ranks[a], and every column of an adapter that owns no rows, are
// exactly 0 (not computed: no 0 * NaN from a NaN row past the rank, no 0 * inf from an inf scale); without it,
// every column is the sum as written.
Tensor multi_lora_outer(const Tensor& x, const Tensor& y, const Tensor& seg_indptr, const Tensor& adapter_ids,
                        const OptTensor& scale, int64_t seed, double dropout_p, int64_t num_adapters,
                        int64_t rank, at::ScalarType out_dtype, const OptTensor& ranks) {
  check_float(x, "x");
  check_float(y, "y");
  TORCH_CHECK(x.dim() == 2, "x must be [M, N], got ", x.sizes());
  const int64_t M = x.size(0), N = x.size(1), A = num_adapters, R = rank;
  TORCH_CHECK(A >= 0 && R >= 0, "num_adapters and rank must be >= 0, got ", A, " and ", R);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) >= R, "y must be [M = ", M, ", >= rank = ", R,
              "], got ", y.sizes());
  const Segments segs = read_segments(seg_indptr, adapter_ids, M, A);
  const std::vector<double> scales = read_scale(scale, A);
  const std::vector<int64_t> live = ranks.has_value() ? read_ranks(*ranks, A, R) : std::vector<int64_t>(A, R);
  const DropoutMask mask = dropout_mask(seed, dropout_p);
  const at::ScalarType acc = acc_type(out_dtype == at::kDouble || x.scalar_type() == at::kDouble ? at::kDouble
                                                                                                 : at::kFloat);
  Tensor out = monkey_kernels::fresh_output({A, N, R}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  // Segments of each adapter, in row order: the fixed summation order of its reduction.
  std::vector<std::vector<int64_t>> owned(A);
  for (size_t g = 0; g < segs.adapter.size(); ++g)
    if (segs.adapter[g] >= 0 && segs.indptr[g + 1] > segs.indptr[g]) owned[segs.adapter[g]].push_back(g);
  // y's live columns, converted once (not once per column block)
  const Tensor y_acc = y.slice(1, 0, R).to(acc);
  const int64_t blocks = (N + kOuterColumns - 1) / kOuterColumns;
  const at::ThreadLocalState state;
  at::parallel_for(0, A * blocks, 1, [&](int64_t i0, int64_t i1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t a = item / blocks;
      const int64_t c0 = (item % blocks) * kOuterColumns, c1 = std::min(N, c0 + kOuterColumns);
      Tensor dst = out[a].slice(0, c0, c1);
      const int64_t width = ranks.has_value() ? (owned[a].empty() ? 0 : live[a]) : R;
      if (width < R) dst.slice(1, width, R).zero_();
      if (width == 0) continue;
      Tensor sum = at::zeros({c1 - c0, width}, x.options().dtype(acc));
      for (int64_t g : owned[a]) {
        const int64_t s0 = segs.indptr[g], s1 = segs.indptr[g + 1];
        Tensor xs = dropped(x, mask, s0, s1, c0, c1, acc);
        sum.addmm_(xs.t(), y_acc.slice(0, s0, s1).slice(1, 0, width));
      }
      if (scales[a] != 1.0) sum.mul_(scales[a]);
      dst.slice(1, 0, width).copy_(sum);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// merged GEMM (no dropout, LoRA input = GEMM input)
// ---------------------------------------------------------------------------------------------------
// OUT[i] = X[i] @ (Wb + s[a] * UP[a][:, :rank] @ DOWN[a][:rank])^T + bias + RES[i]
//
// The rows of adapter a see the merged weight W_a = Wb + s_a UP_a DOWN_a, so their LoRA term rides inside one
// large GEMM instead of two rank-r GEMMs (N = r or K = r), which BLAS runs far below its peak. Building W_a
// costs 2 N K r flops against 2 rows_a (N + K) r for the LoRA term itself, so an adapter is merged only when
// rows_a (N + K) >= N K; the others get the base GEMM plus the two rank-r GEMMs. Every GEMM here is one ATen
// call over a whole segment at the top level (BLAS uses every thread), not inside a parallel region.
// Forward: Wb = W [N, K], DOWN = A [A, R, K], UP = B [A, N, R]. Input gradient (no dropout, V = U):
// dX = dY (W + s B A) = dY @ (W^T + s A^T B^T)^T, i.e. Wb = W^T, DOWN = B^T, UP = A^T.
Tensor multi_lora_merged_gemm(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& down,
                              const Tensor& up, const OptTensor& scale, const OptTensor& residual,
                              const Tensor& seg_indptr, const Tensor& adapter_ids, const Tensor& ranks,
                              at::ScalarType out_dtype) {
  check_float(x, "x");
  check_float(weight, "weight");
  check_float(down, "down");
  check_float(up, "up");
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "weight must be [N, K = ", K, "], got ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK(down.dim() == 3 && down.size(2) == K, "down must be [num_adapters, R, K = ", K, "], got ",
              down.sizes());
  const int64_t A = down.size(0), R = down.size(1);
  TORCH_CHECK(up.dim() == 3 && up.size(0) == A && up.size(1) == N && up.size(2) == R, "up must be [num_adapters = ",
              A, ", N = ", N, ", R = ", R, "], got ", up.sizes());
  for (const Tensor* t : {&weight, &down, &up})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "weight, down and up must have the dtype of x (",
                x.scalar_type(), "), got ", t->scalar_type());
  check_epilogue(out_dtype, bias, residual, M, N);
  const Segments segs = read_segments(seg_indptr, adapter_ids, M, A);
  const std::vector<int64_t> rank = read_ranks(ranks, A, R);
  const std::vector<double> scales = read_scale(scale, A);
  const at::ScalarType acc = acc_type(out_dtype);
  const at::TensorOptions opts = at::TensorOptions().device(at::kCPU).dtype(acc);
  Tensor out = monkey_kernels::fresh_output({M, N}, opts.dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  const Tensor w = weight.to(acc);
  const bool transposed = !w.is_contiguous() && w.t().is_contiguous();
  const Tensor b = bias.has_value() ? bias->to(acc) : Tensor();
  const bool direct = out_dtype == acc;
  std::vector<int64_t> rows_of(A, 0);
  for (size_t g = 0; g < segs.adapter.size(); ++g)
    if (segs.adapter[g] >= 0) rows_of[segs.adapter[g]] += segs.indptr[g + 1] - segs.indptr[g];

  // Segments in adapter order, so each merged weight is built once and dropped before the next.
  std::vector<int64_t> order(segs.adapter.size());
  for (size_t g = 0; g < order.size(); ++g) order[g] = static_cast<int64_t>(g);
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return segs.adapter[p] < segs.adapter[q]; });

  int64_t current = -2;
  Tensor w_eff, down_a, up_a;
  Tensor merged_buffer;  // one [N, K] buffer for every merged adapter: allocated (and page-faulted) once
  bool merged = false;
  for (int64_t g : order) {
    const int64_t s0 = segs.indptr[g], s1 = segs.indptr[g + 1];
    if (s1 == s0) continue;
    const int64_t a = segs.adapter[g];
    const bool lora = a >= 0 && rank[a] > 0;
    if (a != current) {
      current = a;
      merged = lora && rows_of[a] * (N + K) >= N * K;
      w_eff = w;
      if (lora) {
        down_a = down[a].slice(0, 0, rank[a]).to(acc);  // [rank, K]
        up_a = up[a].slice(1, 0, rank[a]).to(acc);      // [N, rank]
        if (merged && transposed) {
          // weight is W^T of a row-major W (the input gradient): merge in W's own layout, W_eff^T = W + s
          // down^T up^T, never reading W column-wise once per adapter.
          if (!merged_buffer.defined()) merged_buffer = at::empty({K, N}, opts);
          w_eff = at::addmm_out(merged_buffer, w.t(), down_a.t(), up_a.t(), /*beta=*/1.0, /*alpha=*/scales[a]).t();
        } else if (merged) {
          if (!merged_buffer.defined()) merged_buffer = at::empty({N, K}, opts);
          w_eff = at::addmm_out(merged_buffer, w, up_a, down_a, /*beta=*/1.0, /*alpha=*/scales[a]);
        }
      }
    }
    const Tensor xs = x.slice(0, s0, s1).to(acc);
    Tensor dst = direct ? out.slice(0, s0, s1) : at::empty({s1 - s0, N}, opts);
    if (b.defined()) {
      at::addmm_out(dst, b, xs, w_eff.t());
    } else {
      at::mm_out(dst, xs, w_eff.t());
    }
    if (lora && !merged) dst.addmm_(at::mm(xs, down_a.t()), up_a.t(), /*beta=*/1.0, /*alpha=*/scales[a]);
    if (residual.has_value()) dst.add_(residual->slice(0, s0, s1));
    if (!direct) out.slice(0, s0, s1).copy_(dst);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// the dropout mask itself (for tests and references: the ops never materialise it)
// ---------------------------------------------------------------------------------------------------
Tensor multi_lora_keep_mask(int64_t seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "rows and cols must be >= 0, got ", rows, " and ", cols);
  const DropoutMask mask = dropout_mask(seed, p);
  Tensor out = at::empty({rows, cols}, at::TensorOptions().device(at::kCPU).dtype(at::kBool));
  static_assert(sizeof(bool) == sizeof(uint8_t), "bool tensors hold one byte per element");
  uint8_t* data = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) monkey_kernels::mask_row_bytes(mask.row(i), 0, cols, data + i * cols);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(monkey_kernels_native, m) {
  m.def("multi_lora_keep_mask(int seed, int rows, int cols, float p) -> Tensor");
  m.def(
      "multi_lora_shrink(Tensor x, Tensor weight, Tensor seg_indptr, Tensor adapter_ids, Tensor ranks, "
      "int r_block, int seed, float dropout_p) -> Tensor");
  m.def(
      "multi_lora_fused_gemm(Tensor? x, Tensor? weight, Tensor? bias, Tensor? h, Tensor? expand, Tensor? scale, "
      "Tensor? residual, Tensor seg_indptr, Tensor adapter_ids, Tensor ranks, int num_rows, int out_features, "
      "ScalarType out_dtype, int seed, float dropout_p) -> Tensor");
  m.def(
      "multi_lora_outer(Tensor x, Tensor y, Tensor seg_indptr, Tensor adapter_ids, Tensor? scale, int seed, "
      "float dropout_p, int num_adapters, int rank, ScalarType out_dtype, Tensor? ranks=None) -> Tensor");
  m.def(
      "multi_lora_merged_gemm(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up, Tensor? scale, "
      "Tensor? residual, Tensor seg_indptr, Tensor adapter_ids, Tensor ranks, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(monkey_kernels_native, CPU, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink);
  m.impl("multi_lora_fused_gemm", &multi_lora_fused_gemm);
  m.impl("multi_lora_outer", &multi_lora_outer);
  m.impl("multi_lora_merged_gemm", &multi_lora_merged_gemm);
}

// No tensor argument to dispatch on: one kernel for every key (it always returns a CPU tensor).
TORCH_LIBRARY_IMPL(monkey_kernels_native, CompositeExplicitAutograd, m) {
  m.impl("multi_lora_keep_mask", &multi_lora_keep_mask);
}

}  // namespace monkey_kernels_native
