// stacked_addmm: out[m] = (bias[m] +) a[m] @ b[m], or out[m] += a[m] @ b[m], for all M members at once,
// with (member, row block) tasks spread over the intra-op threads and each product single-threaded.
//
// Why: on a 2-core CPU, ATen's bmm runs the members one after another and splits each (small) GEMM
// over both threads; splitting the work into independent whole products instead measured ~10% faster
// at 2 threads for the MLP JR step's shapes (M = 5, 128 to 256 rows, 256 to 784 wide), and identical at
// 1 thread. Rows are split into blocks = threads / gcd(M, threads) per member so every thread gets the
// same number of tasks (M = 5, 2 threads: 10 tasks of half a member each).
//
// a and b may be any strided views (transposes, a stride-0 member dim for an input shared by the
// members): at::mm_out takes them as they are.
#include <numeric>

#include <ATen/Parallel.h>

#include "fastjac.h"

at::Tensor stacked_addmm_(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
                          const c10::optional<at::Tensor>& bias, bool accumulate) {
  const char* op = "stacked_addmm_";
  fastjac::check_cpu_float(out, op, "out", /*contiguous=*/false);
  fastjac::check_cpu_float(a, op, "a", /*contiguous=*/false);
  fastjac::check_cpu_float(b, op, "b", /*contiguous=*/false);
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && out.dim() == 3, op, ": a, b and out must be [M, ., .], got ",
              a.sizes(), ", ", b.sizes(), ", ", out.sizes());
  const int64_t M = out.size(0), P = out.size(1), Q = out.size(2), K = a.size(2);
  TORCH_CHECK(a.size(0) == M && b.size(0) == M && a.size(1) == P && b.size(1) == K && b.size(2) == Q, op,
              ": shapes do not chain: a ", a.sizes(), " @ b ", b.sizes(), " -> out ", out.sizes());
  TORCH_CHECK(a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type(), op,
              ": a, b and out must share one dtype");
  TORCH_CHECK(!(accumulate && bias.has_value()), op, ": a bias is added only when not accumulating");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == M && bias->size(1) == Q &&
                    bias->scalar_type() == out.scalar_type(),
                op, ": bias must be [", M, ", ", Q, "] of out's dtype, got ", bias->sizes());
  }
  const int64_t threads = at::get_num_threads();
  const int64_t min_rows = 16;  // below this a block's GEMM is mostly overhead
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(threads / std::gcd(M, threads), P / min_rows));
  const int64_t block_rows = (P + blocks - 1) / blocks;
  at::parallel_for(0, M * blocks, 1, [&](int64_t begin, int64_t end) {
    // worker threads do not inherit the caller's grad mode: these are plain kernels below autograd
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / blocks, first = (task % blocks) * block_rows;
      const int64_t rows = std::min(P, first + block_rows) - first;
      if (rows <= 0) continue;
      at::Tensor o = out[m].narrow(0, first, rows);
      const at::Tensor a_rows = a[m].narrow(0, first, rows);
      if (accumulate) {
        o.addmm_(a_rows, b[m]);
      } else if (bias.has_value()) {
        at::addmm_out(o, (*bias)[m], a_rows, b[m]);
      } else {
        at::mm_out(o, a_rows, b[m]);
      }
    }
  });
  return out;
}
