// fastjac._C: the one module of the C++/CUDA extension. The CPU launchers are registered with the
// dispatcher as the ``fastjac`` operator library (torch.ops.fastjac.*: schemas here, fake kernels in
// fastjac/ops/native.py), so torch.compile, meta tensors and torch.export see through them; a CUDA build
// adds the CUDA kernel of uap_step (csrc/cuda_ops.cpp). The pybind functions below are the
// same launchers for the tests that call them directly.
#include "fastjac.h"

namespace {

// stacked_addmm_ returns nothing through the dispatcher: an op that mutates ``out`` and also returned it
// would alias an input, which torch.compile's functionalization does not accept for custom ops.
void stacked_addmm_op(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias,
                      bool accumulate) {
  stacked_addmm_(out, a, b, bias, accumulate);
}

}  // namespace

TORCH_LIBRARY(fastjac, m) {
  m.def("stream_epilogue_forward(Tensor y, Tensor? bias, int rep, bool relu) -> (Tensor, Tensor?)");
  m.def("stream_epilogue_backward(Tensor grad_out, Tensor? mask, int nb, int rep, bool has_bias) -> (Tensor, Tensor?)");
  m.def("stacked_linear_forward(Tensor x, Tensor weight, Tensor? bias, int streams, bool relu) -> (Tensor, Tensor?)");
  m.def("stacked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? mask, int streams, bool has_bias, "
        "bool needs_x_grad) -> (Tensor?, Tensor, Tensor?)");
  m.def("stacked_addmm_(Tensor(a!) out, Tensor a, Tensor b, Tensor? bias, bool accumulate) -> ()");
  m.def("batch_norm_statistics_backward(Tensor? grad_y, Tensor? grad_x_hat, Tensor? grad_inv_std, Tensor x_hat, "
        "Tensor inv_std, Tensor? gamma) -> (Tensor, Tensor?, Tensor?)");
  m.def("batch_norm_linearization_forward(Tensor t, Tensor x_hat, Tensor scale) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_linearization_backward(Tensor grad_out, Tensor t, Tensor x_hat, Tensor scale, Tensor mean_t, "
        "Tensor mean_tx) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_streams_forward(Tensor x, Tensor? gamma, Tensor? beta, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_streams_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor inv_std, Tensor? gamma, "
        "Tensor mean_t, Tensor mean_tx) -> (Tensor, Tensor, Tensor)");
  // CUDA only (csrc/cuda_ops.cpp): clamp(delta + step_k * sign(grad), -eps_k, eps_k), float32
  m.def("uap_step(Tensor delta, Tensor grad, Tensor step, Tensor eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("stream_epilogue_forward", &stream_epilogue_forward);
  m.impl("stream_epilogue_backward", &stream_epilogue_backward);
  m.impl("stacked_linear_forward", &stacked_linear_forward);
  m.impl("stacked_linear_backward", &stacked_linear_backward);
  m.impl("stacked_addmm_", &stacked_addmm_op);
  m.impl("batch_norm_statistics_backward", &batch_norm_statistics_backward);
  m.impl("batch_norm_linearization_forward", &batch_norm_linearization_forward);
  m.impl("batch_norm_linearization_backward", &batch_norm_linearization_backward);
  m.impl("batch_norm_streams_forward", &batch_norm_streams_forward);
  m.impl("batch_norm_streams_backward", &batch_norm_streams_backward);
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastjac C++ launchers (CPU, OpenMP); same signatures as the launchers in fastjac/ops";

  m.def("stream_epilogue_forward", &stream_epilogue_forward, py::arg("y"), py::arg("bias"), py::arg("rep"),
        py::arg("relu"),
        "stream_epilogue_forward(y [O,S,I], bias [O,NB] | None, rep, relu) -> (out [O,S,I], mask [O,I] bool | None)\n"
        "Bias (index (i // rep) % NB) on stream 0; ReLU mask from stream 0 applied to every stream.");
  m.def("stream_epilogue_backward", &stream_epilogue_backward, py::arg("grad_out"), py::arg("mask"), py::arg("nb"),
        py::arg("rep"), py::arg("has_bias"),
        "stream_epilogue_backward(grad_out [O,S,I], mask [O,I] | None, nb, rep, has_bias)\n"
        "    -> (grad_y [O,S,I], grad_bias [O,NB] | None)");
  m.def("stacked_linear_forward", &stacked_linear_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("streams"), py::arg("relu"),
        "stacked_linear_forward(x [R,IN] | [M,R,IN], weight [M,OUT,IN], bias [M,OUT] | None, streams, relu)\n"
        "    -> (out [M,R,OUT], mask [M,B*OUT] bool | None)   with R = streams * B");
  m.def("stacked_linear_backward", &stacked_linear_backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"),
        py::arg("mask"), py::arg("streams"), py::arg("has_bias"), py::arg("needs_x_grad"),
        "stacked_linear_backward(grad_out [M,R,OUT], x, weight, mask | None, streams, has_bias, needs_x_grad)\n"
        "    -> (grad_x like x | None, grad_weight [M,OUT,IN], grad_bias [M,OUT] | None)\n"
        "grad_x of a shared x [R,IN] is summed over the members.");

  m.def("stacked_addmm_", &stacked_addmm_, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("bias"),
        py::arg("accumulate"),
        "stacked_addmm_(out [M,P,Q], a [M,P,K], b [M,K,Q], bias [M,Q] | None, accumulate) -> out\n"
        "out[m] = (bias[m] +) a[m] @ b[m], or out[m] += a[m] @ b[m] with accumulate; (member, row block)\n"
        "tasks over the intra-op threads, each product single-threaded. a, b: any strides.");

#ifdef FASTJAC_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
