// The runtime of the CPU emulator of CUDA (see cuda_emulation.h): launches, the threads of a block as fibers,
// barriers, and the checks that need no memory instrumentation (launch limits, barrier divergence).
//
// A launch runs its blocks one after another (in index order, or in an order drawn from a schedule seed). The threads of a block are fibers (ucontext) on the calling
// thread, resumed in thread order until each waits at a barrier, a warp operation or the kernel's end; then the
// barrier or warp operation that every participant reached is released. That is deterministic, and it turns
// a barrier that some threads never reach into an error naming the kernel instead of a hang.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace aecr_emulation {

// Thrown inside a fiber to stop the launch after a fatal check (an access outside a tensor): caught by the
// fiber's entry, never seen by kernel code.
struct Abort {};

// What the real build reports for a kernel (benchmarks/cuda_resources.json), set by the tests.
struct KernelResources {
  int registers = -1;     // most registers over the build's architectures
  int max_threads = -1;   // its __launch_bounds__
  int64_t shared_bytes = 0;
};

struct SharedRegion;

struct KernelInfo {
  std::string name;                       // "im2col_kernel<float>": from the symbol table, demangled
  std::vector<SharedRegion*> shared;      // its __shared__ arrays, in declaration order
  int64_t dynamic_shared_limit = 48 << 10;  // cudaFuncAttributeMaxDynamicSharedMemorySize
};

KernelInfo& kernel_info(const void* kernel);

// Registers a warp of a kernel using `registers` a thread takes: allocated per warp in units of 256.
inline int64_t warp_registers(int registers) { return (int64_t(registers) * 32 + 255) / 256 * 256; }

// Resources by kernel name. While `strict`, launching a kernel the table does not know is an error (so a new
// kernel cannot run untried by the register check).
void set_resources(std::map<std::string, KernelResources> table, bool strict);
void set_multiprocessors(int64_t sms);
int64_t multiprocessors();
// 0 (the default): blocks run in index order and a block's threads resume in index order; another value runs
// both in an order drawn from it.
void set_schedule_seed(uint64_t seed);

// Names of every kernel launched by this process, and how often; and how many blocks they launched in all.
// A launch counts once it completed without a failed check.
const std::map<std::string, int64_t>& launched();
const std::map<std::string, int64_t>& launched_blocks();

// ---- The running thread ------------------------------------------------------------------------------------

struct Context {
  KernelInfo* kernel = nullptr;
  uint64_t block_serial = 0;     // a new value for every block of every launch
  uint32_t block_epoch = 0;      // __syncthreads passed by this block
  unsigned tid = 0, warp = 0;    // linear thread index in the block, its warp
  // What this lane knows of the __syncwarp counts of its warp's lanes (32 entries): a lane's count is a Lamport
  // clock (a __syncwarp sets its lanes' counts past the largest of them), and only the lanes of the mask learn
  // each other's. A lane's access at count t is ordered before another lane's if that lane knows a count past t.
  // Shuffles and votes exchange values but do not order memory (only __syncwarp and barriers do).
  const uint32_t* lane_clock = nullptr;
  uint32_t warp_epoch() const { return lane_clock[tid % 32]; }       // this lane's own count
  uint32_t knows(unsigned lane) const { return lane_clock[lane]; }   // its knowledge of another lane's
};

inline thread_local Context context;

// Records a failed check; the launch goes on and raises when it ends (at most a few messages are kept).
void report(const std::string& what);
// Records a failed check that must not go on (the access would touch memory outside a tensor) and stops the
// launch.
[[noreturn]] void fail(const std::string& what);
// "kernel im2col_kernel<float>, block (0,0,0), thread (5,0,0)": where the running thread is.
std::string where();

// Barriers: the whole block, or the lanes of `mask` in the running thread's warp (`orders_memory`: __syncwarp;
// a shuffle or vote waits for its lanes too, but orders no memory).
void block_barrier(const std::source_location& site);
void warp_barrier(unsigned mask, const std::source_location& site, bool orders_memory = true);

// Exchange through the warp: every lane of `mask` offers `value` and receives the value lane `source` offered.
uint64_t warp_exchange(unsigned mask, uint64_t value, unsigned source, const std::source_location& site);

struct LaunchShape {
  dim3 grid, block;
  size_t dynamic_shared = 0;
};

void run(KernelInfo& kernel, const LaunchShape& shape, const std::function<void()>& body);

// Kernel parameters: pointer arguments learn their position and whether they can be written through (see
// memory.h); everything else is passed as it is.
template <typename Param>
struct Argument {
  template <typename A>
  static Param make(A&& a, int) {
    return Param(std::forward<A>(a));
  }
};

// launch(kernel, shape, args...) is in memory.h (it needs the pointer types).

}  // namespace aecr_emulation
