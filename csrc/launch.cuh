// The host launchers: argument checks, grids, and the entry points of tilecl_cuda.h, instantiated
// per input type (one instantiate_*.cu each, so the build compiles them in parallel) and per form.
#pragma once

#include <stdexcept>
#include <string>

#include "grad.cuh"
#include "stats.cuh"

namespace tilecl {
namespace detail {

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

// grad_scale's partials, then one form total (grad_bias) per row tile.
template <typename T>
int64_t workspace_floats(int n, int d) {
  return partial_count<T>(n, d) + ceil_div(n, Config<T>::BM);
}

// The kernels test row_groups alone: masking needs all three arrays or none.
inline GroupMask group_mask(const int64_t* row_groups, const int64_t* col_groups, const int64_t* kept) {
  if ((row_groups == nullptr) != (col_groups == nullptr) || (row_groups == nullptr) != (kept == nullptr))
    throw std::invalid_argument("tilecl: group masking needs row_groups, col_groups and kept_cols, or none");
  return GroupMask{row_groups, col_groups, kept};
}

// How stats_kernel cuts S: groups x splits blocks, each walking blocks_per_group row tiles x
// tiles_per_split column tiles; `parts` bounds both counts, so the partials take
// splits·3n + groups·2·col_count floats (lse_workspace_floats) and a launch has up to parts² blocks.
struct StatsGrid {
  int groups, blocks_per_group, splits, tiles_per_split;
};

template <typename T>
StatsGrid stats_grid(int n, int m, int parts) {
  if (parts < 1) throw std::invalid_argument("tilecl: the statistics need at least one part");
  const int row_blocks = ceil_div(n, Config<T>::BM), col_tiles = ceil_div(m, Config<T>::BN);
  const int blocks_per_group = ceil_div(row_blocks, row_blocks < parts ? row_blocks : parts);
  const int tiles_per_split = ceil_div(col_tiles, col_tiles < parts ? col_tiles : parts);
  return {ceil_div(row_blocks, blocks_per_group), blocks_per_group, ceil_div(col_tiles, tiles_per_split),
          tiles_per_split};
}

template <typename T>
int64_t lse_workspace_floats(int n, int m, int col_count, int parts) {
  const StatsGrid grid = stats_grid<T>(n, m, parts);
  return 3 * static_cast<int64_t>(grid.splits) * n + 2 * static_cast<int64_t>(grid.groups) * col_count;
}

template <typename T>
void launch_lse_stats(const LseArgs& p) {
  check_shapes(p.n, p.m, p.d, p.lda, p.ldb);
  if (p.col_count < 0 || p.col_count > p.m) throw std::invalid_argument("tilecl: col_count must be in [0, m]");
  if (!p.workspace) throw std::invalid_argument("tilecl: the statistics need their workspace");
  if (!p.row_lse_low || (p.col_count > 0 && !p.col_lse_low))
    throw std::invalid_argument("tilecl: the statistics need their low parts' outputs");
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const GroupMask mask = group_mask(p.row_groups, p.col_groups, p.kept_cols);
  const StatsGrid grid = stats_grid<T>(p.n, p.m, p.parts);
  if (grid.splits > 65535) throw std::invalid_argument("tilecl: more than 65535 column splits (grid.y limit)");
  // the workspace: row (max, sum, positive) partials, (splits, n) each, then column (max, sum), (groups, col_count)
  const int64_t row_floats = static_cast<int64_t>(grid.splits) * p.n;
  float* row_max = p.workspace;
  float* row_sum = row_max + row_floats;
  float* row_positive = row_sum + row_floats;
  float* col_max = row_positive + row_floats;
  float* col_sum = col_max + static_cast<int64_t>(grid.groups) * p.col_count;
  TILECL_LAUNCH(stats_kernel<T>, dim3(grid.groups, grid.splits), dim3(kThreads), stream, a, b, p.targets, row_max,
                row_sum, row_positive, col_max, col_sum, p.scale, p.n, p.m, p.col_count, p.d, p.lda, p.ldb,
                grid.blocks_per_group, grid.tiles_per_split, p.exclude_diagonal, mask);
  check_launch("tilecl stats_kernel");
  TILECL_LAUNCH(merge_stats_kernel<T>, dim3(ceil_div(p.n, kThreads)), dim3(kThreads), stream, row_max, row_sum,
                row_positive, p.row_lse, p.row_lse_low, p.positive, grid.splits, p.n);
  check_launch("tilecl merge_stats_kernel<rows>");
  if (p.col_count > 0) {
    TILECL_LAUNCH(merge_stats_kernel<T>, dim3(ceil_div(p.col_count, kThreads)), dim3(kThreads), stream, col_max,
                  col_sum, static_cast<const float*>(nullptr), p.col_lse, p.col_lse_low, static_cast<float*>(nullptr),
                  grid.groups, p.col_count);
    check_launch("tilecl merge_stats_kernel<cols>");
  }
}

// Every form's sweep: the row kernel (grad_a, grad_scale's partials, the form's per-row results),
// the form's total, then the column kernel (grad_b) and grad_scale.
template <typename T, typename Form>
void launch_sweep(const SweepArgs& p, const Form& args) {
  using C = Config<T>;
  check_shapes(p.n, p.m, p.d, p.lda, p.ldb);
  const Epilogue<Form> form{args};
  form.check(p.n, p.m);
  const bool grads = form.products();
  if (!p.workspace || (grads && (!p.grad_a || !p.grad_b || !p.grad_scale)))
    throw std::invalid_argument("tilecl: a gradient sweep needs its workspace, and grad_a, grad_b and grad_scale");
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  // without gradients one feature chunk suffices: the form's row results need only S
  const int chunks = grads ? ceil_div(p.d, C::DOUT) : 1;
  if (chunks > 65535) throw std::invalid_argument("tilecl: d above 65535 x " + std::to_string(C::DOUT) + " (grid.y limit)");
  const dim3 rows_grid(ceil_div(p.n, C::BM), chunks), cols_grid(ceil_div(p.m, C::BN), chunks);
  const int count = static_cast<int>(partial_count<T>(p.n, p.d));
  const GroupMask mask = group_mask(p.row_groups, p.col_groups, p.kept_cols);
  float* row_totals = p.workspace + count;
  TILECL_LAUNCH((grad_kernel<T, Form, true>), rows_grid, dim3(kGradThreads), stream, a, b, p.grad_a, p.workspace,
                row_totals, p.scale, p.n, p.m, p.d, p.lda, p.ldb, p.exclude_diagonal, mask, form);
  check_launch("tilecl grad_kernel<rows>");
  if (float* total = form.total()) {
    TILECL_LAUNCH(sum_partials_kernel<T>, dim3(1), dim3(kThreads), stream, row_totals,
                  static_cast<int>(rows_grid.x), total);
    check_launch("tilecl sum_partials_kernel<total>");
  }
  if (!grads) return;
  TILECL_LAUNCH((grad_kernel<T, Form, false>), cols_grid, dim3(kGradThreads), stream, a, b, p.grad_b, p.workspace,
                row_totals, p.scale, p.n, p.m, p.d, p.lda, p.ldb, p.exclude_diagonal, mask, form);
  check_launch("tilecl grad_kernel<cols>");
  TILECL_LAUNCH(sum_partials_kernel<T>, dim3(1), dim3(kThreads), stream, p.workspace, count, p.grad_scale);
  check_launch("tilecl sum_partials_kernel");
}

}  // namespace detail

template <DType D, class Form>
void gradient_sweep(const SweepArgs& args, const Form& form) {
  detail::launch_sweep<typename detail::Input<D>::type>(args, form);
}

}  // namespace tilecl

// One translation unit per input type defines the host entry points for that type: its statistics,
// its workspace size and one gradient sweep per form of TILECL_FORMS.
#define TILECL_INSTANTIATE_SWEEP(D, FORM) template void gradient_sweep<D, FORM>(const SweepArgs&, const FORM&);
#define TILECL_INSTANTIATE(T, SUFFIX, D)                                                                  \
  namespace tilecl {                                                                                    \
  void lse_stats_##SUFFIX(const LseArgs& args) { detail::launch_lse_stats<T>(args); }                   \
  int64_t lse_workspace_floats_##SUFFIX(int n, int m, int col_count, int parts) {                       \
    return detail::lse_workspace_floats<T>(n, m, col_count, parts);                                     \
  }                                                                                                     \
  int64_t backward_workspace_floats_##SUFFIX(int n, int d) { return detail::workspace_floats<T>(n, d); } \
  TILECL_FORMS(TILECL_INSTANTIATE_SWEEP, D)                                                             \
  }
