// The emulator's runtime (emulator.h): kernel names from the symbol table, the block scheduler on fibers, the
// launch checks, and the error log.
#include "emulator.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "memory.h"
#include "traffic.h"

namespace aecr_emulation {
namespace {

// ---- Kernel names ------------------------------------------------------------------------------------------

// "void aecr::(anonymous namespace)::im2col_kernel<float>(aecr::DeformConvShape, ...)" -> "im2col_kernel<float>":
// the name and its template arguments, without scope, return type or parameters.
std::string kernel_key(std::string demangled) {
  const std::string anonymous = "(anonymous namespace)";
  for (size_t at; (at = demangled.find(anonymous)) != std::string::npos;) demangled.replace(at, anonymous.size(), "anon");
  int depth = 0;
  size_t start = 0, end = demangled.size();
  for (size_t i = 0; i < demangled.size(); ++i) {
    const char c = demangled[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth != 0) continue;
    if (c == '(') {
      end = i;
      break;
    }
    if (c == ' ') start = i + 1;
    if (c == ':' && i + 1 < demangled.size() && demangled[i + 1] == ':') start = i + 2;
  }
  return demangled.substr(start, end - start);
}

// The local symbols of a shared object (kernels live in anonymous namespaces, so dladdr cannot name them).
class SymbolTable {
 public:
  explicit SymbolTable(const char* path) {
    const int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    struct stat st;
    if (fstat(fd, &st) == 0) {
      size_ = static_cast<size_t>(st.st_size);
      void* data = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (data != MAP_FAILED) read(static_cast<const char*>(data));
      if (data != MAP_FAILED) munmap(data, size_);
    }
    close(fd);
  }
  std::string name_at(uint64_t offset) const {
    const auto it = names_.find(offset);
    return it == names_.end() ? std::string() : it->second;
  }

 private:
  void read(const char* image) {
    const auto* header = reinterpret_cast<const Elf64_Ehdr*>(image);
    if (size_ < sizeof(Elf64_Ehdr) || std::memcmp(header->e_ident, ELFMAG, SELFMAG) != 0) return;
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image + header->e_shoff);
    uint64_t base = UINT64_MAX;  // lowest loaded address, which dladdr's dli_fbase corresponds to
    const auto* segments = reinterpret_cast<const Elf64_Phdr*>(image + header->e_phoff);
    for (int i = 0; i < header->e_phnum; ++i) {
      if (segments[i].p_type == PT_LOAD && segments[i].p_vaddr < base) base = segments[i].p_vaddr & ~uint64_t(0xfff);
    }
    if (base == UINT64_MAX) base = 0;
    for (int i = 0; i < header->e_shnum; ++i) {
      if (sections[i].sh_type != SHT_SYMTAB && sections[i].sh_type != SHT_DYNSYM) continue;
      const auto* symbols = reinterpret_cast<const Elf64_Sym*>(image + sections[i].sh_offset);
      const char* strings = image + sections[sections[i].sh_link].sh_offset;
      for (size_t k = 0; k < sections[i].sh_size / sizeof(Elf64_Sym); ++k) {
        if (ELF64_ST_TYPE(symbols[k].st_info) != STT_FUNC || symbols[k].st_value == 0) continue;
        names_.emplace(symbols[k].st_value - base, strings + symbols[k].st_name);
      }
    }
  }
  size_t size_ = 0;
  std::unordered_map<uint64_t, std::string> names_;
};

std::string symbol_name(const void* function) {
  Dl_info info;
  if (dladdr(function, &info) == 0 || info.dli_fname == nullptr) return "";
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<SymbolTable>> tables;
  std::lock_guard<std::mutex> lock(mutex);
  auto& table = tables[info.dli_fname];
  if (!table) table = std::make_unique<SymbolTable>(info.dli_fname);
  const std::string mangled = table->name_at(reinterpret_cast<uintptr_t>(function) - reinterpret_cast<uintptr_t>(info.dli_fbase));
  if (mangled.empty()) return "";
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string out = status == 0 && demangled != nullptr ? demangled : mangled;
  std::free(demangled);
  return out;
}

struct Registry {
  std::mutex mutex;
  std::unordered_map<const void*, std::unique_ptr<KernelInfo>> kernels;
  std::map<std::string, KernelResources> resources;
  bool strict = false;
  std::map<std::string, int64_t> launched;
  std::map<std::string, int64_t> blocks;  // blocks launched, by kernel
  int64_t sms = 3;
  uint64_t schedule_seed = 0;  // 0: blocks and threads in index order; else a permutation of each drawn from it
};

Registry& registry() {
  static Registry r;
  return r;
}

// ---- Fibers ------------------------------------------------------------------------------------------------

constexpr size_t kStackBytes = 512 << 10;

enum class State { Ready, AtBarrier, AtWarp, Done, Failed };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // with a guard page below it
  State state = State::Ready;
  std::source_location site;  // where it waits
  unsigned mask = 0;           // of the warp operation it waits at
  bool orders_memory = false;  // that operation is a __syncwarp
};

struct Warp {
  uint64_t slots[2][32] = {};  // exchanged values, by generation parity
  uint32_t generation = 0;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<uint32_t> lane_clocks;  // 32 per thread: see Context::lane_clock
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
  std::vector<std::string> errors;
  bool failed = false;
};

thread_local BlockRun* run_state = nullptr;
thread_local std::vector<char*> stack_pool;
thread_local uint64_t serial_counter = 0;

char* take_stack(size_t i) {
  while (stack_pool.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot allocate fiber stacks");
    mprotect(memory, page, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
    stack_pool.push_back(static_cast<char*>(memory) + page);
  }
  return stack_pool[i];
}

void fiber_entry() {
  BlockRun& r = *run_state;
  Fiber& f = *r.current;
  try {
    (*r.body)();
    f.state = State::Done;
  } catch (const Abort&) {
    f.state = State::Failed;
  } catch (const std::exception& e) {
    r.errors.push_back(where() + ": threw " + e.what());
    r.failed = true;
    f.state = State::Failed;
  }
  swapcontext(&f.context, &r.scheduler);
}

void switch_to_scheduler(State state, const std::source_location& site, unsigned mask) {
  BlockRun& r = *run_state;
  Fiber& f = *r.current;
  f.state = state;
  f.site = site;
  f.mask = mask;
  swapcontext(&f.context, &r.scheduler);
  if (r.failed) throw Abort{};  // resumed only to unwind (never: an aborted block is abandoned)
}

std::string location(const std::source_location& s) {
  std::string file = s.file_name();
  const size_t slash = file.find_last_of('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(s.line());
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

std::string block_name() {
  std::ostringstream s;
  s << "block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << ")";
  return s.str();
}

void resume(BlockRun& r, size_t t) {
  Fiber& f = r.fibers[t];
  r.current = &f;
  context.tid = static_cast<unsigned>(t);
  context.warp = static_cast<unsigned>(t / 32);
  context.lane_clock = &r.lane_clocks[t * 32];
  threadIdx = dim3(static_cast<unsigned>(t % blockDim.x), static_cast<unsigned>((t / blockDim.x) % blockDim.y),
                   static_cast<unsigned>(t / (blockDim.x * blockDim.y)));
  f.state = State::Ready;
  swapcontext(&r.scheduler, &f.context);
}

// A __syncwarp of the lanes of `mask` (warp starting at thread `lo`): each learns what the others know, and their
// own counts move past the largest of them.
void synchronise_lanes(BlockRun& r, size_t lo, unsigned mask) {
  uint32_t merged[32] = {};
  uint32_t next = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const uint32_t* clock = &r.lane_clocks[(lo + lane) * 32];
    for (unsigned k = 0; k < 32; ++k) merged[k] = std::max(merged[k], clock[k]);
    next = std::max(next, clock[lane] + 1);
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1u) merged[lane] = next;
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1u) std::copy(merged, merged + 32, &r.lane_clocks[(lo + lane) * 32]);
  }
}

// Releases the warp operations whose participants have all arrived; returns whether any was.
bool release_warps(BlockRun& r) {
  bool any = false;
  const size_t threads = r.fibers.size();
  for (size_t w = 0; w < r.warps.size(); ++w) {
    const size_t lo = 32 * w, hi = std::min(threads, lo + 32);
    for (size_t t = lo; t < hi; ++t) {
      const Fiber& f = r.fibers[t];
      if (f.state != State::AtWarp) continue;
      bool complete = true;
      for (unsigned lane = 0; lane < 32; ++lane) {
        if (!(f.mask >> lane & 1u)) continue;
        const size_t u = lo + lane;
        if (u >= hi) {
          fail(block_name() + ": warp operation at " + location(f.site) + " names lane " + std::to_string(lane) +
               " of a warp of " + std::to_string(hi - lo) + " threads");
        }
        const Fiber& g = r.fibers[u];
        if (g.state == State::AtWarp && (g.mask != f.mask || !same_site(g.site, f.site))) {
          fail(block_name() + ": lanes of warp " + std::to_string(w) + " wait at different warp operations (" +
               location(f.site) + " and " + location(g.site) + ")");
        }
        if (g.state != State::AtWarp) complete = false;
      }
      if (!complete) continue;
      for (unsigned lane = 0; lane < 32; ++lane) {
        if (f.mask >> lane & 1u) r.fibers[lo + lane].state = State::Ready;
      }
      ++r.warps[w].generation;
      if (f.orders_memory) synchronise_lanes(r, lo, f.mask);
      count_warp_met(w);
      any = true;
      break;
    }
  }
  return any;
}

// Nothing is ready: releases the block barrier, or explains why the block cannot go on.
bool release_block(BlockRun& r) {
  size_t waiting = 0, done = 0, at_warp = 0;
  const Fiber* first = nullptr;
  for (const Fiber& f : r.fibers) {
    if (f.state == State::AtBarrier) {
      if (first == nullptr) first = &f;
      if (!same_site(f.site, first->site)) {
        fail(block_name() + ": threads wait at different __syncthreads (" + location(first->site) + " and " +
             location(f.site) + ")");
      }
      ++waiting;
    } else if (f.state == State::Done) {
      ++done;
    } else if (f.state == State::AtWarp) {
      ++at_warp;
    }
  }
  if (done == r.fibers.size()) return false;
  if (waiting == r.fibers.size()) {
    for (Fiber& f : r.fibers) f.state = State::Ready;
    ++context.block_epoch;
    count_block_met();
    return true;
  }
  std::ostringstream why;
  why << block_name() << ": ";
  if (first != nullptr) {
    why << "__syncthreads at " << location(first->site) << " reached by " << waiting << " of " << r.fibers.size()
        << " threads (" << done << " returned, " << at_warp << " wait at a warp operation): a barrier in divergent code";
  } else {
    why << at_warp << " threads wait at a warp operation that lanes of their warp never reach (" << done
        << " returned)";
  }
  fail(why.str());
}

void check_shape(const KernelInfo& kernel, const LaunchShape& shape) {
  const auto& reg = registry();
  auto error = [&](const std::string& what) {
    throw std::runtime_error("CUDA emulation: kernel " + kernel.name + ": invalid launch: " + what);
  };
  const dim3& b = shape.block;
  const dim3& g = shape.grid;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads == 0 || g.x == 0 || g.y == 0 || g.z == 0) error("an empty grid or block");
  if (threads > 1024) error(std::to_string(threads) + " threads per block (at most 1024)");
  if (b.x > 1024 || b.y > 1024 || b.z > 64) error("block dimensions above (1024, 1024, 64)");
  if (g.x > 2147483647u) error("grid x above 2^31 - 1");
  if (g.y > 65535 || g.z > 65535) error("grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
                                        std::to_string(g.z) + "): y and z at most 65535");
  if (shape.dynamic_shared > (48u << 10) && static_cast<int64_t>(shape.dynamic_shared) > kernel.dynamic_shared_limit) {
    error(std::to_string(shape.dynamic_shared) + " bytes of dynamic shared memory: above 48 KB it needs "
          "cudaFuncAttributeMaxDynamicSharedMemorySize set to at least that");
  }
  const auto it = reg.resources.find(kernel.name);
  if (it == reg.resources.end()) {
    if (reg.strict) error("no resource usage known for it (regenerate benchmarks/cuda_resources.json)");
    return;
  }
  const KernelResources& res = it->second;
  if (res.max_threads > 0 && static_cast<int64_t>(threads) > res.max_threads) {
    error(std::to_string(threads) + " threads per block above its __launch_bounds__(" +
          std::to_string(res.max_threads) + ")");
  }
  if (res.registers > 0) {
    const uint64_t total = uint64_t(warp_registers(res.registers)) * ((threads + 31) / 32);
    if (total > 65536) {
      error(std::to_string(threads) + " threads x " + std::to_string(res.registers) + " registers = " +
            std::to_string(total) + " registers per block (at most 65536)");
    }
  }
  if (res.shared_bytes > (48 << 10)) error(std::to_string(res.shared_bytes) + " bytes of static shared memory");
}

}  // namespace

// ---- Public --------------------------------------------------------------------------------------------------

KernelInfo& kernel_info(const void* kernel) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  auto& info = reg.kernels[kernel];
  if (!info) {
    info = std::make_unique<KernelInfo>();
    info->name = kernel_key(symbol_name(kernel));
    if (info->name.empty()) info->name = "<unnamed kernel>";
  }
  return *info;
}

void set_resources(std::map<std::string, KernelResources> table, bool strict) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  reg.resources = std::move(table);
  reg.strict = strict;
}

void set_multiprocessors(int64_t sms) { registry().sms = sms; }
void set_schedule_seed(uint64_t seed) { registry().schedule_seed = seed; }
int64_t multiprocessors() { return registry().sms; }

const std::map<std::string, int64_t>& launched() { return registry().launched; }
const std::map<std::string, int64_t>& launched_blocks() { return registry().blocks; }

std::string where() {
  std::ostringstream s;
  s << "kernel " << (context.kernel ? context.kernel->name : "?") << ", " << block_name() << ", thread ("
    << threadIdx.x << "," << threadIdx.y << "," << threadIdx.z << ")";
  return s.str();
}

void report(const std::string& what) {
  BlockRun* r = run_state;
  if (r == nullptr) throw std::runtime_error("CUDA emulation: " + what);
  for (const std::string& e : r->errors) {
    if (e == what) return;
  }
  if (r->errors.size() < 8) r->errors.push_back(what);
}

void fail(const std::string& what) {
  report(what);
  if (run_state != nullptr) run_state->failed = true;
  throw Abort{};
}

void block_barrier(const std::source_location& site) { switch_to_scheduler(State::AtBarrier, site, 0); }

void warp_barrier(unsigned mask, const std::source_location& site, bool orders_memory) {
  if (!(mask >> (context.tid % 32) & 1u)) fail(where() + ": a warp operation whose mask leaves out the calling lane");
  run_state->current->orders_memory = orders_memory;
  switch_to_scheduler(State::AtWarp, site, mask);
}

uint64_t warp_exchange(unsigned mask, uint64_t value, unsigned source, const std::source_location& site) {
  BlockRun& r = *run_state;
  Warp& w = r.warps[context.warp];
  const uint32_t generation = w.generation;
  const unsigned lane = context.tid % 32;
  w.slots[generation & 1][lane] = value;
  warp_barrier(mask, site, false);
  if (source >= 32 || !(mask >> source & 1u)) fail(where() + ": a shuffle reads lane " + std::to_string(source) +
                                                   " outside its mask");
  return w.slots[generation & 1][source];
}

void run(KernelInfo& kernel, const LaunchShape& shape, const std::function<void()>& body) {
  if (run_state != nullptr) throw std::runtime_error("CUDA emulation: a kernel launched from inside a kernel");
  check_shape(kernel, shape);
  const dim3 grid = shape.grid, block = shape.block;
  const size_t threads = size_t(block.x) * block.y * block.z;
  BlockRun r;
  r.fibers.resize(threads);
  r.warps.resize((threads + 31) / 32);
  r.lane_clocks.assign(r.warps.size() * 32 * 32, 0);
  r.body = &body;
  gridDim = grid;
  blockDim = block;
  context = Context{};
  context.kernel = &kernel;
  begin_launch(kernel, shape);
  run_state = &r;
  bool failed = false;
  // CUDA orders neither the blocks of a grid nor the threads of a block; a schedule seed draws another order of
  // both, so that a test can show a result does not depend on it (or, for atomics, that it does).
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order(blocks), thread_order(threads);
  std::iota(block_order.begin(), block_order.end(), 0);
  std::iota(thread_order.begin(), thread_order.end(), 0);
  if (const uint64_t seed = registry().schedule_seed; seed != 0) {
    std::mt19937_64 draw(seed);
    std::shuffle(block_order.begin(), block_order.end(), draw);
    std::shuffle(thread_order.begin(), thread_order.end(), draw);
  }
  // While measuring (traffic.h), a sample of the blocks.
  int64_t first_counted = 0, counted = 0;
  {
    const auto& reg = registry();
    const auto res = reg.resources.find(kernel.name);
    const bool known = res != reg.resources.end();
    count_launch(kernel.name, int64_t(blocks), int64_t(threads), known ? res->second.registers : 0,
                 (known ? res->second.shared_bytes : 0) + int64_t(shape.dynamic_shared), first_counted, counted);
  }
  for (uint64_t b = 0; b < blocks && !failed; ++b) {
    if (int64_t(b) < first_counted || int64_t(b) >= first_counted + counted) continue;
    {
      const uint64_t i = block_order[b];
      const unsigned x = unsigned(i % grid.x), y = unsigned(i / grid.x % grid.y), z = unsigned(i / grid.x / grid.y);
      {
        blockIdx = dim3(x, y, z);
        context.block_serial = ++serial_counter;
        context.block_epoch = 0;
        std::fill(r.lane_clocks.begin(), r.lane_clocks.end(), 0);
        begin_block(kernel);
        count_block_start(threads);
        for (size_t t = 0; t < threads; ++t) {
          Fiber& f = r.fibers[t];
          f.stack = take_stack(t);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack;
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_entry, 0);
          f.state = State::Ready;
        }
        try {
          for (;;) {
            bool ran = false;
            for (size_t i = 0; i < threads; ++i) {
              const size_t t = thread_order[i];
              if (r.fibers[t].state != State::Ready) continue;
              resume(r, t);
              ran = true;
              if (r.failed) throw Abort{};
            }
            if (ran) continue;
            if (release_warps(r)) continue;
            if (!release_block(r)) break;
          }
          end_block(kernel);
          count_block_end();
        } catch (const Abort&) {
          failed = true;
        }
      }
    }
  }
  run_state = nullptr;
  context = Context{};
  if (!r.errors.empty()) {
    std::string message = "CUDA emulation: kernel " + kernel.name + ":";
    for (const std::string& e : r.errors) message += "\n  " + e;
    throw std::runtime_error(message);
  }
  count_launch_end();
  // Counted only once it completed: a launch that a check stopped did not cover its kernel.
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  ++reg.launched[kernel.name];
  reg.blocks[kernel.name] += int64_t(blocks);
}

}  // namespace aecr_emulation
