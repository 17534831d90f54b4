// The streaming-LSE statistics (the softmax losses' forward), as the Triton kernels
// (kernels/contrastive.py) compute them:
//   row_stats_kernel   one block per BM rows, walks every column tile: row LSE and positive logit;
//   col_stats_kernel   one block per BN columns, walks every row tile: column LSE (no atomics).
// Two threads per row (column) reduce each fp32 tile of S with one __shfl_xor_sync each for the
// max and the sum.
#pragma once

#include "scores.cuh"

namespace tilecl {
namespace detail {

// Streaming-LSE update of one row (column) from the 64 tile entries `v[0], v[stride], ...` that
// this thread and its pair partner (lane ^ 1) share: each reads every other entry.
__device__ __forceinline__ void merge_line(float& run_max, float& run_sum, const float* v, int stride, int half) {
  float peak = kNegInf;
#pragma unroll 8
  for (int e = half; e < 64; e += 2) peak = fmaxf(peak, v[e * stride]);
  peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, 1));
  const float new_max = fmaxf(run_max, peak);
  const float shift = new_max == kNegInf ? 0.0f : new_max;  // nothing seen yet: exp(-inf − 0) = 0
  float sum = 0.0f;
#pragma unroll 8
  for (int e = half; e < 64; e += 2) sum += expf(v[e * stride] - shift);
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  run_sum = run_sum * expf(run_max - shift) + sum;
  run_max = new_max;
}

// max + log(sum); a line with no entry (fully excluded) is -inf, without log(0). A NaN sum (a NaN
// logit, which fmaxf skips) stays NaN: it must not pass for an excluded line.
__device__ __forceinline__ float log_sum_exp(float run_max, float run_sum) {
  return run_sum == 0.0f ? kNegInf : run_max + logf(run_sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const T* __restrict__ a, const T* __restrict__ b, const int64_t* __restrict__ targets,
                     float* __restrict__ row_lse, float* __restrict__ positive, float scale, int n, int m, int d,
                     int64_t lda, int64_t ldb, bool exclude_diagonal, GroupMask mask) {
  using C = Config<T>;
  using L = Layout<T>;
  alignas(32) __shared__ unsigned char smem[L::kStatsBytes];
  const float* s_s = reinterpret_cast<const float*>(smem + L::kS);
  const int row0 = blockIdx.x * C::BM;
  const int r = threadIdx.x / 2, half = threadIdx.x % 2;  // two threads per row
  const int row = row0 + r;
  // a 32-bit column index (m < 2^31): a 64-bit one live across the loop made ptxas spill on sm_90
  const int target = row < n && targets[row] >= 0 && targets[row] < m ? static_cast<int>(targets[row]) : -1;
  float run_max = kNegInf, run_sum = 0.0f, pos = 0.0f;
  for (int col0 = 0; col0 < m; col0 += C::BN) {
    scores_tile<T, kThreads>(a, b, row0, col0, n, m, d, lda, ldb, scale, exclude_diagonal, mask, smem);
    merge_line(run_max, run_sum, s_s + r * L::LDS, 1, half);
    // the positive logit comes from the same tile as the LSE, so a saturated row cancels exactly
    if (target >= col0 && target < col0 + C::BN) pos = s_s[r * L::LDS + (target - col0)];
  }
  if (row < n && half == 0) {
    row_lse[row] = log_sum_exp(run_max, run_sum);
    positive[row] = pos;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    col_stats_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ col_lse, float scale,
                     int n, int m, int col_count, int d, int64_t lda, int64_t ldb, bool exclude_diagonal,
                     GroupMask mask) {
  using C = Config<T>;
  using L = Layout<T>;
  alignas(32) __shared__ unsigned char smem[L::kStatsBytes];
  const float* s_s = reinterpret_cast<const float*>(smem + L::kS);
  const int col0 = blockIdx.x * C::BN;
  const int c = threadIdx.x / 2, half = threadIdx.x % 2;  // two threads per column
  float run_max = kNegInf, run_sum = 0.0f;
  for (int row0 = 0; row0 < n; row0 += C::BM) {
    scores_tile<T, kThreads>(a, b, row0, col0, n, m, d, lda, ldb, scale, exclude_diagonal, mask, smem);
    merge_line(run_max, run_sum, s_s + c, L::LDS, half);
  }
  const int col = col0 + c;
  if (col < col_count && half == 0) col_lse[col] = log_sum_exp(run_max, run_sum);
}

}  // namespace detail
}  // namespace tilecl
