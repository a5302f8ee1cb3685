// The fused SGD-UAP update and projection onto the L-inf ball of each perturbation:
//     out[k, i] = min(max(delta[k, i] + step[k] * sign(grad[k, i]), -eps[k]), eps[k])
// It must equal torch's clamp(delta + step * sign(grad), -eps, eps) bit for bit. The add and multiply are
// written as PTX without .ftz so that the extension's --use_fast_math (flush-to-zero, contraction) cannot
// change them; step * sign is exact anyway (sign is -1, 0 or 1), so one IEEE rounding of the add remains,
// and the sign is read from the bits. sign(NaN) is 0 as in torch.sign on the CPU; a NaN delta propagates
// through the clamp as in torch.clamp. (The clamp's comparisons may flush a subnormal eps: not a real case.)
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_launchers.h"

namespace fastjac {
namespace cuda {
namespace {

__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// sign(g) from the bits (integer ops ignore flush-to-zero, so a subnormal gradient keeps its sign):
// 0 for +-0 and NaN (as torch.sign on the CPU), else +-1.
__device__ __forceinline__ float sign_of(float g) {
  const int bits = __float_as_int(g);
  const int magnitude = bits & 0x7fffffff;
  if (magnitude == 0 || magnitude > 0x7f800000) return 0.0f;
  return bits < 0 ? -1.0f : 1.0f;
}

__global__ void uap_step_kernel(const float* delta, const float* __restrict__ grad, const float* __restrict__ step,
                                const float* __restrict__ eps, float* out, int64_t k, int64_t d) {
  const int64_t total = k * d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / d;
    const float sign = sign_of(grad[i]);
    float value = add_rn(delta[i], mul_rn(step[row], sign));
    const float bound = eps[row];
    value = value < -bound ? -bound : value;  // max(value, -eps); a NaN value stays NaN
    value = value > bound ? bound : value;    // min(value, eps)
    out[i] = value;
  }
}

}  // namespace

cudaError_t uap_step(const float* delta, const float* grad, const float* step, const float* eps, float* out,
                     int64_t k, int64_t d, cudaStream_t stream) {
  if (k <= 0 || d <= 0) return cudaSuccess;
  const int64_t total = k * d;
  constexpr int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const unsigned int grid = static_cast<unsigned int>(blocks < 65535ll * 32 ? blocks : 65535ll * 32);
  uap_step_kernel<<<grid, threads, 0, stream>>>(delta, grad, step, eps, out, k, d);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastjac
