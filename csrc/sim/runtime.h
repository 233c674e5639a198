// The CPU execution layer's runtime: runs a kernel's blocks on OS threads, each block's CUDA
// threads as fibers that switch only at barriers and warp collectives, with shared memory as a
// per-block arena whose every byte is tracked (last writer, readers, barrier epoch).
//
// Kernel sources never include this file: they include common/gf.h, whose CPU half
// (common/sim_primitives.h) calls the functions below. Host code (the binding, tests) uses
// settings() and stats().
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <source_location>
#include <string>

#include <vector_types.h>

#include "common/launch.h"

namespace gf::sim {

using Site = std::source_location;

// Order in which threads of a block (between sync points) and blocks of a grid are run.
enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Settings {
  Order thread_order = Order::kForward;
  Order block_order = Order::kForward;
  uint64_t seed = 0;         // of the random orders
  int workers = 1;           // OS threads running blocks in parallel
  int arch = 80;             // the GPU whose limits and kernel configurations apply
  int num_sms = 4;           // what launchers see as the SM count (sizes split-K style grids)
  bool check_races = true;   // per-byte shared-memory tracking
};
Settings& settings();

struct Stats {
  uint64_t launches = 0, blocks = 0, barriers = 0, collectives = 0, cp_async = 0;
};
Stats stats();
void reset_stats();

// Identity of the running CUDA thread (what threadIdx, blockIdx, ... read).
struct ThreadView {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear;                // thread index within the block, x fastest
};
const ThreadView& view();

// Report a kernel error (a broken rule of the hardware) and stop the launch. Inside a kernel the
// current thread never resumes; the launch throws std::runtime_error with the message.
[[noreturn]] void fail(const std::string& what, Site site = Site::current());

// ---- shared memory -------------------------------------------------------------------------
unsigned char* smem_base();
size_t smem_size();
// Record an access of the current thread (or, for warp collectives, of `thread`): checks bounds
// and races, and that no pending cp.async owns the bytes.
void smem_read(uint32_t off, uint32_t bytes, const char* what);
void smem_write(uint32_t off, uint32_t bytes, const char* what);
void smem_read_by(int thread, uint32_t off, uint32_t bytes, const char* what);

// ---- synchronization -----------------------------------------------------------------------
void barrier(Site site);

// One lane's part of a warp collective. `resolve` runs once all 32 lanes of the warp arrived at
// the same call site with the same op and mask; it reads every lane's `in` and writes its `out`.
struct Lane {
  const void* in;
  void* out;
  int thread;                // linear thread index of this lane
};
using ResolveFn = void (*)(Lane (&lanes)[32]);
void warp_collective(const char* op, unsigned mask, ResolveFn resolve, const void* in, void* out,
                     Site site);
void warp_synced(int warp);  // called by sync_warp's resolve: that warp's epoch advances

// ---- cp.async --------------------------------------------------------------------------------
void cp_async(uint32_t dst_off, const void* src, int cp_size, int src_size, Site site);
void cp_async_commit(Site site);
void cp_async_wait(int pending_groups, Site site);

// ---- launch ----------------------------------------------------------------------------------
// Runs `body` once per CUDA thread of the grid. Throws std::invalid_argument for a launch the GPU
// would refuse and std::runtime_error for an error inside the kernel.
void launch(const LaunchConfig& config, const DeviceInfo& device, const std::function<void()>& body);

// The device a launcher sees on the CPU (from settings()).
DeviceInfo device_info();

}  // namespace gf::sim
