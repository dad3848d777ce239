// Checked device memory of the CUDA emulator (memory.h): bounds, the race record, shared-memory poisoning and
// initialisation, and the workspace check (workspaces.h).
#include "memory.h"

#include "traffic.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <sstream>
#include <unordered_map>
#include <vector>

namespace aecr_emulation {

// The last write and a summary of the reads of one byte.
struct Shadow {
  uint64_t write_serial = 0;  // block of the last write (0: none)
  uint32_t write_epoch = 0, write_warp_epoch = 0;
  uint32_t writer = 0;
  bool write_atomic = false;
  uint64_t read_serial = 0;  // block of the reads summarised (0: none)
  uint32_t read_epoch = 0;       // the block epoch of the reads summarised
  uint32_t read_warp_epoch = 0;  // the reader's own __syncwarp count at its latest read (one reader)
  uint32_t read_warps = 0;       // warps that read in that epoch
  uint32_t reader = 0;           // the last reader
  bool many_readers = false;     // more than one thread read in that epoch
  bool many_blocks = false;      // global memory: read by more than one block of the launch
  // With many readers: by lane, 1 + its own __syncwarp count at its latest read (0: no read). Lanes of other
  // warps share these entries, but a write after another warp's read in the same epoch is a race anyway.
  std::vector<uint32_t> lane_reads;
};

namespace {

struct Launch {
  std::unordered_map<uintptr_t, Shadow> global;  // by byte address, this launch only
  SharedRegion dynamic;
  std::vector<unsigned char> dynamic_bytes;
  std::vector<Shadow> dynamic_shadow;
};

thread_local Launch current_launch;

struct RegionStore {
  std::vector<std::unique_ptr<SharedRegion>> regions;
  std::vector<std::unique_ptr<std::vector<Shadow>>> shadows;
};

RegionStore& region_store() {
  static RegionStore store;
  return store;
}

std::string thread_name(uint32_t tid) {
  std::ostringstream s;
  s << "(" << tid % blockDim.x << "," << (tid / blockDim.x) % blockDim.y << "," << tid / (blockDim.x * blockDim.y)
    << ")";
  return s.str();
}

std::string what_memory(const Extent& e, const void* at) {
  std::ostringstream s;
  const auto offset = static_cast<const unsigned char*>(at) - e.lo;
  if (e.shared != nullptr) {
    s << "__shared__ array #" << e.shared->index << " (byte " << offset << " of " << (e.hi - e.lo) << ")";
  } else {
    s << "kernel argument #" << e.argument << " (byte " << offset << " of its tensor's " << (e.hi - e.lo) << ")";
  }
  return s.str();
}

const char* verb(Access kind) { return kind == Access::Read ? "reads" : kind == Access::Write ? "writes" : "atomically updates"; }

// Whether an earlier access by `other` in block `serial`, block epoch `epoch`, warp epoch `warp_epoch` is ordered
// before an access by the running thread. Accesses of another block are never ordered (global memory; in shared
// memory they are a previous block's and do not count).
bool ordered(uint64_t serial, uint32_t epoch, uint32_t other, uint32_t warp_epoch) {
  const Context& c = context;
  if (serial != c.block_serial) return false;
  if (other == c.tid || epoch < c.block_epoch) return true;
  return other / 32 == c.warp && warp_epoch < c.knows(other % 32);
}

// A read of this epoch by a lane of the running thread's warp that no __syncwarp orders before the running
// thread (another warp's reads are checked apart); returns that reader's thread index, or -1.
int64_t unordered_reader(const Shadow& c) {
  const Context& x = context;
  if (!c.many_readers) {
    const bool unordered = c.reader != x.tid && c.reader / 32 == x.warp && x.knows(c.reader % 32) <= c.read_warp_epoch;
    return unordered ? int64_t(c.reader) : -1;
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (lane == x.tid % 32 || c.lane_reads[lane] == 0) continue;
    if (x.knows(lane) <= c.lane_reads[lane] - 1) return int64_t(x.warp) * 32 + lane;
  }
  return -1;
}

void race(const Extent& e, const void* at, Access kind, const char* earlier, uint32_t other, bool other_block,
          bool& reported) {
  if (reported) return;
  reported = true;
  std::ostringstream s;
  s << (e.shared != nullptr ? "shared" : "global") << "-memory race: " << where() << " " << verb(kind) << " "
    << what_memory(e, at) << " that ";
  if (other_block) {
    s << "another block of the launch " << earlier << " (blocks are not ordered)";
  } else {
    s << "thread " << thread_name(other) << " " << earlier << " with no barrier between";
  }
  report(s.str());
}

// Checks an access against the cell's history and adds it; `reported` keeps an access of several bytes to one
// message.
void record(Shadow& c, const Extent& e, const void* at, Access kind, bool& reported) {
  const Context& x = context;
  const bool global = e.shared == nullptr;
  const bool stale_write = !global && c.write_serial != x.block_serial;  // a previous block's
  if (c.write_serial != 0 && !stale_write && !(kind == Access::Atomic && c.write_atomic) &&
      !ordered(c.write_serial, c.write_epoch, c.writer, c.write_warp_epoch)) {
    race(e, at, kind, c.write_atomic ? "updated atomically" : "wrote", c.writer, c.write_serial != x.block_serial,
         reported);
  }
  if (kind == Access::Read) {
    if (!global && c.write_serial != x.block_serial && !reported) {
      reported = true;
      report("uninitialised shared memory: " + where() + " reads " + what_memory(e, at) +
             ", which this block has not written");
    }
    if (c.read_serial != x.block_serial || c.read_epoch != x.block_epoch) {
      if (global && c.read_serial != 0 && c.read_serial != x.block_serial) c.many_blocks = true;
      c.read_serial = x.block_serial;
      c.read_epoch = x.block_epoch;
      c.read_warps = 0;
      c.read_warp_epoch = 0;
      c.many_readers = false;
      c.lane_reads.clear();
      c.reader = x.tid;
    }
    c.read_warps |= 1u << x.warp;
    if (c.reader != x.tid && !c.many_readers) {
      c.many_readers = true;
      c.lane_reads.assign(32, 0);
      c.lane_reads[c.reader % 32] = c.read_warp_epoch + 1;
    }
    c.reader = x.tid;
    c.read_warp_epoch = x.warp_epoch();
    if (c.many_readers) c.lane_reads[x.tid % 32] = std::max(c.lane_reads[x.tid % 32], x.warp_epoch() + 1);
    return;
  }
  if (global && (c.many_blocks || (c.read_serial != 0 && c.read_serial != x.block_serial))) {
    race(e, at, kind, "read", c.reader, true, reported);
  } else if (c.read_serial == x.block_serial && c.read_epoch == x.block_epoch) {
    const bool other_warp = (c.read_warps & ~(1u << x.warp)) != 0;
    const int64_t unordered = other_warp ? -1 : unordered_reader(c);
    if (other_warp || unordered >= 0) {
      race(e, at, kind, "read", other_warp ? c.reader : uint32_t(unordered), false, reported);
    }
  }
  c.write_serial = x.block_serial;
  c.write_epoch = x.block_epoch;
  c.write_warp_epoch = x.warp_epoch();
  c.writer = x.tid;
  c.write_atomic = kind == Access::Atomic;
}

}  // namespace

void touch(const void* at, size_t bytes, Access kind, const Extent& e) {
  const auto* p = static_cast<const unsigned char*>(at);
  if (p == nullptr) fail(where() + " " + verb(kind) + " through a null pointer (kernel argument #" +
                         std::to_string(e.argument) + ")");
  if (p < e.lo || p + bytes > e.hi) {
    std::ostringstream s;
    s << "out of bounds: " << where() << " " << verb(kind) << " " << bytes << " bytes at ";
    if (e.shared != nullptr) {
      s << "byte " << (p - e.lo) << " of __shared__ array #" << e.shared->index << " (" << (e.hi - e.lo) << " bytes)";
    } else {
      s << "byte " << (p - e.lo) << " of kernel argument #" << e.argument << ", whose tensor has " << (e.hi - e.lo)
        << " bytes";
    }
    fail(s.str());
  }
  if (context.kernel == nullptr) return;  // host code (not in a launch)
  if (counting()) {  // measuring (traffic.h): the checks below are off, the data being partly unwritten
    count_access(p, bytes, kind, e.shared != nullptr);
    return;
  }
  if (e.shared != nullptr) {
    std::vector<Shadow>& shadow = *e.shared->shadow;
    const size_t first = static_cast<size_t>(p - e.shared->data);
    bool reported = false;
    for (size_t i = 0; i < bytes; ++i) record(shadow[first + i], e, p + i, kind, reported);
    return;
  }
  if (e.workspace != nullptr &&
      check_workspace(*e.workspace, p, bytes, kind != Access::Write, kind != Access::Read)) {
    report("uninitialised global memory: " + where() + " " + verb(kind) + " " + what_memory(e, p) +
           ", which no kernel has written since it was allocated (it still holds the poison)");
  }
  if (!e.tracked && kind == Access::Read) return;
  // Byte by byte, so that accesses of different widths (a float4 and a float, a float and a bf16) meet.
  bool reported = false;
  const auto address = reinterpret_cast<uintptr_t>(p);
  for (size_t i = 0; i < bytes; ++i) record(current_launch.global[address + i], e, p + i, kind, reported);
}

SharedRegion* register_shared(unsigned char* data, size_t bytes) {
  KernelInfo* kernel = context.kernel;
  if (kernel == nullptr) throw std::runtime_error("CUDA emulation: a __shared__ array outside a kernel");
  RegionStore& store = region_store();
  store.shadows.push_back(std::make_unique<std::vector<Shadow>>(bytes));
  store.regions.push_back(std::make_unique<SharedRegion>());
  SharedRegion* r = store.regions.back().get();
  r->data = data;
  r->bytes = bytes;
  r->index = static_cast<int>(kernel->shared.size());
  r->shadow = store.shadows.back().get();
  kernel->shared.push_back(r);
  std::memset(data, 0xff, bytes);
  return r;
}

SharedRegion* dynamic_region() { return &current_launch.dynamic; }

void begin_launch(KernelInfo&, const LaunchShape& shape) {
  Launch& l = current_launch;
  l.global.clear();
  l.dynamic_bytes.assign(shape.dynamic_shared, 0xff);
  l.dynamic_shadow.assign(shape.dynamic_shared, Shadow{});
  l.dynamic.data = l.dynamic_bytes.data();
  l.dynamic.bytes = shape.dynamic_shared;
  l.dynamic.index = -1;
  l.dynamic.shadow = &l.dynamic_shadow;
}

// Shared memory holds garbage at the start of a block: 0xFF bytes (NaN in every floating-point type, -1 in
// integers) make a read of something the block did not write visible in its results too.
void begin_block(KernelInfo& kernel) {
  for (SharedRegion* r : kernel.shared) std::memset(r->data, 0xff, r->bytes);
  std::fill(current_launch.dynamic_bytes.begin(), current_launch.dynamic_bytes.end(), 0xff);
}

void end_block(KernelInfo& kernel) {
  size_t total = 0;
  for (const SharedRegion* r : kernel.shared) total += r->bytes;
  if (total > (48u << 10)) {
    report("invalid launch: " + std::to_string(total) + " bytes of static shared memory (at most 48 KB)");
  }
}

}  // namespace aecr_emulation
