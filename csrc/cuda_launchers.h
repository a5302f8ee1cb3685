// Plain CUDA launchers of fastjac (no torch headers): raw device pointers, sizes and a stream.
// Defined in csrc/*.cu, wrapped for Python by csrc/cuda_ops.cpp. Every launcher enqueues its kernel(s)
// on `stream` and returns cudaGetLastError() (cudaSuccess when there was nothing to do).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastjac {
namespace cuda {

// Counter-based (Philox-4x32-10) Gaussian projections, a pure function of (seed, offset, element index):
// element e of the row-major [n, d] output is component e % 4 of the Philox block with counter
// (e / 4, offset) and key seed, turned into normals by Box-Muller. Independent of the launch shape.
cudaError_t projections_gaussian(float* out, int64_t n, int64_t d, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream);

// Unit-sphere projections [n, c]: the Gaussian rows of projections_gaussian(n, c, seed, offset), each
// divided by its norm (one block per row, shared-memory reduction of the squared norm).
cudaError_t projections_sphere(float* out, int64_t n, int64_t c, uint64_t seed, uint64_t offset,
                               cudaStream_t stream);

// out[i] = sum_j in[i, j]^2 for a row-major [n, d] input (one block per row, warp-shuffle reduction).
cudaError_t sq_norms(const float* in, float* out, int64_t n, int64_t d, cudaStream_t stream);
cudaError_t sq_norms(const double* in, double* out, int64_t n, int64_t d, cudaStream_t stream);

// out[k, i] = min(max(delta[k, i] + step[k] * sign(grad[k, i]), -eps[k]), eps[k]) over [k, d] (row-major),
// bit-identical to torch's clamp(delta + step * sign(grad), -eps, eps) whatever the fast-math flags.
// out may alias delta (in-place update).
cudaError_t uap_step(const float* delta, const float* grad, const float* step, const float* eps, float* out,
                     int64_t k, int64_t d, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastjac
