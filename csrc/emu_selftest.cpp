// Checks of the emulation layer itself, compiled into the cuda-emu module only (tests call them).
//
// Small kernels that exercise each emulated feature with a known answer: shuffles, votes,
// atomics and barriers; the 16-bit conversions (compared against torch's in the tests); the
// failures the emulation must report instead of hanging or reading garbage (a divergent
// barrier, warp collectives and WMMA calls in divergent code, a misaligned WMMA pointer); and a
// missing barrier that the reverse scheduling order exposes.
#ifndef TILECL_EMU
#error "emu_selftest.cpp is part of the CPU emulation build only"
#endif

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cuda_emu.h"

namespace py = pybind11;

namespace {

constexpr int kThreads = 64;  // two warps

// out[t] = {xor-butterfly warp sum of t, shfl_down(t, 1), ballot(t odd), any(t == 5), all(t < 64),
//           shared-memory atomic count after a barrier, block sum via shared memory}
__global__ void collectives_kernel(int* out) {
  __shared__ int counter;
  __shared__ int values[kThreads];
  const int t = threadIdx.x;
  if (t == 0) counter = 0;
  __syncthreads();
  int sum = t;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const int down = __shfl_down_sync(0xffffffffu, t, 1);
  const unsigned ballot = __ballot_sync(0xffffffffu, t % 2);
  const int any = __any_sync(0xffffffffu, t == 5);
  const int all = __all_sync(0xffffffffu, t < kThreads);
  atomicAdd(&counter, 1);
  values[t] = t;
  __syncthreads();
  int block_sum = 0;
  for (int i = 0; i < kThreads; ++i) block_sum += values[i];
  int* row = out + 7 * (blockIdx.x * kThreads + t);
  row[0] = sum;
  row[1] = down;
  row[2] = static_cast<int>(ballot);
  row[3] = any;
  row[4] = all;
  row[5] = counter;
  row[6] = block_sum + static_cast<int>(blockIdx.x);
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x != 0) __syncthreads();
}

// Thread 0 writes shared memory that thread 127 reads; without the second barrier that is a race,
// which the forward order hides (thread 0 runs first) and the reverse order exposes.
__global__ void missing_barrier_kernel(int* out, bool with_barrier) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 0;
  __syncthreads();
  if (threadIdx.x == 0) value = 42;
  if (with_barrier) __syncthreads();
  if (threadIdx.x == blockDim.x - 1) *out = value;
}

// Warp collectives in divergent code. `kind` 0: half the warp exits before a WMMA load; 1: the two
// halves load through different calls; 2: only lane 0 multiplies; 3: the two halves shuffle
// through different calls; 4: the lanes run different numbers of shuffles through the same call.
__global__ void divergent_warp_kernel(const __half* data, int kind) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  const int lane = threadIdx.x % 32;
  if (kind == 0) {
    if (lane < 16) return;
    wmma::load_matrix_sync(fa, data, 16);
  } else if (kind == 1) {
    if (lane < 16) {
      wmma::load_matrix_sync(fa, data, 16);
    } else {
      wmma::load_matrix_sync(fa, data, 16);
    }
  } else if (kind == 2) {
    if (lane == 0) {
      wmma::fill_fragment(acc, 0.0f);
      wmma::load_matrix_sync(fa, data, 16);
      wmma::load_matrix_sync(fb, data, 16);
      wmma::mma_sync(acc, fa, fb, acc);
    }
  } else if (kind == 3) {
    int x = lane;
    if (lane < 16) {
      x = __shfl_xor_sync(0xffffffffu, x, 1);
    } else {
      x = __shfl_xor_sync(0xffffffffu, x, 1);
    }
  } else {
    int x = lane;
    for (int i = 0; i < (lane == 3 ? 2 : 1); ++i) x = __shfl_xor_sync(0xffffffffu, x, 1);
    x = __shfl_xor_sync(0xffffffffu, x, 2);
  }
}

__global__ void misaligned_wmma_kernel(const __half* data) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> frag;
  nvcuda::wmma::load_matrix_sync(frag, data + 1, 16);
}

// C = A·B for 16x16 float16 inputs through the fragment API (row-major A, column-major B).
__global__ void wmma_kernel(const __half* a, const __half* b, float* c) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

}  // namespace

void register_emu_selftest(py::module_& module) {
  module.def("selftest_collectives", [](int blocks) {
    std::vector<int> out(7 * kThreads * blocks, -1);
    int* ptr = out.data();
    TILECL_LAUNCH(collectives_kernel, dim3(blocks), dim3(kThreads), nullptr, ptr);
    return out;
  });
  module.def("selftest_divergent_barrier", [] {
    TILECL_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(kThreads), nullptr);
  });
  module.def("selftest_missing_barrier", [](bool with_barrier) {
    int out = -1;
    int* ptr = &out;
    TILECL_LAUNCH(missing_barrier_kernel, dim3(1), dim3(128), nullptr, ptr, with_barrier);
    return out;
  });
  module.def("selftest_divergent_warp", [](int kind) {
    alignas(32) static __half data[256];
    const __half* ptr = data;
    TILECL_LAUNCH(divergent_warp_kernel, dim3(1), dim3(64), nullptr, ptr, kind);
  });
  module.def("selftest_misaligned_wmma", [] {
    alignas(32) static __half data[16 * 17];
    const __half* ptr = data;
    TILECL_LAUNCH(misaligned_wmma_kernel, dim3(1), dim3(32), nullptr, ptr);
  });
  module.def("selftest_wmma", [](const std::vector<float>& a, const std::vector<float>& b_col_major) {
    alignas(32) static __half ha[256], hb[256];
    alignas(32) static float c[256];
    for (int i = 0; i < 256; ++i) {
      ha[i] = __float2half(a.at(i));
      hb[i] = __float2half(b_col_major.at(i));
    }
    const __half* pa = ha;
    const __half* pb = hb;
    float* pc = c;
    TILECL_LAUNCH(wmma_kernel, dim3(1), dim3(32), nullptr, pa, pb, pc);
    return std::vector<float>(c, c + 256);
  });
  module.def("float_to_half_bits", [](const std::vector<float>& values) {
    std::vector<int> bits;
    for (float v : values) bits.push_back(__float2half(v).bits);
    return bits;
  });
  module.def("float_to_bf16_bits", [](const std::vector<float>& values) {
    std::vector<int> bits;
    for (float v : values) bits.push_back(__float2bfloat16(v).bits);
    return bits;
  });
  module.def("half_bits_to_float", [](const std::vector<int>& bits) {
    std::vector<float> values;
    for (int b : bits) values.push_back(__half2float(__half{static_cast<uint16_t>(b)}));
    return values;
  });
}
