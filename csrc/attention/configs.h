// Attention tile configurations (data): the kernels read them at compile time (they size
// register arrays), per head dim; tuning edits this file only. Every block is `warps` warps of
// 16-row mma.m16n8k16 strips; shared-memory rows are padded by 8 elements (16 bytes), so the 8
// row addresses of an ldmatrix fall in distinct bank groups.
//
// FlashAttention-2's sm_80 choices guided these (forward 128 x 64 / 128 x 32 with 4 warps,
// backward 128-key tiles with 8 warps), trimmed so that no kernel spills at 255 registers
// (benchmarks/results/static/cuda_resources.md). Untuned on hardware: no GPU has run them yet.
//
// A Hopper path (wgmma, TMA, warp specialization) would add its own kernels and table beside
// these and be chosen by the launchers in fwd.cu / bwd.cu for dev.arch >= 90; this mma.sync path
// runs on sm_80 and sm_90 alike.
#pragma once

#include <utility>

namespace gf::attn {

// Forward: a block owns block_m = 16 * warps * m_tiles queries (warp w: m_tiles strips of 16
// rows) and streams key tiles of block_n through `stages` cp.async buffers of K and V.
struct FwdTile {
  int warps, m_tiles, block_n, stages;
};
// dK/dV: a block owns block_n = 16 * warps keys (one 16-row strip per warp) and streams query
// tiles of block_m (Q and dO, `stages` buffers), over every query head of its GQA group.
struct BwdKvTile {
  int warps, block_m, stages;
};
// Deterministic dQ: a block owns block_m = 16 * warps queries and streams key tiles of block_n.
struct BwdQTile {
  int warps, block_n, stages;
};

// Head dims with kernels. Each one is compiled for fp16 and bf16 (and both archs): the build
// budget (csrc/README.md) bounds this list.
using HeadDims = std::integer_sequence<int, 64, 96, 128>;

template <int D> struct Config;
template <> struct Config<64> {
  static constexpr FwdTile fwd{4, 2, 64, 2};     // 128 x 64, 55 KiB
  static constexpr BwdKvTile bwd_kv{8, 64, 2};   // 128 keys x 64 queries
  static constexpr BwdQTile bwd_q{4, 64, 2};     // 64 x 64
};
template <> struct Config<96> {
  static constexpr FwdTile fwd{4, 2, 32, 2};     // 128 x 32
  static constexpr BwdKvTile bwd_kv{8, 64, 2};   // 128 keys x 64 queries (the dQ split needs 64)
  static constexpr BwdQTile bwd_q{4, 64, 2};     // 64 x 64
};
template <> struct Config<128> {
  static constexpr FwdTile fwd{4, 2, 32, 2};     // 128 x 32
  static constexpr BwdKvTile bwd_kv{8, 32, 2};   // 128 keys x 32 queries
  static constexpr BwdQTile bwd_q{4, 64, 2};     // 64 x 64
};

// The backward's preprocess (delta = rowsum(dO O) - dlse, dQ accumulator zeroed): threads per block.
inline constexpr int kPreprocessThreads = 128;

}  // namespace gf::attn
