// GEMMs where one side is a LoRA rank (at most a few tens): the shrink H = X A^T (N = r), the expand
// Y += s H B^T (K = r), the merge W + s B A (K = r) and the grouped outer products dA, dB (N = r, reduction
// over the rows), in fp32 or fp64 on raw pointers:
//
//   C[i, j] = (accumulate ? C[i, j] : 0) + alpha * sum_{k < K} L[i * l_row + k * l_col] * R[k * r_ld + j]
//   for i < M, j < width.
//
// Why not BLAS: MKL runs these shapes far below its peak (measured on an AMD EPYC, one thread, fp32,
// [1024, 256] x [256, 16]: 76 GFLOP/s for X A^T and 50 for X^T G, against 92 for a square [1024, 256] x
// [256, 256]); this register-tiled kernel runs them at 115-180 GFLOP/s (AVX2 / AVX-512). And a call costs no
// dispatcher round trip: the native ops call it once per segment piece, hundreds of times per layer on
// small tiles. L may have any strides (rows of X for a shrink, columns of X for an outer product); R is
// packed row-major with a row length that is a multiple of kLowRankColumns, so every load of R is one full
// vector (the packing functions are in multi_lora_cpu.cpp).
//
// Each C element is one sum over k in increasing order: the result does not depend on the tiling, on the
// vector path or on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#include "settings.h"

namespace monkey_kernels {

constexpr int64_t kLowRankColumns = 16;  // columns of C per register tile

inline int64_t lowrank_padded(int64_t width) {
  return (width + kLowRankColumns - 1) / kLowRankColumns * kLowRankColumns;
}

namespace lowrank_detail {

template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  typedef T unaligned __attribute__((vector_size(Bytes), aligned(alignof(T))));  // rows carry no alignment
};

template <typename T>
struct Problem {
  const T* l;
  int64_t l_row, l_col;
  const T* r;
  int64_t r_ld;
  int64_t rows, depth;
  T* c;
  int64_t c_ld, width;
  T alpha;
  bool accumulate;
  const T* c_in;  // non-null: C = C_IN + alpha * L R (C_IN with row stride c_in_ld), accumulate ignored
  int64_t c_in_ld;
};

// One MR x 16 tile of C: the accumulators stay in registers for the whole k loop. (Blocking the depth so that
// the tiles share an L1-resident panel of L or R was measured slower, with X cold or in cache: the panels
// stream well from L2, and resuming tiles from C costs more than it saves.)
template <typename T, int Bytes, int MR>
__attribute__((always_inline)) inline void tile(const Problem<T>& p, int64_t i0, int64_t j0) {
  using V = typename Vec<T, Bytes>::type;
  using U = typename Vec<T, Bytes>::unaligned;
  constexpr int lanes = Bytes / sizeof(T);
  constexpr int per_row = kLowRankColumns / lanes;
  V acc[MR][per_row];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < per_row; ++v) acc[m][v] = V{};
  const T* l = p.l + i0 * p.l_row;
  const T* r = p.r + j0;
  for (int64_t k = 0; k < p.depth; ++k) {
    V rk[per_row];
    for (int v = 0; v < per_row; ++v) rk[v] = *reinterpret_cast<const U*>(r + k * p.r_ld + v * lanes);
    const T* lk = l + k * p.l_col;
    for (int m = 0; m < MR; ++m) {
      const T lm = lk[m * p.l_row];
      for (int v = 0; v < per_row; ++v) acc[m][v] += lm * rk[v];
    }
  }
  const int64_t n = std::min<int64_t>(kLowRankColumns, p.width - j0);
  if (n == kLowRankColumns) {  // a full tile: vector loads and stores of C (an expand's epilogue is half its work)
    for (int m = 0; m < MR; ++m) {
      U* c = reinterpret_cast<U*>(p.c + (i0 + m) * p.c_ld + j0);
      const U* c_in = p.c_in != nullptr ? reinterpret_cast<const U*>(p.c_in + (i0 + m) * p.c_in_ld + j0) : c;
      const bool add = p.c_in != nullptr || p.accumulate;
      for (int v = 0; v < per_row; ++v) {
        const V scaled = p.alpha * acc[m][v];
        c[v] = add ? V(c_in[v]) + scaled : scaled;
      }
    }
    return;
  }
  for (int m = 0; m < MR; ++m) {
    T out[kLowRankColumns];
    for (int v = 0; v < per_row; ++v) *reinterpret_cast<U*>(out + v * lanes) = acc[m][v];
    T* c = p.c + (i0 + m) * p.c_ld + j0;
    if (p.c_in != nullptr) {
      const T* c_in = p.c_in + (i0 + m) * p.c_in_ld + j0;
      for (int64_t j = 0; j < n; ++j) c[j] = c_in[j] + p.alpha * out[j];
    } else if (p.accumulate) {
      for (int64_t j = 0; j < n; ++j) c[j] += p.alpha * out[j];
    } else {
      for (int64_t j = 0; j < n; ++j) c[j] = p.alpha * out[j];
    }
  }
}

template <typename T, int Bytes, int MR>
__attribute__((always_inline)) inline void tiles_of(const Problem<T>& p, int64_t& i) {
  for (; i + MR <= p.rows; i += MR)
    for (int64_t j = 0; j < p.width; j += kLowRankColumns) tile<T, Bytes, MR>(p, i, j);
}

// Tiles of MR rows, then the remaining rows in tiles of 4, 2 and 1 (a rank of 16 is 12 + 4 rows, not 12 + 4 x 1).
template <typename T, int Bytes, int MR>
__attribute__((always_inline)) inline void run(const Problem<T>& p) {
  int64_t i = 0;
  tiles_of<T, Bytes, MR>(p, i);
  if (MR > 4) tiles_of<T, Bytes, (MR > 4 ? 4 : 1)>(p, i);
  if (MR > 2) tiles_of<T, Bytes, (MR > 2 ? 2 : 1)>(p, i);
  tiles_of<T, Bytes, 1>(p, i);
}

// Tile heights: as many accumulators (MR x 16 / lanes) as the vector registers hold with room for R and
// the broadcast: 16 of 32 zmm for fp32 on AVX-512 (a rank-16 operand is one tile), 12 of 32 zmm (fp64), 12 of 16
// ymm (AVX2), 12 of 16 xmm (portable, 16-byte vectors, which every target has natively: SSE2, NEON; wider ones
// would be emulated).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MONKEY_LOWRANK_X86 1
__attribute__((target("avx512f"))) inline void run_avx512(const Problem<float>& p) { run<float, 64, 16>(p); }
__attribute__((target("avx512f"))) inline void run_avx512(const Problem<double>& p) { run<double, 64, 6>(p); }
__attribute__((target("avx2,fma"))) inline void run_avx2(const Problem<float>& p) { run<float, 32, 6>(p); }
__attribute__((target("avx2,fma"))) inline void run_avx2(const Problem<double>& p) { run<double, 32, 3>(p); }
#endif
inline void run_portable(const Problem<float>& p) { run<float, 16, 3>(p); }
inline void run_portable(const Problem<double>& p) { run<double, 16, 1>(p); }

// 2: AVX-512, 1: AVX2 + FMA, 0: portable (the only path outside GCC on x86-64). The widest path this CPU runs,
// capped by MONKEY_KERNELS_LOWRANK_ISA (settings.h; passed in before every op call, so tests can run each path
// on one machine). A cap above what the CPU supports leaves the best path.
inline int isa_level() {
  int level = 0;
#ifdef MONKEY_LOWRANK_X86
  static const int supported = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  level = supported;
#endif
  return std::min(level, settings().lowrank_isa_cap.load(std::memory_order_relaxed));
}

}  // namespace lowrank_detail

// The vector path lowrank_gemm runs now: "avx512", "avx2" or "portable".
inline const char* lowrank_isa() {
  static const char* const names[] = {"portable", "avx2", "avx512"};
  return names[lowrank_detail::isa_level()];
}

// C = (accumulate ? C : 0) + alpha * L R (see the top of this file), T = float or double. R must hold
// lowrank_padded(width) readable columns per row (r_ld >= that): columns past `width` are read, never stored.
// With c_in (row stride c_in_ld): C = C_IN + alpha * L R, one pass over C instead of a copy, then an update (a
// merge W + s B A); C_IN may be C itself.
template <typename T>
inline void lowrank_gemm(const T* l, int64_t l_row, int64_t l_col, const T* r, int64_t r_ld, int64_t rows,
                         int64_t depth, T* c, int64_t c_ld, int64_t width, T alpha, bool accumulate,
                         const T* c_in = nullptr, int64_t c_in_ld = 0) {
  if (rows <= 0 || width <= 0) return;
  const lowrank_detail::Problem<T> p{l,     l_row, l_col,      r,    r_ld,   rows, depth, c, c_ld, width,
                                     alpha, accumulate, c_in, c_in_ld};
  switch (lowrank_detail::isa_level()) {
#ifdef MONKEY_LOWRANK_X86
    case 2:
      lowrank_detail::run_avx512(p);
      return;
    case 1:
      lowrank_detail::run_avx2(p);
      return;
#endif
    default:
      lowrank_detail::run_portable(p);
  }
}

}  // namespace monkey_kernels
