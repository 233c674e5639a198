// Counter-based random numbers made of the primitives (no PTX of their own): the stream of
// Triton's `tl.rand(seed, offset)` (triton/language/random.py: Philox4x32 with 10 rounds, the
// 64-bit offset split into the two low counter words, the 64-bit seed into the key, the first
// output word mapped to [0, 1)), so a dropout mask drawn here is the one Triton's kernels draw for
// the same seed and counter. Stateless: the backward regenerates any element from (seed, counter).
#pragma once

#include <cstdint>

namespace gf {

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) on the
// counter (c0, c1, 0, 0) and key (k0, k1); returns the first output word.
GF_DEVICE uint32_t philox4x32_10_first(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;  // multipliers
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;      // Weyl key increments
  uint32_t c2 = 0, c3 = 0;
  #pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = umulhi(kRoundB, a2) ^ c1 ^ k0;
    c2 = umulhi(kRoundA, a0) ^ c3 ^ k1;
    c1 = kRoundB * a2;
    c3 = kRoundA * a0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// tl.rand(seed, offset) for an int64 seed and a non-negative int64 offset: uniform in [0, 1).
// The word is read as int32, negative values complemented, then scaled in fp32 (Triton's
// uint_to_uniform_float: int32 -> fp32 rounds to nearest, then one fp32 multiply).
GF_DEVICE float philox_uniform(uint64_t seed, uint64_t offset) {
  const uint32_t w = philox4x32_10_first(uint32_t(offset), uint32_t(offset >> 32),
                                         uint32_t(seed), uint32_t(seed >> 32));
  int32_t x = bit_cast<int32_t>(w);
  if (x < 0) x = ~x;
  return float(x) * 4.6566127342e-10f;
}

}  // namespace gf
