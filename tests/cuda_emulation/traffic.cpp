// The emulator's traffic counts (traffic.h).
#include "traffic.h"

#include <algorithm>
#include <list>
#include <unordered_map>
#include <unordered_set>

#include "emulator.h"
#include "memory.h"

namespace aecr_emulation {
namespace {

struct Record {
  uintptr_t address;
  uint32_t bytes;
  Access kind;
  bool shared;
};

struct State {
  bool on = false;
  TrafficOptions options;
  std::vector<LaunchTraffic> launches;
  // The launch being counted.
  bool launch_counted = false;
  LaunchTraffic current;
  std::vector<std::vector<Record>> pending;     // by thread of the block: accesses since its warp last met
  std::vector<std::vector<uint64_t>> warp_traces;  // sector << 1 | written, by warp, since the block last met
  std::vector<uint64_t> block_trace;               // of the running block: its warps' interleaved
  std::vector<std::vector<uint64_t>> traces;    // of the blocks counted, in block order
  int uncounted = 0;
};

thread_local State state;

constexpr unsigned kSectorShift = 5;  // 32-byte sectors
constexpr unsigned kBanks = 32;

using Lanes = std::vector<std::pair<unsigned, const Record*>>;  // (lane, its access) of one instruction

void count_shared_request(const Lanes& lanes, LaunchTraffic& t) {
  uint32_t width = 0;
  for (const auto& [lane, r] : lanes) width = std::max(width, r->bytes);
  // 4-byte accesses and narrower: one phase of 32 lanes; 8-byte: two of 16; 16-byte: four of 8.
  const unsigned per_phase = width <= 4 ? 32 : width <= 8 ? 16 : 8;
  int64_t wavefronts = 0;
  for (unsigned start = 0; start < 32; start += per_phase) {
    std::vector<std::vector<uintptr_t>> words(kBanks);
    bool any = false;
    for (const auto& [lane, r] : lanes) {
      if (lane < start || lane >= start + per_phase) continue;
      any = true;
      for (uintptr_t word = r->address >> 2; word <= (r->address + r->bytes - 1) >> 2; ++word) {
        auto& bank = words[word % kBanks];
        if (std::find(bank.begin(), bank.end(), word) == bank.end()) bank.push_back(word);
      }
    }
    if (!any) continue;
    size_t most = 1;
    for (const auto& bank : words) most = std::max(most, bank.size());
    wavefronts += static_cast<int64_t>(most);
  }
  ++t.shared_requests;
  t.shared_wavefronts += wavefronts;
}

void count_global_request(const Lanes& lanes, size_t warp, LaunchTraffic& t) {
  std::vector<uint64_t> sectors;
  for (const auto& [lane, r] : lanes) {
    for (uint64_t s = r->address >> kSectorShift; s <= (r->address + r->bytes - 1) >> kSectorShift; ++s) {
      sectors.push_back(s);
    }
  }
  std::sort(sectors.begin(), sectors.end());
  sectors.erase(std::unique(sectors.begin(), sectors.end()), sectors.end());
  const Access kind = lanes.front().second->kind;
  const auto n = static_cast<int64_t>(sectors.size());
  if (kind == Access::Read) {
    ++t.load_requests;
    t.load_sectors += n;
  } else if (kind == Access::Write) {
    ++t.store_requests;
    t.store_sectors += n;
  } else {
    ++t.atomic_requests;
    t.atomic_sectors += n;
    t.atomics += static_cast<int64_t>(lanes.size());
  }
  const uint64_t written = kind == Access::Read ? 0 : 1;
  for (const uint64_t s : sectors) state.warp_traces[warp].push_back(s << 1 | written);
}

// The lanes of warp `w` met: their i-th accesses form one instruction each (lanes that made fewer accesses,
// having diverged, take no part in the later ones). Lanes whose i-th accesses differ in memory or kind are
// counted as separate instructions.
void flush_warp(size_t w) {
  State& s = state;
  const size_t lo = 32 * w, hi = std::min(s.pending.size(), lo + 32);
  size_t longest = 0;
  for (size_t t = lo; t < hi; ++t) longest = std::max(longest, s.pending[t].size());
  Lanes group;
  for (size_t i = 0; i < longest; ++i) {
    for (const bool shared : {false, true}) {
      for (const Access kind : {Access::Read, Access::Write, Access::Atomic}) {
        group.clear();
        for (size_t t = lo; t < hi; ++t) {
          if (i < s.pending[t].size() && s.pending[t][i].shared == shared && s.pending[t][i].kind == kind) {
            group.emplace_back(static_cast<unsigned>(t - lo), &s.pending[t][i]);
          }
        }
        if (group.empty()) continue;
        if (shared) {
          count_shared_request(group, s.current);
        } else {
          count_global_request(group, w, s.current);
        }
      }
    }
  }
  for (size_t t = lo; t < hi; ++t) s.pending[t].clear();
}

// DRAM sectors of the launch's trace through an LRU cache of `capacity` sectors, the blocks of each wave
// interleaved sector by sector.
int64_t dram_sectors(const std::vector<std::vector<uint64_t>>& traces, int64_t wave, int64_t capacity) {
  std::list<uint64_t> order;  // most recent first
  struct Line {
    std::list<uint64_t>::iterator at;
    bool dirty;
  };
  std::unordered_map<uint64_t, Line> lines;
  int64_t traffic = 0;
  auto touch = [&](uint64_t entry) {
    const uint64_t sector = entry >> 1;
    const bool written = (entry & 1) != 0;
    auto it = lines.find(sector);
    if (it != lines.end()) {
      order.splice(order.begin(), order, it->second.at);
      it->second.dirty |= written;
      return;
    }
    if (!written) ++traffic;  // a read miss fetches the sector (a write fills it whole: 32-byte sectors)
    order.push_front(sector);
    lines.emplace(sector, Line{order.begin(), written});
    if (static_cast<int64_t>(lines.size()) > capacity) {
      const uint64_t victim = order.back();
      order.pop_back();
      auto v = lines.find(victim);
      if (v->second.dirty) ++traffic;
      lines.erase(v);
    }
  };
  for (size_t first = 0; first < traces.size(); first += static_cast<size_t>(wave)) {
    const size_t last = std::min(traces.size(), first + static_cast<size_t>(wave));
    size_t longest = 0;
    for (size_t b = first; b < last; ++b) longest = std::max(longest, traces[b].size());
    for (size_t i = 0; i < longest; ++i) {
      for (size_t b = first; b < last; ++b) {
        if (i < traces[b].size()) touch(traces[b][i]);
      }
    }
  }
  for (const auto& [sector, line] : lines) traffic += line.dirty ? 1 : 0;
  return traffic;
}

int64_t blocks_per_sm(const TrafficOptions& o, int64_t threads, int registers, int64_t shared_bytes) {
  const int64_t warps = (threads + 31) / 32;
  int64_t n = std::min(o.blocks_per_sm, o.threads_per_sm / (warps * 32));
  if (registers > 0) {
    n = std::min(n, o.registers_per_sm / (warp_registers(registers) * warps));
  }
  n = std::min(n, o.shared_per_sm / (shared_bytes + 1024));  // 1 KB a block is reserved by the system
  return std::max<int64_t>(n, 1);
}

}  // namespace

void start_counting(const TrafficOptions& options) {
  state.on = true;
  state.options = options;
  state.launches.clear();
}

void stop_counting() { state.on = false; }
bool counting() { return state.on; }
const std::vector<LaunchTraffic>& counted_launches() { return state.launches; }

void count_access(const void* at, size_t bytes, Access kind, bool shared) {
  State& s = state;
  if (!s.launch_counted || s.uncounted > 0) return;
  s.pending[context.tid].push_back(Record{reinterpret_cast<uintptr_t>(at), static_cast<uint32_t>(bytes), kind, shared});
}

void count_mma(double flops) {
  if (state.launch_counted) state.current.mma_flops += flops;
}

void count_flops(size_t element_bytes, double flops) {
  if (!state.launch_counted || context.kernel == nullptr) return;
  (element_bytes == 8 ? state.current.fp64_flops : state.current.fp32_flops) += flops;
}

UncountedAccesses::UncountedAccesses() { ++state.uncounted; }
UncountedAccesses::~UncountedAccesses() { --state.uncounted; }

void count_launch(const std::string& kernel, int64_t blocks, int64_t threads, int registers, int64_t shared_bytes,
                  int64_t& first, int64_t& count) {
  State& s = state;
  first = 0;
  count = blocks;
  s.launch_counted = s.on;
  if (!s.on) return;
  s.current = LaunchTraffic{};
  s.current.kernel = kernel;
  s.current.blocks = blocks;
  s.current.threads = threads;
  s.current.wave_blocks = s.options.multiprocessors * blocks_per_sm(s.options, threads, registers, shared_bytes);
  s.traces.clear();
  if (s.options.sample_blocks > 0 && blocks > s.options.sample_blocks) {
    count = s.options.sample_blocks;
    first = std::min(blocks / 2 / s.current.wave_blocks * s.current.wave_blocks, blocks - count);
  }
  s.current.blocks_counted = count;
}

void count_block_start(size_t threads) {
  if (!state.launch_counted) return;
  state.pending.assign(threads, {});
  state.warp_traces.assign((threads + 31) / 32, {});
  state.block_trace.clear();
}

void count_warp_met(size_t warp) {
  if (state.launch_counted) flush_warp(warp);
}

// The whole block met: its warps' sectors since they last met join the block's trace interleaved (the warps of a
// block run side by side, not one after the other as the emulator runs them).
void count_block_met() {
  State& s = state;
  if (!s.launch_counted) return;
  size_t longest = 0;
  for (size_t w = 0; w < s.warp_traces.size(); ++w) {
    flush_warp(w);
    longest = std::max(longest, s.warp_traces[w].size());
  }
  for (size_t i = 0; i < longest; ++i) {
    for (const auto& trace : s.warp_traces) {
      if (i < trace.size()) s.block_trace.push_back(trace[i]);
    }
  }
  for (auto& trace : s.warp_traces) trace.clear();
}

void count_block_end() {
  if (!state.launch_counted) return;
  count_block_met();
  state.traces.push_back(std::move(state.block_trace));
  state.block_trace.clear();
}

void count_launch_end() {
  State& s = state;
  if (!s.launch_counted) return;
  s.launch_counted = false;
  std::unordered_set<uint64_t> distinct;
  for (const auto& trace : s.traces) {
    for (const uint64_t e : trace) distinct.insert(e >> 1);
  }
  s.current.distinct_sectors = static_cast<int64_t>(distinct.size());
  for (const int64_t l2 : s.options.l2_bytes) {
    s.current.dram_sectors.push_back(dram_sectors(s.traces, s.current.wave_blocks, l2 >> kSectorShift));
  }
  s.traces.clear();
  s.launches.push_back(std::move(s.current));
}

}  // namespace aecr_emulation
