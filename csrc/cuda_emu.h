// CPU emulation of the subset of CUDA that the tilecl kernels use (see README.md).
//
// The kernel source compiles unchanged with g++ -DTILECL_EMU against this
// header. A launch runs the grid's blocks one after another; each thread of a
// block is a user-level fiber (ucontext) with its own small mmap'ed stack
// (a PROT_NONE guard page below it, so an overflow faults), run on the calling
// OS thread. Every block- and warp-level synchronization point (__syncthreads,
// __syncwarp, shuffles, votes, and the WMMA calls fill_fragment,
// load_matrix_sync, store_matrix_sync, mma_sync) parks the fiber and switches
// back to the scheduler. The scheduler runs the runnable fibers one at a time
// in the order set_schedule() picks (forward: thread 0 first, reverse: thread
// N-1 first, shuffled: a seeded permutation per round), and releases a barrier
// once every thread of its scope (block or warp) waits there. At the release
// it checks that every thread arrived through the same call (same collective,
// same source line, same count of earlier collectives of that scope); a
// thread that exited, waits at another call, or can never arrive is reported
// (deadlock). What it cannot see: a race that no tested order exposes (a
// fiber runs until its next synchronization point, so only orders at that
// granularity are tried), and races inside a warp that hardware would
// expose but the lockstep-free fibers do not.
//
// __shared__ becomes `static`: one buffer per kernel instantiation, which is
// block-shared memory because blocks never overlap. Everything runs on one OS
// thread and a launch is synchronous; callers hold the GIL, so two launches
// never run at once.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// ----------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

using std::isfinite;
using std::isinf;
using std::isnan;

// ----------------------------------------------------------------- runtime API
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "launch failure"; }

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

namespace tilecl_emu {

enum class State { runnable, block_barrier, warp_barrier, done };

// Where a thread waits: the collective's name and call site, and how many synchronization points
// of that scope (block or warp) the thread passed before. Threads released together must agree.
struct Site {
  const char* what = "";
  const char* file = "";
  int line = 0;
  unsigned long count = 0;
};

struct Fiber {
  ucontext_t context;
  State state = State::runnable;
  Site site;
  unsigned long block_syncs = 0, warp_syncs = 0;
};

constexpr std::size_t kStackBytes = 64 * 1024;  // fragments hold whole 16x16 tiles per thread
constexpr int kMaxThreads = 1024;

// Scheduling order of the runnable fibers within a round (set from Python: set_schedule()).
enum class Order { forward, reverse, shuffled };
inline Order g_order = Order::forward;
inline uint64_t g_seed = 0;

// The fibers' stacks: one mapping, each stack above a PROT_NONE guard page (stacks grow down), so
// an overflow faults instead of overwriting the neighbouring stack.
class Stacks {
 public:
  explicit Stacks(long count) : count_(count) {
    const long page = sysconf(_SC_PAGESIZE);
    stride_ = (kStackBytes + 2 * page - 1) / page * page;  // guard page + stack, page-rounded
    page_ = static_cast<std::size_t>(page);
    bytes_ = stride_ * static_cast<std::size_t>(count);
    void* base = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("cuda-emu: cannot map the fiber stacks");
    base_ = static_cast<char*>(base);
    for (long t = 0; t < count; ++t) {
      if (mprotect(base_ + t * stride_, page_, PROT_NONE) != 0) {
        munmap(base_, bytes_);
        throw std::runtime_error("cuda-emu: cannot protect a fiber stack's guard page");
      }
    }
  }
  ~Stacks() { munmap(base_, bytes_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* stack(long t) const { return base_ + t * stride_ + page_; }
  std::size_t stack_bytes() const { return stride_ - page_; }

 private:
  long count_;
  std::size_t stride_ = 0, page_ = 0, bytes_ = 0;
  char* base_ = nullptr;
};

struct Block {
  std::vector<Fiber> fibers;
  std::unique_ptr<Stacks> stacks;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  int current = 0;
  std::string error;
  // per-warp exchange buffers of shuffles and votes (double-buffered: one barrier per exchange)
  std::vector<uint64_t> exchange;
  std::vector<int> exchange_parity;
};

inline Block* g_block = nullptr;

inline void fail(const std::string& message) {
  // never throw across a fiber boundary: record it and hand control back; the scheduler throws
  Block* block = g_block;
  if (block->error.empty()) block->error = message;
  block->fibers[block->current].state = State::done;
  swapcontext(&block->fibers[block->current].context, &block->scheduler);
  std::abort();  // a failed block is never resumed
}

inline void fiber_entry() {
  Block* block = g_block;
  (*block->body)();
  block->fibers[block->current].state = State::done;
  // returning switches to uc_link, the scheduler
}

inline int linear_tid() { return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }
inline int lane_id() { return linear_tid() % warpSize; }
inline int warp_id() { return linear_tid() / warpSize; }

// Park the current fiber at a synchronization point until the scheduler releases its scope.
inline void wait(State why, const char* what, const char* file, int line) {
  Block* block = g_block;
  Fiber& fiber = block->fibers[block->current];
  const unsigned long count = why == State::block_barrier ? fiber.block_syncs++ : fiber.warp_syncs++;
  fiber.site = Site{what, file, line, count};
  fiber.state = why;
  swapcontext(&fiber.context, &block->scheduler);
}

inline std::string describe(int thread, const Site& site) {
  const char* slash = std::strrchr(site.file, '/');
  return "thread " + std::to_string(thread) + " at " + site.what + " (" + (slash ? slash + 1 : site.file) + ":" +
         std::to_string(site.line) + ", synchronization #" + std::to_string(site.count) + ")";
}

// Every thread released together must have arrived through the same call.
inline void check_same_site(const Block& block, int t0, int t1, const char* scope) {
  const Site& first = block.fibers[t0].site;
  for (int t = t0 + 1; t < t1; ++t) {
    const Site& other = block.fibers[t].site;
    if (std::strcmp(other.what, first.what) != 0 || std::strcmp(other.file, first.file) != 0 ||
        other.line != first.line || other.count != first.count)
      throw std::runtime_error(std::string("cuda-emu: divergent ") + scope + " synchronization: " +
                               describe(t0, first) + ", " + describe(t, other));
  }
}

inline void check_full_warp(unsigned mask, const char* what) {
  const int threads = static_cast<int>(g_block->fibers.size());
  const int first = warp_id() * warpSize;
  const int lanes = std::min(warpSize, threads - first);
  const unsigned full = lanes == warpSize ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) fail(std::string(what) + ": the emulation supports full-warp masks only");
}

// Release the threads waiting at a barrier that every thread of its scope has reached. A barrier
// that some threads of the scope exited without reaching is reported: CUDA leaves it undefined.
inline bool release_barriers(Block& block) {
  const int threads = static_cast<int>(block.fibers.size());
  int at_block = 0, done = 0;
  for (const Fiber& f : block.fibers) {
    at_block += f.state == State::block_barrier;
    done += f.state == State::done;
  }
  if (at_block > 0 && at_block + done == threads) {
    if (done > 0) throw std::runtime_error("cuda-emu: __syncthreads() not reached by every thread of the block");
    check_same_site(block, 0, threads, "block");
    for (Fiber& f : block.fibers) f.state = State::runnable;
    return true;
  }
  bool released = false;
  for (int w0 = 0; w0 < threads; w0 += warpSize) {
    const int w1 = std::min(threads, w0 + warpSize);
    int waiting = 0, exited = 0;
    for (int t = w0; t < w1; ++t) {
      waiting += block.fibers[t].state == State::warp_barrier;
      exited += block.fibers[t].state == State::done;
    }
    if (waiting > 0 && waiting + exited == w1 - w0) {
      if (exited > 0) {
        for (int t = w0; t < w1; ++t)
          if (block.fibers[t].state == State::warp_barrier)
            throw std::runtime_error("cuda-emu: a warp collective not reached by every lane of the warp: " +
                                     describe(t, block.fibers[t].site) + " waits for lanes that exited");
      }
      check_same_site(block, w0, w1, "warp");
      for (int t = w0; t < w1; ++t) block.fibers[t].state = State::runnable;
      released = true;
    }
  }
  return released;
}

// No thread can run and no barrier can be released: name two threads that wait at different calls.
inline std::string deadlock_report(const Block& block) {
  std::string message = "cuda-emu: deadlock (a barrier or warp collective not reached by all threads)";
  int first = -1;
  for (int t = 0; t < static_cast<int>(block.fibers.size()); ++t) {
    const Fiber& f = block.fibers[t];
    if (f.state == State::done) continue;
    if (first < 0) {
      first = t;
      continue;
    }
    const Fiber& g = block.fibers[first];
    if (f.state != g.state || f.site.line != g.site.line || std::strcmp(f.site.what, g.site.what) != 0)
      return message + ": " + describe(first, g.site) + ", " + describe(t, f.site);
  }
  return message;
}

// The scheduling order of the following launches: "forward", "reverse" or "shuffled" (seeded).
inline void set_schedule(const std::string& order, uint64_t seed) {
  if (order == "forward") {
    g_order = Order::forward;
  } else if (order == "reverse") {
    g_order = Order::reverse;
  } else if (order == "shuffled") {
    g_order = Order::shuffled;
  } else {
    throw std::invalid_argument("cuda-emu: schedule must be 'forward', 'reverse' or 'shuffled', got '" + order + "'");
  }
  g_seed = seed;
}
inline std::string schedule_name() {
  return g_order == Order::forward ? "forward" : g_order == Order::reverse ? "reverse" : "shuffled";
}

void reset_mma_cache();

// Outside launch(): getcontext returns twice as far as the compiler knows, which would make it
// assume launch()'s locals can be clobbered.
__attribute__((noinline)) inline void prepare(Fiber& fiber, char* stack, std::size_t bytes, ucontext_t* link) {
  fiber = Fiber{};
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack;
  fiber.context.uc_stack.ss_size = bytes;
  fiber.context.uc_link = link;
  makecontext(&fiber.context, fiber_entry, 0);
}

// Run `body` once per thread of every block of the grid.
inline void launch(dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  const long threads = static_cast<long>(block_dim.x) * block_dim.y * block_dim.z;
  if (threads < 1 || threads > kMaxThreads) throw std::runtime_error("cuda-emu: invalid block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("cuda-emu: empty grid");
  Block block;
  block.body = &body;
  block.fibers.resize(threads);
  block.exchange.assign(2 * ((threads + warpSize - 1) / warpSize) * warpSize, 0);
  block.exchange_parity.assign(threads, 0);
  block.stacks = std::make_unique<Stacks>(threads);
  std::vector<int> order(threads);
  for (long t = 0; t < threads; ++t) order[t] = static_cast<int>(g_order == Order::reverse ? threads - 1 - t : t);
  std::mt19937_64 rng(g_seed);
  struct Restore {
    Block* saved;
    ~Restore() { g_block = saved; }
  } restore{g_block};
  g_block = &block;
  gridDim = grid;
  blockDim = block_dim;
  reset_mma_cache();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        for (long t = 0; t < threads; ++t)
          prepare(block.fibers[t], block.stacks->stack(t), block.stacks->stack_bytes(), &block.scheduler);
        std::fill(block.exchange_parity.begin(), block.exchange_parity.end(), 0);
        for (;;) {
          bool ran = false;
          if (g_order == Order::shuffled) std::shuffle(order.begin(), order.end(), rng);
          for (const int t : order) {
            if (block.fibers[t].state != State::runnable) continue;
            block.current = static_cast<int>(t);
            threadIdx = uint3{static_cast<unsigned>(t % block_dim.x),
                              static_cast<unsigned>((t / block_dim.x) % block_dim.y),
                              static_cast<unsigned>(t / (static_cast<long>(block_dim.x) * block_dim.y))};
            swapcontext(&block.scheduler, &block.fibers[t].context);
            ran = true;
            if (!block.error.empty()) throw std::runtime_error("cuda-emu: " + block.error);
          }
          const bool finished = std::all_of(block.fibers.begin(), block.fibers.end(),
                                            [](const Fiber& f) { return f.state == State::done; });
          if (finished) break;
          if (!release_barriers(block) && !ran) throw std::runtime_error(deadlock_report(block));
        }
      }
}

// One exchange among the lanes of a warp: publish `value`, rendezvous, read lane `src`'s value.
inline uint64_t exchange(uint64_t value, int src, const char* what, const char* file, int line) {
  Block& block = *g_block;
  const int tid = linear_tid();
  const int base = warp_id() * warpSize;
  int& parity = block.exchange_parity[tid];
  uint64_t* slots = block.exchange.data() + parity * (block.exchange.size() / 2);
  slots[tid] = value;
  wait(State::warp_barrier, what, file, line);
  const uint64_t out = slots[base + src];
  parity ^= 1;
  return out;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

inline int lanes_in_warp() {
  const int threads = static_cast<int>(g_block->fibers.size());
  return std::min(warpSize, threads - warp_id() * warpSize);
}

}  // namespace tilecl_emu

// ----------------------------------------------------------------- sync, shuffles, votes
// The trailing defaulted parameters record the caller's source line (GCC builtins evaluated at the
// call site), so threads released together can be checked to have arrived through the same call.
#define TILECL_EMU_SITE const char *site_file_ = __builtin_FILE(), int site_line_ = __builtin_LINE()
#define TILECL_EMU_AT(what) (what), site_file_, site_line_

inline void __syncthreads(TILECL_EMU_SITE) {
  tilecl_emu::wait(tilecl_emu::State::block_barrier, TILECL_EMU_AT("__syncthreads"));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, TILECL_EMU_SITE) {
  tilecl_emu::check_full_warp(mask, "__syncwarp");
  tilecl_emu::wait(tilecl_emu::State::warp_barrier, TILECL_EMU_AT("__syncwarp"));
}
inline unsigned __activemask() { return 0xffffffffu; }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, TILECL_EMU_SITE) {
  tilecl_emu::check_full_warp(mask, "__shfl_sync");
  const int lane = tilecl_emu::lane_id();
  const int src = (lane / width) * width + (src_lane % width);
  return tilecl_emu::from_bits<T>(tilecl_emu::exchange(tilecl_emu::to_bits(var), src, TILECL_EMU_AT("__shfl_sync")));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, TILECL_EMU_SITE) {
  tilecl_emu::check_full_warp(mask, "__shfl_xor_sync");
  const int lane = tilecl_emu::lane_id();
  int src = lane ^ lane_mask;
  if (src / width != lane / width || src >= tilecl_emu::lanes_in_warp()) src = lane;
  return tilecl_emu::from_bits<T>(
      tilecl_emu::exchange(tilecl_emu::to_bits(var), src, TILECL_EMU_AT("__shfl_xor_sync")));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, TILECL_EMU_SITE) {
  tilecl_emu::check_full_warp(mask, "__shfl_down_sync");
  const int lane = tilecl_emu::lane_id();
  int src = lane + static_cast<int>(delta);
  if (src / width != lane / width || src >= tilecl_emu::lanes_in_warp()) src = lane;
  return tilecl_emu::from_bits<T>(
      tilecl_emu::exchange(tilecl_emu::to_bits(var), src, TILECL_EMU_AT("__shfl_down_sync")));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, TILECL_EMU_SITE) {
  tilecl_emu::check_full_warp(mask, "__shfl_up_sync");
  const int lane = tilecl_emu::lane_id();
  int src = lane - static_cast<int>(delta);
  if (src < 0 || src / width != lane / width) src = lane;
  return tilecl_emu::from_bits<T>(
      tilecl_emu::exchange(tilecl_emu::to_bits(var), src, TILECL_EMU_AT("__shfl_up_sync")));
}

namespace tilecl_emu {
inline unsigned ballot(unsigned mask, int predicate, const char* what, const char* file, int line) {
  check_full_warp(mask, what);
  unsigned bits = 0;
  const int lanes = lanes_in_warp();
  // every lane publishes once and reads all: one rendezvous, then 32 reads of the same slots
  Block& block = *g_block;
  const int tid = linear_tid();
  const int base = warp_id() * warpSize;
  int& parity = block.exchange_parity[tid];
  uint64_t* slots = block.exchange.data() + parity * (block.exchange.size() / 2);
  slots[tid] = predicate != 0;
  wait(State::warp_barrier, what, file, line);
  for (int l = 0; l < lanes; ++l) bits |= static_cast<unsigned>(slots[base + l] != 0) << l;
  parity ^= 1;
  return bits;
}
}  // namespace tilecl_emu

inline unsigned __ballot_sync(unsigned mask, int predicate, TILECL_EMU_SITE) {
  return tilecl_emu::ballot(mask, predicate, TILECL_EMU_AT("__ballot_sync"));
}
inline int __any_sync(unsigned mask, int predicate, TILECL_EMU_SITE) {
  return tilecl_emu::ballot(mask, predicate, TILECL_EMU_AT("__any_sync")) != 0;
}
inline int __all_sync(unsigned mask, int predicate, TILECL_EMU_SITE) {
  const int lanes = tilecl_emu::lanes_in_warp();
  const unsigned full = lanes == warpSize ? 0xffffffffu : ((1u << lanes) - 1u);
  return tilecl_emu::ballot(mask, predicate, TILECL_EMU_AT("__all_sync")) == full;
}

// ----------------------------------------------------------------- atomics
// Fibers never preempt one another, so a read-modify-write is atomic by construction.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  const T old = *address;
  *address = std::max(old, value);
  return old;
}
template <typename T>
inline T atomicMin(T* address, T value) {
  const T old = *address;
  *address = std::min(old, value);
  return old;
}
template <typename T>
inline T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ----------------------------------------------------------------- math
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __int_as_float(int x) { return tilecl_emu::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(tilecl_emu::to_bits(x))); }
using ::expf;
using ::fmaf;
using ::fmaxf;
using ::fminf;
using ::logf;

// ----------------------------------------------------------------- half and bfloat16
// Storage-only types with the CUDA conversion functions; float <-> 16-bit conversions round to
// nearest even like the hardware's cvt.rn.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline uint32_t tilecl_float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float tilecl_bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half(float f) {
  const uint32_t u = tilecl_float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude >= 0x7f800000u)  // inf or nan
    return __half{static_cast<uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u))};
  if (magnitude >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (magnitude < 0x38800000u) {
    // subnormal half (or zero): the value in units of 2^-24, rounded to nearest even
    const float scaled = tilecl_bits_float(magnitude) * 16777216.0f;  // exact: a power-of-two scale
    const float rounded = std::nearbyint(scaled);                    // default rounding mode: to even
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(rounded))};
  }
  // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even
  uint32_t h = ((magnitude >> 13) - (112u << 10));
  const uint32_t rest = magnitude & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __half2float(__half h) {
  const uint32_t sign = (static_cast<uint32_t>(h.bits) & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    const float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -value : value;
  }
  if (exponent == 31) return tilecl_bits_float(sign | 0x7f800000u | (mantissa << 13));
  return tilecl_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t u = tilecl_float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(rounded >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return tilecl_bits_float(static_cast<uint32_t>(b.bits) << 16); }

// ----------------------------------------------------------------- WMMA
// A fragment holds its whole tile in every thread of the warp (row-major, logical
// coordinates). The hardware's element-to-thread mapping is unspecified, so a kernel may only
// load, store, fill and multiply fragments; these calls check the documented preconditions
// (256-bit aligned pointer, ldm a multiple of 16 bytes) so a violation fails here as it would
// be undefined on the GPU. Each call is a warp rendezvous: load/store/mma_sync wait for every
// lane of the warp as CUDA documents; fill_fragment (not a _sync call in CUDA) is made one too,
// which is stricter and checks that the whole warp fills its fragments uniformly.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
inline T narrow(float x);
template <>
inline float narrow<float>(float x) {
  return x;
}
template <>
inline __half narrow<__half>(float x) {
  return __float2half(x);
}
template <>
inline __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

template <typename T>
inline void check(const void* ptr, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % 32 != 0)
    tilecl_emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) tilecl_emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = detail::shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag, T value, TILECL_EMU_SITE) {
  tilecl_emu::wait(tilecl_emu::State::warp_barrier, TILECL_EMU_AT("wmma::fill_fragment"));
  for (int i = 0; i < frag.num_elements; ++i) frag.x[i] = value;
}

template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& frag, const T* ptr, unsigned ldm,
                             TILECL_EMU_SITE) {
  detail::check<T>(ptr, ldm, "load_matrix_sync");
  tilecl_emu::wait(tilecl_emu::State::warp_barrier, TILECL_EMU_AT("wmma::load_matrix_sync"));
  using F = fragment<Use, M, N, K, T, row_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) frag.x[r * F::cols + c] = ptr[static_cast<std::size_t>(r) * ldm + c];
}
template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& frag, const T* ptr, unsigned ldm,
                             TILECL_EMU_SITE) {
  detail::check<T>(ptr, ldm, "load_matrix_sync");
  tilecl_emu::wait(tilecl_emu::State::warp_barrier, TILECL_EMU_AT("wmma::load_matrix_sync"));
  using F = fragment<Use, M, N, K, T, col_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) frag.x[r * F::cols + c] = ptr[static_cast<std::size_t>(c) * ldm + r];
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& frag, const T* ptr, unsigned ldm, layout_t layout,
                             TILECL_EMU_SITE) {
  detail::check<T>(ptr, ldm, "load_matrix_sync");
  tilecl_emu::wait(tilecl_emu::State::warp_barrier, TILECL_EMU_AT("wmma::load_matrix_sync"));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      frag.x[r * N + c] = layout == mem_row_major ? ptr[static_cast<std::size_t>(r) * ldm + c]
                                                  : ptr[static_cast<std::size_t>(c) * ldm + r];
}
template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& frag, unsigned ldm, layout_t layout,
                              TILECL_EMU_SITE) {
  detail::check<T>(ptr, ldm, "store_matrix_sync");
  tilecl_emu::wait(tilecl_emu::State::warp_barrier, TILECL_EMU_AT("wmma::store_matrix_sync"));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      T& out = layout == mem_row_major ? ptr[static_cast<std::size_t>(r) * ldm + c]
                                       : ptr[static_cast<std::size_t>(c) * ldm + r];
      out = frag.x[r * N + c];
    }
}

}  // namespace wmma
}  // namespace nvcuda

namespace tilecl_emu {
// Every lane of a warp issues the same mma on the same operands (the calls are warp-collective and
// rendezvous first); the first lane to run after the rendezvous computes it and the others reuse
// the product when their operands match bytewise, which keeps the emulation from doing the warp's
// work 32 times. A lane whose operands differ computes its own product.
struct MmaCacheEntry {
  std::vector<unsigned char> key;
  std::vector<float> product;
};
inline std::vector<std::vector<MmaCacheEntry>> g_mma_cache;
inline std::vector<std::vector<uint32_t>> g_mma_sequence;
constexpr int kMmaCacheSlots = 256;
inline void reset_mma_cache() {
  g_mma_cache.assign(kMaxThreads / warpSize, std::vector<MmaCacheEntry>(kMmaCacheSlots));
  g_mma_sequence.assign(kMaxThreads / warpSize, std::vector<uint32_t>(warpSize, 0));
}
}  // namespace tilecl_emu

namespace nvcuda {
namespace wmma {
// d = a·b + c with exact products and fp32 accumulation in k order.
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c,
                     TILECL_EMU_SITE) {
  tilecl_emu::wait(tilecl_emu::State::warp_barrier, TILECL_EMU_AT("wmma::mma_sync"));
  const int warp = tilecl_emu::warp_id();
  uint32_t& sequence = tilecl_emu::g_mma_sequence[warp][tilecl_emu::lane_id()];
  tilecl_emu::MmaCacheEntry& entry = tilecl_emu::g_mma_cache[warp][sequence++ % tilecl_emu::kMmaCacheSlots];
  const std::size_t sizes[3] = {sizeof(a.x), sizeof(b.x), sizeof(c.x)};
  std::vector<unsigned char> key(sizes[0] + sizes[1] + sizes[2]);
  std::memcpy(key.data(), a.x, sizes[0]);
  std::memcpy(key.data() + sizes[0], b.x, sizes[1]);
  std::memcpy(key.data() + sizes[0] + sizes[1], c.x, sizes[2]);
  if (entry.key == key) {
    std::memcpy(d.x, entry.product.data(), sizeof(d.x));
    return;
  }
  float av[M * K], bv[K * N];
  for (int i = 0; i < M * K; ++i) av[i] = detail::widen(a.x[i]);
  for (int i = 0; i < K * N; ++i) bv[i] = detail::widen(b.x[i]);
  float out[M * N];
  for (int r = 0; r < M; ++r)
    for (int col = 0; col < N; ++col) {
      float acc = c.x[r * N + col];
      for (int k = 0; k < K; ++k) acc = std::fma(av[r * K + k], bv[k * N + col], acc);
      out[r * N + col] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
  entry.key = std::move(key);
  entry.product.assign(out, out + M * N);
}
}  // namespace wmma
}  // namespace nvcuda

// A launch: `TILECL_LAUNCH(kernel, grid, block, stream, args...)` is `kernel<<<grid, block, 0, stream>>>(args...)`
// on the GPU and a synchronous emulated launch here.
#define TILECL_LAUNCH(kernel, grid, block, stream, ...)              \
  do {                                                              \
    (void)(stream);                                                 \
    tilecl_emu::launch((grid), (block), [&]() { kernel(__VA_ARGS__); }); \
  } while (0)
