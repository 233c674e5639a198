// The primitives of gf.h on the CPU execution layer (csrc/sim/runtime.h). Each one does what the
// PTX ISA says the instruction does, and checks what the hardware requires of its operands
// (alignment, all 32 lanes at the same collective, shared memory in bounds and race-free).
#pragma once

#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>

#include "sim/runtime.h"

// CUDA's built-in variables and qualifiers: host_defines.h (included by cuda_fp16.h) already
// makes __global__, __device__ and __host__ empty and __forceinline__ an always_inline inline.
#define threadIdx (::gf::sim::view().thread_idx)
#define blockIdx (::gf::sim::view().block_idx)
#define blockDim (::gf::sim::view().block_dim)
#define gridDim (::gf::sim::view().grid_dim)
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace gf {

using Site = std::source_location;
constexpr unsigned kFullMask = 0xffffffffu;

GF_DEVICE int lane_id() { return sim::view().linear & 31; }
GF_DEVICE int warp_id() { return sim::view().linear >> 5; }

// ---- shared memory ----------------------------------------------------------------------------

// A reference to one T in the block's shared memory: reads and writes are recorded (race and
// bounds checks) and must be aligned to alignof(T). Read it into a typed local (`float x = p[i];`)
// before using it in expressions with templates (std::max) that cannot see through the proxy.
template <class T>
class SmemRef {
 public:
  explicit SmemRef(uint32_t off) : off_(off) {}
  SmemRef(const SmemRef&) = default;

  operator T() const {
    check_align();
    sim::smem_read(off_, sizeof(T), "shared-memory load");
    T v;
    std::memcpy(&v, sim::smem_base() + off_, sizeof(T));
    return v;
  }
  T load() const { return T(*this); }
  const SmemRef& operator=(const T& v) const {
    check_align();
    sim::smem_write(off_, sizeof(T), "shared-memory store");
    std::memcpy(sim::smem_base() + off_, &v, sizeof(T));
    return *this;
  }
  const SmemRef& operator=(const SmemRef& other) const { return *this = T(other); }
  template <class U> const SmemRef& operator+=(const U& v) const { return *this = T(T(*this) + v); }
  template <class U> const SmemRef& operator-=(const U& v) const { return *this = T(T(*this) - v); }
  template <class U> const SmemRef& operator*=(const U& v) const { return *this = T(T(*this) * v); }

 private:
  void check_align() const {
    if (off_ % alignof(T) != 0)
      sim::fail("shared-memory access of " + std::to_string(sizeof(T)) + " bytes at offset " +
                std::to_string(off_) + ", not aligned to " + std::to_string(alignof(T)));
  }
  uint32_t off_;
};

// A pointer into the block's dynamic shared memory (an offset from its start on the CPU, a plain
// T* on the GPU). Indexing gives an SmemRef.
template <class T>
class SmemPtr {
 public:
  SmemPtr() = default;
  explicit SmemPtr(uint32_t off) : off_(off) {}
  template <class U, std::enable_if_t<std::is_convertible_v<U*, T*>, int> = 0>
  SmemPtr(SmemPtr<U> other) : off_(other.offset()) {}

  SmemRef<std::remove_const_t<T>> operator[](int64_t i) const {
    return SmemRef<std::remove_const_t<T>>(uint32_t(int64_t(off_) + i * int64_t(sizeof(T))));
  }
  SmemRef<std::remove_const_t<T>> operator*() const { return (*this)[0]; }
  SmemPtr operator+(int64_t i) const { return SmemPtr(uint32_t(int64_t(off_) + i * int64_t(sizeof(T)))); }
  SmemPtr operator-(int64_t i) const { return *this + (-i); }
  SmemPtr& operator+=(int64_t i) { return *this = *this + i; }
  uint32_t offset() const { return off_; }

 private:
  uint32_t off_ = 0xffffffffu;
};

template <class U, class T> GF_DEVICE SmemPtr<U> smem_cast(SmemPtr<T> p) { return SmemPtr<U>(p.offset()); }
template <class P> GF_DEVICE uint32_t smem_offset(P p) { return p.offset(); }

// Carves the launch's dynamic shared memory in order; every thread carves the same sequence and
// so gets the same pointers. The host sizes the launch with the same rule (smem_align_up).
class SmemArena {
 public:
  template <class T>
  SmemPtr<T> take(size_t count, size_t align = 16, Site site = Site::current()) {
    const size_t start = smem_align_up(off_, align);
    const size_t end = start + count * sizeof(T);
    if (end > sim::smem_size())
      sim::fail("the shared-memory arena needs " + std::to_string(end) +
                " bytes but the launch gave the block " + std::to_string(sim::smem_size()), site);
    off_ = end;
    return SmemPtr<T>(uint32_t(start));
  }
  size_t used() const { return off_; }

 private:
  size_t off_ = 0;
};
GF_DEVICE SmemArena smem_arena() { return SmemArena(); }

// ---- barriers and warp collectives ---------------------------------------------------------------

GF_DEVICE void sync_block(Site site = Site::current()) { sim::barrier(site); }

namespace detail {
inline void resolve_sync_warp(sim::Lane (&lanes)[32]) { sim::warp_synced(lanes[0].thread / 32); }

enum class Shfl { kXor, kIdx, kDown, kUp };
template <class T> struct ShflIn { T v; int arg; };

// __shfl_*_sync with width 32 (CUDA programming guide, "Warp Shuffle Functions"): lane i reads
// the value of lane src; a source outside the warp (down/up) leaves the lane's own value.
template <class T, Shfl M>
void resolve_shfl(sim::Lane (&lanes)[32]) {
  T vals[32];
  for (int i = 0; i < 32; ++i) vals[i] = static_cast<const ShflIn<T>*>(lanes[i].in)->v;
  for (int i = 0; i < 32; ++i) {
    const int arg = static_cast<const ShflIn<T>*>(lanes[i].in)->arg;
    int src = i;
    if constexpr (M == Shfl::kXor) src = i ^ (arg & 31);
    if constexpr (M == Shfl::kIdx) src = arg & 31;
    if constexpr (M == Shfl::kDown) src = i + arg < 32 ? i + arg : i;
    if constexpr (M == Shfl::kUp) src = i - arg >= 0 ? i - arg : i;
    *static_cast<T*>(lanes[i].out) = vals[src];
  }
}

inline void resolve_ballot(sim::Lane (&lanes)[32]) {
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i)
    if (*static_cast<const int*>(lanes[i].in)) bits |= 1u << i;
  for (int i = 0; i < 32; ++i) *static_cast<unsigned*>(lanes[i].out) = bits;
}

template <class T, Shfl M>
T shfl(const char* op, T v, int arg, Site site) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  ShflIn<T> in{v, arg};
  T out;
  sim::warp_collective(op, kFullMask, &resolve_shfl<T, M>, &in, &out, site);
  return out;
}
}  // namespace detail

GF_DEVICE void sync_warp(Site site = Site::current()) {
  sim::warp_collective("sync_warp", kFullMask, &detail::resolve_sync_warp, nullptr, nullptr, site);
}
template <class T> GF_DEVICE T shfl_xor(T v, int lane_mask, Site site = Site::current()) {
  return detail::shfl<T, detail::Shfl::kXor>("shfl_xor", v, lane_mask, site);
}
template <class T> GF_DEVICE T shfl_idx(T v, int src_lane, Site site = Site::current()) {
  return detail::shfl<T, detail::Shfl::kIdx>("shfl_idx", v, src_lane, site);
}
template <class T> GF_DEVICE T shfl_down(T v, int delta, Site site = Site::current()) {
  return detail::shfl<T, detail::Shfl::kDown>("shfl_down", v, delta, site);
}
template <class T> GF_DEVICE T shfl_up(T v, int delta, Site site = Site::current()) {
  return detail::shfl<T, detail::Shfl::kUp>("shfl_up", v, delta, site);
}
GF_DEVICE unsigned ballot(bool pred, Site site = Site::current()) {
  int in = pred ? 1 : 0;
  unsigned out = 0;
  sim::warp_collective("ballot", kFullMask, &detail::resolve_ballot, &in, &out, site);
  return out;
}

// ---- ldmatrix ------------------------------------------------------------------------------------
// PTX ISA 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix", .m8n8 .b16: lanes 8j..8j+7
// give the addresses of rows 0..7 of matrix j (x1: j = 0, x2: j < 2, x4: j < 4), each row 16
// contiguous bytes, 16-byte aligned, in shared memory. Destination register j of lane t holds
// elements (row t/4, cols 2*(t%4), 2*(t%4)+1) of matrix j, the lower column in the low half;
// with .trans it holds (rows 2*(t%4), 2*(t%4)+1, col t/4) instead, the lower row in the low half.
namespace detail {
struct LdmIn {
  uint32_t off;
  Site site;
};

template <int N, bool Trans>
void resolve_ldmatrix(sim::Lane (&lanes)[32]) {
  uint16_t m[N][8][8];
  for (int j = 0; j < N; ++j) {
    for (int r = 0; r < 8; ++r) {
      const sim::Lane& lane = lanes[8 * j + r];
      const LdmIn& in = *static_cast<const LdmIn*>(lane.in);
      if (in.off % 16 != 0)
        sim::fail("ldmatrix row address (shared offset " + std::to_string(in.off) + ", lane " +
                  std::to_string(8 * j + r) + ") not 16-byte aligned", in.site);
      sim::smem_read_by(lane.thread, in.off, 16, "ldmatrix");
      std::memcpy(m[j][r], sim::smem_base() + in.off, 16);
    }
  }
  for (int t = 0; t < 32; ++t) {
    uint32_t* out = static_cast<uint32_t*>(lanes[t].out);
    const int g = t / 4, q = t % 4;
    for (int j = 0; j < N; ++j) {
      const uint16_t lo = Trans ? m[j][2 * q][g] : m[j][g][2 * q];
      const uint16_t hi = Trans ? m[j][2 * q + 1][g] : m[j][g][2 * q + 1];
      out[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

template <int N, bool Trans, class P>
void ldmatrix(uint32_t (&r)[N], P row, Site site) {
  LdmIn in{row.offset(), site};
  static const char* names[2][5] = {{"", "ldmatrix_x1", "ldmatrix_x2", "", "ldmatrix_x4"},
                                    {"", "ldmatrix_x1_trans", "ldmatrix_x2_trans", "",
                                     "ldmatrix_x4_trans"}};
  sim::warp_collective(names[Trans][N], kFullMask, &resolve_ldmatrix<N, Trans>, &in, r, site);
}
}  // namespace detail

template <class P> GF_DEVICE void ldmatrix_x1(uint32_t (&r)[1], P row, Site s = Site::current()) { detail::ldmatrix<1, false>(r, row, s); }
template <class P> GF_DEVICE void ldmatrix_x2(uint32_t (&r)[2], P row, Site s = Site::current()) { detail::ldmatrix<2, false>(r, row, s); }
template <class P> GF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], P row, Site s = Site::current()) { detail::ldmatrix<4, false>(r, row, s); }
template <class P> GF_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], P row, Site s = Site::current()) { detail::ldmatrix<1, true>(r, row, s); }
template <class P> GF_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], P row, Site s = Site::current()) { detail::ldmatrix<2, true>(r, row, s); }
template <class P> GF_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], P row, Site s = Site::current()) { detail::ldmatrix<4, true>(r, row, s); }

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 ------------------------------
// PTX ISA 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type"
// (groupID = lane >> 2, threadID_in_group = lane % 4):
//   A (16x16), a0..a7 in 4 registers (two per register, low half first):
//       row = groupID for a0, a1, a4, a5; groupID + 8 for a2, a3, a6, a7
//       col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4
//   B (16x8), b0..b3 in 2 registers: row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2;
//       col = groupID
//   C, D (16x8 fp32), c0..c3: row = groupID for c0, c1, groupID + 8 for c2, c3;
//       col = threadID_in_group * 2 + (i & 1)
// D = A * B + C. Each product of two 16-bit floats is exact in double; the sum is formed in double
// and rounded once to fp32 (exact, hence bit-equal to the hardware, whenever the exact sum fits in
// fp32's 24 bits; tensor cores otherwise round differently: compare within a tolerance).
namespace detail {
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

inline int mma_a_row(int lane, int i) { return (lane >> 2) + (((i >> 1) & 1) ? 8 : 0); }
inline int mma_a_col(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
inline int mma_b_row(int lane, int i) { return (lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
inline int mma_b_col(int lane, int) { return lane >> 2; }
inline int mma_c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
inline int mma_c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

template <class T>
void resolve_mma(sim::Lane (&lanes)[32]) {
  double A[16][16], B[16][8], C[16][8];
  for (int t = 0; t < 32; ++t) {
    const MmaIn& in = *static_cast<const MmaIn*>(lanes[t].in);
    for (int i = 0; i < 8; ++i) {
      float lo, hi;
      unpack2<T>(in.a[i / 2], lo, hi);
      A[mma_a_row(t, i)][mma_a_col(t, i)] = (i & 1) ? hi : lo;
    }
    for (int i = 0; i < 4; ++i) {
      float lo, hi;
      unpack2<T>(in.b[i / 2], lo, hi);
      B[mma_b_row(t, i)][mma_b_col(t, i)] = (i & 1) ? hi : lo;
    }
    for (int i = 0; i < 4; ++i) C[mma_c_row(t, i)][mma_c_col(t, i)] = in.c[i];
  }
  for (int t = 0; t < 32; ++t) {
    float* d = static_cast<float*>(lanes[t].out);
    for (int i = 0; i < 4; ++i) {
      const int r = mma_c_row(t, i), c = mma_c_col(t, i);
      double acc = C[r][c];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];
      d[i] = float(acc);
    }
  }
}
}  // namespace detail

template <class T>
GF_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const float (&c)[4], Site site = Site::current()) {
  static_assert(std::is_same_v<T, half> || std::is_same_v<T, bf16>, "mma: fp16 or bf16 inputs");
  detail::MmaIn in;
  std::memcpy(in.a, a, sizeof(in.a));
  std::memcpy(in.b, b, sizeof(in.b));
  std::memcpy(in.c, c, sizeof(in.c));
  float out[4];
  sim::warp_collective(std::is_same_v<T, half> ? "mma_m16n8k16_f16" : "mma_m16n8k16_bf16",
                       kFullMask, &detail::resolve_mma<T>, &in, out, site);
  std::memcpy(d, out, sizeof(out));
}

// ---- cp.async (PTX ISA 9.7.9.25 "cp.async") -------------------------------------------------------
// Copies cp-size (4, 8, 16) bytes from global to shared memory, both aligned to cp-size; bytes
// past src-size are zero-filled. On the CPU the destination reads as NaN (0xFF bytes) and is owned
// by the copy until the cp_async_wait that completes its group writes it.
template <int Bytes, class P>
GF_DEVICE void cp_async(P dst, const void* src, int src_bytes = Bytes, Site site = Site::current()) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  sim::cp_async(dst.offset(), src, Bytes, src_bytes, site);
}
GF_DEVICE void cp_async_commit(Site site = Site::current()) { sim::cp_async_commit(site); }
template <int N> GF_DEVICE void cp_async_wait(Site site = Site::current()) { sim::cp_async_wait(N, site); }

// ---- global memory ------------------------------------------------------------------------------

template <class V, class T>
GF_DEVICE V load_global(const T* p, Site site = Site::current()) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V) != 0)
    sim::fail("vector load of " + std::to_string(sizeof(V)) + " bytes from an address not aligned to " +
              std::to_string(sizeof(V)), site);
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, class T>
GF_DEVICE void store_global(T* p, const V& v, Site site = Site::current()) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V) != 0)
    sim::fail("vector store of " + std::to_string(sizeof(V)) + " bytes to an address not aligned to " +
              std::to_string(sizeof(V)), site);
  std::memcpy(p, &v, sizeof(V));
}

GF_DEVICE float atomic_add(float* p, float v, Site site = Site::current()) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(float) != 0) sim::fail("misaligned fp32 atomic", site);
  return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}

// ---- math ----------------------------------------------------------------------------------------

// mul.hi.u32 (PTX ISA 9.7.1.6): the high 32 bits of the 64-bit product.
GF_DEVICE uint32_t umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }

// ex2.approx.ftz.f32 (PTX ISA 9.7.3.22): 2^x, subnormal inputs and results flushed to zero. The
// hardware's result is within 2 ulp of the exact value; std::exp2 is within 1 ulp.
GF_DEVICE float exp2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// ---- launch ---------------------------------------------------------------------------------------

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, const DeviceInfo& device,
            Args&&... args) {
  std::function<void()> body = [kernel, tuple = std::make_tuple(Params(std::forward<Args>(args))...)]() {
    std::apply(kernel, tuple);
  };
  sim::launch(config, device, body);
}

}  // namespace gf
