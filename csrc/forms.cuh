// The elementwise forms of the gradient sweep: what turns a tile of S into the gradient tile G.
//
// A form is an argument type (tilecl_cuda.h) and its Epilogue here; grad.cuh's tile loop is a
// template on the form and calls nothing else of it, so a new form costs one argument type, one
// Epilogue specialization, one entry of TILECL_FORMS (the instantiation) and one binding. An
// Epilogue<Form> holds the arguments (`args`, passed to the kernels by value) and provides:
//
//   Terms<T>                 the per-row and per-column terms of one tile (a POD in shared memory);
//   Totals                   what a thread accumulates across tiles for the form's reductions;
//   load_rows<T, NT>(terms, row0, n), load_cols<T, NT>(terms, col0, m)
//                            a tile's terms, by the block's NT threads (the loop's barriers order them);
//   tile<T, NT>(smem, terms, report, totals, included, g_dot_s)
//                            the epilogue of one tile: S (fp32, in shared memory) → G (store_gradient)
//                            on the entries `included(i, j)` (0 elsewhere), adding Σ G_ij·S_ij of the
//                            fp32 G to `g_dot_s`, plus the form's reductions where `report` (the row
//                            kernel's first feature chunk, which sees every entry once); ends with a
//                            barrier;
//   finish<T, NT>(totals, row0, n, row_totals, warp_sums)
//                            the reporting row block's results: its own outputs and one float per row
//                            tile in row_totals (summed by the launcher into total());
//   products()               whether the gradient products run (host and device);
//   check(n, m), total()     host side: argument checks; where row_totals' sum goes (nullptr: none).
#pragma once

#include <stdexcept>

#include "kernel_traits.h"

namespace tilecl {
namespace detail {

template <class Form>
struct Epilogue;

// S_s → G elementwise through `entry(i, j, S_ij)` on the included entries, 0 on the others: in place
// for float, into the separate 16-bit tile (the tensor-core operand) otherwise; then a barrier.
// Adds this thread's Σ G_ij·S_ij to `g_dot_s` from the fp32 G: the logit scale's gradient is
// Σ G_ij·S_ij / scale, which the 16-bit G of the products (3 digits) would blur.
template <typename T, int NT, typename Included, typename Entry>
__device__ __forceinline__ void store_gradient(unsigned char* smem, Included included, Entry entry, float& g_dot_s) {
  using C = Config<T>;
  using L = Layout<T>;
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += NT) {
    const int i = idx / C::BN, j = idx % C::BN;
    const float s = s_s[i * L::LDS + j];
    float value = 0.0f;
    if (included(i, j)) {  // an excluded entry adds 0, not 0·(-inf)
      value = entry(i, j, s);
      g_dot_s += value * s;
    }
    if constexpr (L::kSeparateG) {
      reinterpret_cast<T*>(smem + L::kG)[i * L::LDG + j] = from_float<T>(value);
    } else {
      s_s[i * L::LDS + j] = value;
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------- offset

// One entry of G. A zero multiplier stands for "no term": select rather than multiply, so an
// overflowing exp never meets it as 0·inf.
__device__ __forceinline__ float offset_entry(float s, float c, float g, float r, float h) {
  float out = g != 0.0f ? g * expf(s - c) : 0.0f;
  if (h != 0.0f) out += h * expf(s - r);
  return out;
}

template <>
struct Epilogue<OffsetForm> {
  OffsetForm args;

  template <typename T>
  struct Terms {
    float c[Config<T>::BM], g[Config<T>::BM], r[Config<T>::BN], h[Config<T>::BN], p[Config<T>::BM];
    int t[Config<T>::BM];  // each row's positive column (-1: none)
    int col0;              // the tile's first column
  };
  struct Totals {};

  // Rows [row0, row0 + BM): c_i = -inf (a fully excluded row) and rows past n carry no term; +inf
  // gives exp(S − inf) = 0 by itself and NaN is kept, so NaN or inf inputs give non-finite
  // gradients as the full-matrix loss does.
  template <typename T, int NT>
  __device__ __forceinline__ void load_rows(Terms<T>& t, int row0, int n) const {
    for (int i = threadIdx.x; i < Config<T>::BM; i += NT) {
      const int row = row0 + i;
      const float ci = row < n ? args.row_offset[row] : 0.0f;
      const bool live = row < n && !(isinf(ci) && ci < 0.0f);
      t.c[i] = live ? ci : 0.0f;
      t.g[i] = live ? args.row_mult[row] : 0.0f;
      const bool positive = row < n && args.positive_cols != nullptr;
      t.t[i] = positive ? static_cast<int>(args.positive_cols[row]) : -1;
      t.p[i] = positive ? args.positive_mult[row] : 0.0f;
    }
  }

  // Columns past col_count, or with r_j = -inf, have none (as the rows: +inf and NaN are kept).
  template <typename T, int NT>
  __device__ __forceinline__ void load_cols(Terms<T>& t, int col0, int /* m */) const {
    if (threadIdx.x == 0) t.col0 = col0;
    for (int j = threadIdx.x; j < Config<T>::BN; j += NT) {
      const int col = col0 + j;
      const float rj = col < args.col_count ? args.col_offset[col] : 0.0f;
      const bool live = col < args.col_count && !(isinf(rj) && rj < 0.0f);
      t.r[j] = live ? rj : 0.0f;
      t.h[j] = live ? args.col_mult[col] : 0.0f;
    }
  }

  template <typename T, int NT, typename Included>
  __device__ __forceinline__ void tile(unsigned char* smem, const Terms<T>& t, bool /* report */, Totals&,
                                       Included included, float& g_dot_s) const {
    // the positive's one-hot, in fp32 before G is rounded: a saturated row's gradient is exactly 0
    store_gradient<T, NT>(
        smem, included,
        [&](int i, int j, float s) {
          const float onehot = t.col0 + j == t.t[i] ? t.p[i] : 0.0f;
          return offset_entry(s, t.c[i], t.g[i], t.r[j], t.h[j]) - onehot;
        },
        g_dot_s);
  }

  template <typename T, int NT>
  __device__ __forceinline__ void finish(const Totals&, int, int, float*, float*) const {}

  __host__ __device__ static constexpr bool products() { return true; }

  void check(int /* n */, int m) const {
    if (args.col_count < 0 || args.col_count > m)
      throw std::invalid_argument("tilecl: the column terms must number at most m");
    if (!args.row_offset || !args.row_mult || (args.col_count > 0 && (!args.col_offset || !args.col_mult)))
      throw std::invalid_argument("tilecl: the offset form needs its row terms, and column terms for col_count > 0");
  }
  float* total() const { return nullptr; }
};

// ------------------------------------------------------------------------------------------ sigmoid

// One included entry: ℓ = S + bias. Sets the pair's loss softplus(−z·ℓ) and returns σ(ℓ) − [z = +1],
// both from one exp(−|ℓ|) ≤ 1 (no overflow), the positive's σ(ℓ) − 1 = −σ(−ℓ) taken directly rather
// than by cancelling against 1. An S of -inf here is a value: a positive's loss is then +inf.
__device__ __forceinline__ float sigmoid_entry(float s, float bias, bool positive, float& loss) {
  const float logit = s + bias, small = expf(-fabsf(logit));
  const float signed_logit = positive ? logit : -logit;
  loss = fmaxf(-signed_logit, 0.0f) + log1pf(small);
  const float large = 1.0f / (1.0f + small), tiny = small / (1.0f + small);  // σ(|ℓ|), σ(−|ℓ|)
  return positive ? -(logit >= 0.0f ? tiny : large) : (logit >= 0.0f ? large : tiny);
}

template <>
struct Epilogue<SigmoidForm> {
  SigmoidForm args;

  template <typename T>
  struct Terms {
    int64_t row_key[Config<T>::BM], col_key[Config<T>::BN];
    float weight[Config<T>::BM];
  };
  struct Totals {
    float loss, grad_sum;  // this thread's row (thread i < BM of a reporting block)
  };

  // Rows past n: weight 0 and key -1 (their S is -inf anyway).
  template <typename T, int NT>
  __device__ __forceinline__ void load_rows(Terms<T>& t, int row0, int n) const {
    for (int i = threadIdx.x; i < Config<T>::BM; i += NT) {
      const int row = row0 + i;
      t.row_key[i] = row < n ? args.row_keys[row] : -1;
      t.weight[i] = row < n ? args.row_weights[row] : 0.0f;
    }
  }

  template <typename T, int NT>
  __device__ __forceinline__ void load_cols(Terms<T>& t, int col0, int m) const {
    for (int j = threadIdx.x; j < Config<T>::BN; j += NT) t.col_key[j] = col0 + j < m ? args.col_keys[col0 + j] : -1;
  }

  // With `report`, thread i < BM first adds its row's weighted losses and Σ_j G_ij to its totals,
  // in a fixed order; without gradients the tile ends there.
  template <typename T, int NT, typename Included>
  __device__ __forceinline__ void tile(unsigned char* smem, const Terms<T>& t, bool report, Totals& totals,
                                       Included included, float& g_dot_s) const {
    using L = Layout<T>;
    const float* s_s = reinterpret_cast<const float*>(smem + L::kS);
    if (report && threadIdx.x < Config<T>::BM) {
      const int i = threadIdx.x;
      for (int j = 0; j < Config<T>::BN; ++j) {
        if (!included(i, j)) continue;
        float pair_loss;
        const float grad = sigmoid_entry(s_s[i * L::LDS + j], args.bias, t.row_key[i] == t.col_key[j], pair_loss);
        totals.loss += t.weight[i] * pair_loss;
        totals.grad_sum += t.weight[i] * grad;
      }
    }
    __syncthreads();  // S_s is read above and overwritten below
    if (!args.with_grads) return;
    store_gradient<T, NT>(
        smem, included,
        [&](int i, int j, float s) {
          float unused;
          return t.weight[i] * sigmoid_entry(s, args.bias, t.row_key[i] == t.col_key[j], unused);
        },
        g_dot_s);
  }

  // The row losses, and the block's Σ G as its row tile's total (grad_bias).
  template <typename T, int NT>
  __device__ __forceinline__ void finish(const Totals& totals, int row0, int n, float* row_totals,
                                         float* warp_sums) const {
    const int i = threadIdx.x;
    if (i < Config<T>::BM && row0 + i < n) args.row_loss[row0 + i] = totals.loss;
    const float total = block_sum<NT>(totals.grad_sum, warp_sums);  // 0 from the threads past BM
    if (threadIdx.x == 0) row_totals[blockIdx.x] = total;
    __syncthreads();  // the caller reuses warp_sums
  }

  __host__ __device__ bool products() const { return args.with_grads; }

  void check(int /* n */, int /* m */) const {
    if (!args.row_keys || !args.col_keys || !args.row_weights || !args.row_loss || !args.grad_bias)
      throw std::invalid_argument("tilecl: the sigmoid form needs both keys, row_weights, row_loss and grad_bias");
  }
  float* total() const { return args.grad_bias; }
};

}  // namespace detail
}  // namespace tilecl

// Every form, for the instantiation (launch.cuh): X(ARG, Form) per entry.
#define TILECL_FORMS(X, ARG) X(ARG, OffsetForm) X(ARG, SigmoidForm)
