// The streaming-LSE statistics (the softmax losses' forward), as the Triton kernels
// (kernels/stats.py) compute them, each tile of S formed once for its rows and its columns:
//   stats_kernel        block (p, q) walks row group p (blocks_per_group tiles of BM rows) x column
//                       split q (tiles_per_split tiles of BN columns): per row, a streaming (max, sum)
//                       and the positive logit over the split, into row q of the row partials; per
//                       column, its (max, sum) over the group, updated in place in row p of the column
//                       partials (no other block owns those entries: no atomics);
//   merge_stats_kernel  folds the partials of each row (column) in a fixed order: its LSE, and the
//                       sum of its partial positive logits (one holds the logit, the others 0).
// Two threads per row (column) reduce each fp32 tile of S with one __shfl_xor_sync each for the
// max and the sum; the same pair of threads owns row r and column r of a tile.
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

// What rounding log_sum_exp's max + log(sum) left out (TwoSum: lse + low is their sum exactly); 0
// where the LSE is not finite. A nearly saturated line's loss LSE − S⁺ is smaller than one ulp of
// the LSE at |S| ≈ 100: the losses add it back.
__device__ __forceinline__ float log_sum_exp_low(float run_max, float run_sum, float lse) {
  if (!isfinite(lse)) return 0.0f;
  const float log_sum = logf(run_sum), b_part = lse - run_max;
  return (run_max - (lse - b_part)) + (log_sum - b_part);
}

// Streaming LSE: fold a partial (max, sum), its sum relative to its max, into the running one.
__device__ __forceinline__ void merge_partial(float& run_max, float& run_sum, float part_max, float part_sum) {
  const float new_max = fmaxf(run_max, part_max);
  const float shift = new_max == kNegInf ? 0.0f : new_max;
  run_sum = run_sum * expf(run_max - shift) + part_sum * expf(part_max - shift);
  run_max = new_max;
}

// (kThreads, 1): without the minimum of one block per SM, ptxas held the 16-bit kernels to 72
// registers on sm_90 and spilled 40-56 bytes; with it they take 113-128, none spilled
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    stats_kernel(const T* __restrict__ a, const T* __restrict__ b, const int64_t* __restrict__ targets,
                 float* __restrict__ row_max, float* __restrict__ row_sum, float* __restrict__ row_positive,
                 float* __restrict__ col_max, float* __restrict__ col_sum, float scale, int n, int m, int col_count,
                 int d, int64_t lda, int64_t ldb, int blocks_per_group, int tiles_per_split, bool exclude_diagonal,
                 GroupMask mask) {
  using C = Config<T>;
  using L = Layout<T>;
  alignas(32) __shared__ unsigned char smem[L::kStatsBytes];
  const float* s_s = reinterpret_cast<const float*>(smem + L::kS);
  const int r = threadIdx.x / 2, half = threadIdx.x % 2;  // two threads per row, and per column
  const int first_block = blockIdx.x * blocks_per_group;
  const int row_blocks = (n - 1) / C::BM + 1;
  const int last_block = row_blocks - first_block < blocks_per_group ? row_blocks : first_block + blocks_per_group;
  // in 64 bits: the split's end may pass 2^31 before it is clipped to m
  const int64_t split_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split * C::BN;
  const int64_t split_end = split_begin + static_cast<int64_t>(tiles_per_split) * C::BN;
  const int col_begin = static_cast<int>(split_begin);
  const int col_end = split_end < m ? static_cast<int>(split_end) : m;
  for (int block = first_block; block < last_block; ++block) {
    const int row0 = block * C::BM;
    const int row = row0 + r;
    // a 32-bit column index (m < 2^31): a 64-bit one live across the loop made ptxas spill on sm_90
    const int target = row < n && targets[row] >= 0 && targets[row] < m ? static_cast<int>(targets[row]) : -1;
    float run_max = kNegInf, run_sum = 0.0f, pos = 0.0f;
    for (int col0 = col_begin; col0 < col_end; col0 += C::BN) {
      scores_tile<T, kThreads>(a, b, row0, col0, n, m, d, lda, ldb, scale, exclude_diagonal, mask, smem);
      merge_line(run_max, run_sum, s_s + r * L::LDS, 1, half);
      // the positive logit comes from the same tile as the LSE, so a saturated row cancels exactly
      if (target >= col0 && target < col0 + C::BN) pos = s_s[r * L::LDS + (target - col0)];
      if (col0 < col_count) {  // the same for every thread: merge_line's shuffles see the whole warp
        const int col = col0 + r;
        // (the group's row of partials addressed here, not held across the loop: ptxas spilled the
        // two pointers on sm_90)
        const int64_t at = static_cast<int64_t>(blockIdx.x) * col_count + col;
        // this pair wrote the entry for the group's earlier blocks; scores_tile's barriers since
        // then make the write visible to both threads
        const bool earlier = block > first_block && col < col_count;
        float part_max = earlier ? col_max[at] : kNegInf, part_sum = earlier ? col_sum[at] : 0.0f;
        merge_line(part_max, part_sum, s_s + r, L::LDS, half);
        if (col < col_count && half == 0) {
          col_max[at] = part_max;
          col_sum[at] = part_sum;
        }
      }
    }
    if (row < n && half == 0) {
      const int64_t at = static_cast<int64_t>(blockIdx.y) * n + row;
      row_max[at] = run_max;
      row_sum[at] = run_sum;
      row_positive[at] = pos;
    }
  }
}

// One thread per line: its LSE and what rounding it left out (`low`); `positive`/`positive_out`
// nullptr for the columns. Templated on T (unused)
// as every kernel is, so each per-type translation unit holds its own instantiation.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_stats_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                       const float* __restrict__ positive, float* __restrict__ lse, float* __restrict__ low,
                       float* __restrict__ positive_out, int parts, int count) {
  const int line = blockIdx.x * kThreads + threadIdx.x;
  if (line >= count) return;
  float run_max = kNegInf, run_sum = 0.0f, total = 0.0f;
  for (int part = 0; part < parts; ++part) {
    const int64_t at = static_cast<int64_t>(part) * count + line;
    merge_partial(run_max, run_sum, part_max[at], part_sum[at]);
    if (positive != nullptr) total += positive[at];
  }
  const float line_lse = log_sum_exp(run_max, run_sum);
  lse[line] = line_lse;
  low[line] = log_sum_exp_low(run_max, run_sum, line_lse);
  if (positive_out != nullptr) positive_out[line] = total;
}

}  // namespace detail
}  // namespace tilecl
