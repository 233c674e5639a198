// Kernel configurations (data): the launchers look these up; tuning edits this file only.
#pragma once

#include <cstdint>

namespace gf::ce {

// Row kernels (cross-entropy over given logits): threads per block by vocabulary size. A block
// owns one row; each thread streams 16-byte vectors of it, so a GPT-2/Llama vocabulary (50k-256k)
// gives each of 512 threads 12-63 vectors per pass. Untuned on hardware.
struct RowConfig {
  int64_t max_v;
  int threads;
};
inline constexpr RowConfig kRowConfigs[] = {
    {256, 32}, {2048, 128}, {16384, 256}, {INT64_MAX, 512},
};

}  // namespace gf::ce

namespace gf::ce {

// Linear cross-entropy tiles (compile-time: they size register arrays; the same on sm_80 and
// sm_90). A block computes a block_n x block_v logits tile with `warps` warps in a 2 x 2 layout
// (each warp 32 x 32 = 2 x 4 mma.m16n8k16 tiles), streaming D through a `stages`-deep cp.async
// pipeline in block_k steps. Shared memory: 30 KiB forward, 39 KiB backward (no opt-in needed).
// Untuned on hardware: 64 x 64 keeps the CPU-layer tests small; larger tiles are the first
// thing to try on a GPU.
struct LinearTile {
  int block_n, block_v, block_k, warps, stages;
};
inline constexpr LinearTile kLinearTile{64, 64, 32, 4, 3};

// fp32 scratch the lean backward may hold for its accumulators (dhidden and dweight windows).
// With the 4 MiB slices in which dhidden is scattered back, the forward's partials (16 bytes per
// row and vocabulary split) and the row order (8 bytes per row), the working set stays under the
// 64 MiB the lean schedule promises beyond the gradients.
inline constexpr int64_t kLinearScratchBytes = int64_t(48) << 20;

}  // namespace gf::ce
