// Python bindings of the CUDA launchers (csrc/*.cu, declared in csrc/cuda_launchers.h) as fastjac._C ops.
// The whole file is compiled only with FASTJAC_WITH_CUDA (the CUDAExtension build); the CPU build, which
// compiles every csrc/*.cpp, gets an empty translation unit.
//
//   projections_gaussian(n, d, seed, offset, device) -> [n, d] float32 standard normals
//   projections_sphere(n, c, seed, offset, device)   -> [n, c] float32 rows uniform on the unit sphere
//       (counter-based: a pure function of (seed, offset); the sphere rows are the normalised Gaussian
//        rows of the same seed and offset; device: a torch.device or a string such as "cuda:0")
//   sq_norms(t [n, *])                  -> [n] squared norms of the rows (float32 or float64)
//   uap_step(delta [K, *], grad like delta, step [K], eps [K]) -> clamp(delta + step*sign(grad), -eps, eps)
#ifdef FASTJAC_WITH_CUDA

#include <string>

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

void check_tensor(const at::Tensor& t, const char* op, const char* name, bool float64_ok = false) {
  TORCH_CHECK(t.is_cuda(), "fastjac._C.", op, ": ", name, " must be on a CUDA device, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || (float64_ok && t.scalar_type() == at::kDouble), "fastjac._C.", op,
              ": ", name, " must be float32", float64_ok ? " or float64" : "", ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastjac._C.", op, ": ", name, " must be contiguous");
}

void check_sizes(int64_t rows, int64_t cols, const char* op, const char* rows_name, const char* cols_name) {
  TORCH_CHECK(rows >= 0, "fastjac._C.", op, ": ", rows_name, " must be >= 0, got ", rows);
  TORCH_CHECK(cols >= 0, "fastjac._C.", op, ": ", cols_name, " must be >= 0, got ", cols);
}

at::Tensor new_output(int64_t rows, int64_t cols, const at::Device& device, const char* op) {
  TORCH_CHECK(device.is_cuda(), "fastjac._C.", op, ": device must be a CUDA device, got ", device);
  return at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat).device(device));
}

at::Tensor projections_gaussian(int64_t n, int64_t d, int64_t seed, int64_t offset, const at::Device& device) {
  check_sizes(n, d, "projections_gaussian", "n", "d");
  at::Tensor out = new_output(n, d, device, "projections_gaussian");
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(fastjac::cuda::projections_gaussian(out.data_ptr<float>(), n, d, static_cast<uint64_t>(seed),
                                                     static_cast<uint64_t>(offset),
                                                     c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor projections_sphere(int64_t n, int64_t c, int64_t seed, int64_t offset, const at::Device& device) {
  check_sizes(n, c, "projections_sphere", "n", "c");
  at::Tensor out = new_output(n, c, device, "projections_sphere");
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(fastjac::cuda::projections_sphere(out.data_ptr<float>(), n, c, static_cast<uint64_t>(seed),
                                                   static_cast<uint64_t>(offset),
                                                   c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor sq_norms(const at::Tensor& t) {
  check_tensor(t, "sq_norms", "t", /*float64_ok=*/true);
  TORCH_CHECK(t.dim() >= 1, "fastjac._C.sq_norms: t must have a row dimension, got a 0-d tensor");
  const int64_t n = t.size(0), d = n > 0 ? t.numel() / n : 0;
  at::Tensor out = at::empty({n}, t.options());
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (t.scalar_type() == at::kDouble) {
    C10_CUDA_CHECK(fastjac::cuda::sq_norms(t.data_ptr<double>(), out.data_ptr<double>(), n, d, stream));
  } else {
    C10_CUDA_CHECK(fastjac::cuda::sq_norms(t.data_ptr<float>(), out.data_ptr<float>(), n, d, stream));
  }
  return out;
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
  // The device argument accepts a torch.device or a string ("cuda", "cuda:1").
  m.def("projections_gaussian", &ops::projections_gaussian, "[n, d] float32 standard normals (Philox, seed, offset)",
        py::arg("n"), py::arg("d"), py::arg("seed"), py::arg("offset"), py::arg("device"));
  m.def(
      "projections_gaussian",
      [](int64_t n, int64_t d, int64_t seed, int64_t offset, const std::string& device) {
        return ops::projections_gaussian(n, d, seed, offset, at::Device(device));
      },
      py::arg("n"), py::arg("d"), py::arg("seed"), py::arg("offset"), py::arg("device"));
  m.def("projections_sphere", &ops::projections_sphere, "[n, c] float32 rows uniform on the unit sphere (Philox)",
        py::arg("n"), py::arg("c"), py::arg("seed"), py::arg("offset"), py::arg("device"));
  m.def(
      "projections_sphere",
      [](int64_t n, int64_t c, int64_t seed, int64_t offset, const std::string& device) {
        return ops::projections_sphere(n, c, seed, offset, at::Device(device));
      },
      py::arg("n"), py::arg("c"), py::arg("seed"), py::arg("offset"), py::arg("device"));
  m.def("sq_norms", &ops::sq_norms, "[n] squared norms of the rows of t [n, *] (CUDA)", py::arg("t"));
  m.def("uap_step", &ops::uap_step, "clamp(delta + step_k * sign(grad), -eps_k, eps_k) (CUDA, float32)", py::arg("delta"),
        py::arg("grad"), py::arg("step"), py::arg("eps"));
}

#endif  // FASTJAC_WITH_CUDA
