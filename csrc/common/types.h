// Storage types and conversions, identical on the GPU and on the CPU (cuda_fp16.h and
// cuda_bf16.h implement them for the host too, with the same round-to-nearest-even).
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gf {

using half = __half;
using bf16 = __nv_bfloat16;

template <class T> GF_HOST_DEVICE float to_float(T v);
template <> GF_HOST_DEVICE float to_float<float>(float v) { return v; }
template <> GF_HOST_DEVICE float to_float<half>(half v) { return __half2float(v); }
template <> GF_HOST_DEVICE float to_float<bf16>(bf16 v) { return __bfloat162float(v); }

template <class T> GF_HOST_DEVICE T from_float(float v);
template <> GF_HOST_DEVICE float from_float<float>(float v) { return v; }
template <> GF_HOST_DEVICE half from_float<half>(float v) { return __float2half_rn(v); }
template <> GF_HOST_DEVICE bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

template <class To, class From> GF_HOST_DEVICE To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// Two 16-bit values in one 32-bit register, `lo` in the low half: the element order of mma
// fragments ("Elements (low to high)" in the PTX ISA fragment tables).
template <class T> GF_HOST_DEVICE uint32_t pack2(float lo, float hi) {
  const uint16_t a = bit_cast<uint16_t>(from_float<T>(lo));
  const uint16_t b = bit_cast<uint16_t>(from_float<T>(hi));
  return uint32_t(a) | (uint32_t(b) << 16);
}

template <class T> GF_HOST_DEVICE void unpack2(uint32_t v, float& lo, float& hi) {
  lo = to_float<T>(bit_cast<T>(uint16_t(v & 0xffffu)));
  hi = to_float<T>(bit_cast<T>(uint16_t(v >> 16)));
}

}  // namespace gf
