// Shared argument checks of the native SLP embedding ops (CPU: slp_cpu.cpp, CUDA glue: cuda/slp_cuda.cpp).
//
// The ops take the flattened token routing built by monkey_kernels.slp.build_token_index:
//   kind [T] int32/int64 (KIND_*), src [T] int32/int64 (token id / b * N + k / b * n_image + j).
// Failures raise c10::ValueError (Python ValueError) naming the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <optional>

#include <cstdint>

namespace monkey_kernels {
namespace slp {

// Same values as monkey_kernels.slp.KIND_* and triton_kernels.slp.KIND_*.
constexpr int64_t KIND_ZERO = 0;
constexpr int64_t KIND_TEXT = 1;
constexpr int64_t KIND_BOX = 2;
constexpr int64_t KIND_IMAGE = 3;

inline bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

inline bool is_table_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), ", expected ", ref.device(),
                    " (the device of ", ref_name, ")");
}

// Shapes of the routing tensors; returns T.
inline int64_t check_routing(const at::Tensor& kind, const at::Tensor& src, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_VALUE(kind.dim() == 1 && is_index_dtype(kind.scalar_type()),
                    "kind must be a 1-D int32/int64 tensor, got ", kind.scalar_type(), " ", kind.sizes());
  TORCH_CHECK_VALUE(src.dim() == 1 && is_index_dtype(src.scalar_type()),
                    "src must be a 1-D int32/int64 tensor, got ", src.scalar_type(), " ", src.sizes());
  TORCH_CHECK_VALUE(src.size(0) == kind.size(0), "src must have the length of kind (", kind.size(0), "), got ",
                    src.size(0));
  check_same_device("kind", kind, ref, ref_name);
  check_same_device("src", src, ref, ref_name);
  return kind.size(0);
}

// boxes [B, N >= 1, 4] float; page_sizes [B, 2] real or None; weight [H, 4] float; bias [H] float or None.
inline void check_projection(const at::Tensor& boxes, const std::optional<at::Tensor>& page_sizes,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t H,
                             const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(boxes.dim() == 3 && boxes.size(1) >= 1 && boxes.size(2) == 4,
                    "boxes must be [B, N >= 1, 4], got ", boxes.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(boxes.scalar_type()), "boxes must be a float tensor, got ",
                    boxes.scalar_type());
  check_same_device("boxes", boxes, ref, ref_name);
  if (page_sizes.has_value() && page_sizes->defined()) {
    const auto& s = *page_sizes;
    TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == boxes.size(0) && s.size(1) == 2, "page_sizes must be [B=",
                      boxes.size(0), ", 2], got ", s.sizes());
    TORCH_CHECK_VALUE(s.scalar_type() != at::kBool && !at::isComplexType(s.scalar_type()),
                      "page_sizes must be a real tensor, got ", s.scalar_type());
    check_same_device("page_sizes", s, ref, ref_name);
  }
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == H && weight.size(1) == 4, "weight must be [H=", H,
                    ", 4], got ", weight.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(weight.scalar_type()), "weight must be a float tensor, got ",
                    weight.scalar_type());
  check_same_device("weight", weight, ref, ref_name);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == H && at::isFloatingType(bias->scalar_type()),
                      "bias must be a float [H=", H, "], got ", bias->scalar_type(), " ", bias->sizes());
    check_same_device("bias", *bias, ref, ref_name);
  }
}

// All forward arguments (see slp_cpu.cpp for the op's contract).
inline void check_forward_args(const at::Tensor& kind, const at::Tensor& src, const at::Tensor& table,
                               const at::Tensor& boxes, const std::optional<at::Tensor>& page_sizes,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& image_features) {
  TORCH_CHECK_VALUE(table.dim() == 2, "table must be 2-D [V, H], got ", table.sizes());
  TORCH_CHECK_VALUE(is_table_dtype(table.scalar_type()),
                    "table must be float32, float64, float16 or bfloat16, got ", table.scalar_type());
  check_routing(kind, src, table, "table");
  const int64_t H = table.size(1);
  check_projection(boxes, page_sizes, weight, bias, H, table, "table");
  if (image_features.has_value() && image_features->defined()) {
    const auto& f = *image_features;
    TORCH_CHECK_VALUE(f.dim() == 3 && f.size(0) == boxes.size(0) && f.size(1) >= 1 && f.size(2) == H,
                      "image_features must be [B=", boxes.size(0), ", n_image >= 1, H=", H, "], got ", f.sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(f.scalar_type()), "image_features must be a float tensor, got ",
                      f.scalar_type());
    check_same_device("image_features", f, table, "table");
  }
}

// out of the .out overload: a contiguous [T, H] tensor of the table's dtype on its device.
inline void check_out(const at::Tensor& out, int64_t T, const at::Tensor& table) {
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == T && out.size(1) == table.size(1), "out must be [T=", T,
                    ", H=", table.size(1), "], got ", out.sizes());
  TORCH_CHECK_VALUE(out.scalar_type() == table.scalar_type(), "out must have the table's dtype ",
                    table.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  check_same_device("out", out, table, "table");
}

}  // namespace slp
}  // namespace monkey_kernels
