// What every pass of the tilecl kernels shares: the platform (nvcc or the CPU emulation), the block
// shapes per input type, the shared-memory layout and the 16-bit conversions.
//
// The kernels are split by pass, as flash-attention splits its kernels:
//   kernel_traits.h  this file;
//   scores.cuh       a tile of S = s·a·bᵀ, with the diagonal and the group mask applied;
//   stats.cuh        the streaming-LSE statistics kernels;
//   forms.cuh        the elementwise forms of the gradient sweep (offset, sigmoid) and their epilogues;
//   grad.cuh         the gradient sweep, one tile loop templated on the form;
//   launch.cuh       the host launchers and the per-type instantiation.
//
// Every header is compiled by nvcc, and by g++ with -DTILECL_EMU against cuda_emu.h: it may use only
// what that header emulates (README.md lists it), and it launches through TILECL_LAUNCH.
#pragma once

#include <cstdint>
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

// The kernels' input type of a host dtype code.
template <DType D>
struct Input;
template <>
struct Input<kFloat32> {
  using type = float;
};
template <>
struct Input<kFloat16> {
  using type = __half;
};
template <>
struct Input<kBFloat16> {
  using type = __nv_bfloat16;
};

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

template <typename T>
struct UseTensorCores {
  static constexpr bool value = TILECL_TENSOR_CORES && !std::is_same<T, float>::value;
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

// Sum of `value` over a block of NT threads in a fixed order (butterfly within warps, then the
// warps in order): every total of the kernels is reproducible bitwise.
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

}  // namespace detail
}  // namespace tilecl
