// Counter-based dropout masks of the native CPU backend: keep(seed, row, col) is a pure function, computed
// where an op reads the element (shrink, outer and the fused GEMM's epilogue), never drawn ahead or stored.
//
// Why not torch.rand: PyTorch's CPU generator costs 5-8 ns per element (measured, one thread, 650 x 128
// masks), and a layer needs its mask three times (forward, dA, dV); a stored mask costs memory. Here an
// element costs two 32-bit integer hashes, in column loops the compiler vectorises (an AVX2 clone is chosen
// at run time where the CPU has it), and the backward recomputes exactly the forward's mask from the seed.
//
//   per row:      r1 = mix32(lo32(row) ^ k1) ^ hi32(row),   r2 = mix32(r1 ^ k2)      (k1, k2 from the seed)
//   per element:  bits = mix32(mix32(col ^ r1) + r2),       keep = bits >= floor(p * 2^32)
//
// mix32 (the "lowbias32" integer hash) is a bijection of 32-bit words with full avalanche: distinct rows get
// distinct r1 (and r2), the columns of a row distinct inner words, and the second round keyed by r2 keeps
// two rows whose r1 happen to be close from sharing (permuted) columns. P(keep) = 1 - p to within 2^-32.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace monkey_kernels {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The keys of one row of a mask.
struct MaskRow {
  uint32_t r1, r2, threshold;
  uint32_t bits(uint32_t col) const { return mix32(mix32(col ^ r1) + r2); }
  bool keep(uint32_t col) const { return bits(col) >= threshold; }
};

struct DropoutMask {
  bool active = false;  // p > 0
  double p = 0.0;
  uint32_t k1 = 0, k2 = 0, threshold = 0;

  MaskRow row(int64_t index) const {
    const uint64_t r = static_cast<uint64_t>(index);
    const uint32_t r1 = mix32(static_cast<uint32_t>(r) ^ k1) ^ static_cast<uint32_t>(r >> 32);
    return MaskRow{r1, mix32(r1 ^ k2), threshold};
  }
};

// The mask of (seed, p); p in [0, 1). Columns are 32-bit (a LoRA input is never 2^32 wide).
inline DropoutMask dropout_mask(int64_t seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
  DropoutMask m;
  m.active = p > 0.0;
  m.p = p;
  const uint64_t s = static_cast<uint64_t>(seed);
  m.k1 = mix32(static_cast<uint32_t>(s) ^ 0x243f6a88U);
  m.k2 = mix32(m.k1 ^ static_cast<uint32_t>(s >> 32) ^ 0x85a308d3U);
  const double scaled = std::floor(p * 4294967296.0);
  m.threshold = scaled >= 4294967295.0 ? 0xffffffffU : static_cast<uint32_t>(scaled);
  return m;
}

// keep[j] = row.keep(c0 + j) for j < n (1 = keep): the one loop every masked op runs, vectorised.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void mask_row_bytes(const MaskRow& row, int64_t c0, int64_t n, uint8_t* keep) {
  const uint32_t r1 = row.r1, r2 = row.r2, threshold = row.threshold;
  const uint32_t start = static_cast<uint32_t>(c0);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t col = start + static_cast<uint32_t>(j);
    keep[j] = mix32(mix32(col ^ r1) + r2) >= threshold ? 1 : 0;
  }
}

}  // namespace monkey_kernels
