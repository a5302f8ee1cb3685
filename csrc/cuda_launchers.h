// Plain CUDA launchers of fastjac (no torch headers): raw device pointers, sizes and a stream.
// Defined in csrc/*.cu, wrapped for Python by csrc/cuda_ops.cpp. Every launcher enqueues its kernel(s)
// on `stream` and returns cudaGetLastError() (cudaSuccess when there was nothing to do).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastjac {
namespace cuda {

// out[k, i] = min(max(delta[k, i] + step[k] * sign(grad[k, i]), -eps[k]), eps[k]) over [k, d] (row-major),
// bit-identical to torch's clamp(delta + step * sign(grad), -eps, eps) whatever the fast-math flags.
// out may alias delta (in-place update).
cudaError_t uap_step(const float* delta, const float* grad, const float* step, const float* eps, float* out,
                     int64_t k, int64_t d, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastjac
