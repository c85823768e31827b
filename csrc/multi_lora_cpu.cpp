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
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "dropout_hash.h"
#include "lowrank_gemm.h"
#include "outputs.h"
#include "settings.h"

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
// kTiledMaxPackedBytes, K <= kTiledMaxDepth); MONKEY_KERNELS_CPU_GEMM=blas / tiled pins it (tiled: every shape;
// passed in as settings().cpu_gemm, see settings.h).
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
  const monkey_kernels::CpuGemmMode mode = monkey_kernels::cpu_gemm_mode();
  if (mode == monkey_kernels::CpuGemmMode::kBlas) return false;
  if (mode == monkey_kernels::CpuGemmMode::kTiled) return true;
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
// The checked sizes of a fused GEMM call and which of its terms are present.
struct FusedGemmShape {
  int64_t M, N, K, A, R;
  bool has_base, has_lora;
};

FusedGemmShape check_fused_gemm(const OptTensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& h,
                                const OptTensor& expand, const OptTensor& residual, at::ScalarType out_dtype,
                                int64_t M, int64_t N) {
  TORCH_CHECK(M >= 0 && N >= 0, "num_rows and out_features must be >= 0, got ", M, " and ", N);
  check_epilogue(out_dtype, bias, residual, M, N);
  FusedGemmShape s{M, N, 0, 0, 0, x.has_value() && x->size(1) > 0, h.has_value()};
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
  if (s.has_base) s.K = x->size(1);
  if (s.has_lora) {
    check_float(*h, "h");
    TORCH_CHECK(expand.has_value(), "expand is required when h is given");
    check_float(*expand, "expand");
    TORCH_CHECK(expand->dim() == 3 && expand->size(1) == N, "expand must be [num_adapters, out_features = ", N,
                ", R], got ", expand->sizes());
    s.A = expand->size(0);
    s.R = expand->size(2);
    TORCH_CHECK(h->dim() == 2 && h->size(0) == M && h->size(1) >= s.R, "h must be [num_rows = ", M,
                ", >= R = ", s.R, "], got ", h->sizes());
  }
  return s;
}

// What every row chunk of a fused GEMM reads, prepared once per call (T: the accumulation type). Operands are
// converted and packed here, outside the chunks (copies only where a dtype differs from T).
template <typename T>
struct FusedGemmPlan {
  FusedGemmShape shape;
  const Segments* segs;
  const std::vector<int64_t>* rank;
  const std::vector<double>* scales;
  DropoutMask mask;       // of the LoRA term, over [M, N]
  bool tiled = false;     // the base GEMM by the register-tiled kernel (else BLAS)
  bool direct = false;    // fp32 / fp64 outputs accumulate in the output itself
  int64_t ld = 0;         // row length of the packed [., N] operands
  std::vector<T> e_packed;  // adapter a's E^T [rank, N] (expand[a][:, :rank] read transposed)
  std::vector<T> w_packed;  // W^T [K, N] for the tiled base GEMM
  Tensor w_t;               // W^T for BLAS (a W.t() view stays a view)
  Tensor bias;              // dense, in T: the tiled GEMM reads it raw
  const T* h = nullptr;     // H [M, >= R] in T, and its strides
  int64_t h_row = 0, h_col = 0;
};

template <typename T>
FusedGemmPlan<T> plan_fused_gemm(const FusedGemmShape& shape, const Segments& segs, const std::vector<int64_t>& rank,
                                 const std::vector<double>& scales, const DropoutMask& mask, const OptTensor& weight,
                                 const OptTensor& expand, const Tensor& h_acc, const Tensor& bias, bool direct) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  FusedGemmPlan<T> p;
  p.shape = shape;
  p.segs = &segs;
  p.rank = &rank;
  p.scales = &scales;
  p.mask = mask;
  p.direct = direct;
  p.bias = bias;
  p.ld = lowrank_padded(shape.N);
  if (shape.has_lora) {
    p.e_packed = pack_adapters<T>(*expand, owning_adapters(segs, shape.A), rank, shape.R * p.ld, p.ld,
                                  [&](int64_t a) {
                                    return std::make_tuple(a * expand->stride(0), expand->stride(2),
                                                           expand->stride(1), rank[a], shape.N);
                                  });
    p.h = h_acc.const_data_ptr<T>();
    p.h_row = h_acc.stride(0);
    p.h_col = h_acc.stride(1);
  }
  p.tiled = shape.has_base && tiled_base_gemm<T>(shape.K, shape.N);
  if (p.tiled) {
    p.w_packed.resize(static_cast<size_t>(shape.K * p.ld));
    pack_operand<T>(*weight, 0, weight->stride(1), weight->stride(0), shape.K, shape.N, p.w_packed.data(), p.ld);
  } else if (shape.has_base) {
    p.w_t = weight->to(acc).t();
  }
  return p;
}

// acc_c [r1 - r0, N] = X[r0:r1] W^T + bias: one base GEMM per chunk (tiled kernel or BLAS), or the bias (zeros)
// without a base GEMM.
template <typename T>
void fused_base_rows(const FusedGemmPlan<T>& p, const OptTensor& x, int64_t r0, int64_t r1, Tensor& acc_c) {
  const int64_t n = r1 - r0, N = p.shape.N;
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  if (p.tiled) {
    const Tensor xc = x->slice(0, r0, r1).to(acc);
    tiled_rows<T>(xc.const_data_ptr<T>(), xc.stride(0), xc.stride(1), p.w_packed.data(), p.ld, n, p.shape.K,
                  acc_c.data_ptr<T>(), N, N, p.bias.defined() ? p.bias.template const_data_ptr<T>() : nullptr,
                  /*parallel=*/false);
  } else if (p.shape.has_base) {
    Tensor xc = x->slice(0, r0, r1).to(acc);
    if (p.bias.defined()) {
      at::addmm_out(acc_c, p.bias, xc, p.w_t);
    } else {
      at::mm_out(acc_c, xc, p.w_t);
    }
  } else if (p.bias.defined()) {
    acc_c.copy_(p.bias.expand({n, N}));
  } else {
    acc_c.zero_();
  }
}

// Adds each segment piece's LoRA term s[a] H E[a]^T (dropped: masked and scaled by 1 / (1 - p)) to the rows
// [b0, b1) of the chunk starting at r0 (c: the chunk's [., N] accumulator).
template <typename T>
void fused_lora_rows(const FusedGemmPlan<T>& p, T* c, int64_t r0, int64_t b0, int64_t b1, std::vector<T>& term,
                     std::vector<uint8_t>& keep) {
  const int64_t N = p.shape.N, ld = p.ld;
  const std::vector<int64_t>& rank = *p.rank;
  for_each_piece(*p.segs, b0, b1, [&](int64_t p0, int64_t p1, int64_t a) {
    if (a < 0 || rank[a] == 0) return;
    const T* e = p.e_packed.data() + a * p.shape.R * ld;
    T* dst = c + (p0 - r0) * N;
    const int64_t rows = p1 - p0;
    if (!p.mask.active) {
      lowrank_gemm<T>(p.h + p0 * p.h_row, p.h_row, p.h_col, e, ld, rows, rank[a], dst, N, N,
                      static_cast<T>((*p.scales)[a]), /*accumulate=*/true);
      return;
    }
    term.resize(static_cast<size_t>(rows * N));
    lowrank_gemm<T>(p.h + p0 * p.h_row, p.h_row, p.h_col, e, ld, rows, rank[a], term.data(), N, N, T(1),
                    /*accumulate=*/false);
    const T alpha = static_cast<T>((*p.scales)[a] / (1.0 - p.mask.p));
    for (int64_t i = 0; i < rows; ++i) {
      monkey_kernels::mask_row_bytes(p.mask.row(p0 + i), 0, N, keep.data());
      const T* t = term.data() + i * N;
      T* d = dst + i * N;
      for (int64_t j = 0; j < N; ++j) d[j] += keep[j] ? alpha * t[j] : T(0);  // selected: no 0 * inf
    }
  });
}

// Adds RES[b0:b1] to the chunk's accumulator rows (raw when the residual has the accumulation type).
template <typename T>
void fused_residual_rows(const Tensor& residual, T* c, int64_t r0, int64_t b0, int64_t b1, int64_t N) {
  if (residual.scalar_type() != c10::CppTypeToScalarType<T>::value) {
    add_block<T>(c + (b0 - r0) * N, N, residual, b0, b1 - b0, N);
    return;
  }
  const T* res = residual.const_data_ptr<T>();
  const int64_t s0 = residual.stride(0), s1 = residual.stride(1);
  for (int64_t i = b0; i < b1; ++i) {
    T* d = c + (i - r0) * N;
    for (int64_t j = 0; j < N; ++j) d[j] += res[i * s0 + j * s1];
  }
}

// One row chunk [r0, r1): its base GEMM in one call, then the epilogue in row blocks that stay in cache: LoRA
// terms, residual and (half outputs) the one rounding into the output.
template <typename T>
void fused_gemm_chunk(const FusedGemmPlan<T>& p, const OptTensor& x, const OptTensor& residual, Tensor& out,
                      int64_t r0, int64_t r1) {
  const int64_t N = p.shape.N;
  Tensor acc_c = p.direct ? out.slice(0, r0, r1)
                          : at::empty({r1 - r0, N}, at::TensorOptions().device(at::kCPU).dtype(
                                                        c10::CppTypeToScalarType<T>::value));
  fused_base_rows<T>(p, x, r0, r1, acc_c);
  T* c = acc_c.data_ptr<T>();  // [r1 - r0, N], contiguous
  std::vector<T> term;
  std::vector<uint8_t> keep(p.mask.active ? N : 0);
  for (int64_t b0 = r0; b0 < r1; b0 += kEpilogueRows) {
    const int64_t b1 = std::min(r1, b0 + kEpilogueRows);
    if (p.shape.has_lora) fused_lora_rows<T>(p, c, r0, b0, b1, term, keep);
    if (residual.has_value()) fused_residual_rows<T>(*residual, c, r0, b0, b1, N);
    if (!p.direct) out.slice(0, b0, b1).copy_(acc_c.slice(0, b0 - r0, b1 - r0));  // the one rounding of halves
  }
}

Tensor multi_lora_fused_gemm(const OptTensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& h,
                             const OptTensor& expand, const OptTensor& scale, const OptTensor& residual,
                             const Tensor& seg_indptr, const Tensor& adapter_ids, const Tensor& ranks,
                             int64_t num_rows, int64_t out_features, at::ScalarType out_dtype,
                             int64_t seed, double dropout_p) {
  const FusedGemmShape shape = check_fused_gemm(x, weight, bias, h, expand, residual, out_dtype, num_rows,
                                                out_features);
  const int64_t M = shape.M, N = shape.N, A = shape.A, R = shape.R;
  const bool has_lora = shape.has_lora;
  const at::ScalarType acc = acc_type(out_dtype);
  const std::vector<int64_t> rank = has_lora ? read_ranks(ranks, A, R) : std::vector<int64_t>();
  const std::vector<double> scales = has_lora ? read_scale(scale, A) : std::vector<double>();
  const Segments segs = read_segments(seg_indptr, adapter_ids, M, has_lora ? A : INT64_MAX);
  // Dropout of the LoRA term (the input gradient of a dropped LoRA input): a mask over [M, N].
  const DropoutMask mask = dropout_mask(seed, has_lora ? dropout_p : 0.0);

  Tensor out = monkey_kernels::fresh_output({M, N}, at::TensorOptions().device(at::kCPU).dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const Tensor b = bias.has_value() ? bias->to(acc).contiguous() : Tensor();  // dense: the tiled GEMM reads it raw
  const Tensor h_acc = has_lora ? h->slice(1, 0, R).to(acc) : Tensor();  // a view for an fp32 / fp64 h
  AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_fused_gemm", [&] {
    using T = scalar_t;
    const FusedGemmPlan<T> plan =
        plan_fused_gemm<T>(shape, segs, rank, scales, mask, weight, expand, h_acc, b, /*direct=*/out_dtype == acc);
    parallel_row_chunks(M, [&](int64_t r0, int64_t r1) { fused_gemm_chunk<T>(plan, x, residual, out, r0, r1); });
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

// The checked sizes of a merged GEMM call.
struct MergedGemmShape {
  int64_t M, K, N, A, R;
};

MergedGemmShape check_merged_gemm(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& down,
                                  const Tensor& up, const OptTensor& residual, at::ScalarType out_dtype,
                                  int64_t r_block, const OptTensor& outer_y) {
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
  return {M, K, N, A, R};
}

// Segments in adapter order (stable: row order within an adapter), so each merged weight is built once and
// dropped before the next, and each adapter's OUTER is one sum over its segments in row order.
std::vector<int64_t> segments_by_adapter(const Segments& segs) {
  std::vector<int64_t> order(segs.adapter.size());
  for (size_t g = 0; g < order.size(); ++g) order[g] = static_cast<int64_t>(g);
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return segs.adapter[p] < segs.adapter[q]; });
  return order;
}

// The merged GEMM of one call (T: the accumulation type), walked segment by segment in adapter order: on the
// first segment of an adapter, start_adapter packs its factors and builds its merged weight when that pays off;
// run_segment computes the segment's rows of OUT, SHRINK and its share of OUTER; finish_adapter writes OUTER[a].
template <typename T>
class MergedGemm {
 public:
  MergedGemm(const MergedGemmShape& shape, const Tensor& x, const Tensor& weight, const Tensor& bias,
             const Tensor& down, const Tensor& up, const OptTensor& residual, const Segments& segs,
             const std::vector<int64_t>& rank, const std::vector<double>& scales, int64_t r_block,
             const OptTensor& outer_y, Tensor& out, Tensor& shrink_out, Tensor& outer_out)
      : s_(shape), x_(x), down_(down), up_(up), residual_(residual), segs_(segs), rank_(rank), scales_(scales),
        r_block_(r_block), want_outer_(outer_y.has_value()), out_(out), shrink_out_(shrink_out),
        outer_out_(outer_out), opts_(at::TensorOptions().device(at::kCPU).dtype(c10::CppTypeToScalarType<T>::value)),
        ld_r_(lowrank_padded(shape.R)), ld_n_(lowrank_padded(shape.N)) {
    w_ = weight.to(opts_.dtype());
    transposed_ = !w_.is_contiguous() && w_.t().is_contiguous();
    bias_ = bias;
    direct_ = out.scalar_type() == opts_.dtype().toScalarType();
    rows_of_.assign(shape.A, 0);
    for (size_t g = 0; g < segs.adapter.size(); ++g)
      if (segs.adapter[g] >= 0) rows_of_[segs.adapter[g]] += segs.indptr[g + 1] - segs.indptr[g];
    if (want_outer_) {  // outer_y [M, R], rows of ld_r
      y_packed_.resize(static_cast<size_t>(shape.M * ld_r_));
      pack_operand<T>(*outer_y, 0, outer_y->stride(0), outer_y->stride(1), shape.M, shape.R, y_packed_.data(), ld_r_);
    }
    // The tiled base GEMM reads W_eff^T packed [K, N]: the base once per call, each merged adapter's from it.
    tiled_ = tiled_base_gemm<T>(shape.K, shape.N);
    if (tiled_) {
      base_packed_.resize(static_cast<size_t>(shape.K * ld_n_));
      pack_operand<T>(weight, 0, weight.stride(1), weight.stride(0), shape.K, shape.N, base_packed_.data(), ld_n_);
    }
  }

  void run() {
    int64_t current = -2;
    for (int64_t g : segments_by_adapter(segs_)) {
      const int64_t s0 = segs_.indptr[g], s1 = segs_.indptr[g + 1];
      if (s1 == s0) continue;
      if (segs_.adapter[g] != current) {
        finish_adapter(current);
        current = segs_.adapter[g];
        start_adapter(current);
      }
      run_segment(current, s0, s1);
    }
    finish_adapter(current);
  }

 private:
  // Packs adapter a's factors and, when merging pays off (rows_a (N + K) >= N K: building W_a costs 2 N K r
  // flops against 2 rows_a (N + K) r for the LoRA term), builds its merged weight.
  void start_adapter(int64_t a) {
    lora_ = a >= 0 && rank_[a] > 0;
    merged_ = lora_ && rows_of_[a] * (s_.N + s_.K) >= s_.N * s_.K;
    w_eff_ = w_;
    if (!lora_) return;
    const int64_t ra = rank_[a];
    // DOWN_a^T [K, rank]: the shrink's R operand, and the left factor of a tiled merge
    if (r_block_ > 0 || !merged_ || tiled_) {
      down_packed_.resize(static_cast<size_t>(s_.K * ld_r_));
      pack_operand<T>(down_, a * down_.stride(0), down_.stride(2), down_.stride(1), s_.K, ra, down_packed_.data(),
                      ld_r_);
    }
    // UP_a^T [rank, N]: the LoRA term's R operand, and the right factor of a tiled merge
    if (!merged_ || tiled_) {
      up_packed_.resize(static_cast<size_t>(ra * ld_n_));
      pack_operand<T>(up_, a * up_.stride(0), up_.stride(2), up_.stride(1), ra, s_.N, up_packed_.data(), ld_n_);
    }
    if (merged_ && tiled_) {
      merge_packed(a);
    } else if (merged_) {
      merge_in_layout(a);
    }
    if (want_outer_) outer_sum_.assign(static_cast<size_t>(ra * s_.K), T(0));  // [rank, K]: OUTER[a]^T
  }

  // W_eff^T = Wb^T + s DOWN^T UP^T, packed [K, N]: from the packed base, in one pass.
  void merge_packed(int64_t a) {
    const int64_t ra = rank_[a], N = s_.N;
    merged_packed_.resize(static_cast<size_t>(s_.K * ld_n_));
    const T alpha = static_cast<T>(scales_[a]);
    at::parallel_for(0, s_.K, 48, [&](int64_t k0, int64_t k1) {
      lowrank_gemm<T>(down_packed_.data() + k0 * ld_r_, ld_r_, 1, up_packed_.data(), ld_n_, k1 - k0, ra,
                      merged_packed_.data() + k0 * ld_n_, ld_n_, N, alpha, /*accumulate=*/true,
                      base_packed_.data() + k0 * ld_n_, ld_n_);
    });
  }

  // W_eff = Wb + s UP DOWN for BLAS. When weight is W^T of a row-major W (the input gradient), merge in W's own
  // layout, W_eff^T = W + s DOWN^T UP^T, never reading W column-wise once per adapter.
  void merge_in_layout(int64_t a) {
    const int64_t ra = rank_[a];
    // [rows_b, cols_b], read in place with its row stride (unit column stride, else a copy)
    const Tensor base_view = transposed_ ? w_.t() : w_;
    const Tensor base = base_view.stride(1) == 1 ? base_view : base_view.contiguous();
    const int64_t cols_b = base.size(1), ld_b = lowrank_padded(cols_b);
    if (!merged_buffer_.defined()) merged_buffer_ = at::empty(base.sizes(), opts_);  // allocated (and faulted) once
    // right factor [rank, cols_b]: DOWN_a (forward layout) or UP_a^T (transposed)
    merge_factor_.resize(static_cast<size_t>(ra * ld_b));
    if (transposed_) {
      pack_operand<T>(up_, a * up_.stride(0), up_.stride(2), up_.stride(1), ra, cols_b, merge_factor_.data(), ld_b);
    } else {
      pack_operand<T>(down_, a * down_.stride(0), down_.stride(1), down_.stride(2), ra, cols_b, merge_factor_.data(),
                      ld_b);
    }
    // left factor [rows_b, rank]: UP_a (forward) or DOWN_a^T (transposed), read in place when it has dtype T
    const Tensor& left_t = transposed_ ? down_ : up_;
    const int64_t l_row = transposed_ ? down_.stride(2) : up_.stride(1);
    const int64_t l_col = transposed_ ? down_.stride(1) : up_.stride(2);
    const bool in_place = left_t.scalar_type() == opts_.dtype().toScalarType();
    std::vector<T> left_buffer;
    const T* lp;
    if (in_place) {
      lp = left_t.select(0, a).template const_data_ptr<T>();
    } else {
      left_buffer.resize(static_cast<size_t>(base.size(0) * ra));
      pack_operand<T>(left_t, a * left_t.stride(0), l_row, l_col, base.size(0), ra, left_buffer.data(), ra);
      lp = left_buffer.data();
    }
    const int64_t lr = in_place ? l_row : ra, lc = in_place ? l_col : 1;
    T* wp = merged_buffer_.data_ptr<T>();
    const T* bp = base.const_data_ptr<T>();
    const int64_t b_ld = base.stride(0);
    const T alpha = static_cast<T>(scales_[a]);
    at::parallel_for(0, base.size(0), 48, [&](int64_t i0, int64_t i1) {
      lowrank_gemm<T>(lp + i0 * lr, lr, lc, merge_factor_.data(), ld_b, i1 - i0, ra, wp + i0 * cols_b, cols_b,
                      cols_b, alpha, /*accumulate=*/true, bp + i0 * b_ld, b_ld);
    });
    w_eff_ = transposed_ ? merged_buffer_.t() : merged_buffer_;
  }

  // The segment [s0, s1) of adapter a: its GEMM (one call over the whole segment, every thread), then, while
  // X[segment] is in cache, its shrink (an output, and the LoRA term's input when a is not merged), the LoRA
  // term of an adapter not merged, its share of OUTER, and the residual.
  void run_segment(int64_t a, int64_t s0, int64_t s1) {
    const int64_t rows = s1 - s0, N = s_.N;
    const Tensor xs = x_.slice(0, s0, s1).to(opts_.dtype());
    Tensor dst = direct_ ? out_.slice(0, s0, s1) : at::empty({rows, N}, opts_);
    if (tiled_) {
      const T* r = lora_ && merged_ ? merged_packed_.data() : base_packed_.data();
      tiled_rows<T>(xs.const_data_ptr<T>(), xs.stride(0), xs.stride(1), r, ld_n_, rows, s_.K, dst.data_ptr<T>(), N,
                    N, bias_.defined() ? bias_.const_data_ptr<T>() : nullptr, /*parallel=*/true);
    } else if (bias_.defined()) {
      at::addmm_out(dst, bias_, xs, w_eff_.t());
    } else {
      at::mm_out(dst, xs, w_eff_.t());
    }
    if (lora_) {
      if (r_block_ > 0 || !merged_) shrink_and_expand(a, xs, dst, s0);
      if (want_outer_) accumulate_outer(a, xs, s0);
    }
    if (residual_.has_value()) dst.add_(residual_->slice(0, s0, s1));
    if (!direct_) out_.slice(0, s0, s1).copy_(dst);
  }

  // H = X DOWN_a^T (into SHRINK when r_block > 0, else a scratch buffer) and, for an adapter not merged,
  // dst += s H UP_a^T.
  void shrink_and_expand(int64_t a, const Tensor& xs, Tensor& dst, int64_t s0) {
    const int64_t ra = rank_[a], rows = xs.size(0), N = s_.N;
    const T* xp = xs.const_data_ptr<T>();
    const int64_t x_row = xs.stride(0), x_col = xs.stride(1);
    T* hp = shrink_out_.data_ptr<T>() + s0 * r_block_;
    int64_t h_ld = r_block_;
    if (r_block_ == 0) {
      h_buffer_.resize(static_cast<size_t>(rows * ra));
      hp = h_buffer_.data();
      h_ld = ra;
    }
    at::parallel_for(0, rows, 48, [&](int64_t i0, int64_t i1) {
      lowrank_gemm<T>(xp + i0 * x_row, x_row, x_col, down_packed_.data(), ld_r_, i1 - i0, s_.K, hp + i0 * h_ld, h_ld,
                      ra, T(1), /*accumulate=*/false);
    });
    if (merged_) return;
    T* dp = dst.data_ptr<T>();
    const T alpha = static_cast<T>(scales_[a]);
    at::parallel_for(0, rows, 48, [&](int64_t i0, int64_t i1) {
      lowrank_gemm<T>(hp + i0 * h_ld, h_ld, 1, up_packed_.data(), ld_n_, i1 - i0, ra, dp + i0 * N, N, N, alpha,
                      /*accumulate=*/true);
    });
  }

  // OUTER^T += Y^T X over the segment's rows, in column blocks of X (X's rows: the R operand): one call per
  // thread (16-column tiles split over the threads), each walking X's rows once.
  void accumulate_outer(int64_t a, const Tensor& xs, int64_t s0) {
    const int64_t ra = rank_[a], rows = xs.size(0), K = s_.K;
    const T* yp = y_packed_.data() + s0 * ld_r_;
    const int64_t tiles = (K + monkey_kernels::kLowRankColumns - 1) / monkey_kernels::kLowRankColumns;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> buffer;
      const int64_t k0 = t0 * monkey_kernels::kLowRankColumns;
      const int64_t k1 = std::min(K, t1 * monkey_kernels::kLowRankColumns);
      const Block<T> xb = read_block<T>(xs, DropoutMask{}, 0, rows, k0, k1, buffer, /*r_operand=*/true);
      lowrank_gemm<T>(yp, 1, ld_r_, xb.data, xb.row, ra, rows, outer_sum_.data() + k0, K, k1 - k0, T(1),
                      /*accumulate=*/true);
    });
  }

  // OUTER[a] = s * sum, once the adapter's last segment is done.
  void finish_adapter(int64_t a) {
    if (outer_sum_.empty()) return;
    Tensor sum = at::from_blob(outer_sum_.data(), {rank_[a], s_.K}, opts_).t();
    outer_out_[a].slice(1, 0, rank_[a]).copy_(scales_[a] == 1.0 ? sum : sum * scales_[a]);
    outer_sum_.clear();
  }

  const MergedGemmShape s_;
  const Tensor &x_, &down_, &up_;
  const OptTensor& residual_;
  const Segments& segs_;
  const std::vector<int64_t>& rank_;
  const std::vector<double>& scales_;
  const int64_t r_block_;
  const bool want_outer_;
  Tensor &out_, &shrink_out_, &outer_out_;
  const at::TensorOptions opts_;  // CPU, dtype T
  const int64_t ld_r_, ld_n_;     // row lengths of the packed [., R] and [., N] operands
  Tensor w_, w_eff_, bias_, merged_buffer_;
  bool transposed_ = false, direct_ = false, tiled_ = false, lora_ = false, merged_ = false;
  std::vector<int64_t> rows_of_;
  std::vector<T> y_packed_, down_packed_, up_packed_, merge_factor_, h_buffer_, outer_sum_, base_packed_,
      merged_packed_;
};

std::tuple<Tensor, Tensor, Tensor> multi_lora_merged_gemm(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& down, const Tensor& up,
    const OptTensor& scale, const OptTensor& residual, const Tensor& seg_indptr, const Tensor& adapter_ids,
    const Tensor& ranks, at::ScalarType out_dtype, int64_t r_block, const OptTensor& outer_y) {
  const MergedGemmShape shape = check_merged_gemm(x, weight, bias, down, up, residual, out_dtype, r_block, outer_y);
  const Segments segs = read_segments(seg_indptr, adapter_ids, shape.M, shape.A);
  const std::vector<int64_t> rank = read_ranks(ranks, shape.A, shape.R);
  const std::vector<double> scales = read_scale(scale, shape.A);
  const at::ScalarType acc = acc_type(out_dtype);
  const at::TensorOptions opts = at::TensorOptions().device(at::kCPU).dtype(acc);
  Tensor out = monkey_kernels::fresh_output({shape.M, shape.N}, opts.dtype(out_dtype));
  // Past each rank, on base-only rows and for adapters without rows, SHRINK and OUTER are exactly 0.
  Tensor shrink_out = at::zeros({shape.M, r_block}, opts);
  Tensor outer_out = at::zeros({outer_y.has_value() ? shape.A : 0, shape.K, shape.R}, opts.dtype(x.scalar_type()));
  if (shape.M == 0) return {out, shrink_out, outer_out};
  const Tensor b = bias.has_value() ? bias->to(acc).contiguous() : Tensor();  // dense: the tiled GEMM reads it raw
  AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_merged_gemm", [&] {
    MergedGemm<scalar_t>(shape, x, weight, b, down, up, residual, segs, rank, scales, r_block, outer_y, out,
                         shrink_out, outer_out)
        .run();
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
