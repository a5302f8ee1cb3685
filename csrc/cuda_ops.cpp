// Python bindings of the CUDA launchers (csrc/*.cu, declared in csrc/cuda_launchers.h) as fastjac._C ops.
// The whole file is compiled only with FASTJAC_WITH_CUDA (the CUDAExtension build); the CPU build, which
// compiles every csrc/*.cpp, gets an empty translation unit.
//
//   uap_step(delta [K, *], grad like delta, step [K], eps [K]) -> clamp(delta + step*sign(grad), -eps, eps)
//       float32, bit-identical to torch's expression: the cuda backend's one op of its own (its GEMMs and
//       elementwise ops are ATen's, i.e. cuBLAS and torch's CUDA kernels).
#ifdef FASTJAC_WITH_CUDA

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#if __has_include("fastjac.h")
#include "fastjac.h"  // declares register_cuda_ops
#endif
#include "cuda_launchers.h"

// Named namespace: fastjac.h (or the CPU ops) may declare functions of the same names in the global one.
namespace fastjac {
namespace cuda_ops {

void check_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastjac._C.", op, ": ", name, " must be on a CUDA device, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastjac._C.", op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastjac._C.", op, ": ", name, " must be contiguous");
}

at::Tensor uap_step(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& step, const at::Tensor& eps) {
  check_tensor(delta, "uap_step", "delta");
  check_tensor(grad, "uap_step", "grad");
  check_tensor(step, "uap_step", "step");
  check_tensor(eps, "uap_step", "eps");
  TORCH_CHECK(delta.dim() >= 1, "fastjac._C.uap_step: delta must be [K, *in], got a 0-d tensor");
  TORCH_CHECK(grad.sizes() == delta.sizes(), "fastjac._C.uap_step: grad must have delta's shape ", delta.sizes(),
              ", got ", grad.sizes());
  const int64_t k = delta.size(0);
  TORCH_CHECK(step.numel() == k, "fastjac._C.uap_step: step must hold K=", k, " values, got shape ", step.sizes());
  TORCH_CHECK(eps.numel() == k, "fastjac._C.uap_step: eps must hold K=", k, " values, got shape ", eps.sizes());
  for (const at::Tensor* t : {&grad, &step, &eps}) {
    TORCH_CHECK(t->device() == delta.device(), "fastjac._C.uap_step: delta, grad, step and eps must be on one device, got ",
                delta.device(), " and ", t->device());
  }
  at::Tensor out = at::empty_like(delta);
  const c10::cuda::CUDAGuard guard(delta.device());
  C10_CUDA_CHECK(fastjac::cuda::uap_step(delta.data_ptr<float>(), grad.data_ptr<float>(), step.data_ptr<float>(),
                                         eps.data_ptr<float>(), out.data_ptr<float>(), k, k > 0 ? delta.numel() / k : 0,
                                         c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace cuda_ops
}  // namespace fastjac

void register_cuda_ops(pybind11::module_& m) {
  namespace py = pybind11;
  namespace ops = fastjac::cuda_ops;
  m.def("uap_step", &ops::uap_step, "clamp(delta + step_k * sign(grad), -eps_k, eps_k) (CUDA, float32)", py::arg("delta"),
        py::arg("grad"), py::arg("step"), py::arg("eps"));
}

#endif  // FASTJAC_WITH_CUDA
