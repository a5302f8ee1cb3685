// stacked_addmm_: out[m] = (bias[m] +) a[m] @ b[m], or out[m] += a[m] @ b[m], for all M members at once,
// with (member, row block) tasks spread over the intra-op threads and each product a single-threaded
// BLAS sgemm/dgemm call on raw pointers.
//
// Why (a heuristic, measured on one machine: the project's 2-core AMD EPYC VM, torch 2.13.0+cpu with its
// MKL, 2026-11-25; bench/RESULTS.md, "Current numbers"): there ATen's bmm runs the members one after
// another and splits each (small) GEMM over both threads; splitting the work into independent whole
// products instead measured 6 to 14% faster per product in isolation at 2 threads for the MLP JR step's
// shapes (M = 5, 128 to 256 rows, 256 to 784 wide), and the same at 1 thread. Nothing here is derived
// from the machine at run time: on other core counts or another BLAS, re-measure (the products against
// ATen's: `python bench/ablations.py plain|chain <threads>`, and pytest bench/bench_linear_chain.py)
// before relying on it. Rows are split into blocks = threads / gcd(M, threads) per member so every
// thread gets the same number of tasks (M = 5, 2 threads: 10 tasks of half a member each). Calling BLAS
// directly (the Fortran sgemm_/dgemm_ that libtorch_cpu exports and ATen itself uses) skips ~6 tensor
// views and a dispatch per task: measured ~0.2 ms of a 12 ms MLP JR step on the same machine.
//
// a and b may be any strided views with one unit stride per matrix (transposes, a stride-0 member dim
// for an input shared by the members); out must have a unit column stride.
#include <numeric>

#include <ATen/Parallel.h>

#include "fastjac.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

inline void blas_gemm(char ta, char tb, int m, int n, int k, float beta, const float* a, int lda, const float* b,
                      int ldb, float* c, int ldc) {
  const float one = 1.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void blas_gemm(char ta, char tb, int m, int n, int k, double beta, const double* a, int lda, const double* b,
                      int ldb, double* c, int ldc) {
  const double one = 1.0;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

// A row-major [rows, cols] matrix view for column-major BLAS: its transpose, read with 'N' (unit column
// stride) or 'T' (unit row stride), and the leading dimension.
struct BlasView {
  char trans;
  int64_t ld, row_step;  // row_step: elements between consecutive rows (to offset a row block)
};

BlasView blas_view(const at::Tensor& t, const char* op, const char* name) {
  const int64_t rows = t.size(1), cols = t.size(2), s_row = t.stride(1), s_col = t.stride(2);
  if ((s_col == 1 || cols == 1) && (rows == 1 || s_row >= cols)) {  // row-major rows
    return {'N', rows == 1 ? std::max<int64_t>(cols, 1) : s_row, s_row};
  }
  if ((s_row == 1 || rows == 1) && (cols == 1 || s_col >= rows)) {  // column-major: a transposed view
    return {'T', cols == 1 ? std::max<int64_t>(rows, 1) : s_col, 1};
  }
  TORCH_CHECK(false, op, ": ", name, " [", rows, ", ", cols, "] needs non-overlapping rows or columns with a unit "
              "stride, got strides ", t.strides());
}

template <typename scalar_t>
void run(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias,
         bool accumulate, const char* op) {
  const int64_t M = out.size(0), P = out.size(1), Q = out.size(2), K = a.size(2);
  const BlasView va = blas_view(a, op, "a"), vb = blas_view(b, op, "b");
  TORCH_CHECK(out.stride(2) == 1 && out.stride(1) >= Q, op, ": out needs unit column stride, got ", out.strides());
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const scalar_t* a_ptr = a.data_ptr<scalar_t>();
  const scalar_t* b_ptr = b.data_ptr<scalar_t>();
  const scalar_t* bias_ptr = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  const int64_t bias_step = bias.has_value() ? bias->stride(0) : 0, bias_col = bias.has_value() ? bias->stride(1) : 0;

  const int64_t threads = at::get_num_threads();
  // Heuristic, chosen and not measured: below 16 rows a block's GEMM is assumed to be mostly call overhead.
  const int64_t min_rows = 16;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(threads / std::gcd(M, threads), P / min_rows));
  const int64_t block_rows = (P + blocks - 1) / blocks;
  at::parallel_for(0, M * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / blocks, first = (task % blocks) * block_rows;
      const int64_t rows = std::min(P, first + block_rows) - first;
      if (rows <= 0) continue;
      scalar_t* c = out_ptr + m * out.stride(0) + first * out.stride(1);
      if (bias_ptr != nullptr) {  // C = bias, then C += A B
        const scalar_t* bias_m = bias_ptr + m * bias_step;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t q = 0; q < Q; ++q) c[r * out.stride(1) + q] = bias_m[q * bias_col];
      }
      // row-major C[rows, Q] = A[rows, K] B[K, Q]  <=>  column-major C^T = B^T A^T
      blas_gemm(vb.trans, va.trans, static_cast<int>(Q), static_cast<int>(rows), static_cast<int>(K),
                (accumulate || bias_ptr != nullptr) ? scalar_t(1) : scalar_t(0), b_ptr + m * b.stride(0),
                static_cast<int>(vb.ld), a_ptr + m * a.stride(0) + first * va.row_step, static_cast<int>(va.ld), c,
                static_cast<int>(out.stride(1)));
    }
  });
}

}  // namespace

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
                    bias->scalar_type() == out.scalar_type() && bias->device().is_cpu(),
                op, ": bias must be a CPU [", M, ", ", Q, "] tensor of out's dtype, got ", bias->sizes());
  }
  TORCH_CHECK(std::max({P, Q, K, out.stride(1), a.stride(1), a.stride(2), b.stride(1), b.stride(2)}) <
                  std::numeric_limits<int>::max(),
              op, ": sizes or strides beyond 32-bit BLAS");
  if (M == 0 || P == 0 || Q == 0) return out;
  if (K == 0) return accumulate ? out : (bias.has_value() ? out.copy_(bias->unsqueeze(1)) : out.zero_());
  if (out.scalar_type() == at::kFloat) {
    run<float>(out, a, b, bias, accumulate, op);
  } else {
    run<double>(out, a, b, bias, accumulate, op);
  }
  return out;
}
