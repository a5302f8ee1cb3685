// Per-row squared norms [n, d] -> [n]: one block per row (grid-stride over rows), each thread a strided
// partial sum, then a warp-shuffle reduction inside each warp and one more across the warps' results.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_launchers.h"

namespace fastjac {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size
constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int lane_offset = kWarp / 2; lane_offset > 0; lane_offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, lane_offset);
  }
  return value;
}

template <typename T>
__global__ void sq_norms_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n, int64_t d) {
  __shared__ T warp_sums[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* values = in + row * d;
    T sum = T(0);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) sum += values[j] * values[j];
    sum = warp_sum(sum);
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    if (warp == 0) {
      sum = lane < kThreads / kWarp ? warp_sums[lane] : T(0);
      sum = warp_sum(sum);
      if (lane == 0) out[row] = sum;
    }
    __syncthreads();  // warp_sums is reused by the next row
  }
}

template <typename T>
cudaError_t launch(const T* in, T* out, int64_t n, int64_t d, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const unsigned int rows = static_cast<unsigned int>(n < (1ll << 30) ? n : (1ll << 30));
  sq_norms_kernel<T><<<rows, kThreads, 0, stream>>>(in, out, n, d);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sq_norms(const float* in, float* out, int64_t n, int64_t d, cudaStream_t stream) {
  return launch(in, out, n, d, stream);
}

cudaError_t sq_norms(const double* in, double* out, int64_t n, int64_t d, cudaStream_t stream) {
  return launch(in, out, n, d, stream);
}

}  // namespace cuda
}  // namespace fastjac
