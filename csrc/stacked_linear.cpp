// Stacked Linear over M members with the stream epilogue fused (see fastjac/ops/stacked_linear.py).
// The products are ATen GEMMs; the epilogue pass between them also does the layout change that the
// shared-x case needs, so no separate transpose copy is made:
//   shared x [R, IN]: y = x @ W.view(M*OUT, IN)^T is row-major [R, M*OUT] = [S, B, M, OUT]; the epilogue
//   reads it there and writes out [M, R, OUT]. Backward writes grad_y row-major again, which makes
//   grad_weight = grad_y^T @ x and grad_x = grad_y @ W.view(M*OUT, IN) one GEMM each (the latter is the
//   sum over members).
#include "fastjac.h"

namespace {

using fastjac::EpilogueShape;
using fastjac::Strides;

struct Dims {
  int64_t M, OUT, IN, R, B;
};

// x [R, IN] or [M, R, IN], weight [M, OUT, IN]; streams must divide R.
Dims check_x_weight(const at::Tensor& x, const at::Tensor& weight, int64_t streams, const char* op) {
  fastjac::check_cpu_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be [M, OUT, IN], got ", weight.sizes());
  const int64_t M = weight.size(0), OUT = weight.size(1), IN = weight.size(2);
  fastjac::check_cpu_float(x, op, "x");
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.size(-1) == IN && (x.dim() == 2 || x.size(0) == M), op,
              ": x must be [R, ", IN, "] or [", M, ", R, ", IN, "] (IN and M from weight [M, OUT, IN]), got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x dtype ", x.scalar_type(),
              " differs from weight dtype ", weight.scalar_type());
  const int64_t R = x.size(-2);
  TORCH_CHECK(streams >= 1 && R % streams == 0, op, ": streams=", streams, " must be >= 1 and divide the ", R,
              " rows of x");
  return {M, OUT, IN, R, R / streams};
}

EpilogueShape epilogue_shape(const Dims& d, int64_t streams) {
  return {d.M, streams, d.B, d.OUT, /*nb=*/d.OUT, /*rep=*/1};  // bias index of (b, f) is f
}

Strides row_major(const Dims& d) {  // [S, B, M, OUT] seen as [O=M, S, B, F=OUT]
  return {d.OUT, d.B * d.M * d.OUT, d.M * d.OUT};
}

}  // namespace

std::tuple<at::Tensor, c10::optional<at::Tensor>> stacked_linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t streams,
    bool relu) {
  constexpr const char* op = "stacked_linear_forward";
  const Dims d = check_x_weight(x, weight, streams, op);
  if (bias) {
    fastjac::check_cpu_float(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == d.M && bias->size(1) == d.OUT, op, ": bias must be [M=", d.M,
                ", OUT=", d.OUT, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from weight dtype ", weight.scalar_type());
  }

  const EpilogueShape shape = epilogue_shape(d, streams);
  const Strides member_major = fastjac::contiguous_strides(shape);  // [M, S, B, OUT] = out [M, R, OUT]
  at::Tensor mask = relu ? at::empty({d.M, d.B * d.OUT}, x.options().dtype(at::kBool)) : at::Tensor();
  const at::Tensor b = bias ? *bias : at::Tensor();
  at::Tensor out;
  if (x.dim() == 2) {
    const at::Tensor y = at::mm(x, weight.view({d.M * d.OUT, d.IN}).t());  // [R, M*OUT]
    out = at::empty({d.M, d.R, d.OUT}, x.options());
    fastjac::epilogue_forward(y, row_major(d), out, member_major, b, mask, shape);
  } else {
    out = at::bmm(x, weight.transpose(1, 2));  // [M, R, OUT], contiguous: the epilogue runs in place
    if (bias || relu) fastjac::epilogue_forward(out, member_major, out, member_major, b, mask, shape);
  }
  return {out, relu ? c10::optional<at::Tensor>(mask) : c10::nullopt};
}

std::tuple<c10::optional<at::Tensor>, at::Tensor, c10::optional<at::Tensor>> stacked_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& mask, int64_t streams, bool has_bias, bool needs_x_grad) {
  constexpr const char* op = "stacked_linear_backward";
  const Dims d = check_x_weight(x, weight, streams, op);
  fastjac::check_cpu_float(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == d.M && grad_out.size(1) == d.R && grad_out.size(2) == d.OUT,
              op, ": grad_out must be [M=", d.M, ", R=", d.R, ", OUT=", d.OUT, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " differs from weight dtype ", weight.scalar_type());
  if (mask) fastjac::check_mask(*mask, d.M, d.B * d.OUT, op);

  const EpilogueShape shape = epilogue_shape(d, streams);
  const Strides member_major = fastjac::contiguous_strides(shape);
  const at::Tensor m = mask ? *mask : at::Tensor();
  at::Tensor grad_bias = has_bias ? at::empty({d.M, d.OUT}, grad_out.options()) : at::Tensor();
  c10::optional<at::Tensor> grad_x;
  at::Tensor grad_weight;

  if (x.dim() == 2) {
    // grad_y row-major [R, M*OUT]: mask multiply, bias reduction and transpose in one pass.
    at::Tensor grad_y = at::empty({d.R, d.M * d.OUT}, grad_out.options());
    fastjac::epilogue_backward(grad_out, member_major, grad_y, row_major(d), m, grad_bias, shape);
    grad_weight = at::mm(grad_y.t(), x).view({d.M, d.OUT, d.IN});              // [M*OUT, R] @ [R, IN]
    if (needs_x_grad) grad_x = at::mm(grad_y, weight.view({d.M * d.OUT, d.IN}));  // summed over members
  } else {
    // Without a mask grad_y is grad_out itself; the pass then only reduces the bias gradient.
    at::Tensor grad_y = mask ? at::empty_like(grad_out) : grad_out;
    if (mask || has_bias) {
      fastjac::epilogue_backward(grad_out, member_major, mask ? grad_y : at::Tensor(), member_major, m, grad_bias,
                                 shape);
    }
    grad_weight = at::bmm(grad_y.transpose(1, 2), x);  // [M, OUT, R] @ [M, R, IN]
    if (needs_x_grad) grad_x = at::bmm(grad_y, weight);  // [M, R, OUT] @ [M, OUT, IN]
  }
  return {grad_x, grad_weight, has_bias ? c10::optional<at::Tensor>(grad_bias) : c10::nullopt};
}
