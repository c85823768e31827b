// Host launcher of the CUDA SLP embedding assembly kernel (slp_embed_kernel.cu).
//
// Plain CUDA C++: no torch / ATen headers, so slp_embed_kernel.cu compiles with a bare `nvcc -c`. The ATen
// glue (slp_cuda.cpp) prepares the operands and calls monkey_kernels::slp::launch_slp_embed_forward.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace monkey_kernels {
namespace slp {

// Element type of the table, the image features and the output (all three share it).
enum class SlpDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[t, :] for t in [0, T), H columns (see slp_embed_kernel.cu for the math):
//   kind[t] 1: table[src[t], :]; 2: W c + b with c = boxes[src[t]] / (w, h, w, h)[src[t] / n_boxes];
//   3: features[src[t] / n_image, src[t] % n_image, :]; 0, or src out of range for its kind: zeros.
struct SlpEmbedParams {
  void* out;                 // [T, H] contiguous, element type `dtype`
  const int32_t* kind;       // [T] contiguous
  const int64_t* src;        // [T] contiguous
  const void* table;         // [V, H], strides (stride_tv, stride_th) in elements
  int64_t stride_tv;
  int64_t stride_th;
  const float* boxes;        // [B * n_boxes, 4] contiguous fp32 (unnormalized when page_sizes is set)
  const float* page_sizes;   // [B, 2] contiguous fp32 (w, h), or nullptr: boxes already normalized
  const float* weight_t;     // [4, H] contiguous fp32: the SLP weight transposed (coalesced column reads)
  const float* bias;         // [H] fp32 or nullptr
  const void* features;      // [B, n_image, H], strides (stride_fb, stride_fn, stride_fh) in elements, or nullptr
  int64_t stride_fb;
  int64_t stride_fn;
  int64_t stride_fh;
  int64_t T;
  int64_t H;
  int64_t V;
  int64_t batch;             // B
  int64_t n_boxes;           // N >= 1
  int64_t n_image;           // >= 1 when features != nullptr
};

// Enqueues the kernel on `stream`; returns cudaSuccess or the launch error (never synchronizes).
// The vectorized path (16-byte loads and stores) is taken when H, the row strides and the pointers allow it;
// otherwise a scalar path handles any strides.
cudaError_t launch_slp_embed_forward(const SlpEmbedParams& params, SlpDType dtype, cudaStream_t stream);

}  // namespace slp
}  // namespace monkey_kernels
