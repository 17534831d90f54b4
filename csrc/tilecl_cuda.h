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
  // Scratch for the partial statistics, lse_workspace_floats(dtype, n, m, col_count, parts) floats;
  // `parts` bounds the row groups and the column splits S is cut into (one block each pair).
  float* workspace;
  int parts;
  // What rounding each LSE left out: row_lse + row_lse_low is max + log(sum) exactly (n, col_count)
  float* row_lse_low;
  float* col_lse_low;
};

// What every gradient sweep takes, whatever its form: the operands of S = scale·a·bᵀ, its masking,
// the gradient outputs and the stream. grad_a = scale·G·b (n x d), grad_b = scale·Gᵀ·a (m x d),
// grad_scale = Σ G_ij (a_i·b_j) (1), with G_ij the form's elementwise step (below).
struct SweepArgs {
  const void* a;
  const void* b;
  float* grad_a;             // n x d, contiguous (nullptr when the form asks for no gradients)
  float* grad_b;             // m x d, contiguous (idem)
  float* grad_scale;         // 1 (idem)
  float* workspace;          // backward_workspace_floats(dtype, n, d) floats
  float scale;
  int n, m, d;
  int64_t lda, ldb;
  bool exclude_diagonal;
  void* stream;
  // Group masking as in LseArgs: a masked entry has no term (G_ij = 0, and no loss in a form that has one).
  const int64_t* row_groups;  // n
  const int64_t* col_groups;  // m
  const int64_t* kept_cols;   // n
};

// The forms of G. Each is one argument type here and one epilogue in forms.cuh; gradient_sweep
// (below) is instantiated for each in instantiate_*.cu (forms.cuh's TILECL_FORMS lists them).

// The softmax losses' offset form: G_ij = g_i·exp(S_ij − c_i) + [j < col_count]·h_j·exp(S_ij − r_j)
// − p_i·[j = t_i], the positive's one-hot subtracted in fp32 before G is rounded for the products.
struct OffsetForm {
  const float* row_offset;      // c, n (c_i = -inf: row i has no term)
  const float* row_mult;        // g, n
  const float* col_offset;      // r, col_count (r_j = -inf: column j has no term)
  const float* col_mult;        // h, col_count
  int col_count;                // in [0, m]
  const int64_t* positive_cols; // t, n (-1: none); nullptr: no positive terms
  const float* positive_mult;   // p, n
};

// The sigmoid (SigLIP) form: G_ij = w_i·(σ(S_ij + bias) − [z_ij = +1]), z_ij = +1 where
// row_keys[i] == col_keys[j]; the sweep also yields the per-row losses and Σ G (grad_bias).
struct SigmoidForm {
  float bias;
  const int64_t* row_keys;   // n
  const int64_t* col_keys;   // m
  const float* row_weights;  // w, n
  float* row_loss;           // n: Σ_j w_i·softplus(−z_ij (S_ij + bias))
  float* grad_bias;          // 1: Σ G_ij
  bool with_grads;           // false: row_loss and grad_bias only (one S pass; SweepArgs' outputs unused)
};

void lse_stats_float(const LseArgs& args);
void lse_stats_half(const LseArgs& args);
void lse_stats_bf16(const LseArgs& args);
int64_t lse_workspace_floats_float(int n, int m, int col_count, int parts);
int64_t lse_workspace_floats_half(int n, int m, int col_count, int parts);
int64_t lse_workspace_floats_bf16(int n, int m, int col_count, int parts);

// The gradient sweep of `form` on inputs of dtype D (defined for every dtype and form).
template <DType D, class Form>
void gradient_sweep(const SweepArgs& args, const Form& form);

// Floats of scratch a sweep needs: a grad_scale partial per (row tile, feature chunk), a form total
// (grad_bias) per row tile.
int64_t backward_workspace_floats_float(int n, int d);
int64_t backward_workspace_floats_half(int n, int d);
int64_t backward_workspace_floats_bf16(int n, int d);

}  // namespace tilecl
