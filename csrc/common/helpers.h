// Small building blocks made of the primitives (no PTX of their own): warp and block reductions
// and the online log-sum-exp merge.
#pragma once

#include <cmath>

namespace gf {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

GF_DEVICE float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

GF_DEVICE float warp_max(float v) {
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}

// Sums over the 4 lanes of an mma quad (the lanes sharing groupID = lane >> 2, which hold one
// row of a C fragment).
GF_DEVICE float quad_sum(float v) {
  v += shfl_xor(v, 1);
  v += shfl_xor(v, 2);
  return v;
}

GF_DEVICE float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  v = fmaxf(v, shfl_xor(v, 2));
  return v;
}

// Running log-sum-exp in base 2: m = max of the values seen, s = sum of 2^(value - m).
// Merging two partial results; an empty part has m = -inf, s = 0.
GF_DEVICE void lse2_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty (and -inf - -inf would be NaN)
  s = s * exp2_approx(m - mn) + s2 * exp2_approx(m2 - mn);
  m = mn;
}

// The whole block's sum, returned to every thread. `scratch` holds >= blockDim / 32 floats and
// may be reused after the call (the trailing barrier orders its reads before later writes).
template <class P>
GF_DEVICE float block_sum(float v, P scratch) {
  const int nwarps = int(blockDim.x * blockDim.y * blockDim.z) / 32;
  v = warp_sum(v);
  if (lane_id() == 0) scratch[warp_id()] = v;
  sync_block();
  float r = lane_id() < nwarps ? float(scratch[lane_id()]) : 0.0f;
  r = warp_sum(r);
  sync_block();
  return r;
}

}  // namespace gf
