// Native CPU ops of the fused SLP embedding assembly (monkey_kernels.slp), forward and backward.
//
// Op schemas (namespace monkey_kernels_native; declared here because this file is always built):
//
//   slp_embed_forward(Tensor kind, Tensor src, Tensor table, Tensor boxes, Tensor? page_sizes, Tensor weight,
//                     Tensor? bias, Tensor? image_features) -> Tensor
//   slp_embed_forward.out(..., same arguments, *, Tensor(a!) out) -> ()
//       writes into out (no return: torch.compile functionalizes mutable custom ops only without aliased
//       outputs); the functional overload allocates out with at::empty and calls the same code.
//       out [T, H] in table's dtype, every row written exactly once (out of place):
//         kind 1 (text):  out[t] = table[src[t]]                                   (an exact copy)
//         kind 2 (box):   out[t] = W c + b, c = boxes[b, k] / (w, h, w, h)[b]      (src = b * N + k)
//                         in fp32 (fp64 for a float64 table), one rounding to the table's dtype
//         kind 3 (image): out[t] = image_features[b, j]                            (src = b * n_image + j)
//         kind 0, and any src out of range for its kind: a zero row (never an out-of-bounds read).
//       kind/src: [T] int32/int64; table [V, H] float32/float64/float16/bfloat16 (any strides); boxes
//       [B, N >= 1, 4] float; page_sizes [B, 2] real or None (boxes already normalized); weight [H, 4];
//       bias [H] or None; image_features [B, n_image >= 1, H] or None (converted to the table's dtype).
//
//   slp_embed_backward(Tensor grad_out, Tensor kind, Tensor src, Tensor boxes, Tensor? page_sizes,
//                      Tensor weight, int num_embeddings, int padding_idx, int n_image, bool[6] output_mask)
//       -> (Tensor grad_table, Tensor grad_weight, Tensor grad_bias, Tensor grad_boxes, Tensor grad_page_sizes,
//           Tensor grad_image)
//       grad_out [T, H]; output_mask says which of the six to compute (the others are undefined: None in
//       Python). grad_table [num_embeddings, H] (grad_out's dtype; row padding_idx, -1 = none, stays zero),
//       grad_weight [H, 4] and grad_bias [H] (weight's dtype), grad_boxes [B, N, 4] (boxes' dtype),
//       grad_page_sizes [B, 2] (page_sizes' dtype, must be float), grad_image [B * n_image, H] (grad_out's
//       dtype). The math is in monkey_kernels.slp.SLPEmbedFunction. Everything is deterministic: no atomics,
//       every reduction runs in a fixed order (token order for a table row, slot order for dW / db).
//
// Parallelism: at::parallel_for over token rows (forward, image gradient), over table rows (table
// gradient: a counting sort of the text tokens by id, then each row is the ordered sum of its tokens), over
// hidden columns (dW, db) and over box slots (dc = W^T g).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <vector>

#include "outputs.h"
#include "slp_common.h"

namespace monkey_kernels {
namespace slp {
namespace {

// Elements per parallel chunk: enough work per task that thread start-up does not dominate.
constexpr int64_t kGrainElements = 1 << 14;

inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1)); }

// kind as int32 and src as int64, contiguous (the routing is [T]: converting is cheap next to [T, H]).
std::pair<at::Tensor, at::Tensor> routing(const at::Tensor& kind, const at::Tensor& src) {
  return {kind.to(at::kInt).contiguous(), src.to(at::kLong).contiguous()};
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_impl(at::Tensor& out, const at::Tensor& kind_t, const at::Tensor& src_t, const at::Tensor& table,
                  const at::Tensor& boxes, const std::optional<at::Tensor>& page_sizes, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& image_features) {
  using acc_t = at::opmath_type<scalar_t>;  // float for fp32/fp16/bf16, double for fp64
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = kind_t.size(0);
  const int64_t V = table.size(0);
  const int64_t H = table.size(1);
  const int64_t B = boxes.size(0);
  const int64_t N = boxes.size(1);

  // The small operands in the compute type, contiguous: boxes [B*N, 4], sizes [B, 2], W^T [4, H] (so the
  // inner loop over h reads four unit-stride rows and vectorizes), bias [H].
  const at::Tensor c_boxes = boxes.to(acc_dtype).contiguous();
  const bool has_sizes = page_sizes.has_value() && page_sizes->defined();
  const at::Tensor c_sizes = has_sizes ? page_sizes->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor c_wt = weight.to(acc_dtype).t().contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor c_bias = has_bias ? bias->to(acc_dtype).contiguous() : at::Tensor();
  const bool has_image = image_features.has_value() && image_features->defined();
  // Features of another dtype are converted once, as the torch path's .to(table.dtype) does.
  const at::Tensor feats = has_image ? image_features->to(table.scalar_type()) : at::Tensor();
  const int64_t n_image = has_image ? feats.size(1) : 0;

  const int32_t* kind = kind_t.data_ptr<int32_t>();
  const int64_t* src = src_t.data_ptr<int64_t>();
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const int64_t tv = table.stride(0), th = table.stride(1);
  const acc_t* bx = c_boxes.data_ptr<acc_t>();
  const acc_t* sz = has_sizes ? c_sizes.data_ptr<acc_t>() : nullptr;
  const acc_t* w0 = c_wt.data_ptr<acc_t>();
  const acc_t* w1 = w0 + H;
  const acc_t* w2 = w1 + H;
  const acc_t* w3 = w2 + H;
  const acc_t* bi = has_bias ? c_bias.data_ptr<acc_t>() : nullptr;
  const scalar_t* ft = has_image ? feats.data_ptr<scalar_t>() : nullptr;
  const int64_t fb = has_image ? feats.stride(0) : 0, fn = has_image ? feats.stride(1) : 0,
                fh = has_image ? feats.stride(2) : 0;
  scalar_t* o = out.data_ptr<scalar_t>();

  auto copy_row = [H](scalar_t* dst, const scalar_t* row, int64_t stride) {
    if (stride == 1) {
      std::memcpy(dst, row, sizeof(scalar_t) * H);
    } else {
      for (int64_t h = 0; h < H; ++h) dst[h] = row[h * stride];
    }
  };

  at::parallel_for(0, T, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* dst = o + t * H;
      const int64_t s = src[t];
      switch (kind[t]) {
        case KIND_TEXT:
          if (s >= 0 && s < V) {
            copy_row(dst, tab + s * tv, th);
            continue;
          }
          break;
        case KIND_BOX:
          if (s >= 0 && s < B * N) {
            acc_t c0 = bx[4 * s], c1 = bx[4 * s + 1], c2 = bx[4 * s + 2], c3 = bx[4 * s + 3];
            if (sz != nullptr) {
              const int64_t b = s / N;
              const acc_t pw = sz[2 * b], ph = sz[2 * b + 1];
              c0 /= pw;  // divisions, not reciprocals: the same rounding as the torch and Triton paths
              c1 /= ph;
              c2 /= pw;
              c3 /= ph;
            }
            if (bi != nullptr) {
              for (int64_t h = 0; h < H; ++h) {
                const acc_t z = c0 * w0[h] + c1 * w1[h] + c2 * w2[h] + c3 * w3[h];
                dst[h] = static_cast<scalar_t>(z + bi[h]);
              }
            } else {
              for (int64_t h = 0; h < H; ++h) {
                dst[h] = static_cast<scalar_t>(c0 * w0[h] + c1 * w1[h] + c2 * w2[h] + c3 * w3[h]);
              }
            }
            continue;
          }
          break;
        case KIND_IMAGE:
          if (ft != nullptr && s >= 0 && s < B * n_image) {
            const int64_t b = s / n_image, j = s - b * n_image;
            copy_row(dst, ft + b * fb + j * fn, fh);
            continue;
          }
          break;
        default:
          break;
      }
      // kind 0, an unknown kind or an index out of range for its kind: a zero row (all-zero bits are +0.0
      // in every float format).
      std::memset(dst, 0, sizeof(scalar_t) * H);
    }
  });
}

void forward_out_cpu(const at::Tensor& kind, const at::Tensor& src, const at::Tensor& table,
                     const at::Tensor& boxes, const std::optional<at::Tensor>& page_sizes, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& image_features,
                     at::Tensor& out) {
  check_forward_args(kind, src, table, boxes, page_sizes, weight, bias, image_features);
  check_out(out, kind.size(0), table);
  if (out.numel() == 0) return;
  auto [kind_c, src_c] = routing(kind, src);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "slp_embed_forward_cpu", [&] {
    forward_impl<scalar_t>(out, kind_c, src_c, table, boxes, page_sizes, weight, bias, image_features);
  });
}

at::Tensor forward_cpu(const at::Tensor& kind, const at::Tensor& src, const at::Tensor& table,
                       const at::Tensor& boxes, const std::optional<at::Tensor>& page_sizes, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& image_features) {
  check_forward_args(kind, src, table, boxes, page_sizes, weight, bias, image_features);
  at::Tensor out = fresh_output({kind.size(0), table.size(1)}, table.options().memory_format(at::MemoryFormat::Contiguous));
  forward_out_cpu(kind, src, table, boxes, page_sizes, weight, bias, image_features, out);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
// For each of num_slots slots (box slots or feature rows), the token that used it (-1: none). Each slot is
// used by at most one token (build_token_index); should two claim one, the later token wins, as the torch
// path's scatter does on CPU.
std::vector<int64_t> slot_tokens(const int32_t* kind, const int64_t* src, int64_t T, int64_t wanted,
                                 int64_t num_slots) {
  std::vector<int64_t> pos(static_cast<size_t>(num_slots), -1);
  for (int64_t t = 0; t < T; ++t) {
    if (kind[t] == wanted && src[t] >= 0 && src[t] < num_slots) pos[src[t]] = t;
  }
  return pos;
}

// grad_table [V, H]: row v is the sum, in token order, of the rows of dY of the text tokens with id v (in
// acc_t); row padding_idx and rows of unused ids are zero. A counting sort groups the tokens by id, so each
// output row is owned by one task: deterministic, no atomics, every row written once.
template <typename scalar_t>
at::Tensor table_grad(const scalar_t* dy, const int32_t* kind, const int64_t* src, int64_t T, int64_t H, int64_t V,
                      int64_t padding_idx, const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor grad = fresh_output({V, H}, options);
  std::vector<int64_t> start(static_cast<size_t>(V) + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t v = src[t];
    if (kind[t] == KIND_TEXT && v >= 0 && v < V && v != padding_idx) ++start[v + 1];
  }
  for (int64_t v = 0; v < V; ++v) start[v + 1] += start[v];
  std::vector<int64_t> order(static_cast<size_t>(start[V]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = src[t];
      if (kind[t] == KIND_TEXT && v >= 0 && v < V && v != padding_idx) order[fill[v]++] = t;
    }
  }
  scalar_t* g = grad.data_ptr<scalar_t>();
  at::parallel_for(0, V, row_grain(H), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(H));
    for (int64_t v = begin; v < end; ++v) {
      scalar_t* dst = g + v * H;
      const int64_t first = start[v], last = start[v + 1];
      if (first == last) {
        std::memset(dst, 0, sizeof(scalar_t) * H);
      } else if (last - first == 1) {
        std::memcpy(dst, dy + order[first] * H, sizeof(scalar_t) * H);  // one token: an exact copy
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t i = first; i < last; ++i) {
          const scalar_t* row = dy + order[i] * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<acc_t>(row[h]);
        }
        for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
      }
    }
  });
  return grad;
}

// Gradients of the projection (W, b) and of its inputs (boxes, page sizes). g_s = dY[p(s)] for the token
// p(s) of box slot s. The reductions are O((B N) H) and run in double: cheap, and it keeps the fp32 results
// within an ulp or two of float64 for any H. Results are computed as double tensors and cast once.
template <typename scalar_t>
void box_grads(const scalar_t* dy, const std::vector<int64_t>& pos, int64_t H, const at::Tensor& boxes,
               const std::optional<at::Tensor>& page_sizes, const at::Tensor& weight, bool need_w, bool need_bias,
               bool need_boxes, bool need_sizes, at::Tensor& grad_w, at::Tensor& grad_bias, at::Tensor& grad_boxes,
               at::Tensor& grad_sizes) {
  const int64_t B = boxes.size(0), N = boxes.size(1), S = B * N;
  const bool has_sizes = page_sizes.has_value() && page_sizes->defined();
  const at::Tensor box64 = boxes.to(at::kDouble).contiguous();
  const at::Tensor size64 = has_sizes ? page_sizes->to(at::kDouble).contiguous() : at::Tensor();
  const double* bx = box64.data_ptr<double>();
  const double* sz = has_sizes ? size64.data_ptr<double>() : nullptr;

  if (need_w || need_bias) {
    // c_s normalized in double; unused slots are skipped (their g is zero).
    std::vector<double> c(static_cast<size_t>(4 * S));
    for (int64_t s = 0; s < S; ++s) {
      const int64_t b = s / N;
      for (int i = 0; i < 4; ++i) c[4 * s + i] = sz ? bx[4 * s + i] / sz[2 * b + (i & 1)] : bx[4 * s + i];
    }
    at::Tensor dw = fresh_output({H, 4}, boxes.options().dtype(at::kDouble));
    at::Tensor db = fresh_output({H}, boxes.options().dtype(at::kDouble));
    double* dwp = dw.data_ptr<double>();
    double* dbp = db.data_ptr<double>();
    // Each task owns a range of columns h and walks the slots in order: deterministic, no shared writes.
    at::parallel_for(0, H, 256, [&](int64_t begin, int64_t end) {
      const int64_t width = end - begin;
      std::vector<double> a0(width, 0.0), a1(width, 0.0), a2(width, 0.0), a3(width, 0.0), ab(width, 0.0);
      for (int64_t s = 0; s < S; ++s) {
        if (pos[s] < 0) continue;
        const scalar_t* row = dy + pos[s] * H + begin;
        const double c0 = c[4 * s], c1 = c[4 * s + 1], c2 = c[4 * s + 2], c3 = c[4 * s + 3];
        for (int64_t h = 0; h < width; ++h) {
          const double g = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(row[h]));
          a0[h] += g * c0;
          a1[h] += g * c1;
          a2[h] += g * c2;
          a3[h] += g * c3;
          ab[h] += g;
        }
      }
      for (int64_t h = 0; h < width; ++h) {
        double* out = dwp + 4 * (begin + h);
        out[0] = a0[h];
        out[1] = a1[h];
        out[2] = a2[h];
        out[3] = a3[h];
        dbp[begin + h] = ab[h];
      }
    });
    if (need_w) grad_w = dw.to(weight.scalar_type());
    if (need_bias) grad_bias = db.to(weight.scalar_type());
  }

  if (need_boxes || need_sizes) {
    const at::Tensor w64 = weight.to(at::kDouble).contiguous();  // [H, 4]
    const double* w = w64.data_ptr<double>();
    std::vector<double> dc(static_cast<size_t>(4 * S), 0.0);  // dc_s = W^T g_s (zero for unused slots)
    at::parallel_for(0, S, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(4 * H, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t s = begin; s < end; ++s) {
                         if (pos[s] < 0) continue;
                         const scalar_t* row = dy + pos[s] * H;
                         double d0 = 0, d1 = 0, d2 = 0, d3 = 0;
                         for (int64_t h = 0; h < H; ++h) {
                           const double g = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(row[h]));
                           d0 += w[4 * h] * g;
                           d1 += w[4 * h + 1] * g;
                           d2 += w[4 * h + 2] * g;
                           d3 += w[4 * h + 3] * g;
                         }
                         dc[4 * s] = d0;
                         dc[4 * s + 1] = d1;
                         dc[4 * s + 2] = d2;
                         dc[4 * s + 3] = d3;
                       }
                     });
    if (need_boxes) {
      at::Tensor gb = fresh_output({B, N, 4}, boxes.options().dtype(at::kDouble));
      double* p = gb.data_ptr<double>();
      for (int64_t s = 0; s < S; ++s) {
        const int64_t b = s / N;
        for (int i = 0; i < 4; ++i) p[4 * s + i] = sz ? dc[4 * s + i] / sz[2 * b + (i & 1)] : dc[4 * s + i];
      }
      grad_boxes = gb.to(boxes.scalar_type());
    }
    if (need_sizes) {
      // d/dw of x / w is -x / w^2: dw_b = -sum_k (dc_0 x1 + dc_2 x2) / w^2, dh_b likewise with y1, y2.
      at::Tensor gs = fresh_output({B, 2}, boxes.options().dtype(at::kDouble));
      double* p = gs.data_ptr<double>();
      for (int64_t b = 0; b < B; ++b) {
        const double pw = sz[2 * b], ph = sz[2 * b + 1];
        double dw = 0, dh = 0;
        for (int64_t k = 0; k < N; ++k) {
          const int64_t s = b * N + k;
          dw += dc[4 * s] * bx[4 * s] + dc[4 * s + 2] * bx[4 * s + 2];
          dh += dc[4 * s + 1] * bx[4 * s + 1] + dc[4 * s + 3] * bx[4 * s + 3];
        }
        p[2 * b] = -dw / (pw * pw);
        p[2 * b + 1] = -dh / (ph * ph);
      }
      grad_sizes = gs.to(page_sizes->scalar_type());
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& kind, const at::Tensor& src, const at::Tensor& boxes,
    const std::optional<at::Tensor>& page_sizes, const at::Tensor& weight, int64_t num_embeddings,
    int64_t padding_idx, int64_t n_image, std::array<bool, 6> output_mask) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && is_table_dtype(grad_out.scalar_type()),
                    "grad_out must be a 2-D float32/float64/float16/bfloat16 tensor [T, H], got ",
                    grad_out.scalar_type(), " ", grad_out.sizes());
  const int64_t T = check_routing(kind, src, grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.size(0) == T, "grad_out must have T=", T, " rows (the length of kind), got ",
                    grad_out.size(0));
  const int64_t H = grad_out.size(1);
  check_projection(boxes, page_sizes, weight, std::nullopt, H, grad_out, "grad_out");
  TORCH_CHECK_VALUE(num_embeddings >= 0, "num_embeddings must be >= 0, got ", num_embeddings);
  TORCH_CHECK_VALUE(padding_idx >= -1 && padding_idx < std::max<int64_t>(num_embeddings, 1),
                    "padding_idx must be -1 (none) or in [0, num_embeddings=", num_embeddings, "), got ",
                    padding_idx);
  TORCH_CHECK_VALUE(n_image >= 0, "n_image must be >= 0, got ", n_image);
  const bool need_table = output_mask[0], need_w = output_mask[1], need_bias = output_mask[2],
             need_boxes = output_mask[3], need_sizes = output_mask[4], need_image = output_mask[5];
  const bool has_sizes = page_sizes.has_value() && page_sizes->defined();
  TORCH_CHECK_VALUE(!need_sizes || (has_sizes && at::isFloatingType(page_sizes->scalar_type())),
                    "output_mask asks for the page_sizes gradient, but page_sizes is ",
                    has_sizes ? "not a float tensor" : "None");

  at::Tensor grad_table, grad_w, grad_bias, grad_boxes, grad_sizes, grad_image;
  const at::Tensor dy = grad_out.contiguous();
  auto [kind_c, src_c] = routing(kind, src);
  const int32_t* kd = kind_c.data_ptr<int32_t>();
  const int64_t* sr = src_c.data_ptr<int64_t>();
  const int64_t B = boxes.size(0), N = boxes.size(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "slp_embed_backward_cpu", [&] {
    const scalar_t* d = dy.data_ptr<scalar_t>();
    if (need_table) grad_table = table_grad<scalar_t>(d, kd, sr, T, H, num_embeddings, padding_idx, dy.options());
    if (need_w || need_bias || need_boxes || need_sizes) {
      const std::vector<int64_t> pos = slot_tokens(kd, sr, T, KIND_BOX, B * N);
      box_grads<scalar_t>(d, pos, H, boxes, page_sizes, weight, need_w, need_bias, need_boxes, need_sizes, grad_w,
                          grad_bias, grad_boxes, grad_sizes);
    }
    if (need_image) {
      const int64_t slots = B * n_image;
      const std::vector<int64_t> pos = slot_tokens(kd, sr, T, KIND_IMAGE, slots);
      grad_image = fresh_output({slots, H}, dy.options());
      scalar_t* gi = grad_image.data_ptr<scalar_t>();
      at::parallel_for(0, slots, row_grain(H), [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          if (pos[j] >= 0) {
            std::memcpy(gi + j * H, d + pos[j] * H, sizeof(scalar_t) * H);
          } else {
            std::memset(gi + j * H, 0, sizeof(scalar_t) * H);  // a feature row no placeholder used
          }
        }
      });
    }
  });
  return {grad_table, grad_w, grad_bias, grad_boxes, grad_sizes, grad_image};
}

}  // namespace
}  // namespace slp
}  // namespace monkey_kernels

TORCH_LIBRARY_FRAGMENT(monkey_kernels_native, m) {
  m.def(
      "slp_embed_forward(Tensor kind, Tensor src, Tensor table, Tensor boxes, Tensor? page_sizes, Tensor weight, "
      "Tensor? bias, Tensor? image_features) -> Tensor");
  m.def(
      "slp_embed_forward.out(Tensor kind, Tensor src, Tensor table, Tensor boxes, Tensor? page_sizes, "
      "Tensor weight, Tensor? bias, Tensor? image_features, *, Tensor(a!) out) -> ()");
  m.def(
      "slp_embed_backward(Tensor grad_out, Tensor kind, Tensor src, Tensor boxes, Tensor? page_sizes, "
      "Tensor weight, int num_embeddings, int padding_idx, int n_image, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(monkey_kernels_native, CPU, m) {
  m.impl("slp_embed_forward", &monkey_kernels::slp::forward_cpu);
  m.impl("slp_embed_forward.out", &monkey_kernels::slp::forward_out_cpu);
  m.impl("slp_embed_backward", &monkey_kernels::slp::backward_cpu);
}
