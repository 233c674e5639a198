// Launch contract shared by the GPU build and the CPU execution layer: the device facts a
// launcher may use, one launch's configuration, and the limits a GPU enforces on it.
// Host code only; no CUDA keywords, no torch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <driver_types.h>  // cudaStream_t (a plain pointer type, usable on the host)
#include <vector_types.h>  // dim3, uint3, float4, uint4

namespace gf {

using Stream = cudaStream_t;

// Element type of a kernel's floating-point tensors (its template parameter).
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// What a launcher may know about the device it launches on. The CPU layer fills these from its
// settings, so the configurations of every architecture can be run on a CPU.
struct DeviceInfo {
  int arch = 80;              // compute capability * 10 (80: A100, 90: H100/H200)
  int num_sms = 108;
  size_t smem_optin = 0;      // bytes of dynamic shared memory a block may opt in to (0: arch max)
};

struct LaunchConfig {
  const char* name = "kernel";
  dim3 grid{1, 1, 1};
  dim3 block{1, 1, 1};
  size_t smem = 0;            // dynamic shared memory, bytes
  bool smem_opt_in = false;   // true: the kernel asks for more than the 48 KiB default
  Stream stream = nullptr;
};

constexpr size_t kDefaultSmemPerBlock = 48u << 10;

// The most dynamic shared memory one block can opt in to (CUDA programming guide, "Technical
// Specifications per Compute Capability"): 163 KiB on sm_80, 227 KiB on sm_90.
constexpr size_t max_smem_optin(int arch) {
  return arch >= 90 ? 227u << 10 : arch >= 80 ? 163u << 10 : 99u << 10;
}

// Throws std::invalid_argument naming the kernel and the violated limit. Called by both
// launch implementations, so a configuration the GPU would reject fails on the CPU too.
inline void check_launch(const LaunchConfig& c, const DeviceInfo& dev) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(std::string("launch of ") + c.name + ": " + why);
  };
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0) fail("a block dimension is 0");
  if (c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64)
    fail("block dimensions exceed (1024, 1024, 64)");
  if (threads > 1024) fail("more than 1024 threads per block (" + std::to_string(threads) + ")");
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) fail("a grid dimension is 0");
  if (c.grid.x > 0x7fffffffu) fail("grid.x exceeds 2^31 - 1");
  if (c.grid.y > 65535 || c.grid.z > 65535)
    fail("grid.y / grid.z exceed 65535 (" + std::to_string(c.grid.y) + ", " +
         std::to_string(c.grid.z) + ")");
  const size_t cap = dev.smem_optin ? dev.smem_optin : max_smem_optin(dev.arch);
  if (!c.smem_opt_in && c.smem > kDefaultSmemPerBlock)
    fail(std::to_string(c.smem) + " bytes of shared memory without opting in (limit 48 KiB)");
  if (c.smem > cap)
    fail(std::to_string(c.smem) + " bytes of shared memory exceed sm_" +
         std::to_string(dev.arch) + "'s " + std::to_string(cap) + " bytes per block");
}

// Bytes a sequence of shared-memory carvings occupies, with the arena's alignment rule
// (SmemArena::take): the host computes a launch's dynamic shared memory with this.
constexpr size_t smem_align_up(size_t off, size_t align) { return (off + align - 1) / align * align; }

}  // namespace gf
