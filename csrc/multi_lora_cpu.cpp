// Native CPU implementation of the segmented multi-LoRA primitives (see monkey_kernels/ops/multi_lora/
// native_impl.py, and triton_kernels/multi_lora.py for the math):
//
//   multi_lora_shrink      H[i, :rank_a]  = drop(X)[i] @ W[a][:rank_a]^T                     (fp32 / fp64)
//   multi_lora_fused_gemm  OUT[i]         = X[i] @ Wb^T + bias + drop(s[a] * H[i, :R] @ E[a]^T) + RES[i]
//   multi_lora_outer       OUT[a]         = s[a] * sum_{rows i of a} drop(X)[i]^T @ Y[i, :R]
//   multi_lora_merged_gemm the forward / input gradient with each adapter's merged weight (no dropout)
//
// with a = adapter of the segment that owns row i (-1: no LoRA term). The base GEMM X Wb^T is BLAS's, or the
// register-tiled kernel's where that measured faster on the machine (tiled_base_gemm); every rank-sized GEMM runs the register-tiled kernel of csrc/lowrank_gemm.h on raw pointers,
// with its operands packed here once per call: BLAS runs those shapes far below its peak, and on small
// tiles the dispatcher round trips of ATen calls per segment piece cost more than the arithmetic. Rows are cut
// into one chunk per thread, run in parallel (at::parallel_for); a chunk does its base GEMM (bias included) in
// one call, then walks its rows in cache-sized blocks adding the LoRA term of every segment piece in the
// block and the residual. ATen GEMMs run inside the chunks: inside a parallel region they are
// single-threaded, so the chunks are the only parallelism. The grouped outer product splits (adapter, column
// block) work items. Half types (fp16 / bf16) accumulate in fp32 and round once into the output, like the
// Triton kernels; fp64 accumulates in fp64. Dropout masks are counter-based (csrc/dropout_hash.h): a function
// of (seed, row, column) computed where an element is read, so the backward recomputes the forward's mask
// without storing it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "dropout_hash.h"
#include "lowrank_gemm.h"
#include "outputs.h"

namespace monkey_kernels_native {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using monkey_kernels::DropoutMask;
using monkey_kernels::dropout_mask;
using monkey_kernels::lowrank_gemm;
using monkey_kernels::lowrank_padded;

// ---------------------------------------------------------------------------------------------------
// Segments and row chunks
// ---------------------------------------------------------------------------------------------------
struct Segments {
  std::vector<int64_t> indptr;   // [G + 1]
  std::vector<int64_t> adapter;  // [G], -1 = base only
  int64_t num_rows() const { return indptr.back(); }
};

// A 1-D integer CPU tensor (any integer dtype and stride) as int64 values, read in place.
std::vector<int64_t> host_int64(const Tensor& t) {
  std::vector<int64_t> out(t.numel());
  AT_DISPATCH_INTEGRAL_TYPES(t.scalar_type(), "multi_lora_host_int64", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.dim() == 0 ? 0 : t.stride(0);
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int64_t>(p[i * stride]);
  });
  return out;
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
  std::vector<double> out(num_adapters);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale->scalar_type(), "multi_lora_read_scale", [&] {
    const scalar_t* p = scale->const_data_ptr<scalar_t>();
    for (int64_t a = 0; a < num_adapters; ++a) out[a] = static_cast<double>(p[a * scale->stride(0)]);
  });
  return out;
}

// Adapters that own at least one row.
std::vector<bool> owning_adapters(const Segments& s, int64_t num_adapters) {
  std::vector<bool> owns(num_adapters, false);
  for (size_t g = 0; g < s.adapter.size(); ++g)
    if (s.adapter[g] >= 0 && s.indptr[g + 1] > s.indptr[g]) owns[s.adapter[g]] = true;
  return owns;
}

// ---------------------------------------------------------------------------------------------------
// Raw operands of the low-rank kernel
// ---------------------------------------------------------------------------------------------------
// Element (i, j) of a block is data[i * row + j * col].
template <typename T>
struct Block {
  const T* data;
  int64_t row, col;
};

// The block drop(x)[r0:r1, c0:c1] as T. Without dropout and with x already of dtype T: x's own memory (any
// strides). Otherwise converted into `buffer` (row-major): kept elements are x / (1 - p) rounded to x's dtype
// (as the torch backend and the kernels round), dropped ones exactly 0 (selected, so a NaN or inf there is
// dropped too). As the R operand of lowrank_gemm (`r_operand`), the block has unit column stride and
// lowrank_padded(c1 - c0) readable columns per row: x's memory only where that holds inside x, else the
// buffer, zero-padded.
template <typename T>
Block<T> read_block(const Tensor& x, const DropoutMask& mask, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                    std::vector<T>& buffer, bool r_operand = false) {
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const int64_t rows = r1 - r0, cols = c1 - c0;
  const bool in_place = !r_operand || (s1 == 1 && cols % monkey_kernels::kLowRankColumns == 0);
  if (!mask.active && x.scalar_type() == c10::CppTypeToScalarType<T>::value && in_place)
    return Block<T>{x.const_data_ptr<T>() + r0 * s0 + c0 * s1, s0, s1};
  const int64_t ld = r_operand ? lowrank_padded(cols) : cols;
  buffer.assign(static_cast<size_t>(rows * ld), T(0));
  std::vector<uint8_t> keep(mask.active ? cols : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_read_block", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t inv_keep = static_cast<op_t>(1.0 - mask.p);
    const scalar_t* src = x.const_data_ptr<scalar_t>() + r0 * s0 + c0 * s1;
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* xs = src + i * s0;
      T* d = buffer.data() + i * ld;
      if (!mask.active) {
        for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<T>(static_cast<op_t>(xs[j * s1]));
        continue;
      }
      monkey_kernels::mask_row_bytes(mask.row(r0 + i), c0, cols, keep.data());
      for (int64_t j = 0; j < cols; ++j) {
        const T scaled = static_cast<T>(static_cast<op_t>(static_cast<scalar_t>(static_cast<op_t>(xs[j * s1]) / inv_keep)));
        d[j] = keep[j] ? scaled : T(0);
      }
    }
  });
  return Block<T>{buffer.data(), ld, 1};
}

// The packed R operand: dst[k * ld + j] = src(k, j) as T for k < depth, j < width, and 0 for j in [width, ld),
// with src(k, j) = base.data[offset + k * sk + j * sj] (any float dtype).
template <typename T>
void pack_operand(const Tensor& base, int64_t offset, int64_t sk, int64_t sj, int64_t depth, int64_t width, T* dst,
                  int64_t ld) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "multi_lora_pack", [&] {
    const scalar_t* src = base.const_data_ptr<scalar_t>() + offset;
    for (int64_t k = 0; k < depth; ++k) {
      T* d = dst + k * ld;
      for (int64_t j = 0; j < width; ++j) d[j] = static_cast<T>(static_cast<at::opmath_type<scalar_t>>(src[k * sk + j * sj]));
      std::fill(d + width, d + ld, T(0));
    }
  });
}

// Each owning adapter's [depth_a, width_a] operand packed: adapter a at packed.data() + a * stride, row length
// ld. `operand(a)` gives (offset, sk, sj, depth, width) of adapter a in `base`.
template <typename T, typename F>
std::vector<T> pack_adapters(const Tensor& base, const std::vector<bool>& owns, const std::vector<int64_t>& rank,
                             int64_t stride, int64_t ld, const F& operand) {
  std::vector<T> packed(owns.size() * stride);
  for (size_t a = 0; a < owns.size(); ++a) {
    if (!owns[a] || rank[a] == 0) continue;
    const auto [offset, sk, sj, depth, width] = operand(static_cast<int64_t>(a));
    pack_operand<T>(base, offset, sk, sj, depth, width, packed.data() + a * stride, ld);
  }
  return packed;
}

// c[i * ld + j] (+)= v over an [rows, cols] block when the epilogue operand is not in T: read with its strides.
template <typename T>
void add_block(T* c, int64_t ld, const Tensor& src, int64_t r0, int64_t rows, int64_t cols) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "multi_lora_add_block", [&] {
    const scalar_t* p = src.const_data_ptr<scalar_t>() + r0 * src.stride(0);
    const int64_t s0 = src.stride(0), s1 = src.stride(1);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        c[i * ld + j] += static_cast<T>(static_cast<at::opmath_type<scalar_t>>(p[i * s0 + j * s1]));
  });
}

// ---------------------------------------------------------------------------------------------------
// The base GEMM: BLAS, or the register-tiled kernel where it measured faster on this machine
// ---------------------------------------------------------------------------------------------------
// MKL's sgemm runs at about 100 GFLOP/s on the AMD EPYC of our CI (one thread), where the tiled kernel computes
// [1024, 256] x [256, 256] at 180 (512: 160); on Intel CPUs MKL is the fast one. So the choice is measured once
// per (K, N, dtype) and process, on shapes the tiled kernel runs without cache blocking (W^T packed within
// kTiledMaxPackedBytes, K <= kTiledMaxDepth); MONKEY_KERNELS_CPU_GEMM=blas / tiled pins it (tiled: every shape).
constexpr int64_t kTiledMaxDepth = 512;
constexpr int64_t kTiledMaxPackedBytes = int64_t(1) << 20;
constexpr double kTiledMinSpeedup = 1.1;  // a margin, so that timing noise does not flip a close call

template <typename T, typename F>
double best_seconds(const F& f) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// rows of C (+)= L R by the tiled kernel, split over the threads when `parallel` (outside a parallel region)
template <typename T>
void tiled_rows(const T* l, int64_t l_row, int64_t l_col, const T* r, int64_t r_ld, int64_t rows, int64_t depth,
                T* c, int64_t c_ld, int64_t width, const T* bias, bool parallel) {
  auto body = [&](int64_t i0, int64_t i1) {
    lowrank_gemm<T>(l + i0 * l_row, l_row, l_col, r, r_ld, i1 - i0, depth, c + i0 * c_ld, c_ld, width, T(1),
                    /*accumulate=*/false, bias, /*c_in_ld=*/0);  // C = bias (every row) + L R
  };
  if (parallel) {
    at::parallel_for(0, rows, 48, body);
  } else {
    body(0, rows);
  }
}

template <typename T>
bool tiled_measured_faster(int64_t K, int64_t N) {
  const int64_t rows = 256 * std::max<int64_t>(1, at::get_num_threads()), ld = lowrank_padded(N);
  const at::TensorOptions opts = at::TensorOptions().device(at::kCPU).dtype(c10::CppTypeToScalarType<T>::value);
  // deterministic values in [-1, 1) (not torch.rand: the measurement must not move the user's RNG stream)
  Tensor x = at::empty({rows, K}, opts), w = at::empty({N, K}, opts);
  uint32_t state = 12345;
  for (Tensor* t : {&x, &w}) {
    T* p = t->data_ptr<T>();
    for (int64_t i = 0; i < t->numel(); ++i) {
      state = state * 1664525u + 1013904223u;
      p[i] = static_cast<T>(static_cast<double>(state >> 8) / 8388608.0 - 1.0);
    }
  }
  Tensor out = at::empty({rows, N}, opts);
  std::vector<T> packed(static_cast<size_t>(K * ld));
  pack_operand<T>(w, 0, w.stride(1), w.stride(0), K, N, packed.data(), ld);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const double blas = best_seconds<T>([&] { at::mm_out(out, x, w.t()); });
  const double tiled = best_seconds<T>([&] {
    tiled_rows<T>(xp, K, 1, packed.data(), ld, rows, K, op, N, N, nullptr, /*parallel=*/true);
  });
  return tiled * kTiledMinSpeedup < blas;
}

// Whether the base GEMM X [., K] W^T (W [N, K]) runs the tiled kernel; measured at first use per shape.
template <typename T>
bool tiled_base_gemm(int64_t K, int64_t N) {
  const char* mode = std::getenv("MONKEY_KERNELS_CPU_GEMM");
  if (mode != nullptr && std::strcmp(mode, "blas") == 0) return false;
  if (mode != nullptr && std::strcmp(mode, "tiled") == 0) return true;
  TORCH_CHECK(mode == nullptr || mode[0] == '\0' || std::strcmp(mode, "auto") == 0,
              "MONKEY_KERNELS_CPU_GEMM must be auto, blas or tiled, got '", mode, "'");
  if (K > kTiledMaxDepth || K * lowrank_padded(N) * static_cast<int64_t>(sizeof(T)) > kTiledMaxPackedBytes) return false;
  static std::mutex lock;
  static std::map<std::tuple<int64_t, int64_t, size_t>, bool> decided;
  const auto key = std::make_tuple(K, N, sizeof(T));
  {
    std::lock_guard<std::mutex> guard(lock);
    const auto it = decided.find(key);
    if (it != decided.end()) return it->second;
  }
  const bool tiled = tiled_measured_faster<T>(K, N);  // outside the lock: it runs GEMMs on every thread
  std::lock_guard<std::mutex> guard(lock);
  return decided.emplace(key, tiled).first->second;  // a concurrent first call may have decided already
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
  const std::vector<bool> owns = owning_adapters(segs, A);
  AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_shrink", [&] {
    using T = scalar_t;
    // adapter a's A^T [K, rank] (W[a][:rank] read transposed), rows of lowrank_padded(R)
    const int64_t ld = lowrank_padded(R);
    const std::vector<T> packed = pack_adapters<T>(weight, owns, rank, K * ld, ld, [&](int64_t a) {
      return std::make_tuple(a * weight.stride(0), weight.stride(2), weight.stride(1), K, rank[a]);
    });
    T* h = out.data_ptr<T>();
    at::parallel_for(0, M, kMinChunkRows, [&](int64_t r0, int64_t r1) {
      std::vector<T> buffer;
      for_each_piece(segs, r0, r1, [&](int64_t p0, int64_t p1, int64_t a) {
        if (a < 0 || rank[a] == 0) return;
        const Block<T> l = read_block<T>(x, mask, p0, p1, 0, K, buffer);
        lowrank_gemm<T>(l.data, l.row, l.col, packed.data() + a * K * ld, ld, p1 - p0, K, h + p0 * r_block, r_block,
                        rank[a], T(1), /*accumulate=*/false);
      });
    });
  });
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
  const Tensor b = bias.has_value() ? bias->to(acc).contiguous() : Tensor();  // dense: the tiled GEMM reads it raw
  const Tensor h_acc = has_lora ? h->slice(1, 0, R).to(acc) : Tensor();  // a view for an fp32 / fp64 h
  const bool direct = out_dtype == acc;  // fp32 / fp64 accumulate in the output itself

  AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_fused_gemm", [&] {
    using T = scalar_t;
    // adapter a's E^T [rank, N] (expand[a][:, :rank] read transposed), rows of lowrank_padded(N)
    const int64_t ld = lowrank_padded(N);
    const std::vector<T> packed =
        has_lora ? pack_adapters<T>(*expand, owning_adapters(segs, A), rank, R * ld, ld, [&](int64_t a) {
          return std::make_tuple(a * expand->stride(0), expand->stride(2), expand->stride(1), rank[a], N);
        })
                 : std::vector<T>();
    const T* hp = has_lora ? h_acc.const_data_ptr<T>() : nullptr;
    const int64_t h_row = has_lora ? h_acc.stride(0) : 0, h_col = has_lora ? h_acc.stride(1) : 0;
    const bool residual_raw = residual.has_value() && residual->scalar_type() == acc;
    const int64_t K = has_base ? x->size(1) : 0;
    const bool tiled = has_base && tiled_base_gemm<T>(K, N);
    std::vector<T> w_packed;  // W^T [K, N] for the tiled base GEMM, else W^T for BLAS (W.t() views stay views)
    if (tiled) {
      w_packed.resize(static_cast<size_t>(K * ld));
      pack_operand<T>(*weight, 0, weight->stride(1), weight->stride(0), K, N, w_packed.data(), ld);
    }
    const Tensor w_t = has_base && !tiled ? weight->to(acc).t() : Tensor();

    parallel_row_chunks(M, [&](int64_t r0, int64_t r1) {
      const int64_t n = r1 - r0;
      Tensor acc_c = direct ? out.slice(0, r0, r1) : at::empty({n, N}, opts.dtype(acc));
      if (tiled) {
        const Tensor xc = x->slice(0, r0, r1).to(acc);
        tiled_rows<T>(xc.const_data_ptr<T>(), xc.stride(0), xc.stride(1), w_packed.data(), ld, n, K,
                      acc_c.data_ptr<T>(), N, N, b.defined() ? b.const_data_ptr<T>() : nullptr, /*parallel=*/false);
      } else if (has_base) {
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
      T* c = acc_c.data_ptr<T>();  // [n, N], contiguous
      std::vector<T> term;
      std::vector<uint8_t> keep(mask.active ? N : 0);
      // Epilogue in row blocks: LoRA terms, residual and (half outputs) the rounding while a block is in cache.
      for (int64_t b0 = r0; b0 < r1; b0 += kEpilogueRows) {
        const int64_t b1 = std::min(r1, b0 + kEpilogueRows);
        if (has_lora) {
          for_each_piece(segs, b0, b1, [&](int64_t p0, int64_t p1, int64_t a) {
            if (a < 0 || rank[a] == 0) return;
            const T* e = packed.data() + a * R * ld;
            T* dst = c + (p0 - r0) * N;
            const int64_t rows = p1 - p0;
            if (!mask.active) {
              lowrank_gemm<T>(hp + p0 * h_row, h_row, h_col, e, ld, rows, rank[a], dst, N, N,
                              static_cast<T>(scales[a]), /*accumulate=*/true);
              return;
            }
            term.resize(static_cast<size_t>(rows * N));
            lowrank_gemm<T>(hp + p0 * h_row, h_row, h_col, e, ld, rows, rank[a], term.data(), N, N, T(1),
                            /*accumulate=*/false);
            const T alpha = static_cast<T>(scales[a] / (1.0 - mask.p));
            for (int64_t i = 0; i < rows; ++i) {
              monkey_kernels::mask_row_bytes(mask.row(p0 + i), 0, N, keep.data());
              const T* t = term.data() + i * N;
              T* d = dst + i * N;
              for (int64_t j = 0; j < N; ++j) d[j] += keep[j] ? alpha * t[j] : T(0);  // selected: no 0 * inf
            }
          });
        }
        if (residual_raw) {
          const T* res = residual->const_data_ptr<T>();
          const int64_t s0 = residual->stride(0), s1 = residual->stride(1);
          for (int64_t i = b0; i < b1; ++i) {
            T* d = c + (i - r0) * N;
            for (int64_t j = 0; j < N; ++j) d[j] += res[i * s0 + j * s1];
          }
        } else if (residual.has_value()) {
          add_block<T>(c + (b0 - r0) * N, N, *residual, b0, b1 - b0, N);
        }
        if (!direct) out.slice(0, b0, b1).copy_(acc_c.slice(0, b0 - r0, b1 - r0));  // the one rounding of halves
      }
    });
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
  // Sums land in the output itself when it has the accumulation dtype, else in one buffer rounded at the end.
  Tensor sums = out_dtype == acc ? out : at::empty({A, N, R}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_outer", [&] {
    using T = scalar_t;
    // y [M, R] packed once (rows of lowrank_padded(R)), not once per column block
    const int64_t ld = lowrank_padded(R);
    std::vector<T> y_packed(static_cast<size_t>(M * ld));
    pack_operand<T>(y, 0, y.stride(0), y.stride(1), M, R, y_packed.data(), ld);
    T* res = sums.data_ptr<T>();
    const int64_t blocks = (N + kOuterColumns - 1) / kOuterColumns;
    at::parallel_for(0, A * blocks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> buffer;
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t a = item / blocks;
        const int64_t c0 = (item % blocks) * kOuterColumns, c1 = std::min(N, c0 + kOuterColumns);
        const int64_t width = ranks.has_value() ? (owned[a].empty() ? 0 : live[a]) : R;
        T* dst = res + a * N * R + c0 * R;  // [c1 - c0, R], row stride R
        std::fill(dst, dst + (c1 - c0) * R, T(0));
        if (width == 0) continue;
        for (int64_t g : owned[a]) {
          const int64_t s0 = segs.indptr[g], s1 = segs.indptr[g + 1];
          // element (column n, row i) of drop(x)^T: rows of C are x's columns. (Measured against C^T = y^T x
          // with x's rows as the R operand: this column-strip form streams a cold x faster, the other wins
          // by ~10% when x is in cache, as in the merged GEMM's pass.)
          const Block<T> xs = read_block<T>(x, mask, s0, s1, c0, c1, buffer);
          lowrank_gemm<T>(xs.data, xs.col, xs.row, y_packed.data() + s0 * ld, ld, c1 - c0, s1 - s0, dst, R, width,
                          T(1), /*accumulate=*/true);
        }
        if (scales[a] != 1.0) {
          const T s = static_cast<T>(scales[a]);
          for (int64_t i = 0; i < c1 - c0; ++i)
            for (int64_t j = 0; j < width; ++j) dst[i * R + j] *= s;
        }
      }
    });
  });
  if (out_dtype != acc) out.copy_(sums);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// merged GEMM (no dropout, LoRA input = GEMM input), with the LoRA passes that read the same input
// ---------------------------------------------------------------------------------------------------
// OUT[i]   = X[i] @ (Wb + s[a] * UP[a][:, :rank] @ DOWN[a][:rank])^T + bias + RES[i]
// SHRINK[i] = X[i] @ DOWN[a][:rank]^T                      (r_block > 0: [M, r_block], fp32 / fp64)
// OUTER[a]  = s[a] * sum_{rows i of a} X[i]^T @ Y[i, :R]   (outer_y = Y given: [A, K, R], dtype of x)
//
// The rows of adapter a see the merged weight W_a = Wb + s_a UP_a DOWN_a, so their LoRA term rides inside one
// large GEMM instead of two rank-r GEMMs. Building W_a costs 2 N K r flops against 2 rows_a (N + K) r for the
// LoRA term itself, so an adapter is merged only when rows_a (N + K) >= N K; the others get the base GEMM plus
// the two rank-r GEMMs. Every GEMM here is one call over a whole segment at the top level (BLAS, or the
// row-split low-rank kernel, uses every thread).
//
// SHRINK and OUTER are the rank-r passes over X that the autograd formula needs anyway. They run segment by
// segment right after the segment's GEMM, while X[segment] is still in cache: each is memory-bound on its
// own (16 flops per element of X at rank 16), so a separate pass re-reads X from memory.
//
// Forward: Wb = W [N, K], DOWN = A [A, R, K], UP = B [A, N, R]; SHRINK = H. Input gradient (no dropout,
// V = U): dX = dY (W + s B A) = dY @ (W^T + s A^T B^T)^T, i.e. Wb = W^T, DOWN = B^T, UP = A^T; then SHRINK
// = G = dY B and, with Y = H, OUTER = dB = s sum dY^T H.
std::tuple<Tensor, Tensor, Tensor> multi_lora_merged_gemm(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& down, const Tensor& up,
    const OptTensor& scale, const OptTensor& residual, const Tensor& seg_indptr, const Tensor& adapter_ids,
    const Tensor& ranks, at::ScalarType out_dtype, int64_t r_block, const OptTensor& outer_y) {
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
  TORCH_CHECK(r_block == 0 || r_block >= R, "r_block = ", r_block, " must be 0 (no shrink) or >= R = ", R);
  if (outer_y.has_value()) {
    check_float(*outer_y, "outer_y");
    TORCH_CHECK(outer_y->dim() == 2 && outer_y->size(0) == M && outer_y->size(1) >= R,
                "outer_y must be [M = ", M, ", >= R = ", R, "], got ", outer_y->sizes());
  }
  check_epilogue(out_dtype, bias, residual, M, N);
  const Segments segs = read_segments(seg_indptr, adapter_ids, M, A);
  const std::vector<int64_t> rank = read_ranks(ranks, A, R);
  const std::vector<double> scales = read_scale(scale, A);
  const at::ScalarType acc = acc_type(out_dtype);
  const at::TensorOptions opts = at::TensorOptions().device(at::kCPU).dtype(acc);
  Tensor out = monkey_kernels::fresh_output({M, N}, opts.dtype(out_dtype));
  // Past each rank, on base-only rows and for adapters without rows, SHRINK and OUTER are exactly 0.
  Tensor shrink_out = at::zeros({M, r_block}, opts);
  const bool want_outer = outer_y.has_value();
  Tensor outer_out = at::zeros({want_outer ? A : 0, K, R}, opts.dtype(x.scalar_type()));
  if (M == 0) return {out, shrink_out, outer_out};
  const Tensor w = weight.to(acc);
  const bool transposed = !w.is_contiguous() && w.t().is_contiguous();
  const Tensor b = bias.has_value() ? bias->to(acc).contiguous() : Tensor();  // dense: the tiled GEMM reads it raw
  const bool direct = out_dtype == acc;
  std::vector<int64_t> rows_of(A, 0);
  for (size_t g = 0; g < segs.adapter.size(); ++g)
    if (segs.adapter[g] >= 0) rows_of[segs.adapter[g]] += segs.indptr[g + 1] - segs.indptr[g];

  // Segments in adapter order, so each merged weight is built once and dropped before the next, and each
  // adapter's OUTER is one sum over its segments in row order.
  std::vector<int64_t> order(segs.adapter.size());
  for (size_t g = 0; g < order.size(); ++g) order[g] = static_cast<int64_t>(g);
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return segs.adapter[p] < segs.adapter[q]; });

  AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_merged_gemm", [&] {
    using T = scalar_t;
    const int64_t ld_r = lowrank_padded(R), ld_n = lowrank_padded(N);
    std::vector<T> y_packed;  // outer_y [M, R], rows of ld_r
    if (want_outer) {
      y_packed.resize(static_cast<size_t>(M * ld_r));
      pack_operand<T>(*outer_y, 0, outer_y->stride(0), outer_y->stride(1), M, R, y_packed.data(), ld_r);
    }
    std::vector<T> down_packed, up_packed, merge_packed, h_buffer, outer_sum;
    // The tiled base GEMM reads W_eff^T packed [K, N]: the base once per call, each merged adapter's from it.
    const bool tiled = tiled_base_gemm<T>(K, N);
    std::vector<T> base_packed, merged_packed;
    if (tiled) {
      base_packed.resize(static_cast<size_t>(K * ld_n));
      pack_operand<T>(weight, 0, weight.stride(1), weight.stride(0), K, N, base_packed.data(), ld_n);
    }
    Tensor merged_buffer;  // one buffer for every merged adapter: allocated (and page-faulted) once
    T* shrink = shrink_out.data_ptr<T>();
    int64_t current = -2;
    bool merged = false;
    Tensor w_eff;
    auto flush_outer = [&]() {  // OUTER[current] = s * sum, once the adapter's last segment is done
      if (outer_sum.empty()) return;
      Tensor sum = at::from_blob(outer_sum.data(), {rank[current], K}, opts).t();
      outer_out[current].slice(1, 0, rank[current]).copy_(scales[current] == 1.0 ? sum : sum * scales[current]);
      outer_sum.clear();
    };
    for (int64_t g : order) {
      const int64_t s0 = segs.indptr[g], s1 = segs.indptr[g + 1], rows = s1 - s0;
      if (rows == 0) continue;
      const int64_t a = segs.adapter[g];
      const bool lora = a >= 0 && rank[a] > 0;
      if (a != current) {
        flush_outer();
        current = a;
        merged = lora && rows_of[a] * (N + K) >= N * K;
        w_eff = w;
        if (lora) {
          const int64_t ra = rank[a];
          // DOWN_a^T [K, rank]: the shrink's R operand, and the left factor of a tiled merge
          if (r_block > 0 || !merged || tiled) {
            down_packed.resize(static_cast<size_t>(K * ld_r));
            pack_operand<T>(down, a * down.stride(0), down.stride(2), down.stride(1), K, ra, down_packed.data(), ld_r);
          }
          // UP_a^T [rank, N]: the LoRA term's R operand, and the right factor of a tiled merge
          if (!merged || tiled) {
            up_packed.resize(static_cast<size_t>(ra * ld_n));
            pack_operand<T>(up, a * up.stride(0), up.stride(2), up.stride(1), ra, N, up_packed.data(), ld_n);
          }
          if (merged && tiled) {
            // W_eff^T = Wb^T + s DOWN^T UP^T, packed [K, N]: from the packed base, in one pass
            merged_packed.resize(static_cast<size_t>(K * ld_n));
            const T alpha = static_cast<T>(scales[a]);
            at::parallel_for(0, K, 48, [&](int64_t k0, int64_t k1) {
              lowrank_gemm<T>(down_packed.data() + k0 * ld_r, ld_r, 1, up_packed.data(), ld_n, k1 - k0, ra,
                              merged_packed.data() + k0 * ld_n, ld_n, N, alpha, /*accumulate=*/true,
                              base_packed.data() + k0 * ld_n, ld_n);
            });
          } else if (merged) {
            // W_eff = Wb + s UP DOWN. When weight is W^T of a row-major W (the input gradient), merge in W's own
            // layout, W_eff^T = W + s DOWN^T UP^T, never reading W column-wise once per adapter.
            // [rows_b, cols_b], read in place with its row stride (unit column stride, else a copy)
            const Tensor base_view = transposed ? w.t() : w;
            const Tensor base = base_view.stride(1) == 1 ? base_view : base_view.contiguous();
            const int64_t cols_b = base.size(1);
            if (!merged_buffer.defined()) merged_buffer = at::empty(base.sizes(), opts);
            // right factor [rank, cols_b]: DOWN_a (forward layout) or UP_a^T (transposed)
            merge_packed.resize(static_cast<size_t>(ra * lowrank_padded(cols_b)));
            if (transposed) {
              pack_operand<T>(up, a * up.stride(0), up.stride(2), up.stride(1), ra, cols_b, merge_packed.data(),
                              lowrank_padded(cols_b));
            } else {
              pack_operand<T>(down, a * down.stride(0), down.stride(1), down.stride(2), ra, cols_b,
                              merge_packed.data(), lowrank_padded(cols_b));
            }
            // left factor [rows_b, rank]: UP_a (forward) or DOWN_a^T (transposed), read in place
            const Tensor left_t = transposed ? down : up;
            const int64_t l_row = transposed ? down.stride(2) : up.stride(1);
            const int64_t l_col = transposed ? down.stride(1) : up.stride(2);
            std::vector<T> left_buffer;
            const Tensor left = left_t.select(0, a);
            const T* lp;
            if (left_t.scalar_type() == acc) {
              lp = left.const_data_ptr<T>();
            } else {
              left_buffer.resize(static_cast<size_t>(base.size(0) * ra));
              pack_operand<T>(left_t, a * left_t.stride(0), l_row, l_col, base.size(0), ra, left_buffer.data(), ra);
              lp = left_buffer.data();
            }
            const int64_t lr = left_t.scalar_type() == acc ? l_row : ra;
            const int64_t lc = left_t.scalar_type() == acc ? l_col : 1;
            T* wp = merged_buffer.data_ptr<T>();
            const T* bp = base.const_data_ptr<T>();
            const int64_t b_ld = base.stride(0);
            const T alpha = static_cast<T>(scales[a]);
            at::parallel_for(0, base.size(0), 48, [&](int64_t i0, int64_t i1) {
              lowrank_gemm<T>(lp + i0 * lr, lr, lc, merge_packed.data(), lowrank_padded(cols_b), i1 - i0, ra,
                              wp + i0 * cols_b, cols_b, cols_b, alpha, /*accumulate=*/true, bp + i0 * b_ld, b_ld);
            });
            w_eff = transposed ? merged_buffer.t() : merged_buffer;
          }
          if (want_outer) outer_sum.assign(static_cast<size_t>(ra * K), T(0));  // [rank, K]: OUTER[a]^T
        }
      }
      const Tensor xs = x.slice(0, s0, s1).to(acc);
      Tensor dst = direct ? out.slice(0, s0, s1) : at::empty({rows, N}, opts);
      if (tiled) {
        const T* r = lora && merged ? merged_packed.data() : base_packed.data();
        tiled_rows<T>(xs.const_data_ptr<T>(), xs.stride(0), xs.stride(1), r, ld_n, rows, K, dst.data_ptr<T>(), N, N,
                      b.defined() ? b.const_data_ptr<T>() : nullptr, /*parallel=*/true);
      } else if (b.defined()) {
        at::addmm_out(dst, b, xs, w_eff.t());
      } else {
        at::mm_out(dst, xs, w_eff.t());
      }
      if (lora) {
        const int64_t ra = rank[a];
        const T* xp = xs.const_data_ptr<T>();
        const int64_t x_row = xs.stride(0), x_col = xs.stride(1);
        // the shrink X DOWN_a^T: an output (r_block > 0) and, for an adapter not merged, the LoRA term's input
        if (r_block > 0 || !merged) {
          T* hp = shrink + s0 * r_block;
          int64_t h_ld = r_block;
          if (r_block == 0) {
            h_buffer.resize(static_cast<size_t>(rows * ra));
            hp = h_buffer.data();
            h_ld = ra;
          }
          at::parallel_for(0, rows, 48, [&](int64_t i0, int64_t i1) {
            lowrank_gemm<T>(xp + i0 * x_row, x_row, x_col, down_packed.data(), ld_r, i1 - i0, K, hp + i0 * h_ld, h_ld,
                            ra, T(1), /*accumulate=*/false);
          });
          if (!merged) {
            T* dp = dst.data_ptr<T>();
            const T alpha = static_cast<T>(scales[a]);
            at::parallel_for(0, rows, 48, [&](int64_t i0, int64_t i1) {
              lowrank_gemm<T>(hp + i0 * h_ld, h_ld, 1, up_packed.data(), ld_n, i1 - i0, ra, dp + i0 * N, N, N, alpha,
                              /*accumulate=*/true);
            });
          }
        }
        if (want_outer) {  // OUTER^T += Y^T X over the segment's rows, in column blocks of X (X rows: the R operand)
          // one call per thread (16-column tiles split over the threads): each call walks X's rows once
          const T* yp = y_packed.data() + s0 * ld_r;
          const int64_t tiles = (K + monkey_kernels::kLowRankColumns - 1) / monkey_kernels::kLowRankColumns;
          at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
            std::vector<T> buffer;
            const int64_t k0 = t0 * monkey_kernels::kLowRankColumns;
            const int64_t k1 = std::min(K, t1 * monkey_kernels::kLowRankColumns);
            const Block<T> xb = read_block<T>(xs, DropoutMask{}, 0, rows, k0, k1, buffer, /*r_operand=*/true);
            lowrank_gemm<T>(yp, 1, ld_r, xb.data, xb.row, ra, rows, outer_sum.data() + k0, K, k1 - k0, T(1),
                            /*accumulate=*/true);
          });
        }
      }
      if (residual.has_value()) dst.add_(residual->slice(0, s0, s1));
      if (!direct) out.slice(0, s0, s1).copy_(dst);
    }
    flush_outer();
  });
  return {out, shrink_out, outer_out};
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

bool tiled_base_gemm_choice(int64_t K, int64_t N, bool float64) {
  TORCH_CHECK(K >= 0 && N >= 0, "K and N must be >= 0, got ", K, " and ", N);
  return float64 ? tiled_base_gemm<double>(K, N) : tiled_base_gemm<float>(K, N);
}

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
      "Tensor? residual, Tensor seg_indptr, Tensor adapter_ids, Tensor ranks, ScalarType out_dtype, "
      "int r_block=0, Tensor? outer_y=None) -> (Tensor, Tensor, Tensor)");
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
