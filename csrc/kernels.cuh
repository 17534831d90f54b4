// The tilecl CUDA kernels: streaming-LSE statistics and the gradient sweep (offset and sigmoid forms).
//
// Same structure as the Triton kernels (kernels/contrastive.py):
//   row_stats_kernel   one block per BM rows, walks every column tile: row LSE and positive logit;
//   col_stats_kernel   one block per BN columns, walks every row tile: column LSE (no atomics);
//   grad_rows_kernel   one block per (BM rows, DOUT features): grad_a = s·G·b and the
//                      grad_scale partial Σ_i a_i·(G b)_i of its share;
//   grad_cols_kernel   one block per (BN columns, DOUT features): grad_b = s·Gᵀ·a;
//   sum_partials_kernel  the partials summed by one block in a fixed order.
// No floating-point atomics anywhere: every result is bitwise reproducible.
//
// A tile of S = s·a·bᵀ is built by looping over the features in BK-wide chunks staged in shared
// memory; half and bfloat16 multiply on tensor cores (WMMA 16x16x16, fp32 accumulation) on
// sm_80+, float (and the 16-bit types on older GPUs) with shared-memory FMA. The tile lands in
// shared memory as fp32, where the row/column reductions and the gradient tile
// G_ij = g_i·exp(S_ij − c_i) + h_j·exp(S_ij − r_j) are computed elementwise — or, in the sigmoid
// (SigLIP) form of the same gradient kernels, G_ij = g_i·(σ(S_ij + β) − [z_ij = +1]) and the
// row kernel's per-row losses, so the sigmoid loss is one sweep.
//
// This file is compiled by nvcc, and by g++ with -DTILECL_EMU against cuda_emu.h: it may use
// only what that header emulates (README.md lists it), and it launches through TILECL_LAUNCH.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef TILECL_EMU
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define TILECL_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#include "tilecl_cuda.h"

// The emulation runs the sm_80 code path, so the tests execute the tensor-core code; its
// TILECL_EMU_NO_TENSOR_CORES build runs the pre-sm_80 path (16-bit types through the FMA loop).
#if (defined(TILECL_EMU) && !defined(TILECL_EMU_NO_TENSOR_CORES)) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define TILECL_TENSOR_CORES 1
#else
#define TILECL_TENSOR_CORES 0
#endif

namespace tilecl {
namespace detail {

constexpr int kThreads = 128;  // statistics kernels and sum_partials: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kGradThreads = 256;  // gradient kernels: 8 warps
constexpr int kGradWarps = kGradThreads / 32;
constexpr float kNegInf = -INFINITY;

// Block shape per input type. BM = BN = 64 rows/columns of S per block, BK features per staged
// chunk, DOUT gradient features per gradient block (a wider D adds blocks along grid.y, each
// recomputing its tiles of S), XK rows of the gradient operand X staged at a time (a 64 x DOUT
// X tile does not fit 48 KiB). PAD (elements) shifts consecutive shared-memory rows across banks
// and keeps every WMMA pointer 256-bit aligned.
template <typename T>
struct Config {
  static constexpr int BM = 64, BN = 64, BK = 32, DOUT = 512, XK = 16, PAD = 8;
};
template <>
struct Config<float> {
  static constexpr int BM = 64, BN = 64, BK = 32, DOUT = 512, XK = 8, PAD = 4;
};

constexpr int round_up32(int bytes) { return (bytes + 31) / 32 * 32; }

// Offsets (bytes) into one shared buffer. Region 0 holds the staged chunks of a and b; the fp32
// tile S follows; 16-bit types convert G to a separate tile (the tensor-core operand) and then
// reuse region 0 and S's space for the staged XK-row chunks of the gradient operand X (b rows for
// grad_a, a rows for grad_b); float overwrites S with G in place and stages X over region 0.
template <typename T>
struct Layout {
  using C = Config<T>;
  static constexpr bool kSeparateG = !std::is_same<T, float>::value;
  static constexpr int LDT = C::BK + C::PAD;    // staged a/b chunk row stride (elements of T)
  static constexpr int LDS = C::BN + 4;         // S row stride (floats)
  static constexpr int LDG = C::BN + C::PAD;    // G row stride (elements of T)
  static constexpr int LDX = C::DOUT + C::PAD;  // X row stride (elements of T)
  static constexpr int kA = 0;
  static constexpr int kB = round_up32(kA + C::BM * LDT * int(sizeof(T)));
  static constexpr int kS = round_up32(kB + C::BN * LDT * int(sizeof(T)));
  static constexpr int kG = round_up32(kS + C::BM * LDS * 4);
  static constexpr int kStatsBytes = kG;
  static constexpr int kGradBytes = kSeparateG ? round_up32(kG + C::BM * LDG * int(sizeof(T))) : kG;
  static constexpr int kX = kA;
  static constexpr int kXBytes = C::XK * LDX * int(sizeof(T));
  static constexpr int kStage = kA;  // per-warp 16x16 fp32 epilogue tiles of the tensor-core path
  static_assert(kXBytes <= (kSeparateG ? kG : kS) - kX, "an X chunk does not fit its region");
  static_assert(kGradWarps * 16 * 16 * 4 <= kGradBytes - kStage, "epilogue staging does not fit");
  static_assert(kGradBytes <= 48 * 1024, "static shared memory above 48 KiB");
  static_assert(C::BM * 2 == kThreads && C::BN * 2 == kThreads, "two threads per row/column of a tile");
  static_assert(C::BM % 16 == 0 && C::BN % 16 == 0 && C::BK % 16 == 0 && C::DOUT % 32 == 0, "WMMA tiles");
  static_assert(C::BM == C::BN && C::BM % C::XK == 0, "X chunks tile the inner dimension");
  static_assert(!kSeparateG || C::XK % 16 == 0, "X chunks of the 16-bit types feed WMMA");
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <typename T>
struct UseTensorCores {
  static constexpr bool value = TILECL_TENSOR_CORES && !std::is_same<T, float>::value;
};

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

// (max, sum of exp(x − shift)) of the 32 strided entries this thread owns, merged with its pair.
struct Partial {
  float peak, sum;
};

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

// One entry of G. A zero multiplier stands for "no term": select rather than multiply, so an
// overflowing exp never meets it as 0·inf.
__device__ __forceinline__ float gradient_entry(float s, float c, float g, float r, float h) {
  float out = g != 0.0f ? g * expf(s - c) : 0.0f;
  if (h != 0.0f) out += h * expf(s - r);
  return out;
}

// Row terms of rows [row0, row0 + BM) into shared memory: c_i = -inf (a fully excluded row) and rows
// past n carry no term; +inf gives exp(S - inf) = 0 by itself and NaN is kept, so NaN or inf inputs
// give non-finite gradients as the full-matrix loss does.
template <int NT>
__device__ __forceinline__ void load_row_terms(float* c_s, float* g_s, const float* c, const float* g, int row0,
                                               int n, int count) {
  for (int i = threadIdx.x; i < count; i += NT) {
    const int row = row0 + i;
    const float ci = row < n ? c[row] : 0.0f;
    const bool live = row < n && !(isinf(ci) && ci < 0.0f);
    c_s[i] = live ? ci : 0.0f;
    g_s[i] = live ? g[row] : 0.0f;
  }
}

// Column terms of columns [col0, col0 + BN): columns past k, or with r_j = -inf, have none (as the
// rows: +inf and NaN are kept).
template <int NT>
__device__ __forceinline__ void load_col_terms(float* r_s, float* h_s, const float* r, const float* h, int col0,
                                               int k, int count) {
  for (int j = threadIdx.x; j < count; j += NT) {
    const int col = col0 + j;
    const float rj = col < k ? r[col] : 0.0f;
    const bool live = col < k && !(isinf(rj) && rj < 0.0f);
    r_s[j] = live ? rj : 0.0f;
    h_s[j] = live ? h[col] : 0.0f;
  }
}

// S_s → G (in place for float, into the separate 16-bit tile otherwise), then a barrier.
template <typename T, int NT>
__device__ __forceinline__ void gradient_tile(unsigned char* smem, const float* c_s, const float* g_s,
                                              const float* r_s, const float* h_s) {
  using C = Config<T>;
  using L = Layout<T>;
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += NT) {
    const int i = idx / C::BN, j = idx % C::BN;
    const float value = gradient_entry(s_s[i * L::LDS + j], c_s[i], g_s[i], r_s[j], h_s[j]);
    if constexpr (L::kSeparateG) {
      reinterpret_cast<T*>(smem + L::kG)[i * L::LDG + j] = from_float<T>(value);
    } else {
      s_s[i * L::LDS + j] = value;
    }
  }
  __syncthreads();
}

// The sigmoid form of one entry: ℓ = S + bias (S = -inf outside the matrix: no term). Sets the
// pair's loss softplus(−z·ℓ) and returns σ(ℓ) − [z = +1], both from one exp(−|ℓ|) ≤ 1 (no
// overflow), the positive's σ(ℓ) − 1 = −σ(−ℓ) taken directly rather than by cancelling against 1.
__device__ __forceinline__ float sigmoid_entry(float s, float bias, bool positive, float& loss) {
  if (isinf(s) && s < 0.0f) {
    loss = 0.0f;
    return 0.0f;
  }
  const float logit = s + bias, small = expf(-fabsf(logit));
  const float signed_logit = positive ? logit : -logit;
  loss = fmaxf(-signed_logit, 0.0f) + log1pf(small);
  const float large = 1.0f / (1.0f + small), tiny = small / (1.0f + small);  // σ(|ℓ|), σ(−|ℓ|)
  return positive ? -(logit >= 0.0f ? tiny : large) : (logit >= 0.0f ? large : tiny);
}

// Keys of lines [line0, line0 + count) into shared memory (lines past `total` get -1, never read).
template <int NT>
__device__ __forceinline__ void load_keys(int64_t* keys_s, const int64_t* keys, int line0, int total, int count) {
  for (int i = threadIdx.x; i < count; i += NT) keys_s[i] = line0 + i < total ? keys[line0 + i] : -1;
}

// S_s → the sigmoid form's G (as gradient_tile), then a barrier. With `report` (the row kernel's
// first feature chunk) thread i < BM first adds its row's weighted losses and Σ_j G_ij to `loss`
// and `grad_sum`, in a fixed order; `with_grads = false` stops there.
template <typename T, int NT>
__device__ __forceinline__ void sigmoid_tile(unsigned char* smem, const float* g_s, const int64_t* rk_s,
                                             const int64_t* ck_s, float bias, bool report, bool with_grads,
                                             float& loss, float& grad_sum) {
  using C = Config<T>;
  using L = Layout<T>;
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  if (report && threadIdx.x < C::BM) {
    const int i = threadIdx.x;
    for (int j = 0; j < C::BN; ++j) {
      float pair_loss;
      const float grad = sigmoid_entry(s_s[i * L::LDS + j], bias, rk_s[i] == ck_s[j], pair_loss);
      loss += g_s[i] * pair_loss;
      grad_sum += g_s[i] * grad;
    }
  }
  __syncthreads();  // S_s is read above and overwritten below
  if (!with_grads) return;
  for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += NT) {
    const int i = idx / C::BN, j = idx % C::BN;
    float unused;
    const float value = g_s[i] * sigmoid_entry(s_s[i * L::LDS + j], bias, rk_s[i] == ck_s[j], unused);
    if constexpr (L::kSeparateG) {
      reinterpret_cast<T*>(smem + L::kG)[i * L::LDG + j] = from_float<T>(value);
    } else {
      s_s[i * L::LDS + j] = value;
    }
  }
  __syncthreads();
}

// Sum of `value` over a block of NT threads in a fixed order (butterfly within warps, then the
// warps in order).
template <int NT>
__device__ __forceinline__ float block_sum(float value, float* warp_sums) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) total += warp_sums[w];
  return total;
}

// The gradient accumulator's ownership (kGradThreads threads, a BM x DOUT output tile). Tensor
// cores: warp w owns the 16-row strip w % 4 and FR consecutive 16-feature fragments from
// (w / 4)·FR. FMA: thread (ty, tx) = (tid / 32, tid % 32) owns output rows ty + 8·i and features
// tx + 32·j (a warp reads one row of G, broadcast, and 32 consecutive features of X).
template <typename T>
struct GradShape {
  using C = Config<T>;
  static constexpr int STRIPS = C::BM / 16, GROUPS = kGradWarps / STRIPS, FR = C::DOUT / 16 / GROUPS;
  static constexpr int TY = kGradThreads / 32, RI = C::BM / TY, FJ = C::DOUT / 32;
  static_assert(STRIPS * GROUPS == kGradWarps && FR * GROUPS * 16 == C::DOUT, "warps tile the output");
  static_assert(RI * TY == C::BM && C::BM == C::BN, "threads tile the output");
};

// acc (+)= op(G)[:, kc:kc+XK]·X over one staged XK-row chunk of X: TRANSPOSE_G = false is G·X
// (grad_a: G is BM x BN, X holds b rows), true is Gᵀ·X (grad_b: X holds a rows).
#if TILECL_TENSOR_CORES
template <typename T, bool TRANSPOSE_G>
__device__ __forceinline__ void accumulate_mma(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[GradShape<T>::FR],
    const unsigned char* smem, int kc) {
  namespace wmma = nvcuda::wmma;
  using C = Config<T>;
  using L = Layout<T>;
  using S = GradShape<T>;
  const T* g_t = reinterpret_cast<const T*>(smem + L::kG);
  const T* x_s = reinterpret_cast<const T*>(smem + L::kX);
  const int warp = threadIdx.x / 32, strip = warp % S::STRIPS, frag0 = warp / S::STRIPS * S::FR;
#pragma unroll
  for (int kk = 0; kk < C::XK; kk += 16) {
    using LayoutA = typename std::conditional<TRANSPOSE_G, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
    // Gᵀ's (16·strip.., k..) block is G's (k.., 16·strip..) block read column-major
    if constexpr (TRANSPOSE_G) {
      wmma::load_matrix_sync(fa, g_t + (kc + kk) * L::LDG + strip * 16, L::LDG);
    } else {
      wmma::load_matrix_sync(fa, g_t + strip * 16 * L::LDG + kc + kk, L::LDG);
    }
#pragma unroll
    for (int j = 0; j < S::FR; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, x_s + kk * L::LDX + (frag0 + j) * 16, L::LDX);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
}
#endif

template <typename T, bool TRANSPOSE_G>
__device__ __forceinline__ void accumulate_fma(float (&acc)[GradShape<T>::RI][GradShape<T>::FJ],
                                               const unsigned char* smem, int kc) {
  using C = Config<T>;
  using L = Layout<T>;
  using S = GradShape<T>;
  const int ty = threadIdx.x / 32, tx = threadIdx.x % 32;
  const T* x_s = reinterpret_cast<const T*>(smem + L::kX);
#pragma unroll 2
  for (int k = 0; k < C::XK; ++k) {
    float gv[S::RI], xv[S::FJ];
#pragma unroll
    for (int i = 0; i < S::RI; ++i) {
      const int o = ty + S::TY * i;  // output row: a row of G (grad_a) or a column of G (grad_b)
      const int gi = TRANSPOSE_G ? kc + k : o, gj = TRANSPOSE_G ? o : kc + k;
      if constexpr (L::kSeparateG) {
        gv[i] = to_float(reinterpret_cast<const T*>(smem + L::kG)[gi * L::LDG + gj]);
      } else {
        gv[i] = reinterpret_cast<const float*>(smem + L::kS)[gi * L::LDS + gj];
      }
    }
#pragma unroll
    for (int j = 0; j < S::FJ; ++j) xv[j] = to_float(x_s[k * L::LDX + tx + 32 * j]);
#pragma unroll
    for (int i = 0; i < S::RI; ++i)
#pragma unroll
      for (int j = 0; j < S::FJ; ++j) acc[i][j] = fmaf(gv[i], xv[j], acc[i][j]);
  }
}

// The gradient kernels. ROWS = true: one block per BM rows (grad_a and the grad_scale partial);
// false: one block per BN columns (grad_b). grid.y walks the features in DOUT chunks.
template <typename T, bool ROWS>
__global__ void __launch_bounds__(kGradThreads)
    grad_kernel(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ c,
                const float* __restrict__ g, const float* __restrict__ r, const float* __restrict__ h,
                float* __restrict__ out, float* __restrict__ partials, float scale, int n, int m, int k, int d,
                int64_t lda, int64_t ldb, bool exclude_diagonal, GroupMask mask, bool sigmoid, bool with_grads,
                const int64_t* __restrict__ row_keys, const int64_t* __restrict__ col_keys, float bias,
                float* __restrict__ row_loss, float* __restrict__ bias_partials) {
  using C = Config<T>;
  using L = Layout<T>;
  using S = GradShape<T>;
  constexpr int NT = kGradThreads;
  alignas(32) __shared__ unsigned char smem[L::kGradBytes];
  __shared__ float c_s[C::BM], g_s[C::BM], r_s[C::BN], h_s[C::BN], warp_sums[kGradWarps];
  __shared__ int64_t rk_s[C::BM], ck_s[C::BN];  // the sigmoid form's keys
  const int tile0 = blockIdx.x * (ROWS ? C::BM : C::BN);  // this block's rows (columns)
  const int f0 = blockIdx.y * C::DOUT;
  // the sigmoid form's per-row losses and Σ G, reported by the row kernel's first feature chunk
  const bool report = ROWS && sigmoid && blockIdx.y == 0;
  float loss = 0.0f, grad_sum = 0.0f;
  if constexpr (ROWS) {
    load_row_terms<NT>(c_s, g_s, c, g, tile0, n, C::BM);
    if (sigmoid) load_keys<NT>(rk_s, row_keys, tile0, n, C::BM);
  } else {
    load_col_terms<NT>(r_s, h_s, r, h, tile0, k, C::BN);
    if (sigmoid) load_keys<NT>(ck_s, col_keys, tile0, m, C::BN);
  }
  const int other_count = ROWS ? m : n;
  constexpr int kStep = ROWS ? C::BN : C::BM;
  const int tid = threadIdx.x;
  constexpr bool kMma = UseTensorCores<T>::value;

#if TILECL_TENSOR_CORES
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_mma[kMma ? S::FR : 1];
  if constexpr (kMma) {
#pragma unroll
    for (int j = 0; j < S::FR; ++j) wmma::fill_fragment(acc_mma[j], 0.0f);
  }
#endif
  float acc[kMma ? 1 : S::RI][kMma ? 1 : S::FJ];
  if constexpr (!kMma) {
#pragma unroll
    for (int i = 0; i < S::RI; ++i)
#pragma unroll
      for (int j = 0; j < S::FJ; ++j) acc[i][j] = 0.0f;
  }

  T* x_s = reinterpret_cast<T*>(smem + L::kX);
  for (int other0 = 0; other0 < other_count; other0 += kStep) {
    const int row0 = ROWS ? tile0 : other0, col0 = ROWS ? other0 : tile0;
    // the previous tile's gradient pass read these; scores_tile's leading barrier orders them
    if constexpr (ROWS) {
      load_col_terms<NT>(r_s, h_s, r, h, col0, k, C::BN);
      if (sigmoid) load_keys<NT>(ck_s, col_keys, col0, m, C::BN);
    } else {
      load_row_terms<NT>(c_s, g_s, c, g, row0, n, C::BM);
      if (sigmoid) load_keys<NT>(rk_s, row_keys, row0, n, C::BM);
    }
    scores_tile<T, NT>(a, b, row0, col0, n, m, d, lda, ldb, scale, exclude_diagonal, mask, smem);
    if (sigmoid) {
      sigmoid_tile<T, NT>(smem, g_s, rk_s, ck_s, bias, report, with_grads, loss, grad_sum);
      if (!with_grads) continue;  // a block-uniform flag: every thread skips the products
    } else {
      gradient_tile<T, NT>(smem, c_s, g_s, r_s, h_s);
    }
    // X in XK-row chunks: the other operand's rows other0 + kc.., this block's feature chunk. A
    // chunk wholly past the matrix has G = 0 and X = 0 and is skipped (a block-uniform test).
    for (int kc = 0; kc < kStep && other0 + kc < other_count; kc += C::XK) {
      if constexpr (ROWS) {
        stage<T, C::XK, C::DOUT, L::LDX, NT>(x_s, b, other0 + kc, m, f0, d, ldb);
      } else {
        stage<T, C::XK, C::DOUT, L::LDX, NT>(x_s, a, other0 + kc, n, f0, d, lda);
      }
      __syncthreads();
      if constexpr (kMma) {
#if TILECL_TENSOR_CORES
        accumulate_mma<T, !ROWS>(acc_mma, smem, kc);
#endif
      } else {
        accumulate_fma<T, !ROWS>(acc, smem, kc);
      }
      // the next chunk (or the next tile's staging of a and b) overwrites X
      __syncthreads();
    }
  }
  // The last chunk ended with a barrier, so the tensor-core epilogue may stage over X (region 0).

  if (report) {
    if (threadIdx.x < C::BM && tile0 + threadIdx.x < n) row_loss[tile0 + threadIdx.x] = loss;
  }
  if constexpr (ROWS) {
    if (sigmoid) {
      const float total = block_sum<NT>(grad_sum, warp_sums);  // 0 outside the first feature chunk
      if (threadIdx.x == 0) bias_partials[blockIdx.y * gridDim.x + blockIdx.x] = total;
      __syncthreads();  // warp_sums is reused below
    }
  }
  if (!with_grads) return;
  // out = scale·acc; the row kernel also forms Σ_i a_i·(G b)_i over its rows and features
  const int count = ROWS ? n : m;
  float partial = 0.0f;
  auto emit = [&](int o, int f, float value) {
    const int line = tile0 + o, feat = f0 + f;
    if (line < count && feat < d) {
      out[static_cast<int64_t>(line) * d + feat] = value * scale;
      if constexpr (ROWS) partial += value * to_float(a[static_cast<int64_t>(line) * lda + feat]);
    }
  };
  if constexpr (kMma) {
#if TILECL_TENSOR_CORES
    const int warp = tid / 32, lane = tid % 32;
    const int strip = warp % S::STRIPS, frag0 = warp / S::STRIPS * S::FR;
    float* stage_w = reinterpret_cast<float*>(smem + L::kStage) + warp * 256;
#pragma unroll
    for (int j = 0; j < S::FR; ++j) {
      wmma::store_matrix_sync(stage_w, acc_mma[j], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = lane; e < 256; e += 32) emit(strip * 16 + e / 16, (frag0 + j) * 16 + e % 16, stage_w[e]);
      __syncwarp();
    }
#endif
  } else {
    const int ty = tid / 32, tx = tid % 32;
#pragma unroll
    for (int i = 0; i < S::RI; ++i)
#pragma unroll
      for (int j = 0; j < S::FJ; ++j) emit(ty + S::TY * i, tx + 32 * j, acc[i][j]);
  }
  if constexpr (ROWS) {
    const float total = block_sum<NT>(partial, warp_sums);
    if (tid == 0) partials[blockIdx.y * gridDim.x + blockIdx.x] = total;
  }
}

// grad_scale = Σ partials, one block, a fixed order whatever the launch. (A template only so that
// each type's translation unit has its own instance.)
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* __restrict__ partials, int count,
                                                                float* __restrict__ out) {
  __shared__ float warp_sums[kWarps];
  float value = 0.0f;
  for (int i = threadIdx.x; i < count; i += kThreads) value += partials[i];
  const float total = block_sum<kThreads>(value, warp_sums);
  if (threadIdx.x == 0) *out = total;
}

// In 64 bits: x + y − 1 must not overflow for x near 2^31.
inline int ceil_div(int x, int y) { return static_cast<int>((static_cast<int64_t>(x) + y - 1) / y); }

// The tile loops step a 32-bit index by up to 64 (col0 += BN, row0 += BM, k0 += BK): it must stay
// below 2^31 (backends/cuda.py checks the same bound before any launch).
constexpr int kMaxDim = INT32_MAX - 63;  // 2^31 − 64

inline void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

inline void check_shapes(int n, int m, int d, int64_t lda, int64_t ldb) {
  if (n < 1 || m < 1 || d < 1) throw std::invalid_argument("tilecl: n, m and d must be positive");
  if (n > kMaxDim || m > kMaxDim || d > kMaxDim) throw std::invalid_argument("tilecl: n, m and d must be at most 2^31 - 64");
  if (lda < d || ldb < d) throw std::invalid_argument("tilecl: row strides must be at least d");
}

// One partial per (row tile, feature chunk): grad_scale's.
template <typename T>
int64_t partial_count(int n, int d) {
  return static_cast<int64_t>(ceil_div(n, Config<T>::BM)) * ceil_div(d, Config<T>::DOUT);
}

// grad_scale's partials, then the sigmoid form's grad_bias partials.
template <typename T>
int64_t workspace_floats(int n, int d) {
  return 2 * partial_count<T>(n, d);
}

// The kernels test row_groups alone: masking needs all three arrays or none.
inline GroupMask group_mask(const int64_t* row_groups, const int64_t* col_groups, const int64_t* kept) {
  if ((row_groups == nullptr) != (col_groups == nullptr) || (row_groups == nullptr) != (kept == nullptr))
    throw std::invalid_argument("tilecl: group masking needs row_groups, col_groups and kept_cols, or none");
  return GroupMask{row_groups, col_groups, kept};
}

template <typename T>
void launch_lse_stats(const LseArgs& p) {
  using C = Config<T>;
  check_shapes(p.n, p.m, p.d, p.lda, p.ldb);
  if (p.col_count < 0 || p.col_count > p.m) throw std::invalid_argument("tilecl: col_count must be in [0, m]");
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const GroupMask mask = group_mask(p.row_groups, p.col_groups, p.kept_cols);
  TILECL_LAUNCH(row_stats_kernel<T>, dim3(ceil_div(p.n, C::BM)), dim3(kThreads), stream, a, b, p.targets,
                p.row_lse, p.positive, p.scale, p.n, p.m, p.d, p.lda, p.ldb, p.exclude_diagonal, mask);
  check_launch("tilecl row_stats_kernel");
  if (p.col_count > 0) {
    TILECL_LAUNCH(col_stats_kernel<T>, dim3(ceil_div(p.col_count, C::BN)), dim3(kThreads), stream, a, b,
                  p.col_lse, p.scale, p.n, p.m, p.col_count, p.d, p.lda, p.ldb, p.exclude_diagonal, mask);
    check_launch("tilecl col_stats_kernel");
  }
}

template <typename T>
void launch_offset_backward(const BackwardArgs& p) {
  using C = Config<T>;
  check_shapes(p.n, p.m, p.d, p.lda, p.ldb);
  if (p.k < 0 || p.k > p.m) throw std::invalid_argument("tilecl: the column terms must number at most m");
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  if (p.sigmoid && (p.k != 0 || !p.row_keys || !p.col_keys || !p.row_loss || !p.grad_bias))
    throw std::invalid_argument("tilecl: the sigmoid form needs k = 0, both keys, row_loss and grad_bias");
  const bool grads = !p.sigmoid || p.with_grads;
  // without gradients (sigmoid form only) one feature chunk suffices: the losses need only S
  const int chunks = grads ? ceil_div(p.d, C::DOUT) : 1;
  if (chunks > 65535) throw std::invalid_argument("tilecl: d above 65535 x " + std::to_string(C::DOUT) + " (grid.y limit)");
  const dim3 rows_grid(ceil_div(p.n, C::BM), chunks), cols_grid(ceil_div(p.m, C::BN), chunks);
  const int count = static_cast<int>(partial_count<T>(p.n, p.d));
  const GroupMask mask = group_mask(p.row_groups, p.col_groups, p.kept_cols);
  float* bias_partials = p.workspace + count;
  TILECL_LAUNCH((grad_kernel<T, true>), rows_grid, dim3(kGradThreads), stream, a, b, p.row_offset, p.row_mult,
                p.col_offset, p.col_mult, p.grad_a, p.workspace, p.scale, p.n, p.m, p.k, p.d, p.lda, p.ldb,
                p.exclude_diagonal, mask, p.sigmoid, grads, p.row_keys, p.col_keys, p.bias, p.row_loss, bias_partials);
  check_launch("tilecl grad_kernel<rows>");
  if (p.sigmoid) {
    const int used = static_cast<int>(rows_grid.x) * chunks;
    TILECL_LAUNCH(sum_partials_kernel<T>, dim3(1), dim3(kThreads), stream, bias_partials, used, p.grad_bias);
    check_launch("tilecl sum_partials_kernel<bias>");
  }
  if (!grads) return;
  TILECL_LAUNCH((grad_kernel<T, false>), cols_grid, dim3(kGradThreads), stream, a, b, p.row_offset, p.row_mult,
                p.col_offset, p.col_mult, p.grad_b, p.workspace, p.scale, p.n, p.m, p.k, p.d, p.lda, p.ldb,
                p.exclude_diagonal, mask, p.sigmoid, grads, p.row_keys, p.col_keys, p.bias, p.row_loss, bias_partials);
  check_launch("tilecl grad_kernel<cols>");
  TILECL_LAUNCH(sum_partials_kernel<T>, dim3(1), dim3(kThreads), stream, p.workspace, count, p.grad_scale);
  check_launch("tilecl sum_partials_kernel");
}

}  // namespace detail
}  // namespace tilecl

// One translation unit per input type defines the host entry points for that type.
#define TILECL_INSTANTIATE(T, SUFFIX)                                                                   \
  namespace tilecl {                                                                                    \
  void lse_stats_##SUFFIX(const LseArgs& args) { detail::launch_lse_stats<T>(args); }                   \
  void offset_backward_##SUFFIX(const BackwardArgs& args) { detail::launch_offset_backward<T>(args); }  \
  int64_t backward_workspace_floats_##SUFFIX(int n, int d) { return detail::workspace_floats<T>(n, d); } \
  }
