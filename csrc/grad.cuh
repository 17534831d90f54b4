// The gradient sweep: one tile loop for every form (forms.cuh), a template on it.
//   grad_kernel<T, Form, true>   one block per (BM rows, DOUT features): grad_a = s·G·b, the
//                                grad_scale partial Σ_i a_i·(G b)_i of its share and, in the first
//                                feature chunk, the form's per-row results (the sigmoid losses);
//   grad_kernel<T, Form, false>  one block per (BN columns, DOUT features): grad_b = s·Gᵀ·a;
//   sum_partials_kernel<T>       the partials summed by one block in a fixed order.
// No floating-point atomics anywhere: every result is bitwise reproducible.
//
// Each tile of S comes from scores_tile; the form's epilogue turns it into G (fp32 in place for
// float, converted to the input type for the second tensor-core product otherwise), which is then
// multiplied by X, the other operand's rows, staged XK rows at a time.
#pragma once

#include "forms.cuh"
#include "scores.cuh"

namespace tilecl {
namespace detail {

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
// false: one block per BN columns (grad_b). grid.y walks the features in DOUT chunks. `row_totals`:
// one float per row tile for the form's total (Epilogue::finish).
template <typename T, typename Form, bool ROWS>
__global__ void __launch_bounds__(kGradThreads)
    grad_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                float* __restrict__ partials, float* __restrict__ row_totals, float scale, int n, int m, int d,
                int64_t lda, int64_t ldb, bool exclude_diagonal, GroupMask mask, Epilogue<Form> form) {
  using C = Config<T>;
  using L = Layout<T>;
  using S = GradShape<T>;
  using Terms = typename Epilogue<Form>::template Terms<T>;
  constexpr int NT = kGradThreads;
  static_assert(L::kGradBytes + sizeof(Terms) + 4 * kGradWarps <= 48 * 1024, "static shared memory above 48 KiB");
  alignas(32) __shared__ unsigned char smem[L::kGradBytes];
  __shared__ Terms terms;
  __shared__ float warp_sums[kGradWarps];
  const int tile0 = blockIdx.x * (ROWS ? C::BM : C::BN);  // this block's rows (columns)
  const int f0 = blockIdx.y * C::DOUT;
  // the row kernel's first feature chunk sees every entry of its rows once: it reports the form's
  // per-row results
  const bool report = ROWS && blockIdx.y == 0;
  typename Epilogue<Form>::Totals totals{};
  const Inclusion inclusion{n, m, exclude_diagonal, mask};
  float g_dot_s = 0.0f;  // this thread's Σ G_ij·S_ij (store_gradient)
  if constexpr (ROWS) {
    form.template load_rows<T, NT>(terms, tile0, n);
  } else {
    form.template load_cols<T, NT>(terms, tile0, m);
  }
  const bool products = form.products();  // block-uniform
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
      form.template load_cols<T, NT>(terms, col0, m);
    } else {
      form.template load_rows<T, NT>(terms, row0, n);
    }
    scores_tile<T, NT>(a, b, row0, col0, n, m, d, lda, ldb, scale, exclude_diagonal, mask, smem);
    const auto included = [&](int i, int j) { return inclusion(row0 + i, col0 + j); };
    form.template tile<T, NT>(smem, terms, report, totals, included, g_dot_s);
    if (!products) continue;
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

  if constexpr (ROWS) {
    if (report) form.template finish<T, NT>(totals, tile0, n, row_totals, warp_sums);
  }
  if (!products) return;
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
    // Σ_ij G_ij·a_i·b_j from the fp32 G, Σ G∘S / scale, counted by the first feature chunk (it sees
    // each entry once); at scale 0, S holds no a_i·b_j: from the products and the input rows then
    const float mine = scale != 0.0f ? (report ? g_dot_s / scale : 0.0f) : partial;
    const float total = block_sum<NT>(mine, warp_sums);
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

}  // namespace detail
}  // namespace tilecl
