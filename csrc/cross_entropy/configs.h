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
