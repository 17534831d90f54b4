// Host API of the tilecl CUDA kernels: raw pointers, shapes, strides and a stream.
//
// Nothing here needs a CUDA header, so bindings.cpp compiles with the plain host compiler and
// the same bindings serve the real extension and the CPU emulation module. Pointers are device
// pointers (host pointers under the emulation); `stream` is a cudaStream_t passed as void*.
#pragma once

#include <cstdint>

namespace tilecl {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Row LSE (n), column LSE (col_count) and positive logits (n) of S = scale·a·bᵀ, float32.
struct LseArgs {
  const void* a;             // n x d, row stride lda, unit column stride
  const void* b;             // m x d, row stride ldb
  const int64_t* targets;    // n, row i's positive column
  float* row_lse;            // n
  float* col_lse;            // col_count (unused when col_count == 0)
  float* positive;           // n
  float scale;
  int n, m, d, col_count;
  int64_t lda, ldb;
  bool exclude_diagonal;
  void* stream;
  // False-negative group masking, all three or none (nullptr): S_ij = -inf where
  // row_groups[i] == col_groups[j] and j != kept_cols[i], as the diagonal with exclude_diagonal.
  const int64_t* row_groups;  // n
  const int64_t* col_groups;  // m
  const int64_t* kept_cols;   // n: row i's kept (positive) column, or -1
};

// The offset-form backward: G_ij = g_i·exp(S_ij − c_i) + [j < k]·h_j·exp(S_ij − r_j);
// grad_a = scale·G·b (n x d), grad_b = scale·Gᵀ·a (m x d), grad_scale = Σ G_ij (a_i·b_j) (1).
struct BackwardArgs {
  const void* a;
  const void* b;
  const float* row_offset;   // c, n (a non-finite c_i counts as 0, as in the reference)
  const float* row_mult;     // g, n
  const float* col_offset;   // r, k (a non-finite r_j: column j has no term)
  const float* col_mult;     // h, k
  float* grad_a;             // n x d, contiguous
  float* grad_b;             // m x d, contiguous
  float* grad_scale;         // 1
  float* workspace;          // backward_workspace_floats(dtype, n, d) floats
  float scale;
  int n, m, d, k;
  int64_t lda, ldb;
  bool exclude_diagonal;
  void* stream;
  // The sigmoid (SigLIP) form, same kernels (sigmoid = true): G_ij = g_i·(σ(S_ij + bias) − [z_ij = +1])
  // with z_ij = +1 where row_keys[i] == col_keys[j]; c, r and h are not read (k = 0).
  bool sigmoid;
  bool with_grads;           // false: only row_loss and grad_bias (one S pass, grad_a/grad_b untouched)
  const int64_t* row_keys;   // n
  const int64_t* col_keys;   // m
  float bias;
  float* row_loss;           // n: Σ_j g_i·softplus(−z_ij (S_ij + bias))
  float* grad_bias;          // 1: Σ G_ij
  // Group masking, both forms, as in LseArgs: a masked entry has no term (G_ij = 0, no loss).
  const int64_t* row_groups;  // n
  const int64_t* col_groups;  // m
  const int64_t* kept_cols;   // n
};

void lse_stats_float(const LseArgs& args);
void lse_stats_half(const LseArgs& args);
void lse_stats_bf16(const LseArgs& args);
void offset_backward_float(const BackwardArgs& args);
void offset_backward_half(const BackwardArgs& args);
void offset_backward_bf16(const BackwardArgs& args);

// Floats of scratch the backward needs: a grad_scale and a grad_bias partial per (row tile, feature chunk).
int64_t backward_workspace_floats_float(int n, int d);
int64_t backward_workspace_floats_half(int n, int d);
int64_t backward_workspace_floats_bf16(int n, int d);

}  // namespace tilecl
