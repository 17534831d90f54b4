// A tile of S = s·a·bᵀ: the one place every pass forms S, so the statistics and the recomputing
// gradient sweep exclude the same entries (outside the matrix, the diagonal, the group mask).
#pragma once

#include "kernel_traits.h"

namespace tilecl {
namespace detail {

// rows x cols of a row-major matrix (row stride ld) into shared memory, zeros outside; NT threads.
template <typename T, int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void stage(T* dst, const T* src, int row0, int n_rows, int col0, int n_cols, int64_t ld) {
  const T zero = from_float<T>(0.0f);
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NT) {
    const int r = idx / COLS, c = idx % COLS;
    const int row = row0 + r, col = col0 + c;
    dst[r * LD + c] = (row < n_rows && col < n_cols) ? src[static_cast<int64_t>(row) * ld + col] : zero;
  }
}

// False-negative group masking (Scores.row_groups/col_groups/kept_cols): S_ij = -inf where
// row_groups[i] == col_groups[j] and j != kept[i] (kept[i] = -1: no column kept). All nullptr: no
// masking. Passed by value down to scores_tile, the one place a tile of S is formed, so the
// statistics and the recomputing gradient kernels exclude the same entries.
struct GroupMask {
  const int64_t* row_groups;  // n
  const int64_t* col_groups;  // m
  const int64_t* kept;        // n
};

// Whether entry (row, col) is in the loss: inside the matrix, off the diagonal (NT-Xent) and not a
// false negative — where scores_tile does not write -inf. The gradient's epilogue asks it again
// rather than reading -inf in S: an S of -inf can also be a value (an infinite feature), which is
// in the loss and gives what the full-matrix loss gives.
struct Inclusion {
  int n, m;
  bool exclude_diagonal;
  GroupMask mask;

  __device__ __forceinline__ bool operator()(int row, int col) const {
    if (row >= n || col >= m || (exclude_diagonal && row == col)) return false;
    return mask.row_groups == nullptr || mask.row_groups[row] != mask.col_groups[col] || col == mask.kept[row];
  }
};

// S_s = scale·a[row0:row0+BM]·b[col0:col0+BN]ᵀ in fp32, -inf outside the matrix, (NT-Xent) on the
// diagonal and where `mask` excludes the entry, by a block of NT threads. Starts with a barrier
// (callers may still be reading the previous S_s) and ends with one (the tile is complete for
// every thread).
template <typename T, int NT>
__device__ void scores_tile(const T* __restrict__ a, const T* __restrict__ b, int row0, int col0, int n, int m,
                            int d, int64_t lda, int64_t ldb, float scale, bool exclude_diagonal, GroupMask mask,
                            unsigned char* smem) {
  using C = Config<T>;
  using L = Layout<T>;
  T* a_s = reinterpret_cast<T*>(smem + L::kA);
  T* b_s = reinterpret_cast<T*>(smem + L::kB);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  if constexpr (UseTensorCores<T>::value) {
#if TILECL_TENSOR_CORES
    namespace wmma = nvcuda::wmma;
    // warp w owns the 16-row strip w % STRIPS and FR consecutive 16-column fragments of it
    constexpr int STRIPS = C::BM / 16, GROUPS = NT / 32 / STRIPS, FR = C::BN / 16 / GROUPS;
    static_assert(GROUPS * STRIPS * 32 == NT && FR * GROUPS * 16 == C::BN, "warps tile the S tile");
    // (with one group, as in the statistics kernels, the same code as a warp-per-strip layout)
    const int warp = threadIdx.x / 32;
    const int strip = GROUPS == 1 ? warp : warp % STRIPS, frag0 = GROUPS == 1 ? 0 : warp / STRIPS * FR;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FR];
#pragma unroll
    for (int j = 0; j < FR; ++j) wmma::fill_fragment(acc[j], 0.0f);
    for (int k0 = 0; k0 < d; k0 += C::BK) {
      __syncthreads();
      stage<T, C::BM, C::BK, L::LDT, NT>(a_s, a, row0, n, k0, d, lda);
      stage<T, C::BN, C::BK, L::LDT, NT>(b_s, b, col0, m, k0, d, ldb);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < C::BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, a_s + strip * 16 * L::LDT + kk, L::LDT);
#pragma unroll
        for (int j = 0; j < FR; ++j) {
          // bᵀ as a column-major K x N operand is b's rows read in place
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, b_s + (frag0 + j) * 16 * L::LDT + kk, L::LDT);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
    }
    // S_s may alias the previous tile's X operand: every thread passed the loop's barriers since
#pragma unroll
    for (int j = 0; j < FR; ++j)
      wmma::store_matrix_sync(s_s + strip * 16 * L::LDS + (frag0 + j) * 16, acc[j], L::LDS, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += NT) {
      const int r = idx / C::BN, c = idx % C::BN;
      const int row = row0 + r, col = col0 + c;
      const bool valid = row < n && col < m && !(exclude_diagonal && row == col);
      float& s = s_s[r * L::LDS + c];
      s = valid ? s * scale : kNegInf;
    }
    __syncthreads();
#endif
  } else {
    // thread (ty, tx) owns rows ty + (NT/8)·i and columns tx + 8·j of the tile
    constexpr int TY = NT / 8, RI = C::BM / TY, CJ = C::BN / 8;
    static_assert(RI * TY == C::BM, "threads tile the S tile");
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    float acc[RI][CJ];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < d; k0 += C::BK) {
      __syncthreads();
      stage<T, C::BM, C::BK, L::LDT, NT>(a_s, a, row0, n, k0, d, lda);
      stage<T, C::BN, C::BK, L::LDT, NT>(b_s, b, col0, m, k0, d, ldb);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < C::BK; ++k) {
        float av[RI], bv[CJ];
#pragma unroll
        for (int i = 0; i < RI; ++i) av[i] = to_float(a_s[(ty + TY * i) * L::LDT + k]);
#pragma unroll
        for (int j = 0; j < CJ; ++j) bv[j] = to_float(b_s[(tx + 8 * j) * L::LDT + k]);
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
          for (int j = 0; j < CJ; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) {
        const int r = ty + TY * i, c = tx + 8 * j;
        const int row = row0 + r, col = col0 + c;
        const bool valid = row < n && col < m && !(exclude_diagonal && row == col);
        s_s[r * L::LDS + c] = valid ? acc[i][j] * scale : kNegInf;
      }
    __syncthreads();
  }
  // The group mask: a pass of its own over the finished tile, one more barrier in masked launches
  // only. The ids come straight from global memory (a warp reads one row's group and kept column,
  // broadcast, and 32 consecutive column groups; all cached) and the loop is not unrolled: staging
  // them in shared memory, testing them in the passes above, or unrolling this loop each cost the
  // statistics kernels up to 30 registers, and spills on sm_90, where ptxas holds them at 64-80.
  if (mask.row_groups != nullptr) {  // block-uniform
#pragma unroll 1
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += NT) {
      const int r = idx / C::BN, c = idx % C::BN;
      const int row = row0 + r, col = col0 + c;
      if (row < n && col < m && mask.row_groups[row] == mask.col_groups[col] && col != mask.kept[row])
        s_s[r * L::LDS + c] = kNegInf;
    }
    __syncthreads();
  }
}

}  // namespace detail
}  // namespace tilecl
