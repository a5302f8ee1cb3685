// Declarations shared by the C++ sources of fastjac._C (CPU ops; see fastjac/ops/*.py for semantics).
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace fastjac {

// ---- input checks: every message names the op and the argument, and says what was expected ----

inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name, bool contiguous = true) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_mask(const at::Tensor& mask, int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(mask.device().is_cpu(), op, ": mask must be a CPU tensor, got device ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.is_contiguous(), op, ": mask must be contiguous");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == cols, op, ": mask must be [",
              rows, ", ", cols, "], got ", mask.sizes());
}

// ---- the fused stream epilogue on a strided [O, S, B, F] view (f contiguous) ----
// The [O, S, I] tensor of the Python op is the case B = 1, F = I. stacked_linear uses B = batch rows and
// F = OUT so that it can read or write the row-major GEMM layout [S*B, O*F] directly (no transpose copy).
// Element (o, s, b, f) lives at o*o_stride + s*s_stride + b*b_stride + f. Its flat index in a stream is
// i = b*F + f: the mask is [O, B*F] (contiguous) and the bias index is (i / rep) % nb.

struct Strides {
  int64_t o, s, b;
};

struct EpilogueShape {
  int64_t O, S, B, F;
  int64_t nb;   // bias columns (ignored without bias)
  int64_t rep;  // consecutive elements sharing one bias value
};

inline Strides contiguous_strides(const EpilogueShape& sh) {  // [O, S, B, F] contiguous
  return {sh.S * sh.B * sh.F, sh.B * sh.F, sh.F};
}

// out = y with bias added to stream 0 and every stream multiplied by mask (= stream 0 > 0).
// bias: [O, nb] or undefined. mask: [O, B*F] bool to fill, or undefined when relu is off.
// out may alias y when both use the same strides. No input checks: callers check.
void epilogue_forward(const at::Tensor& y, Strides y_strides, const at::Tensor& out, Strides out_strides,
                      const at::Tensor& bias, const at::Tensor& mask, const EpilogueShape& shape);

// grad_y = grad_out * mask (every stream), grad_bias[o, k] = sum of stream-0 grad_y with bias index k.
// grad_y: written in its own strides, or undefined to skip the write (no mask, caller reuses grad_out).
// grad_bias: [O, nb] to fill, or undefined. mask: [O, B*F] or undefined.
void epilogue_backward(const at::Tensor& grad_out, Strides grad_out_strides, const at::Tensor& grad_y,
                       Strides grad_y_strides, const at::Tensor& mask, const at::Tensor& grad_bias,
                       const EpilogueShape& shape);

}  // namespace fastjac

// ---- launchers bound into fastjac._C (same names and argument order as the Python launchers) ----

std::tuple<at::Tensor, c10::optional<at::Tensor>> stream_epilogue_forward(
    const at::Tensor& y, const c10::optional<at::Tensor>& bias, int64_t rep, bool relu);

std::tuple<at::Tensor, c10::optional<at::Tensor>> stream_epilogue_backward(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& mask, int64_t nb, int64_t rep, bool has_bias);

at::Tensor stacked_addmm_(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
                          const c10::optional<at::Tensor>& bias, bool accumulate);

std::tuple<at::Tensor, c10::optional<at::Tensor>> stacked_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t streams,
    bool relu);

std::tuple<c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>> stacked_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& mask, int64_t streams, bool has_bias, bool needs_x_grad);

// ---- BatchNorm with batch statistics on the engine's rows (csrc/batch_norm.cpp; fastjac/ops/batch_norm.py) ----
std::tuple<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>> batch_norm_statistics_backward(
    const c10::optional<at::Tensor>& grad_y, const c10::optional<at::Tensor>& grad_x_hat,
    const c10::optional<at::Tensor>& grad_inv_std, const at::Tensor& x_hat, const at::Tensor& inv_std,
    const c10::optional<at::Tensor>& gamma);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_linearization_forward(const at::Tensor& t,
                                                                               const at::Tensor& x_hat,
                                                                               const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_linearization_backward(
    const at::Tensor& grad_out, const at::Tensor& t, const at::Tensor& x_hat, const at::Tensor& scale,
    const at::Tensor& mean_t, const at::Tensor& mean_tx);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_streams_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& beta, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_streams_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& inv_std,
    const c10::optional<at::Tensor>& gamma, const at::Tensor& mean_t, const at::Tensor& mean_tx);
