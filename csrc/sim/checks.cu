// Deliberately broken kernels (and their correct twins): each breaks one rule the GPU has, and
// tests/test_cuda_sim_checks.py asserts that the CPU layer reports it instead of passing.
// Built into the CPU-layer module only.
#include <map>
#include <stdexcept>
#include <string>

#include "common/gf.h"
#include "sim/checks.h"

namespace gf::sim_checks {
namespace {

// Each thread writes its slot, then reads its neighbour's: a race unless a barrier separates them.
__global__ void neighbour_kernel(float* out, int with_barrier) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(blockDim.x);
  const int t = int(threadIdx.x);
  s[t] = float(t);
  if (with_barrier) sync_block();
  out[t] = s[(t + 1) % int(blockDim.x)];
}

// Same, within one warp, ordered by sync_warp (enough inside a warp) or by nothing.
__global__ void warp_neighbour_kernel(float* out, int with_sync) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(32);
  const int t = int(threadIdx.x);
  s[t] = float(t);
  if (with_sync) sync_warp();
  out[t] = s[(t + 1) % 32];
}

// Reads, then (without a barrier) another thread overwrites what was read.
__global__ void write_after_read_kernel(float* out, int with_barrier) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(64);
  const int t = int(threadIdx.x);
  s[t] = 1.0f;
  sync_block();
  out[t] = s[(t + 32) % 64];
  if (with_barrier) sync_block();
  s[t] = 2.0f;
}

// Thread 5 returns early; the others wait at a barrier it never reaches.
__global__ void skipped_barrier_kernel(float* out, int) {
  if (threadIdx.x == 5) return;
  sync_block();
  out[threadIdx.x] = 1.0f;
}

// Two halves of the block at two different barriers.
__global__ void different_barriers_kernel(float* out, int) {
  if (threadIdx.x < 32) {
    sync_block();
  } else {
    sync_block();
  }
  out[threadIdx.x] = 1.0f;
}

// Lanes of one warp at two different shuffles (divergent collective).
__global__ void divergent_shuffle_kernel(float* out, int) {
  float v = float(threadIdx.x);
  if (lane_id() < 16) {
    v = shfl_xor(v, 1);
  } else {
    v = shfl_xor(v, 2);
  }
  out[threadIdx.x] = v;
}

// Some lanes exit while the others shuffle.
__global__ void exited_lane_shuffle_kernel(float* out, int) {
  if (lane_id() == 31) return;
  out[threadIdx.x] = shfl_xor(float(threadIdx.x), 1);
}

// A shuffle in a block of 48 threads (a warp of 16).
__global__ void partial_warp_kernel(float* out, int) { out[threadIdx.x] = shfl_xor(1.0f, 1); }

// Reads a cp.async destination before (or, with `wait`, after) cp_async_wait.
__global__ void cp_async_early_read_kernel(const float* src, float* out, int wait) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(32 * 4);
  const int t = int(threadIdx.x);
  cp_async<16>(s + 4 * t, src + 4 * t);
  cp_async_commit();
  if (wait) cp_async_wait<0>();
  out[t] = s[4 * t];
  if (!wait) cp_async_wait<0>();
}

// Thread t reads what thread t+1's cp.async wrote: needs the writer's wait and a barrier.
__global__ void cp_async_other_thread_kernel(const float* src, float* out, int with_barrier) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(32 * 4);
  const int t = int(threadIdx.x);
  cp_async<16>(s + 4 * t, src + 4 * t);
  cp_async_commit();
  cp_async_wait<0>();
  if (with_barrier) sync_block();
  out[t] = s[4 * ((t + 1) % 32)];
}

// Issues a cp.async and never waits for it.
__global__ void cp_async_never_waited_kernel(const float* src, float* out, int) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(32 * 4);
  cp_async<16>(s + 4 * int(threadIdx.x), src + 4 * int(threadIdx.x));
  cp_async_commit();
  out[threadIdx.x] = 1.0f;
}

// cp.async of 16 bytes from a source 4 bytes past an aligned address.
__global__ void cp_async_misaligned_kernel(const float* src, float* out, int) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(32 * 4 + 4);
  cp_async<16>(s + 4 * int(threadIdx.x), src + 1 + 4 * int(threadIdx.x));
  cp_async_commit();
  cp_async_wait<0>();
  out[threadIdx.x] = 1.0f;
}

// ldmatrix with a row address 8 bytes off 16-byte alignment.
__global__ void ldmatrix_misaligned_kernel(const float*, float* out, int) {
  SmemArena arena = smem_arena();
  SmemPtr<uint16_t> s = arena.take<uint16_t>(32 * 8 + 4);
  for (int c = 0; c < 8; ++c) s[lane_id() * 8 + c] = uint16_t(c);
  if (lane_id() == 0)
    for (int c = 0; c < 4; ++c) s[32 * 8 + c] = uint16_t(c);
  sync_warp();
  uint32_t r[4];
  ldmatrix_x4(r, s + lane_id() * 8 + 4);
  out[threadIdx.x] = float(r[0]);
}

// A 16-byte vector load from an address aligned to 4 only.
__global__ void vector_load_misaligned_kernel(const float* src, float* out, int) {
  const float4 v = load_global<float4>(src + 1);
  out[threadIdx.x] = v.x;
}

// Reads shared memory nobody wrote.
__global__ void uninitialized_read_kernel(const float*, float* out, int) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(32);
  out[threadIdx.x] = s[threadIdx.x];
}

// Carves more shared memory than the launch provides.
__global__ void arena_overflow_kernel(const float*, float* out, int) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(1024);
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = 1.0f;
}

// Writes one element past the end of `out` (64 threads, 64 outputs): the guard band catches it.
__global__ void oob_write_kernel(const float*, float* out, int) { out[threadIdx.x + 1] = 1.0f; }

// Reads one element before the start of `src`: the guard band makes it NaN.
__global__ void oob_read_kernel(const float* src, float* out, int) {
  out[threadIdx.x] = src[int(threadIdx.x) - 1];
}

// Signed overflow for arg = 1 (UBSan stops the sanitizer build; only run there).
__global__ void signed_overflow_kernel(const float*, float* out, int arg) {
  int x = 2147483647 - int(threadIdx.x) * arg;
  x += arg;
  out[threadIdx.x] = float(x);
}

// Reads `arg` elements before the input, past its guard band (ASan stops the sanitizer build;
// only run there).
__global__ void heap_overflow_kernel(const float* src, float* out, int arg) {
  out[threadIdx.x] = src[int(threadIdx.x) - arg];
}

// Deterministic in any order: every output written by exactly one thread.
__global__ void clean_kernel(const float* src, float* out, int) {
  SmemArena arena = smem_arena();
  SmemPtr<float> s = arena.take<float>(blockDim.x);
  const int t = int(threadIdx.x);
  s[t] = src[blockIdx.x * blockDim.x + t] * 2.0f;
  sync_block();
  out[blockIdx.x * blockDim.x + t] = s[blockDim.x - 1 - t] + float(blockIdx.x);
}

using Launcher = void (*)(const float*, float*, int, const DeviceInfo&);

LaunchConfig cfg(const char* name, unsigned threads, size_t smem) {
  LaunchConfig c;
  c.name = name;
  c.block = dim3(threads, 1, 1);
  c.smem = smem;
  return c;
}

const std::map<std::string, Launcher>& registry() {
  static const std::map<std::string, Launcher> r = {
      {"neighbour", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(neighbour_kernel, cfg("neighbour", 64, 256), d, o, a); }},
      {"warp_neighbour", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(warp_neighbour_kernel, cfg("warp_neighbour", 32, 128), d, o, a); }},
      {"write_after_read", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(write_after_read_kernel, cfg("write_after_read", 64, 256), d, o, a); }},
      {"skipped_barrier", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(skipped_barrier_kernel, cfg("skipped_barrier", 64, 0), d, o, a); }},
      {"different_barriers", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(different_barriers_kernel, cfg("different_barriers", 64, 0), d, o, a); }},
      {"divergent_shuffle", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(divergent_shuffle_kernel, cfg("divergent_shuffle", 32, 0), d, o, a); }},
      {"exited_lane_shuffle", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(exited_lane_shuffle_kernel, cfg("exited_lane_shuffle", 32, 0), d, o, a); }},
      {"partial_warp", [](const float*, float* o, int a, const DeviceInfo& d) {
         launch(partial_warp_kernel, cfg("partial_warp", 48, 0), d, o, a); }},
      {"cp_async_early_read", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(cp_async_early_read_kernel, cfg("cp_async_early_read", 32, 512), d, s, o, a); }},
      {"cp_async_other_thread", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(cp_async_other_thread_kernel, cfg("cp_async_other_thread", 32, 512), d, s, o, a); }},
      {"cp_async_never_waited", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(cp_async_never_waited_kernel, cfg("cp_async_never_waited", 32, 512), d, s, o, a); }},
      {"cp_async_misaligned", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(cp_async_misaligned_kernel, cfg("cp_async_misaligned", 32, 528), d, s, o, a); }},
      {"ldmatrix_misaligned", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(ldmatrix_misaligned_kernel, cfg("ldmatrix_misaligned", 32, 528), d, s, o, a); }},
      {"vector_load_misaligned", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(vector_load_misaligned_kernel, cfg("vector_load_misaligned", 32, 0), d, s, o, a); }},
      {"uninitialized_read", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(uninitialized_read_kernel, cfg("uninitialized_read", 32, 128), d, s, o, a); }},
      {"arena_overflow", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(arena_overflow_kernel, cfg("arena_overflow", 32, 1024), d, s, o, a); }},
      {"oob_write", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(oob_write_kernel, cfg("oob_write", 64, 0), d, s, o, a); }},
      {"oob_read", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(oob_read_kernel, cfg("oob_read", 64, 0), d, s, o, a); }},
      {"signed_overflow", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(signed_overflow_kernel, cfg("signed_overflow", 32, 0), d, s, o, a); }},
      {"heap_overflow", [](const float* s, float* o, int a, const DeviceInfo& d) {
         launch(heap_overflow_kernel, cfg("heap_overflow", 32, 0), d, s, o, a); }},
      {"clean", [](const float* s, float* o, int a, const DeviceInfo& d) {
         LaunchConfig c = cfg("clean", 64, 256);
         c.grid = dim3(unsigned(a), 1, 1);
         launch(clean_kernel, c, d, s, o, a); }},
  };
  return r;
}

}  // namespace

std::vector<std::string> names() {
  std::vector<std::string> out;
  for (const auto& kv : registry()) out.push_back(kv.first);
  return out;
}

void run(const std::string& name, const float* src, float* out, int arg, const DeviceInfo& dev) {
  auto it = registry().find(name);
  if (it == registry().end()) throw std::invalid_argument("unknown CUDA sim check " + name);
  it->second(src, out, arg, dev);
}

// A launch with an explicit configuration (grid, block, shared memory): the launch limits.
void launch_with(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                 size_t smem, bool opt_in, const DeviceInfo& dev) {
  LaunchConfig c;
  c.name = "limits";
  c.grid = dim3(gx, gy, gz);
  c.block = dim3(bx, by, bz);
  c.smem = smem;
  c.smem_opt_in = opt_in;
  check_launch(c, dev);  // the configuration alone; no kernel needs to run
}

}  // namespace gf::sim_checks
