// ATen glue of the CUDA SLP embedding kernel: argument checks, operand preparation, the current stream.
//
// Implements slp_embed_forward and slp_embed_forward.out (schemas in ../slp_cpu.cpp) for CUDA tensors with a
// float32 / float16 / bfloat16 table. Built only in CUDA builds (setup.py adds csrc/cuda/* and
// -DMONKEY_WITH_CUDA when torch has CUDA and nvcc exists). The backward on CUDA tensors stays in PyTorch
// (monkey_kernels.slp.SLPEmbedFunction): ATen's sort-based embedding backward and O((N + n_image) H) gathers.
//
// Operands the kernel reads once per box row (boxes, page sizes, W, bias: O(B N + H) elements) are converted
// to contiguous fp32 here, W transposed to [4, H] so that a warp reads each of its four columns coalesced.
// All work is enqueued on the current stream with no host synchronisation (CUDA-graph capturable).
#include <ATen/ATen.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS / cuSPARSE headers that a
// bare CUDA toolkit (nvcc only) lacks, and nothing here needs them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../outputs.h"
#include "../slp_common.h"
#include "slp_embed_kernel.h"

namespace monkey_kernels {
namespace slp {
namespace {

SlpDType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return SlpDType::kFloat32;
    case at::kHalf:
      return SlpDType::kFloat16;
    case at::kBFloat16:
      return SlpDType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "table: the CUDA kernel supports float32, float16 and bfloat16, got ", t);
  }
  return SlpDType::kFloat32;  // unreachable
}

void forward_out_cuda(const at::Tensor& kind, const at::Tensor& src, const at::Tensor& table,
                      const at::Tensor& boxes, const std::optional<at::Tensor>& page_sizes, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& image_features,
                      at::Tensor& out) {
  check_forward_args(kind, src, table, boxes, page_sizes, weight, bias, image_features);
  check_out(out, kind.size(0), table);
  const SlpDType dtype = kernel_dtype(table.scalar_type());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(table.device());

  const at::Tensor kind_c = kind.to(at::kInt).contiguous();
  const at::Tensor src_c = src.to(at::kLong).contiguous();
  const at::Tensor boxes_c = boxes.to(at::kFloat).contiguous();
  const bool has_sizes = page_sizes.has_value() && page_sizes->defined();
  const at::Tensor sizes_c = has_sizes ? page_sizes->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor weight_t = weight.to(at::kFloat).t().contiguous();  // [4, H]
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_c = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const bool has_image = image_features.has_value() && image_features->defined();
  // Features of another dtype are converted once (the torch path's .to(table.dtype)); strides are kept.
  const at::Tensor feats = has_image ? image_features->to(table.scalar_type()) : at::Tensor();

  SlpEmbedParams p{};
  p.out = out.data_ptr();
  p.kind = kind_c.data_ptr<int32_t>();
  p.src = src_c.data_ptr<int64_t>();
  p.table = table.data_ptr();
  p.stride_tv = table.stride(0);
  p.stride_th = table.stride(1);
  p.boxes = boxes_c.data_ptr<float>();
  p.page_sizes = has_sizes ? sizes_c.data_ptr<float>() : nullptr;
  p.weight_t = weight_t.data_ptr<float>();
  p.bias = has_bias ? bias_c.data_ptr<float>() : nullptr;
  p.features = has_image ? feats.data_ptr() : nullptr;
  p.stride_fb = has_image ? feats.stride(0) : 0;
  p.stride_fn = has_image ? feats.stride(1) : 0;
  p.stride_fh = has_image ? feats.stride(2) : 0;
  p.T = kind.size(0);
  p.H = table.size(1);
  p.V = table.size(0);
  p.batch = boxes.size(0);
  p.n_boxes = boxes.size(1);
  p.n_image = has_image ? feats.size(1) : 0;

  const cudaError_t err = launch_slp_embed_forward(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "slp_embed_forward: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor forward_cuda(const at::Tensor& kind, const at::Tensor& src, const at::Tensor& table,
                        const at::Tensor& boxes, const std::optional<at::Tensor>& page_sizes,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& image_features) {
  check_forward_args(kind, src, table, boxes, page_sizes, weight, bias, image_features);
  at::Tensor out = fresh_output({kind.size(0), table.size(1)}, table.options());
  forward_out_cuda(kind, src, table, boxes, page_sizes, weight, bias, image_features, out);
  return out;
}

}  // namespace
}  // namespace slp
}  // namespace monkey_kernels

TORCH_LIBRARY_IMPL(monkey_kernels_native, CUDA, m) {
  m.impl("slp_embed_forward", &monkey_kernels::slp::forward_cuda);
  m.impl("slp_embed_forward.out", &monkey_kernels::slp::forward_out_cuda);
}
