// Per-sample random projection vectors from a counter-based RNG (Philox-4x32-10, Salmon et al. 2011,
// "Parallel random numbers: as easy as 1, 2, 3"), written out here: no cuRAND state, no torch.
// A value depends only on (seed, offset, element index), so any launch shape, any device and a
// re-run give the same numbers, and the sphere rows are exactly the normalised Gaussian rows.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_launchers.h"

namespace fastjac {
namespace cuda {
namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kSphereThreads = 256;           // power of two: the tree reduction halves it

__host__ __device__ __forceinline__ uint32_t mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint4 philox_round(uint4 ctr, uint2 key) {
  const uint32_t hi0 = mulhi(kPhiloxM0, ctr.x), lo0 = kPhiloxM0 * ctr.x;
  const uint32_t hi1 = mulhi(kPhiloxM1, ctr.z), lo1 = kPhiloxM1 * ctr.z;
  return make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
}

// Philox-4x32-10 of counter (block, offset) under key seed: four independent 32-bit words. Host-callable
// too, so the known-answer vectors of Random123 can be checked without a GPU.
__host__ __device__ __forceinline__ uint4 philox4x32_10(uint64_t block, uint64_t offset, uint64_t seed) {
  uint4 ctr = make_uint4(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                         static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
  uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    ctr = philox_round(ctr, key);
    key.x += kPhiloxW0;
    key.y += kPhiloxW1;
  }
  return ctr;
}

// 24 random bits -> (0, 1] (never 0, so the logarithm is finite) and [0, 1).
__device__ __forceinline__ float uniform_open0(uint32_t bits) { return ((bits >> 8) + 1u) * (1.0f / 16777216.0f); }
__device__ __forceinline__ float uniform(uint32_t bits) { return (bits >> 8) * (1.0f / 16777216.0f); }

// Box-Muller: two uniforms -> two independent standard normals.
__device__ __forceinline__ float2 box_muller(uint32_t a, uint32_t b) {
  const float radius = sqrtf(-2.0f * logf(uniform_open0(a)));
  float s, c;
  sincospif(2.0f * uniform(b), &s, &c);
  return make_float2(radius * c, radius * s);
}

// The four normals of Philox block `block`: elements 4*block .. 4*block+3 of the flat output.
__device__ __forceinline__ float4 gaussian4(uint64_t block, uint64_t seed, uint64_t offset) {
  const uint4 bits = philox4x32_10(block, offset, seed);
  const float2 z01 = box_muller(bits.x, bits.y);
  const float2 z23 = box_muller(bits.z, bits.w);
  return make_float4(z01.x, z01.y, z23.x, z23.y);
}

__device__ __forceinline__ float component(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__global__ void gaussian_kernel(float* __restrict__ out, uint64_t total, uint64_t seed, uint64_t offset) {
  const uint64_t blocks = (total + 3) / 4;
  for (uint64_t block = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; block < blocks;
       block += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const float4 z = gaussian4(block, seed, offset);
    const uint64_t first = block * 4;
    if (first + 3 < total) {  // a full block: four stores (the output may not be 16-byte aligned)
      out[first] = z.x;
      out[first + 1] = z.y;
      out[first + 2] = z.z;
      out[first + 3] = z.w;
    } else {
      for (int i = 0; i < 4 && first + i < total; ++i) out[first + i] = component(z, i);
    }
  }
}

// One block per row (grid-stride over rows). Each thread owns whole Philox blocks of the row (the two
// boundary blocks may be shared with the neighbouring rows: each row computes them and keeps its part),
// writes its normals, and the block reduces their squared sum in shared memory; then every thread
// rescales the elements it wrote itself (no further synchronisation needed for them).
__global__ void sphere_kernel(float* __restrict__ out, int64_t n, int64_t c, uint64_t seed, uint64_t offset) {
  __shared__ float partial[kSphereThreads];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const uint64_t begin = static_cast<uint64_t>(row) * c, end = begin + c;
    float sum = 0.0f;
    for (uint64_t block = begin / 4 + threadIdx.x; block * 4 < end; block += blockDim.x) {
      const float4 z = gaussian4(block, seed, offset);
      for (int i = 0; i < 4; ++i) {
        const uint64_t e = block * 4 + i;
        if (e >= begin && e < end) {
          const float value = component(z, i);
          out[e] = value;
          sum += value * value;
        }
      }
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = kSphereThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    const float total = partial[0];
    const float scale = total > 0.0f ? 1.0f / sqrtf(total) : 0.0f;
    for (uint64_t block = begin / 4 + threadIdx.x; block * 4 < end; block += blockDim.x) {
      for (int i = 0; i < 4; ++i) {
        const uint64_t e = block * 4 + i;
        if (e >= begin && e < end) out[e] *= scale;
      }
    }
    __syncthreads();  // partial[0] is read above before the next row overwrites partial
  }
}

unsigned int grid_for(uint64_t work, unsigned int threads) {
  const uint64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535ull * 32 ? (blocks > 0 ? blocks : 1) : 65535ull * 32);
}

}  // namespace

cudaError_t projections_gaussian(float* out, int64_t n, int64_t d, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream) {
  if (n <= 0 || d <= 0) return cudaSuccess;
  const uint64_t total = static_cast<uint64_t>(n) * static_cast<uint64_t>(d);
  constexpr unsigned int threads = 256;
  gaussian_kernel<<<grid_for((total + 3) / 4, threads), threads, 0, stream>>>(out, total, seed, offset);
  return cudaGetLastError();
}

cudaError_t projections_sphere(float* out, int64_t n, int64_t c, uint64_t seed, uint64_t offset,
                               cudaStream_t stream) {
  if (n <= 0 || c <= 0) return cudaSuccess;
  const unsigned int rows = static_cast<unsigned int>(n < (1ll << 30) ? n : (1ll << 30));
  sphere_kernel<<<rows, kSphereThreads, 0, stream>>>(out, n, c, seed, offset);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastjac
