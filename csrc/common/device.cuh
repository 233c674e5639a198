// The primitives of gf.h on the GPU: CUDA intrinsics and inline PTX (sm_80 and newer). The
// CPU execution layer's versions (sim_primitives.h) cite the PTX ISA sections these follow.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace gf {

constexpr unsigned kFullMask = 0xffffffffu;

GF_DEVICE int linear_thread() {
  return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
GF_DEVICE int lane_id() { return linear_thread() & 31; }
GF_DEVICE int warp_id() { return linear_thread() >> 5; }

// ---- shared memory ----------------------------------------------------------------------------

template <class T> using SmemPtr = T*;
template <class U, class T> GF_DEVICE U* smem_cast(T* p) { return reinterpret_cast<U*>(p); }
template <class T> GF_DEVICE uint32_t smem_offset(T* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

extern __shared__ __align__(16) unsigned char gf_dynamic_smem[];

class SmemArena {
 public:
  template <class T>
  GF_DEVICE T* take(size_t count, size_t align = 16) {
    const size_t start = (off_ + align - 1) / align * align;
    off_ = start + count * sizeof(T);
    return reinterpret_cast<T*>(gf_dynamic_smem + start);
  }
  GF_DEVICE size_t used() const { return off_; }

 private:
  size_t off_ = 0;
};
GF_DEVICE SmemArena smem_arena() { return SmemArena(); }

// ---- barriers and warp collectives ---------------------------------------------------------------

GF_DEVICE void sync_block() { __syncthreads(); }
GF_DEVICE void sync_warp() { __syncwarp(kFullMask); }
template <class T> GF_DEVICE T shfl_xor(T v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
template <class T> GF_DEVICE T shfl_idx(T v, int src_lane) { return __shfl_sync(kFullMask, v, src_lane); }
template <class T> GF_DEVICE T shfl_down(T v, int delta) { return __shfl_down_sync(kFullMask, v, delta); }
template <class T> GF_DEVICE T shfl_up(T v, int delta) { return __shfl_up_sync(kFullMask, v, delta); }
GF_DEVICE unsigned ballot(bool pred) { return __ballot_sync(kFullMask, pred); }

// ---- ldmatrix (PTX ISA 9.7.14.5.15) ----------------------------------------------------------------

GF_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(smem_offset(row)));
}
GF_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_offset(row)));
}
GF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_offset(row)));
}
GF_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(smem_offset(row)));
}
GF_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_offset(row)));
}
GF_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_offset(row)));
}

// ---- mma.sync m16n8k16, fp32 accumulate (PTX ISA 9.7.14.5.8) -------------------------------------

template <class T>
GF_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const float (&c)[4]);

template <>
GF_DEVICE void mma_m16n8k16<half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

template <>
GF_DEVICE void mma_m16n8k16<bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

// ---- cp.async (PTX ISA 9.7.9.25) -----------------------------------------------------------------

template <int Bytes>
GF_DEVICE void cp_async(void* dst, const void* src, int src_bytes = Bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (Bytes == 16) {
    // .cg: cache in L2 only, the usual choice for tiles streamed through shared memory.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_offset(dst)), "l"(src), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :: "r"(smem_offset(dst)), "l"(src), "n"(Bytes), "r"(src_bytes) : "memory");
  }
}
GF_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> GF_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// ---- global memory ------------------------------------------------------------------------------

template <class V, class T> GF_DEVICE V load_global(const T* p) { return *reinterpret_cast<const V*>(p); }
template <class V, class T> GF_DEVICE void store_global(T* p, const V& v) { *reinterpret_cast<V*>(p) = v; }
GF_DEVICE float atomic_add(float* p, float v) { return atomicAdd(p, v); }

// ---- math ----------------------------------------------------------------------------------------

GF_DEVICE uint32_t umulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }

GF_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- launch --------------------------------------------------------------------------------------

template <class... Params, class... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, const DeviceInfo& device,
            Args&&... args) {
  check_launch(config, device);
  if (config.smem_opt_in) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(config.smem));
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("launch of ") + config.name +
                               ": cudaFuncSetAttribute: " + cudaGetErrorString(e));
  }
  kernel<<<config.grid, config.block, config.smem, config.stream>>>(
      Params(std::forward<Args>(args))...);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("launch of ") + config.name + ": " + cudaGetErrorString(e));
}

}  // namespace gf
