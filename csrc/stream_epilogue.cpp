// The stream epilogue on the CPU: bias on the primal stream, ReLU mask from the primal stream applied to
// every stream, in one pass over the data (see fastjac/ops/stream_epilogue.py for the semantics).
#include "fastjac.h"

#include <ATen/AccumulateType.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads() { return 1; }
static int omp_get_thread_num() { return 0; }
#endif

namespace fastjac {
namespace {

// Work item = one (o, b, block of F): long enough to amortize the loop set-up and vectorize, short enough
// to balance O = 1 calls (then all the parallelism is along I = B*F).
constexpr int64_t kBlock = 4096;
// Below this many elements a parallel region costs more than the pass itself.
constexpr int64_t kParallelMin = 1 << 15;

// Splits [0, len) of a block starting at element i0 into segments on which the bias index (i / rep) % nb
// is k + STEP * (j - j0): STEP = 1 when rep == 1 (consecutive elements take consecutive bias entries),
// STEP = 0 otherwise (a run of one bias entry). The inner loops then vectorize, instead of stepping a
// bias index (and, in backward, a dependent accumulator) once per element.
template <typename Fn>
inline void for_bias_segments(int64_t i0, int64_t len, int64_t nb, int64_t rep, Fn&& f) {
  int64_t k = (i0 / rep) % nb, r = i0 % rep;
  for (int64_t j = 0; j < len;) {
    if (rep == 1) {
      const int64_t n = std::min(nb - k, len - j);
      f(j, j + n, k, std::integral_constant<int, 1>{});
      j += n;
      k = 0;
    } else {
      const int64_t n = std::min(rep - r, len - j);
      f(j, j + n, k, std::integral_constant<int, 0>{});
      j += n;
      r = 0;
      if (++k == nb) k = 0;
    }
  }
}

struct Item {  // the work item `item` of O * B * blocks, as (o, b, f0, len)
  int64_t o, b, f0, len;
  Item(int64_t item, const EpilogueShape& sh, int64_t blocks) {
    o = item / (sh.B * blocks);
    b = (item / blocks) % sh.B;
    f0 = (item % blocks) * kBlock;
    len = std::min(kBlock, sh.F - f0);
  }
};

// The ReLU's row loops, compiled for AVX-512, AVX2 and the baseline and chosen at load time (GCC's
// target_clones, glibc's ifunc), the pointers __restrict__: without both GCC left them scalar (the bool
// pointer may alias the floats), 2x ATen's time per element on ResNet-8's activations.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTJAC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTJAC_CLONES
#endif

// Two loops over bytes: GCC vectorizes neither a bool nor a float-from-compare conversion in one loop
#define FASTJAC_RELU_ROWS(T)                                                                                  \
  FASTJAC_CLONES void masked_row(const T* __restrict__ src, const bool* __restrict__ mask, T* __restrict__ dst, \
                                 int64_t n) {                                                                 \
    const unsigned char* m = reinterpret_cast<const unsigned char*>(mask);                                    \
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * static_cast<T>(m[j]);                                   \
  }                                                                                                           \
  FASTJAC_CLONES void relu_row(const T* __restrict__ y, T* __restrict__ out, bool* __restrict__ mask,         \
                               int64_t n) {                                                                   \
    unsigned char* m = reinterpret_cast<unsigned char*>(mask);                                                \
    for (int64_t j = 0; j < n; ++j) m[j] = y[j] > 0;                                                          \
    masked_row(y, mask, out, n);                                                                              \
  }
FASTJAC_RELU_ROWS(float)
FASTJAC_RELU_ROWS(double)
#undef FASTJAC_RELU_ROWS

template <typename scalar_t>
void forward_kernel(const scalar_t* y, Strides ys, scalar_t* out, Strides os, const scalar_t* bias, bool* mask,
                    const EpilogueShape& sh) {
  const int64_t blocks = (sh.F + kBlock - 1) / kBlock, length = sh.B * sh.F;
#pragma omp parallel for schedule(static) if (sh.O * sh.S * length >= kParallelMin)
  for (int64_t item = 0; item < sh.O * sh.B * blocks; ++item) {
    const Item it(item, sh, blocks);
    const scalar_t* y0 = y + it.o * ys.o + it.b * ys.b + it.f0;  // stream 0 of this block
    scalar_t* out0 = out + it.o * os.o + it.b * os.b + it.f0;
    bool* m = mask ? mask + it.o * length + it.b * sh.F + it.f0 : nullptr;

    // Stream 0: primal = y + bias, mask = primal > 0, out = primal * mask (a product, like the reference:
    // NaN stays NaN and negative values give -0).
    if (bias) {
      const scalar_t* bo = bias + it.o * sh.nb;
      for_bias_segments(it.b * sh.F + it.f0, it.len, sh.nb, sh.rep, [&](int64_t j0, int64_t j1, int64_t k, auto step) {
        const scalar_t* bk = bo + k - step * j0;  // bias of element j: bk[step * j]
        if (m) {
          for (int64_t j = j0; j < j1; ++j) {
            const scalar_t p = y0[j] + bk[step * j];
            m[j] = p > 0;
            out0[j] = p * static_cast<scalar_t>(m[j]);
          }
        } else {
          for (int64_t j = j0; j < j1; ++j) out0[j] = y0[j] + bk[step * j];
        }
      });
    } else if (m) {
      relu_row(y0, out0, m, it.len);
    } else if (out0 != y0) {
      std::copy(y0, y0 + it.len, out0);
    }

    // Streams 1..S-1 (tangents): no bias, the primal's mask.
    for (int64_t s = 1; s < sh.S; ++s) {
      const scalar_t* ysrc = y0 + s * ys.s;
      scalar_t* odst = out0 + s * os.s;
      if (m) {
        masked_row(ysrc, m, odst, it.len);
      } else if (odst != ysrc) {
        std::copy(ysrc, ysrc + it.len, odst);
      }
    }
  }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* go, Strides gos, scalar_t* gy, Strides gys, const bool* mask,
                     scalar_t* grad_bias, const EpilogueShape& sh) {
  // grad_bias sums in the accumulate type (double for float32), each thread into its own [O, nb] partial
  // sums, added up after the loop: deterministic for a given thread count, and no atomics.
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t blocks = (sh.F + kBlock - 1) / kBlock, length = sh.B * sh.F;
  const int threads = omp_get_max_threads();
  const int64_t per_thread = grad_bias ? sh.O * sh.nb : 0;
  std::vector<acc_t> partial(threads * per_thread, acc_t(0));

#pragma omp parallel num_threads(threads) if (sh.O * sh.S * length >= kParallelMin)
  {
    acc_t* mine = partial.data() + omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < sh.O * sh.B * blocks; ++item) {
      const Item it(item, sh, blocks);
      const scalar_t* go0 = go + it.o * gos.o + it.b * gos.b + it.f0;
      scalar_t* gy0 = gy ? gy + it.o * gys.o + it.b * gys.b + it.f0 : nullptr;
      const bool* m = mask ? mask + it.o * length + it.b * sh.F + it.f0 : nullptr;

      if (grad_bias) {  // stream 0 feeds the bias gradient
        acc_t* bo = mine + it.o * sh.nb;
        for_bias_segments(it.b * sh.F + it.f0, it.len, sh.nb, sh.rep, [&](int64_t j0, int64_t j1, int64_t k, auto step) {
          if (gy0) {
            for (int64_t j = j0; j < j1; ++j) gy0[j] = m ? go0[j] * static_cast<scalar_t>(m[j]) : go0[j];
          }
          const scalar_t* g = gy0 ? gy0 : go0;
          if constexpr (decltype(step)::value == 1) {  // distinct bias entries: no dependency between elements
            for (int64_t j = j0; j < j1; ++j) bo[k + j - j0] += g[j];
          } else {  // one bias entry: a vectorized reduction (omp simd may reorder the sum)
            acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = j0; j < j1; ++j) sum += g[j];
            bo[k] += sum;
          }
        });
      }
      for (int64_t s = grad_bias ? 1 : 0; gy0 && s < sh.S; ++s) {
        const scalar_t* src = go0 + s * gos.s;
        scalar_t* dst = gy0 + s * gys.s;
        if (m) {
          masked_row(src, m, dst, it.len);
        } else {
          std::copy(src, src + it.len, dst);
        }
      }
    }
  }

  for (int64_t idx = 0; idx < per_thread; ++idx) {
    acc_t sum = 0;
    for (int t = 0; t < threads; ++t) sum += partial[t * per_thread + idx];
    grad_bias[idx] = static_cast<scalar_t>(sum);
  }
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void epilogue_forward(const at::Tensor& y, Strides y_strides, const at::Tensor& out, Strides out_strides,
                      const at::Tensor& bias, const at::Tensor& mask, const EpilogueShape& shape) {
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "stream_epilogue_forward", [&] {
    forward_kernel<scalar_t>(y.data_ptr<scalar_t>(), y_strides, out.data_ptr<scalar_t>(), out_strides,
                             data_or_null<scalar_t>(bias), data_or_null<bool>(mask), shape);
  });
}

void epilogue_backward(const at::Tensor& grad_out, Strides grad_out_strides, const at::Tensor& grad_y,
                       Strides grad_y_strides, const at::Tensor& mask, const at::Tensor& grad_bias,
                       const EpilogueShape& shape) {
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "stream_epilogue_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), grad_out_strides, data_or_null<scalar_t>(grad_y),
                              grad_y_strides, data_or_null<bool>(mask), data_or_null<scalar_t>(grad_bias), shape);
  });
}

}  // namespace fastjac

// ---- launchers: y [O, S, I] is the [O, S, B=1, F=I] case ----

static void check_stream_input(const at::Tensor& t, const char* op, const char* name) {
  fastjac::check_cpu_float(t, op, name);
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [O, S, I], got ", t.sizes());
  TORCH_CHECK(t.size(1) >= 1, op, ": ", name, " must have at least one stream (S >= 1), got ", t.sizes());
}

static void check_bias_layout(int64_t length, int64_t nb, int64_t rep, const char* op) {
  TORCH_CHECK(rep >= 1, op, ": rep must be >= 1, got ", rep);
  TORCH_CHECK(nb >= 1, op, ": bias must have NB >= 1 columns (nb), got ", nb);
  TORCH_CHECK(length % (nb * rep) == 0, op, ": I=", length, " is not a multiple of NB*rep=", nb * rep,
              " (bias columns times rep)");
}

std::tuple<at::Tensor, c10::optional<at::Tensor>> stream_epilogue_forward(
    const at::Tensor& y, const c10::optional<at::Tensor>& bias, int64_t rep, bool relu) {
  constexpr const char* op = "stream_epilogue_forward";
  check_stream_input(y, op, "y");
  const int64_t O = y.size(0), S = y.size(1), I = y.size(2);
  int64_t nb = 1;  // without bias, nb and rep are unused (as in the reference)
  if (bias) {
    fastjac::check_cpu_float(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == O, op, ": bias must be [O=", O, ", NB], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == y.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from y dtype ", y.scalar_type());
    nb = bias->size(1);
    check_bias_layout(I, nb, rep, op);
  }

  const fastjac::EpilogueShape shape{O, S, 1, I, nb, bias ? rep : 1};
  const auto strides = fastjac::contiguous_strides(shape);
  at::Tensor out = at::empty_like(y);
  at::Tensor mask = relu ? at::empty({O, I}, y.options().dtype(at::kBool)) : at::Tensor();
  fastjac::epilogue_forward(y, strides, out, strides, bias ? *bias : at::Tensor(), mask, shape);
  return {out, relu ? c10::optional<at::Tensor>(mask) : c10::nullopt};
}

std::tuple<at::Tensor, c10::optional<at::Tensor>> stream_epilogue_backward(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& mask, int64_t nb, int64_t rep, bool has_bias) {
  constexpr const char* op = "stream_epilogue_backward";
  check_stream_input(grad_out, op, "grad_out");
  const int64_t O = grad_out.size(0), S = grad_out.size(1), I = grad_out.size(2);
  if (mask) fastjac::check_mask(*mask, O, I, op);
  if (has_bias) check_bias_layout(I, nb, rep, op);
  // Without a mask grad_y equals grad_out. It is returned as a copy: a dispatcher op's output may not alias
  // its input (torch.compile's functionalization and opcheck rely on the schema); the copy only happens for
  // layers without a ReLU, whose gradients are small next to the products.
  if (!mask && !has_bias) return {grad_out.clone(), c10::nullopt};

  const fastjac::EpilogueShape shape{O, S, 1, I, has_bias ? nb : 1, has_bias ? rep : 1};
  const auto strides = fastjac::contiguous_strides(shape);
  // Without a mask only the bias reduction runs, and grad_y is a copy of grad_out (see above).
  at::Tensor grad_y = mask ? at::empty_like(grad_out) : at::Tensor();
  at::Tensor grad_bias = has_bias ? at::empty({O, nb}, grad_out.options()) : at::Tensor();
  fastjac::epilogue_backward(grad_out, strides, grad_y, strides, mask ? *mask : at::Tensor(), grad_bias, shape);
  return {mask ? grad_y : grad_out.clone(), has_bias ? c10::optional<at::Tensor>(grad_bias) : c10::nullopt};
}
