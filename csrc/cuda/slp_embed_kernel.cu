// CUDA kernel of the fused SLP embedding assembly (the CUDA C++ twin of triton_kernels/slp.py).
//
// out[t, :] for every token row t of the flattened batch, each row written exactly once:
//   kind 1 (text):  table[src[t], :]                                     an exact copy
//   kind 2 (box):   W c + b,  c = boxes[s] / (w, h, w, h)[s / n_boxes]    four FMAs per element in fp32
//   kind 3 (image): features[s / n_image, s % n_image, :]                an exact copy
//   kind 0, or src out of range for its kind: zeros                      (never an out-of-bounds read)
//
// The op is a gather of rows: memory bound. Each thread owns VEC consecutive columns (16-byte loads and
// stores when the layout allows) of ROWS consecutive rows, issues the ROWS loads before any store (more
// bytes in flight per thread), and the kind of a row is uniform across the block, so the branches do not
// diverge. Plain CUDA C++ (no torch headers): compiles with `nvcc -c`; the ATen glue is slp_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "slp_embed_kernel.h"

namespace monkey_kernels {
namespace slp {
namespace {

constexpr int kKindText = 1;
constexpr int kKindBox = 2;
constexpr int kKindImage = 3;
constexpr int kThreads = 128;  // threads per block along the hidden dimension
constexpr int kRows = 4;       // token rows per block

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// A read-only (non-coherent cache) load of VEC elements at `ptr`; VEC > 1 needs `ptr` aligned to the pack
// and unit stride. The raw bits travel as one 4/8/16-byte word.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  Pack<T, VEC> out;
  constexpr int kBytes = sizeof(Pack<T, VEC>);
  if constexpr (kBytes == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
    memcpy(&out, &raw, kBytes);
  } else if constexpr (kBytes == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(ptr));
    memcpy(&out, &raw, kBytes);
  } else if constexpr (kBytes == 4) {
    const unsigned int raw = __ldg(reinterpret_cast<const unsigned int*>(ptr));
    memcpy(&out, &raw, kBytes);
  } else {
    const unsigned short raw = __ldg(reinterpret_cast<const unsigned short*>(ptr));
    memcpy(&out, &raw, kBytes);
  }
  return out;
}

// Strided load for the scalar path (VEC == 1): one element, any stride (already applied to `ptr`).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_row(const T* ptr) {
  if constexpr (VEC == 1) {
    Pack<T, 1> out;
    out.v[0] = ptr[0];
    return out;
  } else {
    return load_pack<T, VEC>(ptr);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) slp_embed_forward_kernel(const SlpEmbedParams p) {
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col >= p.H) return;  // no block-wide synchronization below: idle threads may leave
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const T* __restrict__ table = static_cast<const T*>(p.table);
  const T* __restrict__ features = static_cast<const T*>(p.features);
  const T zero = from_float<T>(0.0f);

  Pack<T, VEC> vals[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) vals[r].v[i] = zero;
    const int64_t t = row0 + r;
    if (t >= p.T) continue;
    const int kind = __ldg(p.kind + t);
    const int64_t s = __ldg(p.src + t);
    if (kind == kKindText) {
      if (s >= 0 && s < p.V) vals[r] = load_row<T, VEC>(table + s * p.stride_tv + col * p.stride_th);
    } else if (kind == kKindBox) {
      if (s >= 0 && s < p.batch * p.n_boxes) {
        float c0 = __ldg(p.boxes + 4 * s), c1 = __ldg(p.boxes + 4 * s + 1);
        float c2 = __ldg(p.boxes + 4 * s + 2), c3 = __ldg(p.boxes + 4 * s + 3);
        if (p.page_sizes != nullptr) {
          const int64_t b = s / p.n_boxes;
          const float pw = __ldg(p.page_sizes + 2 * b), ph = __ldg(p.page_sizes + 2 * b + 1);
          c0 /= pw;  // IEEE divisions, as the torch and Triton paths normalize
          c1 /= ph;
          c2 /= pw;
          c3 /= ph;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const int64_t h = col + i;
          float z = c0 * __ldg(p.weight_t + h) + c1 * __ldg(p.weight_t + p.H + h) +
                    c2 * __ldg(p.weight_t + 2 * p.H + h) + c3 * __ldg(p.weight_t + 3 * p.H + h);
          if (p.bias != nullptr) z += __ldg(p.bias + h);
          vals[r].v[i] = from_float<T>(z);
        }
      }
    } else if (kind == kKindImage) {
      if (features != nullptr && s >= 0 && s < p.batch * p.n_image) {
        const int64_t b = s / p.n_image, j = s - b * p.n_image;
        vals[r] = load_row<T, VEC>(features + b * p.stride_fb + j * p.stride_fn + col * p.stride_fh);
      }
    }
  }
  T* __restrict__ out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t t = row0 + r;
    if (t < p.T) *reinterpret_cast<Pack<T, VEC>*>(out + t * p.H + col) = vals[r];
  }
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The widest pack (up to 16 bytes) that H, the strides and the pointers allow; 1 = the strided scalar path.
template <typename T>
int pick_vec(const SlpEmbedParams& p) {
  for (int vec = static_cast<int>(16 / sizeof(T)); vec > 1; vec /= 2) {
    const int64_t bytes = vec * static_cast<int64_t>(sizeof(T));
    bool ok = p.H % vec == 0 && aligned(p.out, bytes) && aligned(p.table, bytes) && p.stride_th == 1 &&
              p.stride_tv % vec == 0;
    if (p.features != nullptr) {
      ok = ok && aligned(p.features, bytes) && p.stride_fh == 1 && p.stride_fb % vec == 0 && p.stride_fn % vec == 0;
    }
    if (ok) return vec;
  }
  return 1;
}

template <typename T, int VEC>
cudaError_t launch(const SlpEmbedParams& p, cudaStream_t stream) {
  const int64_t vectors = (p.H + VEC - 1) / VEC;
  const int64_t threads = vectors >= kThreads ? kThreads : ((vectors + 31) / 32) * 32;
  const int64_t col_blocks = (vectors + threads - 1) / threads;
  const int64_t row_blocks = (p.T + kRows - 1) / kRows;
  if (col_blocks > 65535 || row_blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(row_blocks), static_cast<unsigned int>(col_blocks));
  slp_embed_forward_kernel<T, VEC><<<grid, static_cast<unsigned int>(threads), 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const SlpEmbedParams& p, cudaStream_t stream) {
  switch (pick_vec<T>(p)) {
    case 8:
      if constexpr (sizeof(T) <= 2) return launch<T, 8>(p, stream);
      break;
    case 4:
      return launch<T, 4>(p, stream);
    case 2:
      return launch<T, 2>(p, stream);
    default:
      break;
  }
  return launch<T, 1>(p, stream);
}

}  // namespace

cudaError_t launch_slp_embed_forward(const SlpEmbedParams& params, SlpDType dtype, cudaStream_t stream) {
  if (params.T < 0 || params.H < 0 || params.n_boxes < 1 || (params.features != nullptr && params.n_image < 1)) {
    return cudaErrorInvalidValue;
  }
  if (params.T == 0 || params.H == 0) return cudaSuccess;
  switch (dtype) {
    case SlpDType::kFloat32:
      return launch_typed<float>(params, stream);
    case SlpDType::kFloat16:
      return launch_typed<__half>(params, stream);
    case SlpDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace slp
}  // namespace monkey_kernels
