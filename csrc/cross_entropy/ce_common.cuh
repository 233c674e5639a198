// Device helpers shared by the cross-entropy kernels: 16-byte vectors of T, the softcap and the
// online log-sum-exp of a row. Included by kernel sources only (after common/gf.h).
#pragma once

namespace gf::ce {

template <class T> constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte vector

// 16 bytes of T -> fp32 values, and back.
template <class T>
GF_DEVICE void unpack_vec(const uint4& raw, float (&out)[kVec<T>]) {
  if constexpr (sizeof(T) == 4) {
    out[0] = bit_cast<float>(raw.x);
    out[1] = bit_cast<float>(raw.y);
    out[2] = bit_cast<float>(raw.z);
    out[3] = bit_cast<float>(raw.w);
  } else {
    unpack2<T>(raw.x, out[0], out[1]);
    unpack2<T>(raw.y, out[2], out[3]);
    unpack2<T>(raw.z, out[4], out[5]);
    unpack2<T>(raw.w, out[6], out[7]);
  }
}

template <class T>
GF_DEVICE uint4 pack_vec(const float (&in)[kVec<T>]) {
  uint4 raw;
  if constexpr (sizeof(T) == 4) {
    raw.x = bit_cast<uint32_t>(in[0]);
    raw.y = bit_cast<uint32_t>(in[1]);
    raw.z = bit_cast<uint32_t>(in[2]);
    raw.w = bit_cast<uint32_t>(in[3]);
  } else {
    raw.x = pack2<T>(in[0], in[1]);
    raw.y = pack2<T>(in[2], in[3]);
    raw.z = pack2<T>(in[4], in[5]);
    raw.w = pack2<T>(in[6], in[7]);
  }
  return raw;
}

GF_DEVICE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// softcap c > 0: c * tanh(x / c); otherwise x.
GF_DEVICE float soft(float x, float c) { return c > 0.0f ? c * tanhf(x / c) : x; }

// Online log-sum-exp state of one thread, in base 2 (y = x log2 e): m = max y, s = sum 2^(y - m).
struct RowStats {
  float m = -INFINITY, s = 0.0f, sum_x = 0.0f;

  GF_DEVICE void add(float x) {
    sum_x += x;
    const float y = x * kLog2e;
    if (y > m) {
      s = s * exp2_approx(m - y) + 1.0f;
      m = y;
    } else if (y != -INFINITY) {  // exp2(-inf) = 0; a NaN still reaches s
      s += exp2_approx(y - m);
    }
  }
  GF_DEVICE void merge(float m2, float s2, float sum_x2) {
    lse2_merge(m, s, m2, s2);
    sum_x += sum_x2;
  }
  GF_DEVICE void warp_reduce() {
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = shfl_xor(m, off), s2 = shfl_xor(s, off), x2 = shfl_xor(sum_x, off);
      merge(m2, s2, x2);
    }
  }
};

}  // namespace gf::ce
